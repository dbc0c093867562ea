"""Rewards made comparable across prompts, within each prompt's N responses.

One easy prompt, all of whose responses score 0.9, should not take every slot of a global selection
from a hard prompt whose best scores 0.3. Normalising within the prompt's group puts both on the
same scale. Only valid entries (finite, selectable) count; the others come back as 0 (selectors never
keep them anyway). Both rules are deterministic:

- ``zscore``: (r − mean) / std over the group (population std); a group with one valid response or
  all rewards equal gives 0 for all (no response is better than another);
- ``rank``: the response's place among its group in [0, 1], ties sharing the middle of their places;
  all equal or a single response gives 0.5.
"""

from __future__ import annotations

from typing import Literal

import torch

Normalization = Literal["none", "zscore", "rank"]


def normalize_within_prompts(rewards: torch.Tensor, valid: torch.Tensor, mode: Normalization) -> torch.Tensor:
    """``rewards`` and ``valid`` are [prompts, N]; returns normalized rewards of the same shape."""
    if mode == "none":
        return rewards
    out = torch.zeros_like(rewards, dtype=torch.float32)
    for row in range(rewards.shape[0]):
        mask = valid[row]
        values = rewards[row][mask].double()
        if values.numel() == 0:
            continue
        out[row][mask] = (_zscore(values) if mode == "zscore" else _rank(values)).float()
    return out


def _zscore(values: torch.Tensor) -> torch.Tensor:
    std = values.std(unbiased=False) if values.numel() > 1 else values.new_zeros(())
    if float(std) == 0.0:
        return torch.zeros_like(values)
    return (values - values.mean()) / std


def _rank(values: torch.Tensor) -> torch.Tensor:
    count = values.numel()
    if count == 1:
        return torch.full_like(values, 0.5)
    below = (values[None, :] < values[:, None]).sum(dim=1).double()
    equal = (values[None, :] == values[:, None]).sum(dim=1).double()
    return (below + (equal - 1) / 2) / (count - 1)


def zscore_within_groups(rewards: torch.Tensor, groups: list[int]) -> torch.Tensor:
    """z-scores within each group of a flat reward vector (rollouts of one prompt share a group)."""
    out = torch.zeros_like(rewards, dtype=torch.float32)
    index = torch.tensor(groups)
    for group in dict.fromkeys(groups):
        members = index == group
        finite = members & torch.isfinite(rewards)
        if finite.any():
            out[finite] = _zscore(rewards[finite].double()).float()
        out[members & ~torch.isfinite(rewards)] = rewards[members & ~torch.isfinite(rewards)]
    return out
