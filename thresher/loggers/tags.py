"""Where a metric goes in a tracker (TensorBoard, W&B, MLflow): ``group/name``, the group said once.

``reward_mean`` → ``reward/mean``, ``time_generate`` → ``time/generate``, a validation record's
``val_reward_greedy`` → ``validation/reward_greedy``, ``loss`` → ``train/loss``. Every tracker logger
uses these names, so a dashboard built on one reads the same in another.
"""

from __future__ import annotations

import math
from typing import Any

NOT_SCALARS = frozenset({"kind", "step", "time"})
SELECTION = frozenset(
    {"prompts", "rollouts", "kept", "accept_rate", "prompts_without_kept", "prompts_without_kept_fraction",
     "nonfinite_rewards", "duplicates_not_selectable"}
)  # fmt: skip
COST = frozenset(
    {"kept_tokens", "generated_tokens_per_kept_token", "rollouts_per_kept", "sampling_rounds",
     "prompts_accepted", "prompts_skipped_solved", "prompts_skipped_hopeless", "prompts_resting_solved",
     "prompts_resting_hopeless", "rollouts_allocated_min", "rollouts_allocated_max"}
)  # fmt: skip
GENERATION_PREFIXES = ("response_len", "finished_", "generated_tokens", "generator_", "prompts_")


def metric_tag(key: str, kind: str) -> str:
    """The tracker name of ``key`` in a record of ``kind`` (``train`` or ``validation``)."""
    if kind == "validation":
        return f"validation/{key.removeprefix('val_')}"
    if key.startswith(("reward", "scorer_")):
        return f"reward/{_without(key, 'reward')}"
    if key in COST or key.startswith("prompt_reward_mean_"):
        return f"cost/{key}"
    if key in SELECTION or key.startswith("selector_"):
        return f"selection/{key}"
    if "distinct" in key:
        return f"diversity/{key}"
    if key.startswith(("time_", "tokens_per_s")):
        return f"time/{_without(key, 'time')}"
    if key.startswith(GENERATION_PREFIXES):
        return f"generation/{key}"
    return f"train/{key}"  # loss, grad_norm, lr, tokens trained, memory, the loss plugin's own metrics


def _without(key: str, group: str) -> str:
    """``reward_mean`` → ``mean`` under ``reward``; a key that is the group's name stays as it is."""
    rest = key.removeprefix(f"{group}_")
    return rest if rest and rest != key else key


def numeric(value: Any) -> float | None:
    """The value as a finite float, or None (text, null, bool, NaN are not scalars)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's finite numbers under their tracker names."""
    kind = str(record.get("kind"))
    out = {}
    for key, value in record.items():
        number = numeric(value)
        if key not in NOT_SCALARS and number is not None:
            out[metric_tag(key, kind)] = number
    return out


def best_and_worst_kept(rows: list[dict[str, Any]], count: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A step's ``count`` best and worst kept responses, by reward (reading them catches reward hacking)."""
    kept = sorted(
        (row for row in rows if row.get("kept") and numeric(row.get("reward")) is not None),
        key=lambda row: row["reward"],
        reverse=True,
    )
    return kept[:count], kept[::-1][:count]
