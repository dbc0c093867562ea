"""Plugin registration: built-ins and third parties through the same hooks and rules."""

from __future__ import annotations

import json
import re
import textwrap
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from pydantic import BaseModel

import thresher
from tests.helpers import IdleGenerator
from thresher.core.config import load_config
from thresher.core.console import ConsoleReporter
from thresher.core.errors import PluginError
from thresher.core.registry import build_registry, get_plugin_manager
from thresher.core.runner import Run

DOCS = Path(__file__).resolve().parents[2] / "docs" / "plugin_hooks.md"


class LastRolloutSelector:
    """A third-party selector: always keeps the last rollout of each prompt (easy to recognise)."""

    name: ClassVar[str] = "last_rollout"
    calls: ClassVar[int] = 0

    class Config(BaseModel):
        pass

    def __init__(self, config, context=None):
        self.config = config

    def select(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        kept = torch.zeros_like(valid)
        kept[:, -1] = True
        return kept


class LastRolloutPlugin:
    @thresher.hookimpl
    def register_selectors(self, register):
        register(LastRolloutSelector)


def test_builtins_are_registered(registry):
    assert registry.names("generator") == ["hf", "vllm"]
    assert registry.names("scorer") == ["combine", "local", "rule", "triton"]
    assert registry.names("selector") == ["band", "chain", "global_top_fraction", "random", "threshold", "topk"]
    assert registry.names("loss") == ["masked_mean_logprob", "raft_pp", "reinforce_rej"]
    assert registry.names("logger") == ["jsonl", "mlflow", "tensorboard", "wandb"]


def test_unknown_name_lists_what_is_available(registry):
    available = "band, chain, global_top_fraction, random, threshold, topk"
    with pytest.raises(PluginError, match=rf"unknown selector 'best'; available: {available}"):
        registry.get("selector", "best")


def test_duplicate_name_is_an_error(plugin_manager):
    class AnotherTopK(LastRolloutSelector):
        name = "topk"

    class Duplicate:
        @thresher.hookimpl
        def register_selectors(self, register):
            register(AnotherTopK)

    plugin_manager.register(Duplicate(), name="duplicate")
    with pytest.raises(PluginError, match=r"duplicate selector name 'topk': registered by .*TopKSelector and again by"):
        build_registry(plugin_manager)


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"Config": BaseModel, "select": lambda s, r, v: v}, "needs a non-empty string class attribute `name`"),
        ({"name": "x", "select": lambda s, r, v: v}, "needs a nested pydantic `Config` model"),
        ({"name": "x", "Config": BaseModel}, "missing selector method\\(s\\): select"),
    ],
)
def test_malformed_plugin_classes_are_rejected(plugin_manager, attributes, message):
    broken = type("Broken", (), attributes)

    class Registers:
        @thresher.hookimpl
        def register_selectors(self, register):
            register(broken)

    plugin_manager.register(Registers(), name="broken")
    with pytest.raises(PluginError, match=message):
        build_registry(plugin_manager)


def test_hook_implementation_may_take_a_subset_of_arguments(plugin_manager):
    class NoArguments:
        @thresher.hookimpl
        def register_selectors(self):
            pass

    plugin_manager.register(NoArguments(), name="no-args")
    assert "topk" in build_registry(plugin_manager).names("selector")


@pytest.fixture
def installed_plugin(tmp_path, monkeypatch):
    """A real installed distribution with an entry point in group `thresher`, on sys.path."""
    (tmp_path / "thresher_fancy.py").write_text(
        textwrap.dedent(
            """
            import torch
            from pydantic import BaseModel
            import thresher

            class ConstantScorer:
                name = "constant"
                class Config(BaseModel):
                    value: float = 1.0
                def __init__(self, config, context=None):
                    self.config = config
                def score(self, rollouts):
                    return torch.full((len(rollouts),), self.config.value)
                def close(self):
                    pass

            @thresher.hookimpl
            def register_scorers(register):
                register(ConstantScorer)
            """
        )
    )
    dist = tmp_path / "thresher_fancy-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: thresher-fancy\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[thresher]\nfancy = thresher_fancy\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("THRESHER_LOAD_PLUGINS", raising=False)
    return "constant"


def test_entry_point_plugins_are_discovered(installed_plugin):
    registry = build_registry(get_plugin_manager(load_entrypoints=True))
    assert installed_plugin in registry.names("scorer")
    assert (
        "fancy" in registry.origins[("scorer", "constant")]
        or "thresher_fancy" in registry.origins[("scorer", "constant")]
    )


def test_load_plugins_allow_list_can_exclude_entry_points(installed_plugin, monkeypatch):
    monkeypatch.setenv("THRESHER_LOAD_PLUGINS", "")
    assert installed_plugin not in build_registry(get_plugin_manager()).names("scorer")
    monkeypatch.setenv("THRESHER_LOAD_PLUGINS", "fancy")
    assert installed_plugin in build_registry(get_plugin_manager()).names("scorer")


def test_plugins_command_lists_third_party_config_fields(installed_plugin, cli, plugin_manager):
    plugin_manager.load_setuptools_entrypoints("thresher")
    result = cli("plugins", "--json")
    assert result.exit_code == 0, result.output
    listing = json.loads(result.output)
    constant = next(p for p in listing["scorer"] if p["name"] == "constant")
    assert constant["fields"] == [{"name": "value", "type": "float", "default": 1.0, "description": ""}]
    rule = next(p for p in listing["scorer"] if p["name"] == "rule")
    assert [f["name"] for f in rule["fields"]] == ["function", "batch_size"]
    assert rule["fields"][0]["default"] == "(required)"


def test_third_party_selector_is_used_by_a_run(plugin_manager, tiny_config, write_config):
    plugin_manager.register(LastRolloutPlugin(), name="last-rollout")
    registry = build_registry(plugin_manager)
    tiny_config["selector"] = {"type": "last_rollout"}
    tiny_config["rs"]["max_steps"] = 2
    config = load_config(write_config(tiny_config), [], registry)
    LastRolloutSelector.calls = 0
    with Run(config, registry=registry, reporter=ConsoleReporter(quiet=True)) as run:
        run.train()
    assert LastRolloutSelector.calls == 2
    n = tiny_config["rs"]["num_rollouts_per_prompt"]
    for step in (1, 2):
        rows = [json.loads(line) for line in (Path(config.output.dir) / "rollouts" / f"step_{step}.jsonl").open()]
        assert [r["kept"] for r in rows] == [r["sample"] == n - 1 for r in rows]


# Every hook has a documentation section and a test of its own (the datasette convention).


def test_every_hook_is_documented_and_tested(plugin_manager):
    hooks = [name for name in dir(plugin_manager.hook) if not name.startswith("_")]
    assert hooks, "no hooks found"
    docs = DOCS.read_text()
    tests = set(globals())
    for hook in hooks:
        assert re.search(rf"^## `{hook}\(", docs, flags=re.MULTILINE), f"docs/plugin_hooks.md lacks {hook}"
        assert f"test_hook_{hook}" in tests, f"no test_hook_{hook}"


def _registered(plugin_manager, plugin, kind):
    plugin_manager.register(plugin, name=f"test-{kind}")
    return build_registry(plugin_manager)


def test_hook_register_generators(plugin_manager):
    class MyGenerator(IdleGenerator):
        name = "mine"

        class Config(BaseModel):
            pass

    class Plugin:
        @thresher.hookimpl
        def register_generators(self, register):
            register(MyGenerator)

    assert _registered(plugin_manager, Plugin(), "generator").get("generator", "mine") is MyGenerator


def test_hook_register_scorers(installed_plugin):
    assert "constant" in build_registry(get_plugin_manager()).names("scorer")


def test_hook_register_selectors(plugin_manager):
    assert _registered(plugin_manager, LastRolloutPlugin(), "selector").get("selector", "last_rollout")


def test_hook_register_losses(plugin_manager):
    class SumLoss:
        name = "sum"

        class Config(BaseModel):
            pass

        def __call__(self, token_logprobs, response_mask, *, num_sequences, num_tokens):
            return -(token_logprobs * response_mask).sum(), {}

    class Plugin:
        @thresher.hookimpl
        def register_losses(self, register):
            register(SumLoss)

    assert _registered(plugin_manager, Plugin(), "loss").get("loss", "sum") is SumLoss


def test_hook_register_loggers(plugin_manager):
    class CountingLogger:
        name = "counting"

        class Config(BaseModel):
            pass

        def log(self, record):
            pass

        def close(self):
            pass

    class NoLog:
        name = "no_log"

        class Config(BaseModel):
            pass

        def close(self):
            pass

    class Plugin:
        @thresher.hookimpl
        def register_loggers(self, register):
            register(CountingLogger)

    registry = _registered(plugin_manager, Plugin(), "logger")
    assert registry.get("logger", "counting") is CountingLogger
    assert registry.names("logger") == ["counting", "jsonl", "mlflow", "tensorboard", "wandb"]
    with pytest.raises(PluginError, match=r"logger plugin '.*NoLog': missing logger method\(s\): log$"):
        registry.add("logger", NoLog)
    assert thresher.register(CountingLogger) is CountingLogger  # the kind is inferred from log/close
    thresher.unregister(CountingLogger)


def test_hook_register_commands(plugin_manager, cli):
    class Plugin:
        @thresher.hookimpl
        def register_commands(self, app):
            @app.command()
            def hello(name: str) -> None:
                """Say hello."""
                print(f"hello {name}")

    plugin_manager.register(Plugin(), name="commands")
    result = cli("hello", "world")
    assert result.exit_code == 0
    assert result.output.strip() == "hello world"
