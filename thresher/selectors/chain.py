"""The ``chain`` selector: compose selectors without writing code.

Each stage sees only what the previous stage kept (its ``valid`` mask), so ``[band, topk]`` means "drop
uninformative prompts, then keep the best response of each remaining prompt".

Example config section::

    selector:
      type: chain
      stages:
        - {type: band, lo: 0.1, hi: 0.9}
        - {type: topk, top_n_rollouts: 1}
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from thresher.core.build import build_nested
from thresher.core.checks import call_selector
from thresher.core.config import Section
from thresher.core.nested import SelectorSections
from thresher.core.types import PluginContext, ReportsMetrics, Rollout


class ChainSelector:
    name: ClassVar[str] = "chain"

    class Config(Section):
        stages: SelectorSections = Field(..., description="Selectors applied in order, each to the previous' kept.")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config
        self.stages = [build_nested("selector", stage, context) for stage in config.stages]

    def select(
        self, rewards: torch.Tensor, valid: torch.Tensor, rollouts: list[list[Rollout]] | None = None
    ) -> torch.Tensor:
        """Each stage on what the previous kept; stages that take ``rollouts`` get them too."""
        eligible = valid
        flat = [r for group in rollouts for r in group] if rollouts is not None else None
        for stage, section in zip(self.stages, self.config.stages, strict=True):
            eligible = call_selector(stage, rewards, eligible, flat, section["type"]) & eligible
        return eligible

    def metrics(self) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for stage in self.stages:
            if isinstance(stage, ReportsMetrics):
                merged.update(stage.metrics())
        return merged
