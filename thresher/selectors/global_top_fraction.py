"""The ``global_top_fraction`` selector: keep the best fraction of all of a step's rollouts.

Unlike per-prompt top-K, easy prompts can contribute several responses and hard prompts none, which is
what "keep the top α of the batch" means in RAFT. ``k = ceil(fraction × valid rollouts)``; equal rewards
go to the earlier rollout (lower prompt position, then lower sample index). ``max_per_prompt`` caps how
many one prompt contributes (the next best of other prompts fill in).

Example config section::

    selector: {type: global_top_fraction, fraction: 0.125, max_per_prompt: 2}
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from pydantic import Field

from thresher.core.config import Section
from thresher.core.types import PluginContext


class GlobalTopFractionSelector:
    name: ClassVar[str] = "global_top_fraction"

    class Config(Section):
        fraction: float = Field(..., gt=0, le=1, description="Share of the step's valid rollouts kept.")
        max_per_prompt: int | None = Field(None, ge=1, description="At most this many per prompt.")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config

    def select(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        prompts, n = rewards.shape
        flat_valid = valid.flatten()
        budget = math.ceil(self.config.fraction * int(flat_valid.sum()) - 1e-9)
        keys = torch.where(flat_valid, rewards.flatten().float(), torch.tensor(float("-inf")))
        order = torch.sort(-keys, stable=True).indices.tolist()  # best first, ties to the lower flat index
        cap = self.config.max_per_prompt or n
        taken = [0] * prompts
        keep = torch.zeros(prompts * n, dtype=torch.bool)
        for index in order:
            if budget == 0 or not flat_valid[index]:
                break
            prompt = index // n
            if taken[prompt] < cap:
                keep[index] = True
                taken[prompt] += 1
                budget -= 1
        return keep.view(prompts, n)
