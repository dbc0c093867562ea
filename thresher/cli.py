"""The ``thresher`` command line.

    thresher train                       # the built-in demo (SmolLM2-135M learns addition)
    thresher train tiny                  # the tiny preset: seconds, for smoke tests
    thresher train run.yaml --set rs.num_rollouts_per_prompt=8 --set selector.top_n_rollouts=2
    thresher generate run.yaml --out best_of_n.jsonl
    thresher plugins [--json]
    thresher config validate run.yaml
    thresher config schema
    thresher report runs/a runs/b --out report.html
    thresher rollouts runs/a --step 3 --best 2

User mistakes (a config field, a prompt file, a plugin name) print ``error: ...`` lines and exit
with code 2 (config/data) or 3 (scoring); no traceback.
"""

from __future__ import annotations

import json
import os
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pluggy
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from thresher.commands import err_console, user_errors
from thresher.core.errors import ConfigError, ThresherError

DEFAULT_CONFIG = "demo"

ConfigArg = Annotated[str, typer.Argument(help="Config file (YAML/TOML) or preset name: demo, arithmetic, tiny.")]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config value: KEY.PATH=VALUE (repeatable)."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="Only errors and final results.")]


def _registry(pm: pluggy.PluginManager | None = None, warn: bool = True):
    """The plugin registry; each installed plugin that failed to load is one warning line."""
    from thresher.core.registry import build_registry

    registry = build_registry(pm)
    if warn:
        for problem in registry.problems:
            err_console.print(f"[yellow]warning:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    return registry


def build_app(pm: pluggy.PluginManager | None = None) -> typer.Typer:
    """The typer app: the commands below, and any that plugins add through ``register_commands``.
    ``pm`` is the plugin manager the commands build their registry from (default: the installed one)."""
    from thresher.core.registry import call_plugin_hook

    _state.pm = pm
    app = typer.Typer(
        name="thresher",
        help="Rejection-sampling training of language models, composed from plugins.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    for command in (train, generate, plugins, report, rollouts, export):
        app.command()(command)
    config_app = typer.Typer(help="Check and describe run configurations.", no_args_is_help=True)
    config_app.command("validate")(config_validate)
    config_app.command("schema")(config_schema)
    app.add_typer(config_app, name="config")
    call_plugin_hook(_plugin_manager().hook.register_commands, app=app)
    return app


class _State:
    """The plugin manager of the app ``build_app`` made last (tests pass their own)."""

    pm: pluggy.PluginManager | None = None


_state = _State()


def _plugin_manager() -> pluggy.PluginManager:
    from thresher.core.registry import get_plugin_manager

    if _state.pm is None:
        _state.pm = get_plugin_manager()
    return _state.pm


# --- the commands ----------------------------------------------------------------------------------


@user_errors
def train(
    config: ConfigArg = DEFAULT_CONFIG,
    set_: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint.")] = False,
    resume_from: Annotated[
        Path | None, typer.Option("--resume-from", help="Continue from this checkpoint directory.")
    ] = None,
    quiet: QuietOption = False,
    nproc: Annotated[
        int, typer.Option("--nproc", min=1, help="Processes on this machine (runs torchrun for you).")
    ] = 1,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the memory plan (nothing heavy is loaded, nothing written)."),
    ] = False,
) -> None:
    """Run rejection-sampling training (with no CONFIG: the built-in SmolLM2 demo)."""
    from thresher.core.config import load_config
    from thresher.core.console import ConsoleReporter
    from thresher.core.runner import Run

    registry = _registry(_plugin_manager())
    run_config = load_config(config, set_ or [], registry)  # fail here, once, not in every rank
    if dry_run:
        plan = Run(run_config, registry=registry, reporter=ConsoleReporter(err_console, quiet=True)).plan()
        typer.echo(plan.render())
        if not plan.fits:  # scripts can tell: the real run would be refused with the same plan
            raise typer.Exit(ConfigError.exit_code)
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        forwarded = [config, *[a for item in set_ or [] for a in ("--set", item)]]
        forwarded += ["--resume"] if resume else []
        forwarded += ["--resume-from", str(resume_from)] if resume_from else []
        forwarded += ["--quiet"] if quiet else []
        raise typer.Exit(run_torchrun(nproc, forwarded))
    with Run(run_config, registry=registry, reporter=ConsoleReporter(err_console, quiet=quiet)) as run:
        history = run.train(resume=str(resume_from) if resume_from else resume)
    if run.is_main_process:
        typer.echo(f"finished {len(history)} steps; run directory: {run_config.output.dir}")


@user_errors
def generate(
    config: ConfigArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file for the selected pairs.")],
    set_: SetOption = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N prompts.")] = None,
    write_all: Annotated[bool, typer.Option("--all", help="Write every rollout, with its kept flag.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Best-of-N data production: generate, score and select for each training prompt; no training."""
    from thresher.core.config import load_config
    from thresher.core.console import ConsoleReporter
    from thresher.core.runner import Run

    if limit is not None and limit < 1:  # a slice would quietly take all but -limit prompts, or all
        raise ConfigError([f"--limit: expected a number of prompts >= 1, got {limit}"])
    registry = _registry(_plugin_manager())
    run_config = load_config(config, set_ or [], registry)
    check_output_file(out)  # before hours of generation, not after
    with Run(run_config, registry=registry, reporter=ConsoleReporter(err_console, quiet=quiet)) as run:
        counts = run.produce(out, limit=limit, write_all=write_all)
    typer.echo(f"wrote {out}: kept {counts['kept']} of {counts['rollouts']} rollouts for {counts['prompts']} prompts")


@user_errors
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List registered plugins of every kind with their config fields."""
    from thresher.core.registry import KINDS

    registry = _registry(_plugin_manager(), warn=False)
    listing: dict[str, Any] = {
        kind: [
            describe_plugin(registry.get(kind, name), registry.origins[(kind, name)]) for name in registry.names(kind)
        ]
        for kind in KINDS
    }
    listing["not_loaded"] = registry.problems
    if as_json:
        typer.echo(json.dumps(listing, indent=2))
        return
    console = Console()
    if not console.is_terminal:  # piped: one full line per field, never cut to a table's width
        for kind in KINDS:
            for plugin in listing[kind]:
                for f in plugin["fields"] or [{"name": "", "type": "", "default": "", "description": ""}]:
                    default = json.dumps(f["default"]) if f["name"] else ""
                    typer.echo("\t".join([kind, plugin["name"], f["name"], f["type"], default, f["description"]]))
        for problem in registry.problems:
            typer.echo(f"not loaded\t{problem}")
        return
    for problem in registry.problems:
        err_console.print(f"[yellow]not loaded:[/] {escape(problem)}", highlight=False, soft_wrap=True)
    for kind in KINDS:
        table = Table(title=f"{kind} plugins", show_lines=True, title_justify="left")
        table.add_column("name", overflow="fold", no_wrap=False, min_width=8)
        for column in ("field", "type", "default", "description"):
            table.add_column(column, overflow="fold")
        for plugin in listing[kind]:
            fields = plugin["fields"] or [{"name": "", "type": "", "default": "", "description": ""}]
            for i, f in enumerate(fields):
                table.add_row(
                    plugin["name"] if i == 0 else "",
                    f["name"],
                    f["type"],
                    json.dumps(f["default"]) if f["name"] else "",
                    f["description"],
                )
        console.print(table)


@user_errors
def report(
    runs: Annotated[
        list[Path], typer.Argument(metavar="RUN", help="Run directories (output.dir), overlaid in each figure.")
    ],
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE",
            help="HTML report (default: report.html); its PNG and CSV files go in NAME_files/ beside it.",
        ),
    ] = None,
    png: Annotated[
        Path | None,
        typer.Option("--png", metavar="DIR", help="Write only the figures: one PNG and one CSV each, into DIR."),
    ] = None,
) -> None:
    """Figures of one or more runs (finished or live): rewards, accept rate, validation, lengths, speed."""
    from thresher.observe.report import build_report

    if out is None and png is None:
        out = Path("report.html")
    written = build_report(runs, out, png)
    names = ", ".join(f.spec.name for f in written.figures) or "none: no steps recorded yet"
    for folder in written.folders:
        typer.echo(f"wrote {len(written.figures)} figures (PNG + CSV) to {folder}: {names}")
    if written.html is not None:
        typer.echo(f"wrote {written.html}")


@user_errors
def rollouts(
    run: Annotated[Path, typer.Argument(metavar="RUN", help="Run directory (output.dir).")],
    step: Annotated[int | None, typer.Option("--step", metavar="N", help="Step to show (default: the latest).")] = None,
    kept: Annotated[bool, typer.Option("--kept", help="Only kept responses.")] = False,
    rejected: Annotated[bool, typer.Option("--rejected", help="Only rejected responses.")] = False,
    best: Annotated[int | None, typer.Option("--best", metavar="K", help="Per prompt, the K highest rewards.")] = None,
    worst: Annotated[int | None, typer.Option("--worst", metavar="K", help="Per prompt, the K lowest rewards.")] = None,
    grep: Annotated[
        str | None, typer.Option("--grep", metavar="TEXT", help="Responses (or prompts) containing TEXT, any case.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output, nothing truncated.")] = False,
) -> None:
    """Per prompt, the kept and rejected responses of a step with rewards and finish reasons."""
    from thresher.observe.rollouts import Filters, render_lines, rollouts_view

    view = rollouts_view(run, step, Filters(kept, rejected, best, worst, grep))
    if as_json:
        typer.echo(json.dumps(view, indent=2))
        return
    console = Console(highlight=False, soft_wrap=True)
    for line in render_lines(view):
        console.print(line)


@user_errors
def export(
    source: Annotated[
        Path, typer.Argument(metavar="RUN", help="Run directory, or a file `thresher generate --all` wrote.")
    ],
    fmt: Annotated[str, typer.Option("--format", "-f", help="sft, dpo or kto (TRL's trainers' formats).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="JSONL file to write.")],
    steps: Annotated[
        str | None, typer.Option("--steps", metavar="A:B", help="Only these steps (inclusive; A: or :B).")
    ] = None,
    margin: Annotated[float, typer.Option(help="dpo: least reward difference between chosen and rejected.")] = 0.0,
) -> None:
    """A run's rollouts as SFT, DPO or KTO data, each row with its provenance (step, reward, sampling)."""
    from thresher.observe.export import FORMATS, StepRange, write_export

    if fmt not in FORMATS:
        raise ConfigError([f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}"])
    check_output_file(out)
    count = write_export(source, fmt, StepRange.parse(steps), out, margin)
    typer.echo(f"wrote {out}: {count} {fmt} rows")


@user_errors
def config_validate(config: ConfigArg, set_: SetOption = None) -> None:
    """Validate a config file (every problem reported at once); print the resolved config."""
    from thresher.core.config import dump_config, load_config

    resolved = load_config(config, set_ or [], _registry(_plugin_manager()))
    typer.echo(dump_config(resolved), nl=False)
    err_console.print(f"{config}: valid")


@user_errors
def config_schema() -> None:
    """Print the JSON schema of the run config and of every registered plugin's section."""
    from thresher.core.config import RunConfig
    from thresher.core.registry import KINDS

    registry = _registry(_plugin_manager())
    core = RunConfig.model_json_schema()
    for kind in KINDS:
        core["properties"].pop(kind, None)
    schema = {
        "run": core,
        "plugins": {
            kind: {name: registry.get(kind, name).Config.model_json_schema() for name in registry.names(kind)}
            for kind in KINDS
        },
    }
    typer.echo(json.dumps(schema, indent=2))


def check_output_file(out: Path) -> None:
    """``--out`` must be a file we can create: not a directory, in a writable directory."""
    from thresher.core.errors import OutputError

    if out.is_dir():
        raise OutputError(f"--out {out}: is a directory; give a file name, e.g. {out / 'best_of_n.jsonl'}")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"--out {out}: cannot create {parent} ({err.strerror or err})") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"--out {out}: {parent} is not writable")


def run_torchrun(nproc: int, train_args: list[str]) -> int:
    """``torchrun --standalone --nproc-per-node N -m thresher train ...``; one line if it fails."""
    import subprocess

    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        "-m",
        "thresher",
        "train",
        *train_args,
    ]
    code = subprocess.run(command).returncode
    if code != 0:
        err_console.print(
            f"[red]error:[/] the {nproc}-process run failed (torchrun exit {code}); the failing rank's own "
            "message is above. Continue from the last checkpoint with --resume.",
            highlight=False,
            soft_wrap=True,
        )
    return code


def describe_plugin(cls: type[Any], origin: str) -> dict[str, Any]:
    """Name, origin and config fields (name, type, default, description) of a plugin class."""
    fields = []
    for name, info in cls.Config.model_fields.items():
        default = None if info.is_required() else info.get_default(call_default_factory=True)
        fields.append(
            {
                "name": name,
                "type": _type_label(info.annotation),
                "default": default if not info.is_required() else "(required)",
                "description": info.description or "",
            }
        )
    return {"name": cls.name, "origin": origin, "doc": (cls.__doc__ or "").strip().split("\n")[0], "fields": fields}


def _type_label(annotation: Any) -> str:
    """A readable type: ``float | None``, ``'error' | 'skip'``, ``list[str]`` (validators unwrapped)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_label(args[0])
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_label(a) for a in args)
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_label(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def main() -> None:
    """Console-script entry point."""
    try:
        app = build_app()
    except ThresherError as err:  # a broken plugin: report it, do not trace
        err_console.print(f"[red]error:[/] {escape(str(err))}", highlight=False)
        sys.exit(err.exit_code)
    try:
        app()
    except SystemExit as done:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            exit_torchrun_rank(done.code)
        raise


def exit_torchrun_rank(code: object) -> None:
    """End a torchrun rank without running C++ destructors at interpreter exit.

    Everything is written and the process group destroyed by now, but gloo's threads can still be
    torn down by static destructors racing with the interpreter's shutdown: one exit in ~6 under
    CPU load died with SIGABRT ("terminate called without an active exception", no Python frame
    left), which failed the whole job after a complete run. ``os._exit`` skips that phase.
    """
    status = code if isinstance(code, int) else (0 if code is None else 1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
