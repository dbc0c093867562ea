"""Reading a run directory back: ``metrics.jsonl`` and ``rollouts/step_N.jsonl``, from a finished run
or one still being written.

A live run may be caught mid-line, and a killed one leaves a torn last line: a line that does not parse
is skipped, never fatal. A resumed run can repeat a step (the latest record of a step wins), and a
metric may be ``null`` (a NaN that step) or absent (a feature not configured): readers see ``None``.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from thresher.core.errors import DataError

METRICS = "metrics.jsonl"
MARKER = ".thresher-run"
ROLLOUT_FILE = re.compile(r"step_(\d+)\.jsonl")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a JSONL file; lines that do not parse (a torn last line) are skipped."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def number(value: Any) -> float | None:
    """A metric as a float, or None where it is missing, null, non-finite or not a number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass
class RunRecords:
    """One run's metrics, by kind, one record per step (sorted by step)."""

    path: Path
    label: str
    train: list[dict[str, Any]] = field(default_factory=list)
    validation: list[dict[str, Any]] = field(default_factory=list)
    stop: dict[str, Any] | None = None

    def records(self, kind: str) -> list[dict[str, Any]]:
        return self.train if kind == "train" else self.validation

    @property
    def finished(self) -> bool:
        """A final model was written: the run ended normally (not merely paused or still going)."""
        return (self.path / "final").is_dir()

    @property
    def selector(self) -> str:
        """The run's ``selector.type`` from its config.yaml ("" if unreadable): what tells baselines apart."""
        try:
            config = yaml.safe_load((self.path / "config.yaml").read_text(encoding="utf-8"))
            selector = config["selector"]["type"]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return ""
        return str(selector)

    @property
    def last_time(self) -> float | None:
        times = [number(r.get("time")) for r in [*self.train, *self.validation]]
        return max((t for t in times if t is not None), default=None)


def check_run_dir(path: Path) -> None:
    """Fail with one line naming ``path`` unless it is a Thresher run directory."""
    if not path.exists():
        raise DataError(f"{path}: no such directory")
    if not path.is_dir():
        raise DataError(f"{path}: not a run directory (a file, not a directory)")
    if (path / METRICS).is_file() or (path / MARKER).is_file():
        return
    inside = sorted(str(child) for child in path.iterdir() if (child / METRICS).is_file())
    more = f" and {len(inside) - 5} more" if len(inside) > 5 else ""
    hint = f"; run directories inside it: {', '.join(inside[:5])}{more}" if inside else ""
    raise DataError(f"{path}: not a run directory (no {METRICS}){hint}")


def load_run(path: Path, label: str) -> RunRecords:
    """The run's metrics by kind; a step recorded twice (a resumed run) keeps its latest record."""
    check_run_dir(path)
    by_kind: dict[str, dict[int, dict[str, Any]]] = {"train": {}, "validation": {}}
    stop = None
    for record in read_jsonl(path / METRICS):
        kind = record.get("kind")
        if kind == "stop":
            stop = record
            continue
        step = record.get("step")
        if kind in by_kind and isinstance(step, int) and not isinstance(step, bool):
            by_kind[kind][step] = record
    return RunRecords(
        path=path,
        label=label,
        train=[by_kind["train"][s] for s in sorted(by_kind["train"])],
        validation=[by_kind["validation"][s] for s in sorted(by_kind["validation"])],
        stop=stop,
    )


def run_labels(paths: list[Path]) -> list[str]:
    """Each run's directory name; where names clash, as many parent folders as tell the runs apart.

    The same directory given twice gets ``#2``, ``#3``, ... appended.
    """
    resolved = [path.resolve() for path in paths]
    labels = []
    for path in resolved:
        others = [other.parts for other in resolved if other != path]
        depth = 1
        while depth < len(path.parts) and any(o[-depth:] == path.parts[-depth:] for o in others):
            depth += 1
        labels.append(str(Path(*path.parts[-depth:])))
    seen: dict[str, int] = {}
    unique = []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return unique


def load_runs(paths: list[Path]) -> list[RunRecords]:
    """Every run, labelled by its directory name; fails on the first path that is not a run."""
    for path in paths:
        check_run_dir(path)
    return [load_run(path, label) for path, label in zip(paths, run_labels(paths), strict=True)]


def rollout_steps(path: Path) -> list[int]:
    """Steps with a rollouts file (written whole, by rename: a live run never shows a partial one)."""
    folder = path / "rollouts"
    if not folder.is_dir():
        return []
    return sorted(int(m[1]) for f in folder.iterdir() if (m := ROLLOUT_FILE.fullmatch(f.name)))


def read_rollouts(path: Path, step: int) -> list[dict[str, Any]]:
    """The rollout records of one step (a line that does not parse is skipped)."""
    return read_jsonl(path / "rollouts" / f"step_{step}.jsonl")


def describe_steps(steps: list[int]) -> str:
    """``1-4, 7, 9-10``: a list of steps, short however long the run."""
    spans: list[list[int]] = []
    for step in steps:
        if spans and step == spans[-1][1] + 1:
            spans[-1][1] = step
        else:
            spans.append([step, step])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
