"""A run's rollouts as training data in the formats TRL's trainers read.

- ``sft``: each kept response, ``{"prompt", "completion"}`` (TRL's prompt-completion format);
- ``dpo``: per prompt and step, ``{"prompt", "chosen", "rejected"}``: the best kept response against
  the prompt's lowest-rewarded one, only when their rewards differ by at least ``margin``;
- ``kto``: each scored response, ``{"prompt", "completion", "label"}``, ``label`` = kept.

The prompt is the text the policy saw (after any chat template), so a trainer given these rows
must not template them again. Every row carries its provenance: the run, the step, the policy that
sampled it (``policy_step``: the updates made before that step), its reward and reward parts, and the
generator's sampling settings. The source is a run directory (``rollouts/step_N.jsonl``) or a file
``thresher generate --all`` wrote (its rows have every rollout with its ``kept`` flag).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from thresher.core.datasource import read_jsonl
from thresher.core.errors import DataError

Format = Literal["sft", "dpo", "kto"]
FORMATS: tuple[Format, ...] = ("sft", "dpo", "kto")
SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_p", "top_k")
STEP_FILE = re.compile(r"step_(\d+)\.jsonl$")


@dataclass(frozen=True)
class StepRange:
    """``A:B`` (inclusive), ``A:`` or ``:B``; steps count from 1."""

    first: int = 1
    last: int | None = None

    @classmethod
    def parse(cls, text: str | None) -> StepRange:
        if not text:
            return cls()
        match = re.fullmatch(r"\s*(\d*)\s*:\s*(\d*)\s*", text)
        if match is None or not any(match.groups()):
            raise DataError(f"--steps {text!r}: expected A:B, A: or :B (steps counted from 1)")
        first, last = (int(g) if g else None for g in match.groups())
        if (first is not None and first < 1) or (first and last is not None and last < first):
            raise DataError(f"--steps {text!r}: expected 1 <= A <= B")
        return cls(first or 1, last)

    def __contains__(self, step: int) -> bool:
        return step >= self.first and (self.last is None or step <= self.last)


def export_rows(source: Path, fmt: Format, steps: StepRange, margin: float = 0.0) -> Iterator[dict[str, Any]]:
    """The rows of ``fmt`` from a run directory or a ``thresher generate --all`` file."""
    if fmt not in FORMATS:
        raise DataError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if not math.isfinite(margin) or margin < 0:
        raise DataError(f"--margin {margin}: expected a finite number >= 0")
    run, sampling = _provenance(source)
    for step, rows in _steps(source, steps):
        groups: dict[Any, list[dict[str, Any]]] = {}
        for row in rows:
            groups.setdefault(row.get("prompt_index"), []).append(row)
        for group in groups.values():
            yield from _rows_of(fmt, group, margin, {"run": run, "step": step, "sampling": sampling})


def _rows_of(fmt: Format, group: list[dict[str, Any]], margin: float, common: dict[str, Any]) -> Iterator[dict]:
    scored = [row for row in group if _number(row.get("reward")) is not None]
    step = common["step"]
    base = {**common, "policy_step": step - 1 if isinstance(step, int) else None}
    if fmt == "sft":
        for row in scored:
            if row.get("kept"):
                yield {"prompt": row["prompt"], "completion": row["response"], **base, **_reward_of(row)}
    elif fmt == "kto":
        for row in scored:
            yield {"prompt": row["prompt"], "completion": row["response"], "label": bool(row.get("kept")), **base,
                   **_reward_of(row)}  # fmt: skip
    else:
        kept = [row for row in scored if row.get("kept")]
        if not kept:
            return
        chosen = max(kept, key=lambda row: row["reward"])
        rejected = min(scored, key=lambda row: row["reward"])
        if chosen["reward"] - rejected["reward"] < margin or chosen["reward"] == rejected["reward"]:
            return
        yield {
            "prompt": chosen["prompt"],
            "chosen": chosen["response"],
            "rejected": rejected["response"],
            **base,
            "chosen_reward": chosen["reward"],
            "rejected_reward": rejected["reward"],
            "chosen_reward_parts": chosen.get("rewards"),
            "rejected_reward_parts": rejected.get("rewards"),
        }


def _reward_of(row: dict[str, Any]) -> dict[str, Any]:
    return {"reward": row["reward"], "reward_parts": row.get("rewards")}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _steps(source: Path, steps: StepRange) -> Iterator[tuple[int | None, list[dict[str, Any]]]]:
    """``(step, rows)`` per step of a run in order; a generate file is one group of rows, step None."""
    if source.is_file():
        yield None, _read(source)
        return
    folder = source / "rollouts"
    if not folder.is_dir():
        raise DataError(f"{source}: no rollouts/ folder; expected a run directory or a file from thresher generate")
    found = sorted((int(m.group(1)), path) for path in folder.iterdir() if (m := STEP_FILE.search(path.name)))
    chosen = [(step, path) for step, path in found if step in steps]
    if not chosen:
        have = f"steps {found[0][0]}-{found[-1][0]}" if found else "none"
        raise DataError(f"{source}: no rollouts in the steps asked for (the run has {have})")
    for step, path in chosen:
        yield step, _read(path)


def _read(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, row in read_jsonl(path, "rollout"):
        if not {"prompt", "response", "reward"} <= set(row):
            raise DataError(f"{path}:{number}: not a rollout (needs prompt, response and reward)")
        rows.append(row)
    return rows


def _provenance(source: Path) -> tuple[str, dict[str, Any] | None]:
    """The run's name and the generator's sampling settings (from its ``config.yaml``, when there is one)."""
    config_file = source / "config.yaml" if source.is_dir() else None
    sampling = None
    if config_file is not None and config_file.is_file():
        config = yaml.safe_load(config_file.read_text()) or {}
        generator = config.get("generator") or {}
        sampling = {key: generator.get(key) for key in SAMPLING_KEYS if key in generator}
        sampling["n"] = (config.get("rs") or {}).get("num_rollouts_per_prompt")
        sampling["generator"] = generator.get("type")
    return str(source.resolve()), sampling


def write_export(source: Path, fmt: Format, steps: StepRange, out: Path, margin: float = 0.0) -> int:
    """Write the rows to ``out`` (JSON lines; the file appears under its name only when complete)."""
    if not source.exists():
        raise DataError(f"{source}: no such run directory or file")
    partial = out.with_name(f".{out.name}.partial")
    count = 0
    try:
        with partial.open("w", encoding="utf-8") as handle:
            for row in export_rows(source, fmt, steps, margin):
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
        partial.replace(out)
    finally:
        partial.unlink(missing_ok=True)
    return count
