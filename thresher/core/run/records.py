"""What a step's rollouts become on disk and in the metrics: one JSON row per rollout, and the
statistics of all and of kept rollouts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from thresher.core.selection import diversity
from thresher.core.types import Rollout


@dataclass
class ScoredStep:
    """A step's rollouts with their rewards [P, W], validity and the selector's decision.

    With a fixed N every prompt has W = N rollouts. Sampled until accepted, prompts have different
    counts (ragged groups): ``present`` [P, W] marks the cells that hold a rollout, the others have
    a NaN reward and are never valid. ``rollouts`` lists the present cells row by row (prompt by
    prompt, then sample), and ``parts`` holds one value per rollout in that order.
    """

    rollouts: list[Rollout]
    rewards: torch.Tensor
    valid: torch.Tensor
    kept: torch.Tensor
    # what sampling measured for the step's metrics record: phase times, token counts, plugin metrics
    step_metrics: dict[str, Any] = field(default_factory=dict)
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # a combined scorer's parts, per rollout
    present: torch.Tensor | None = None  # [P, W]; None: every cell holds a rollout

    def cells(self) -> torch.Tensor:
        """[P, W] bool: the cells that hold a rollout."""
        return self.present if self.present is not None else torch.ones_like(self.valid, dtype=torch.bool)

    def per_rollout(self, grid: torch.Tensor) -> torch.Tensor:
        """A [P, W] tensor's values at the present cells, in ``rollouts`` order."""
        return grid[self.cells()]

    def rollout_index(self) -> torch.Tensor:
        """[P, W] long: the position in ``rollouts`` of each cell's rollout (-1 where none)."""
        cells = self.cells()
        index = torch.full(cells.shape, -1, dtype=torch.long)
        index[cells] = torch.arange(int(cells.sum()))
        return index

    def kept_rollouts(self) -> list[Rollout]:
        flat = self.per_rollout(self.kept).tolist()
        return [r for r, keep in zip(self.rollouts, flat, strict=True) if keep]


def rollout_record(
    r: Rollout, reward: float | None, kept: bool | None, parts: dict[str, float] | None = None
) -> dict[str, Any]:
    record = {
        "prompt_index": r.prompt.index,
        "group": r.group,
        "sample": r.sample,
        "prompt": r.prompt.text,
        "response": r.text,
        "response_ids": r.response_ids,
        "finish_reason": r.finish_reason,
        "reward": _finite(reward),
        "kept": kept,
    }
    if parts:
        record["rewards"] = {name: _finite(value) for name, value in parts.items()}
    return record


def _finite(value: float | None) -> float | None:
    return value if value is None or math.isfinite(value) else None


def step_statistics(scored: ScoredStep) -> dict[str, Any]:
    """Reward and length statistics of all and of kept rollouts (what metrics.jsonl records)."""
    rewards, valid, kept = scored.rewards, scored.valid, scored.kept
    finite = rewards[valid]
    kept_rewards = rewards[kept]
    lengths = torch.tensor([len(r.response_ids) for r in scored.rollouts], dtype=torch.float)
    kept_lengths = lengths[scored.per_rollout(kept)]
    reasons = [r.finish_reason for r in scored.rollouts]
    return {
        "prompts": rewards.shape[0],
        "rollouts": len(scored.rollouts),
        "kept": int(kept.sum()),
        "accept_rate": float(scored.per_rollout(kept).float().mean()),
        "prompts_without_kept": int((~kept.any(dim=1)).sum()),
        "nonfinite_rewards": int((scored.cells() & ~valid).sum()),  # a ragged group's missing cells are not
        "reward_mean": _stat(finite, "mean"),
        "reward_std": _stat(finite, "std"),
        "reward_min": _stat(finite, "min"),
        "reward_max": _stat(finite, "max"),
        "reward_kept_mean": _stat(kept_rewards, "mean"),
        "reward_gap": _stat(kept_rewards, "mean") - _stat(finite, "mean"),
        "prompts_without_kept_fraction": float((~kept.any(dim=1)).float().mean()),
        **diversity(scored.rollouts, ""),
        **diversity(scored.kept_rollouts(), "kept_"),
        "response_len_mean": float(lengths.mean()),
        "response_len_kept_mean": _stat(kept_lengths, "mean"),
        "finished_eos": reasons.count("eos") / len(reasons),
        "finished_stop": reasons.count("stop") / len(reasons),
        "finished_length": reasons.count("length") / len(reasons),
        **part_statistics(scored),
        **cost_statistics(scored, lengths, kept_lengths),
    }


def cost_statistics(scored: ScoredStep, lengths: torch.Tensor, kept_lengths: torch.Tensor) -> dict[str, Any]:
    """What the step's kept data cost to sample: generated tokens (and rollouts) per kept one."""
    generated, kept = float(lengths.sum()), float(kept_lengths.sum())
    count = int(scored.kept.sum())
    mean, counts = group_means(scored.rewards, scored.valid)
    means = mean[counts > 0]  # each prompt's mean reward: its pass rate for 0/1 rewards
    quarters = torch.tensor([0.25, 0.5, 0.75], dtype=means.dtype)
    quartiles = means.quantile(quarters).tolist() if means.numel() else [float("nan")] * 3
    return {
        "kept_tokens": int(kept),
        "generated_tokens_per_kept_token": generated / kept if kept else float("nan"),
        "rollouts_per_kept": len(scored.rollouts) / count if count else float("nan"),
        "prompt_reward_mean_q25": quartiles[0],
        "prompt_reward_mean_q50": quartiles[1],
        "prompt_reward_mean_q75": quartiles[2],
    }


def group_means(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's mean reward over its valid rollouts (0 where it has none; float64) and how many
    valid rollouts it has."""
    counts = valid.sum(dim=1)
    sums = torch.where(valid, rewards.double(), torch.zeros_like(rewards, dtype=torch.float64)).sum(dim=1)
    return sums / counts.clamp(min=1), counts


def part_statistics(scored: ScoredStep) -> dict[str, float]:
    """Each part's mean over all and kept responses, and the correlation of every pair of parts."""
    out: dict[str, float] = {}
    kept = scored.per_rollout(scored.kept)
    for name, values in scored.parts.items():
        finite = torch.isfinite(values)
        out[f"reward_part_{name}_mean"] = _stat(values[finite], "mean")
        out[f"reward_part_{name}_kept_mean"] = _stat(values[finite & kept], "mean")
    names = list(scored.parts)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            out[f"reward_corr_{a}_{b}"] = _correlation(scored.parts[a], scored.parts[b])
    return out


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    both = torch.isfinite(a) & torch.isfinite(b)
    x, y = a[both].double(), b[both].double()
    if x.numel() < 2 or float(x.std()) == 0.0 or float(y.std()) == 0.0:
        return float("nan")  # undefined: one part is constant over the step
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def _stat(values: torch.Tensor, name: str) -> float:
    if values.numel() == 0 or (name == "std" and values.numel() < 2):
        return float("nan")
    return float(getattr(values.float(), name)())
