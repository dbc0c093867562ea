"""The ``random`` selector: a baseline that keeps as many responses as another selector, at random.

For each prompt it keeps the same number of responses that ``like`` would keep, chosen uniformly among
the prompt's valid rollouts. Train once with your selector and once with ``random`` of it: if the
reward does not beat the random baseline, selection is not what helps. The choice is seeded by
``seed`` and the step's rewards, so a resumed run chooses the same.

Example config section::

    selector: {type: random, like: {type: topk, top_n_rollouts: 1}, seed: 0}
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch
from pydantic import Field

from thresher.core.build import build_nested
from thresher.core.config import Section
from thresher.core.nested import SelectorSection
from thresher.core.types import PluginContext


class RandomSelector:
    name: ClassVar[str] = "random"

    class Config(Section):
        like: SelectorSection = Field(..., description="The selector whose per-prompt counts are matched.")
        seed: int = Field(0, description="Seeds the random choice (with the step's rewards).")

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config
        self.like = build_nested("selector", config.like, context)

    def select(self, rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        counts = (self.like.select(rewards, valid).to(torch.bool) & valid).sum(dim=1).tolist()
        fingerprint = zlib.crc32(rewards.float().numpy().tobytes() + valid.numpy().tobytes())
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + fingerprint)
        keep = torch.zeros_like(valid)
        for prompt, count in enumerate(counts):
            candidates = valid[prompt].nonzero().flatten()
            chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
            keep[prompt, chosen] = True
        return keep
