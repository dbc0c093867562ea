"""What the engine does around any selector: duplicate handling, diversity statistics, the pool of
best-ever responses, and the guardrails that watch for reward hacking."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from thresher.core.config import GuardrailsConfig
from thresher.core.types import Rollout

_SPACES = re.compile(r"\s+")


def duplicate_mask(rollouts: list[Rollout], shape: tuple[int, int], mode: str) -> torch.Tensor:
    """True for a rollout whose response repeats an earlier response of the same prompt group.

    ``exact`` compares the response texts; ``whitespace`` first collapses runs of whitespace and strips
    the ends. Only later copies are marked, so each distinct response still counts once.
    """
    dup = torch.zeros(shape, dtype=torch.bool)
    if mode == "none":
        return dup
    seen: dict[int, set[str]] = {}
    for r in rollouts:
        text = r.text if mode == "exact" else _SPACES.sub(" ", r.text).strip()
        group = seen.setdefault(r.group, set())
        if text in group:
            dup[r.group, r.sample] = True
        group.add(text)
    return dup


def distinct_n(sequences: list[list[int]], n: int) -> float:
    """Unique n-grams / all n-grams over ``sequences`` (token ids): 1.0 all different, → 0 collapse."""
    grams = [tuple(seq[i : i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def diversity(rollouts: list[Rollout], prefix: str) -> dict[str, float]:
    ids = [r.response_ids for r in rollouts]
    return {f"{prefix}distinct_1": distinct_n(ids, 1), f"{prefix}distinct_2": distinct_n(ids, 2)}


@dataclass
class PoolEntry:
    reward: float
    prompt_ids: list[int]
    response_ids: list[int]
    text: str
    step: int


@dataclass
class BestPool:
    """The best kept response ever seen for each prompt (by dataset index), across steps."""

    entries: dict[int, PoolEntry] = field(default_factory=dict)

    def update(self, kept: list[Rollout], rewards: list[float], step: int) -> None:
        for r, reward in zip(kept, rewards, strict=True):
            best = self.entries.get(r.prompt.index)
            if best is None or reward > best.reward:
                self.entries[r.prompt.index] = PoolEntry(
                    reward, list(r.prompt.token_ids), list(r.response_ids), r.text, step
                )

    def state_dict(self) -> dict[str, Any]:
        return {str(k): vars(v) for k, v in self.entries.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.entries = {int(k): PoolEntry(**v) for k, v in state.items()}


@dataclass
class Guardrails:
    """Counts consecutive warning signs; says when a rule trips."""

    config: GuardrailsConfig
    low_diversity_steps: int = 0
    best_metric: float | None = None
    checks_without_improvement: int = 0

    def after_step(self, record: dict[str, Any]) -> str | None:
        """Diversity rule: the reason to stop (or warn) when it trips, else None."""
        threshold = self.config.min_kept_distinct_2
        value = record.get("kept_distinct_2")
        if threshold is None or value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        self.low_diversity_steps = self.low_diversity_steps + 1 if value < threshold else 0
        if self.low_diversity_steps >= self.config.diversity_patience:
            return (
                f"diversity guardrail: kept responses' distinct-2 {value:.3f} < {threshold} for "
                f"{self.low_diversity_steps} steps in a row (a collapse to one answer: reward hacking?)"
            )
        return None

    def after_validation(self, record: dict[str, Any]) -> str | None:
        """Early-stop rule on a validation metric: the reason when patience runs out, else None."""
        metric = self.config.early_stop_metric
        value = record.get(metric) if metric else None
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return None
        if self.best_metric is None or value > self.best_metric + self.config.early_stop_min_delta:
            self.best_metric, self.checks_without_improvement = value, 0
            return None
        self.checks_without_improvement += 1
        if self.checks_without_improvement >= self.config.early_stop_patience:
            return (
                f"early stop: {metric} has not improved on {self.best_metric:.4f} for "
                f"{self.checks_without_improvement} validations"
            )
        return None

    def state_dict(self) -> dict[str, Any]:
        return {
            "low_diversity_steps": self.low_diversity_steps,
            "best_metric": self.best_metric,
            "checks_without_improvement": self.checks_without_improvement,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.low_diversity_steps = state["low_diversity_steps"]
        self.best_metric = state["best_metric"]
        self.checks_without_improvement = state["checks_without_improvement"]
