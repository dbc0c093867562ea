"""The ``threshold`` selector: keep every response whose reward reaches a bar.

Useful with verifiable rewards (keep every correct answer). ``max_per_prompt`` caps how many one
prompt contributes, keeping its best (ties to the lower rollout index), so easy prompts do not
dominate the update.

Example config section::

    selector: {type: threshold, threshold: 1.0, max_per_prompt: 2}
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field

from thresher.core.config import Section
from thresher.core.types import PluginContext
from thresher.selectors.ranking import rank_within_prompt


class ThresholdSelector:
    name: ClassVar[str] = "threshold"

    class Config(Section):
        threshold: float = Field(..., description="Keep rewards >= this value.")
        max_per_prompt: int | None = Field(None, ge=1, description="At most this many per prompt.")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config

    def select(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        keep = valid & (rewards >= self.config.threshold)
        if self.config.max_per_prompt is not None:
            keep &= rank_within_prompt(rewards, keep) < self.config.max_per_prompt
        return keep
