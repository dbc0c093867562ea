"""What Thresher does around any scorer: score each distinct response once, and optionally remember
rewards across steps.

Sampling N responses often gives the same answer several times ("12" eight times over): a remote
reward model or an LLM judge need not see it eight times. Within one call, identical rollouts (same
prompt, same response tokens and text, same finish reason, same dataset fields) are scored once
(``scorer.dedup``, on by default); with ``scorer.cache: {size: N}`` rewards are also remembered across
calls, least recently used first out — for deterministic scorers only. What was saved is reported as
``scorer_cache_hits`` in each step's metrics. A wrapped scorer returns exactly what the scorer
returns for the same rollouts (tested).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import torch

from thresher.core.config.schema import ScorerOptions
from thresher.core.errors import ScorerError
from thresher.core.types import PartRewards, ReportsMetrics, Rollout, is_remote

Key = tuple[Any, ...]


def rollout_key(rollout: Rollout) -> Key:
    """What a reward may depend on: the prompt, the response (tokens and text), how it ended, the row."""
    extra = json.dumps(rollout.prompt.extra, sort_keys=True, default=str)
    return (rollout.prompt.text, tuple(rollout.response_ids), rollout.text, rollout.finish_reason, extra)


class DedupScorer:
    """Wraps a scorer so each distinct rollout of a call (and, with ``cache_size``, of recent calls)
    is scored once. Everything else (``remote``, ``metrics()``, ``close()``) is the scorer's."""

    def __init__(self, scorer: Any, *, cache_size: int | None = None):
        self.scorer = scorer
        self.name = getattr(scorer, "name", type(scorer).__name__)
        self.remote = is_remote(scorer)
        self.cache_size = cache_size
        self.cache: OrderedDict[Key, tuple[float, dict[str, float] | None]] = OrderedDict()
        self.hits = 0

    def score(self, rollouts: list[Rollout]) -> torch.Tensor | PartRewards:
        keys = [rollout_key(r) for r in rollouts]
        known = {key: self.cache[key] for key in dict.fromkeys(keys) if key in self.cache}
        for key in known:
            self.cache.move_to_end(key)
        missing = [key for key in dict.fromkeys(keys) if key not in known]
        first = {key: keys.index(key) for key in missing}
        if missing:
            result = self.scorer.score([rollouts[first[key]] for key in missing])
            total, parts = (result.total, result.parts) if isinstance(result, PartRewards) else (result, None)
            total = torch.as_tensor(total, dtype=torch.float32).flatten().cpu()
            if total.numel() != len(missing):
                raise ScorerError(f"scorer {self.name!r} returned {total.numel()} rewards for {len(missing)} responses")
            for i, key in enumerate(missing):
                known[key] = (float(total[i]), {n: float(v[i]) for n, v in parts.items()} if parts else None)
        self.hits += len(keys) - len(missing)
        if self.cache_size:
            for key in missing:
                self.cache[key] = known[key]
            while len(self.cache) > self.cache_size:
                self.cache.popitem(last=False)
        total = torch.tensor([known[key][0] for key in keys], dtype=torch.float32)
        names = next((list(p) for _, p in known.values() if p), None)
        if names is None:
            return total
        named = {key: value[1] or {} for key, value in known.items()}  # all have parts, or none has
        by_part = {name: torch.tensor([named[key][name] for key in keys], dtype=torch.float32) for name in names}
        return PartRewards(total, by_part)

    def metrics(self) -> dict[str, float]:
        """Rollouts not sent to the scorer since the last report, plus the scorer's own metrics."""
        hits, self.hits = self.hits, 0
        own = self.scorer.metrics() if isinstance(self.scorer, ReportsMetrics) else {}
        return {**own, "cache_hits": hits}

    def close(self) -> None:
        self.scorer.close()


def wrap_scorer(scorer: Any, options: ScorerOptions) -> Any:
    """The scorer with the framework's options applied (``dedup``, ``cache``)."""
    cache = options.cache
    if not options.dedup and cache is None:
        return scorer
    return DedupScorer(scorer, cache_size=cache.size if cache else None)
