"""What a person watching a run sees: the phase in progress (live on a terminal), one line per step
and per validation, and the reward curve at the end."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.markup import escape
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


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


class ConsoleReporter:
    """Human-facing progress: the current phase (live on a terminal) and a line per step."""

    def __init__(self, console: Console | None = None, quiet: bool = False):
        self.console = console or Console(stderr=True)
        self.quiet = quiet
        self._status = None

    def phase(self, text: str) -> None:
        if self.quiet:
            return
        if self._status is None:
            self._status = self.console.status(escape(text))
            self._status.start()
        else:
            self._status.update(escape(text))

    def done(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def info(self, text: str) -> None:
        if not self.quiet:
            self.done()
            self.console.print(text, soft_wrap=True)  # one line per event, also in CI logs

    def step(self, record: dict[str, Any], max_steps: int) -> None:
        if record.get("skipped"):
            self.info(
                f"step {record['step']}/{max_steps}  reward {_fmt(record['reward_mean'])}  "
                f"[yellow]skipped: {record['skipped']}[/]"
            )
            return
        self.info(
            f"step {record['step']}/{max_steps}  reward {_fmt(record['reward_mean'])} "
            f"(kept {_fmt(record['reward_kept_mean'])}, {record['kept']}/{record['rollouts']} kept)  "
            f"loss {_fmt(record.get('loss'))}  gen {_fmt(record['time_generate'], 1)}s "
            f"train {_fmt(record.get('time_train'), 1)}s"
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
