"""``thresher serve-rm``: serve any registered scorer as one Triton model (NeMo-Aligner's reward
contract, see :mod:`thresher.scorers.triton_server`). The Triton plugin adds this command through
``register_commands``, exactly as a third-party plugin would add one.

    thresher serve-rm --rule my_rewards:exact_answer
    thresher serve-rm --model reward_model_dir --device cuda
    thresher serve-rm --scorer '{type: local, path: reward_model_dir}'
    thresher serve-rm --config run.yaml          # the config's scorer section
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
import yaml

from thresher.commands import user_errors
from thresher.core.errors import ConfigError


def add_serve_rm(app: typer.Typer) -> None:
    @app.command("serve-rm")
    @user_errors
    def serve_rm(
        model: Annotated[
            str | None, typer.Option(help="Reward model directory (one-label sequence classifier).")
        ] = None,
        rule: Annotated[
            str | None, typer.Option(help="Rule reward function: module:function or file.py:function.")
        ] = None,
        scorer: Annotated[
            str | None,
            typer.Option(help="Any registered scorer, as a config section: '{type: local, path: rm_dir}'."),
        ] = None,
        config: Annotated[str | None, typer.Option(help="Serve this config file's (or preset's) scorer.")] = None,
        name: Annotated[str, typer.Option(help="Model name clients ask for.")] = "reward_model",
        host: Annotated[str, typer.Option(help="Address to bind; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
        http_port: Annotated[int, typer.Option(help="HTTP port.")] = 8000,
        grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 8001,
        max_batch_size: Annotated[int, typer.Option(help="Largest batch the dynamic batcher forms.")] = 64,
        queue_delay_us: Annotated[int, typer.Option(help="How long the batcher waits to fill a batch (µs).")] = 1000,
        device: Annotated[str, typer.Option(help="Torch device for --model.")] = "cpu",
        log_file: Annotated[str | None, typer.Option(help="Write Triton's own log here.")] = None,
    ) -> None:
        """Serve a reward model, a rule or any registered scorer on Triton Inference Server."""
        from thresher.scorers.triton_server import RewardModelBackend, RuleBackend, ServeOptions, serve

        given = [flag for flag, value in (("--model", model), ("--rule", rule), ("--scorer", scorer),
                                          ("--config", config)) if value is not None]  # fmt: skip
        if len(given) != 1:
            raise ConfigError(
                ["serve-rm: give exactly one of --model DIR, --rule module:function, --scorer SECTION or --config FILE"]
            )
        backend: Any
        if rule:
            backend, source = RuleBackend(rule), f"rule {rule}"
        elif model:
            backend, source = RewardModelBackend(model, device=device), f"model {model}"
        else:
            backend, source = scorer_backend(scorer, config)
        options = ServeOptions(name, host, http_port, grpc_port, max_batch_size, queue_delay_us, log_file)

        def ready(http_url: str, grpc_url: str) -> None:
            typer.echo(
                f"serving reward model {name!r} ({source}) at {http_url} and {grpc_url}; Ctrl-C to stop", err=True
            )
            typer.echo(f"ready {grpc_url} {http_url}")

        try:
            serve(backend, options, ready)
        finally:
            backend.close()
        typer.echo("stopped", err=True)


def scorer_backend(section_text: str | None, config_source: str | None) -> tuple[Any, str]:
    """Build the scorer a ``--scorer`` section or a config file's ``scorer`` section names."""
    from thresher.core.build import instantiate
    from thresher.core.config import read_config_file, resolve_plugin_section
    from thresher.core.registry import build_registry
    from thresher.core.types import PluginContext
    from thresher.scorers.triton_server import ScorerBackend

    registry = build_registry()
    if config_source is not None:
        section = read_config_file(config_source).get("scorer")
        if section is None:
            raise ConfigError([f"--config {config_source}: has no scorer section"])
        where = f"--config {config_source}: scorer"
    else:
        try:
            section = yaml.safe_load(section_text)
        except yaml.YAMLError as err:
            raise ConfigError([f"--scorer: not a YAML mapping ({getattr(err, 'problem', err)})"]) from None
        where = "--scorer"
    spec = resolve_plugin_section("scorer", section, registry, where)
    scorer = instantiate(registry, "scorer", spec, PluginContext(registry=registry))
    return ScorerBackend(scorer), f"scorer {spec.type}"
