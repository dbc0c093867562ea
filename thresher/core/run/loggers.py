"""Every metrics record to every logger: ``metrics.jsonl`` first, then the configured ``loggers:``.

``metrics.jsonl`` is the run's own record, so a failure to write it stops the run (one line naming
the file). Any other logger failing (a full disk under ``tensorboard/``, a tracking server gone) is
reported once and switched off: hours of training are never lost to a dashboard.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.markup import escape

from thresher.core.build import instantiate
from thresher.core.run.metrics import MetricsWriter
from thresher.core.types import Logger, LogsRollouts, PluginContext

if TYPE_CHECKING:
    from thresher.core.session import Session

# The `jsonl` logger plugin names metrics.jsonl, which the core writes always: listing it changes nothing.
ALWAYS_ON = "jsonl"


class RunLoggers:
    """The loggers of one run (main process only): ``write`` a record, ``log_rollouts`` of a step."""

    def __init__(self, primary: MetricsWriter, others: list[Logger], warn: Any, on_close: Any = None):
        self.primary = primary
        self.others = others
        self.warn = warn  # one line to the user, e.g. ConsoleReporter.info
        self.on_close = on_close  # records the files the loggers wrote in the run directory

    def write(self, record: dict[str, Any]) -> None:
        record = {**record, "time": record.get("time", time.time())}  # every logger sees the same time
        self.primary.write(record)
        self._each("log", lambda logger: logger.log(record))

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        self._each("log_rollouts", lambda logger: logger.log_rollouts(step, rows), LogsRollouts)

    def close(self) -> None:
        try:
            self._each("close", lambda logger: logger.close())
        finally:
            self.primary.close()
            if self.on_close is not None:
                self.on_close()

    def _each(self, what: str, call: Any, capability: type | None = None) -> None:
        for logger in list(self.others):
            if capability is not None and not isinstance(logger, capability):
                continue
            try:
                call(logger)
            except Exception as err:  # the logger's own failure: report it, train on
                self.others.remove(logger)
                reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
                self.warn(
                    f"[yellow]warning:[/] logger {logger.name!r} failed in {what} ({type(err).__name__}"
                    f"{': ' + escape(reason) if reason else ''}); it is switched off for the rest of the run"
                )


class NoLoggers:
    """What processes other than the main one log to: nothing."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        pass

    def close(self) -> None:
        pass


def open_loggers(session: Session) -> RunLoggers | NoLoggers:
    """``metrics.jsonl`` and the configured loggers, for the main process; nothing for the others."""
    if not session.dist.is_main:
        return NoLoggers()
    context = PluginContext(
        tokenizer=session.inputs.tokenizer,
        device=session.device,
        seed=session.config.rs.seed,
        registry=session.registry,
        run_dir=session.run_dir.path,
        resumed_step=session.progress.start_step,
    )
    primary = MetricsWriter(session.run_dir.metrics)
    others: list[Logger] = []
    before = _logger_files(session.run_dir.path)
    try:
        for spec in session.config.loggers:
            if spec.type == ALWAYS_ON:
                continue
            try:
                others.append(instantiate(session.registry, "logger", spec, context))
            except Exception as err:  # a dashboard that cannot start is no reason to lose the run
                reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                session.reporter.info(
                    f"[yellow]warning:[/] logger {spec.type!r} could not start ({escape(reason)}); "
                    "training goes on without it"
                )
    except BaseException:
        for logger in others:
            logger.close()
        primary.close()
        raise
    # What a logger plugin writes into the run directory goes into the manifest, so that
    # ``output.overwrite`` removes it and nothing else: the files it made on opening, and later
    # files in the folders those went to.
    opened = _logger_files(session.run_dir.path) - before
    folders = {path.parent for path in opened if path.parent != session.run_dir.path}
    session.run_dir.record(*sorted(folders), *sorted(opened))

    def record_written() -> None:
        later = {path for path in _logger_files(session.run_dir.path) - before if path.parent in folders}
        session.run_dir.record(*sorted(later - opened))

    return RunLoggers(primary, others, session.reporter.info, on_close=record_written)


def _logger_files(root: Path) -> set[Path]:
    """Files in the run directory outside the folders the core itself writes."""
    core_owned = {"rollouts", "checkpoints", "final"}
    return {
        path
        for path in root.rglob("*")
        if path.relative_to(root).parts[0] not in core_owned and not path.name.startswith(".") and path.is_file()
    }
