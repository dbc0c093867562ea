"""What a person watching a run sees: the phase in progress (live on a terminal), one line per step
and per validation, and the reward curve at the end."""

from __future__ import annotations

import math
import threading
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return ""
    low, high = min(finite), max(finite)
    span = (high - low) or 1.0
    return "".join(
        " " if v is None or not math.isfinite(v) else SPARK[int((v - low) / span * (len(SPARK) - 1))] for v in values
    )


def _duration(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h14m``: a remaining time at the precision that matters."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


class ConsoleReporter:
    """Human-facing progress: the phase in progress and one line per step and per validation.

    On a terminal a phase is a live line: a bar with done/total where the phase knows its size
    (responses generated, scored; micro-batches trained), its elapsed time and the run's ETA. Off a
    terminal (a log file, CI) each phase ends with one line saying how long it took, so a log shows
    where a run is and where its time goes; a phase still running prints a line every
    ``heartbeat_s`` seconds (with its count so far), so a log of a slow run — a busy machine, a big
    model — never goes quiet for long.
    """

    def __init__(self, console: Console | None = None, quiet: bool = False, heartbeat_s: float = 30.0):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self.heartbeat_s = heartbeat_s
        self._progress: Progress | None = None
        self._task: Any = None
        self._phase: str | None = None
        self._started = 0.0
        self._count: int = 0  # off a terminal: the phase's progress so far, for its heartbeat
        self._total: int | None = None
        self._heartbeat: threading.Thread | None = None
        self._phase_over = threading.Event()
        self.eta: str = ""  # the run's remaining time, from the steps so far

    def phase(self, text: str, total: int | None = None) -> None:
        """Start a phase (the previous one ends); ``total``: its size, for a bar and ``advance``."""
        if self.quiet:
            return
        self.done()
        self._phase, self._started = text, time.perf_counter()
        self._count, self._total = 0, total
        if not self.console.is_terminal:
            self._start_heartbeat(text)
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            columns += [BarColumn(), MofNCompleteColumn()]
        columns += [TimeElapsedColumn(), TextColumn("{task.fields[eta]}")]
        self._progress = Progress(*columns, console=self.console, transient=True)
        self._task = self._progress.add_task(escape(text), total=total, eta=self._eta_text())
        self._progress.start()

    def advance(self, amount: int = 1) -> None:
        """``amount`` more of the current phase's total is done."""
        self._count += amount
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def done(self) -> None:
        """End the current phase: off a terminal, one line with its duration."""
        self._stop_heartbeat()
        if self._progress is not None:
            self._progress.stop()
            self._progress = self._task = None
        if self._phase is not None and not self.console.is_terminal and not self.quiet:
            self.console.print(f"{escape(self._phase)}: {time.perf_counter() - self._started:.1f} s", soft_wrap=True)
        self._phase = None

    def _start_heartbeat(self, text: str) -> None:
        self._phase_over = threading.Event()
        over, started = self._phase_over, self._started

        def beat() -> None:
            while not over.wait(self.heartbeat_s):
                done = f", {self._count}/{self._total}" if self._total else ""
                elapsed = _duration(time.perf_counter() - started)
                try:
                    self.console.print(f"{escape(text)}: still running ({elapsed}{done})", soft_wrap=True)
                except (OSError, ValueError):  # the stream is gone (a closed log): nothing to tell
                    return

        self._heartbeat = threading.Thread(target=beat, name="thresher-heartbeat", daemon=True)
        self._heartbeat.start()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._phase_over.set()
            self._heartbeat.join()
            self._heartbeat = None

    def _eta_text(self) -> str:
        return f"run ETA {self.eta}" if self.eta else ""

    def warning(self, text: str) -> None:
        """One yellow ``warning:`` line (``text`` may hold rich markup)."""
        self.info(f"[yellow]warning:[/] {text}")

    def info(self, text: str) -> None:
        if not self.quiet:
            self.done()
            self.console.print(text, soft_wrap=True)  # one line per event, also in CI logs

    def step(self, record: dict[str, Any], max_steps: int, seconds_per_step: float | None = None) -> None:
        """The step's line; with ``seconds_per_step`` (the mean so far) also the run's remaining time."""
        remaining = max_steps - int(record["step"])
        self.eta = _duration(seconds_per_step * remaining) if seconds_per_step and remaining > 0 else ""
        eta = f"  ETA {self.eta}" if self.eta else ""
        if record.get("skipped"):
            self.info(
                f"step {record['step']}/{max_steps}  reward {_fmt(record['reward_mean'])}  "
                f"[yellow]skipped: {record['skipped']}[/]{eta}"
            )
            return
        self.info(
            f"step {record['step']}/{max_steps}  reward {_fmt(record['reward_mean'])} "
            f"(kept {_fmt(record['reward_kept_mean'])}, {record['kept']}/{record['rollouts']} kept)  "
            f"loss {_fmt(record.get('loss'))}  gen {_fmt(record['time_generate'], 1)}s "
            f"train {_fmt(record.get('time_train'), 1)}s{eta}"
        )

    def validation(self, record: dict[str, Any]) -> None:
        parts = [f"greedy reward {_fmt(record['val_reward_greedy'])}"]
        if "val_reward_sampled" in record:
            parts.append(f"sampled {_fmt(record['val_reward_sampled'])}")
        if "val_heldout_reward_greedy" in record:
            parts.append(f"held-out scorer greedy {_fmt(record['val_heldout_reward_greedy'])}")
        parts.append(f"distinct-2 {_fmt(record['val_distinct_2_greedy'])}")
        self.info(f"validation after step {record['step']} ({record['val_prompts']} prompts): {', '.join(parts)}")

    def curve(self, train: list[dict[str, Any]], validation: list[dict[str, Any]]) -> None:
        """The reward curve of the run, as a table and a sparkline."""
        if self.quiet or not train:
            return
        self.done()
        table = Table(title="Reward by step", show_edge=False)
        for column in ("step", "reward (all)", "reward (kept)", "accept rate", "loss"):
            table.add_column(column, justify="right")
        for r in train:
            table.add_row(
                str(r["step"]),
                _fmt(r["reward_mean"]),
                _fmt(r["reward_kept_mean"]),
                _fmt(r["accept_rate"]),
                _fmt(r.get("loss")),
            )
        self.console.print(table)
        self.console.print(f"reward (all) by step: {sparkline([r['reward_mean'] for r in train])}")
        if validation:
            points = ", ".join(f"step {v['step']}: {_fmt(v['val_reward_mean'])}" for v in validation)
            self.console.print(f"validation greedy reward: {points}")
