"""The ``band`` selector: skip prompts that teach nothing, then select among the rest.

A prompt whose responses all got the same reward carries no preference (too easy or too hard for the
current policy); one whose mean reward is outside ``[lo, hi]`` is too easy or too hard by your own
measure. Such prompt groups are dropped whole; the ``inner`` selector (default: keep everything left)
then chooses among the remaining rollouts. Reports ``band_prompts_dropped_fraction``.

Example config section::

    selector: {type: band, lo: 0.05, hi: 0.95, inner: {type: topk, top_n_rollouts: 1}}
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from pydantic import Field

from thresher.core.build import build_nested
from thresher.core.checks import call_selector
from thresher.core.config import Section
from thresher.core.nested import SelectorSection
from thresher.core.types import PluginContext, ReportsMetrics, Rollout


class BandSelector:
    name: ClassVar[str] = "band"

    class Config(Section):
        lo: float | None = Field(None, description="Drop prompts whose mean reward is below this.")
        hi: float | None = Field(None, description="Drop prompts whose mean reward is above this.")
        drop_uniform: bool = Field(True, description="Drop prompts whose valid rewards are all equal.")
        inner: SelectorSection | None = Field(None, description="Selector applied to the prompts that remain.")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config
        self.inner = build_nested("selector", config.inner, context) if config.inner else None
        self._metrics: dict[str, float] = {}

    def select(
        self, rewards: torch.Tensor, valid: torch.Tensor, rollouts: list[list[Rollout]] | None = None
    ) -> torch.Tensor:
        """Drop whole prompts outside the band, then let ``inner`` choose (with the rollouts, if it
        takes them), through the same checked call as any selector."""
        count = valid.sum(dim=1)
        masked = torch.where(valid, rewards.float(), torch.zeros_like(rewards, dtype=torch.float))
        mean = masked.sum(dim=1) / count.clamp(min=1)
        high = torch.where(valid, rewards.float(), torch.full_like(mean[:, None].expand_as(rewards), -torch.inf))
        low = torch.where(valid, rewards.float(), torch.full_like(mean[:, None].expand_as(rewards), torch.inf))
        keep_prompt = count > 0
        if self.config.drop_uniform:
            keep_prompt &= high.max(dim=1).values > low.min(dim=1).values
        if self.config.lo is not None:
            keep_prompt &= mean >= self.config.lo
        if self.config.hi is not None:
            keep_prompt &= mean <= self.config.hi
        eligible = valid & keep_prompt[:, None]
        self._metrics = {"band_prompts_dropped_fraction": float((~keep_prompt).float().mean())}
        if self.inner is None:
            return eligible
        flat = [r for group in rollouts for r in group] if rollouts is not None else None
        assert self.config.inner is not None
        return call_selector(self.inner, rewards, eligible, flat, self.config.inner["type"]) & eligible

    def metrics(self) -> dict[str, Any]:
        inner = self.inner.metrics() if isinstance(self.inner, ReportsMetrics) else {}
        return {**self._metrics, **inner}
