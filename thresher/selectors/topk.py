"""The ``topk`` selector: keep the K best responses of every prompt (the classic best-of-N / RAFT rule).

Each prompt keeps ``min(K, N)`` of its valid rollouts; equal rewards go to the lower rollout index.
``min_reward`` additionally drops anything below an absolute bar (so a prompt whose best answer is
still wrong contributes nothing).

Example config section::

    selector: {type: topk, top_n_rollouts: 1, min_reward: 0.5}
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from thresher.core.config import Section
from thresher.core.types import PluginContext
from thresher.selectors.ranking import rank_within_prompt


class TopKSelector:
    name: ClassVar[str] = "topk"

    class Config(Section):
        top_n_rollouts: int = Field(1, ge=1, description="K: responses kept per prompt (at most N).")
        min_reward: float | None = Field(None, description="Keep only rewards >= this value.")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config

    def select(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = valid & (rank_within_prompt(rewards, valid) < self.config.top_n_rollouts)
        if self.config.min_reward is not None:
            keep &= rewards >= self.config.min_reward
        return keep
