"""``thresher rollouts``: what the selector kept and what it threw away, prompt by prompt.

A step's rollouts are grouped by prompt (its place in the step, ``group``, and its dataset index),
the prompt shown once, then its responses from the highest reward down, each marked kept or rejected
(``unscored`` where scoring failed and no reward exists). Filters apply in this order: ``--kept`` /
``--rejected``, then ``--grep`` (a prompt containing the text keeps all its responses, otherwise only
the responses containing it do), then ``--best K`` / ``--worst K`` per prompt among what is left.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.text import Text

from thresher.core.errors import ConfigError, DataError
from thresher.observe.runs import check_run_dir, describe_steps, read_rollouts, rollout_steps

GROUP_KEYS = ("step", "prompt", "prompt_index", "group")
# Shown escaped on the terminal: C0 controls but tab and newline (a line break starts a new output line),
# DEL and C1 controls, the bidirectional controls (U+061C, U+200E/F, U+202A-E, U+2066-9), the line and
# paragraph separators, and lone surrogates (which cannot be encoded to print).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069\ud800-\udfff]")


@dataclass(frozen=True)
class Filters:
    kept: bool = False
    rejected: bool = False
    best: int | None = None
    worst: int | None = None
    grep: str | None = None

    def check(self) -> None:
        problems = []
        if self.kept and self.rejected:
            problems.append("--kept and --rejected: give one of them (neither shows both)")
        if self.best is not None and self.worst is not None:
            problems.append("--best and --worst: give one of them")
        for name, k in (("--best", self.best), ("--worst", self.worst)):
            if k is not None and k < 1:
                problems.append(f"{name} {k}: must be at least 1")
        if problems:
            raise ConfigError(problems)

    def as_dict(self) -> dict[str, Any]:
        return {"kept": self.kept, "rejected": self.rejected, "best": self.best, "worst": self.worst,
                "grep": self.grep}  # fmt: skip


def pick_step(path: Path, step: int | None) -> tuple[int, list[int]]:
    """``step`` (default: the latest with a rollouts file) and all steps that have one."""
    check_run_dir(path)
    steps = rollout_steps(path)
    if not steps:
        raise DataError(f"{path}: no rollouts written yet (rollouts/step_N.jsonl)")
    if step is None:
        return steps[-1], steps
    if step not in steps:
        raise DataError(f"--step {step}: {path} has no rollouts for that step; steps with rollouts: "
                        f"{describe_steps(steps)}")  # fmt: skip
    return step, steps


def _reward(record: dict[str, Any]) -> float | None:
    value = record.get("reward")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def _by_reward(record: dict[str, Any]) -> tuple[bool, float, int]:
    """Highest reward first; no reward last; ties in sampling order."""
    reward = _reward(record)
    sample = record.get("sample")
    return reward is None, -(reward or 0.0), sample if isinstance(sample, int) else 0


def group_rollouts(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per prompt of the step (in step order), its responses sorted by reward, highest first."""
    groups: dict[tuple[Any, Any], dict[str, Any]] = {}
    for record in records:
        group, index = record.get("group"), record.get("prompt_index")
        entry = groups.setdefault(
            (_hashable(group), _hashable(index)),
            {"prompt_index": index, "group": group, "prompt": record.get("prompt"), "rollouts": 0, "kept": 0,
             "responses": []},
        )  # fmt: skip
        entry["rollouts"] += 1
        entry["kept"] += record.get("kept") is True
        entry["responses"].append({k: v for k, v in record.items() if k not in GROUP_KEYS})
    ordered = sorted(groups.values(), key=lambda g: (_sortable(g["group"]), _sortable(g["prompt_index"])))
    for entry in ordered:
        entry["responses"].sort(key=_by_reward)
    return ordered


def _hashable(value: Any) -> Any:
    """A group key from any JSON value: an edited file may hold a list where a number belongs."""
    return json.dumps(value, sort_keys=True) if isinstance(value, list | dict) else value


def _sortable(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, int) else (1, str(value))


def _contains(text: Any, needle: str) -> bool:
    return isinstance(text, str) and needle.casefold() in text.casefold()


def apply_filters(groups: list[dict[str, Any]], filters: Filters) -> list[dict[str, Any]]:
    """The prompts that still have a response after the filters, with only those responses."""
    shown = []
    for entry in groups:
        responses = entry["responses"]
        if filters.kept:
            responses = [r for r in responses if r.get("kept") is True]
        if filters.rejected:
            responses = [r for r in responses if r.get("kept") is False]
        if filters.grep is not None and not _contains(entry["prompt"], filters.grep):
            responses = [r for r in responses if _contains(r.get("response"), filters.grep)]
        if filters.best is not None:
            responses = responses[: filters.best]
        if filters.worst is not None:
            scored = [r for r in responses if _reward(r) is not None]
            unscored = [r for r in responses if _reward(r) is None]
            responses = sorted((scored[::-1] + unscored)[: filters.worst], key=_by_reward)
        if responses:
            shown.append({**entry, "responses": responses})
    return shown


def rollouts_view(path: Path, step: int | None, filters: Filters) -> dict[str, Any]:
    """What ``thresher rollouts --json`` prints: the step, the filters and the matching prompts, untruncated."""
    filters.check()
    chosen, steps = pick_step(path, step)
    groups = group_rollouts(read_rollouts(path, chosen))
    return {
        "run": str(path),
        "step": chosen,
        "steps": steps,
        "filters": filters.as_dict(),
        "totals": {
            "prompts": len(groups),
            "rollouts": sum(g["rollouts"] for g in groups),
            "kept": sum(g["kept"] for g in groups),
        },
        "prompts": apply_filters(groups, filters),
    }


def printable(value: Any) -> str:
    """``value`` as text a terminal shows rather than obeys: each character that is not text made visible.

    A rollout file holds what a model wrote (and what anyone who edited the file wrote): an ANSI escape
    could clear the screen or retitle the window, a right-to-left override could make a response read
    differently from what it is, a lone surrogate (valid JSON) would crash the print. Each of them is
    shown as its Python escape (``\\x1b``, ``\\u202e``); everything else, backslashes included, is
    printed as written. ``--json`` keeps the exact data.
    """
    return _CONTROL.sub(_escaped, "" if value is None else str(value))


def _escaped(match: re.Match[str]) -> str:
    code = ord(match[0])
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _parts(parts: dict[str, Any]) -> str:
    shown = [f"{name} {'—' if _numeric(v) is None else f'{v:.4g}'}" for name, v in parts.items()]
    return "parts: " + ", ".join(shown)


def _numeric(value: Any) -> float | None:
    """A reward part as a number, or None (text, null, a bool: nothing to format as a number)."""
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


# Padded to one width (10), so the rewards after the marks line up.
MARKERS = {True: ("[kept]", "green"), False: ("[rejected]", "red"), None: ("[unscored]", "yellow")}
INDENT = " " * 33  # under the response's first line


def render_lines(view: dict[str, Any]) -> list[Text]:
    """The terminal layout, one rich ``Text`` per line: each prompt once, then its responses.

    Rich ``Text``, never a markup string: what a model wrote is printed as written, so ``[bold]`` stays
    ``[bold]`` and ``:thumbs_up:`` is not turned into an emoji. Styles (plain text when piped) come
    only from here, and every field read from the file goes through :func:`printable`.
    """
    totals = view["totals"]
    lines = [
        Text(printable(f"{view['run']} · step {view['step']} (steps with rollouts: {describe_steps(view['steps'])})"
                       f" · {totals['prompts']} prompts, {totals['rollouts']} rollouts, {totals['kept']} kept"))
    ]  # fmt: skip
    if not view["prompts"]:
        lines.append(Text("no responses match"))
    for entry in view["prompts"]:
        lines += [
            Text(),
            Text.assemble((f"prompt {printable(entry['prompt_index'])}", "bold"),
                          f" (group {printable(entry['group'])}) · kept {entry['kept']} of {entry['rollouts']}"),
            *(Text(f"  {line}") for line in printable(entry["prompt"]).split("\n")),
        ]  # fmt: skip
        for r in entry["responses"]:
            reward = _reward(r)
            shown = "—" if reward is None else f"{reward:.4f}"
            text = printable(r.get("response")).split("\n")
            kept = r.get("kept")
            mark, style = MARKERS[kept if isinstance(kept, bool) else None]  # anything else in the file: unscored
            finish = printable(r.get("finish_reason")) or "—"
            padding = " " * (10 - len(mark))
            lines.append(Text.assemble("    ", (mark, style), f"{padding} {shown:>8}  {finish:<6}  {text[0]}"))
            lines += [Text(f"{INDENT}{line}") for line in text[1:]]
            if isinstance(parts := r.get("rewards"), dict) and parts:  # a combined scorer's parts
                lines.append(Text(f"{INDENT}({printable(_parts(parts))})"))
    return lines
