"""The ``combine`` scorer: one reward from named parts, each any registered scorer.

In practice one reward is rarely enough: a verifier checks correctness, a reward model ranks style, a
rule penalises length. Example config section::

    scorer:
      type: combine
      mode: gate                # sum | product | gate
      parts:
        - {name: correct, scorer: {type: rule, function: my_rewards:exact_answer}}
        - {name: rm, weight: 0.5, normalize: zscore, scorer: {type: triton, url: grpc://127.0.0.1:8001}}
        - {name: brevity, weight: 0.1, scorer: {type: rule, function: my_rewards:length_penalty}}

- ``sum``: Σ weight · part; ``product``: Π weight · part;
- ``gate``: the first part is a pass/fail verifier (passes when its reward ≥ ``gate_threshold``); a
  passing response scores the weighted sum of every part, a failing one exactly ``fail_reward``, so
  a fluent wrong answer never outscores a right one as long as ``fail_reward`` is below what any
  passing response can score (the default 0 suits non-negative parts).

``normalize: zscore`` standardises a part within each prompt's N responses before weighting (the
same result however the step is chunked). Remote parts (``triton``) are called concurrently with each
other and with the local ones. Each part's rewards reach every rollout's record (``rewards:
{correct: 1.0, rm: 0.31, brevity: -0.2}``) and the step's metrics (each part's mean over all and kept
responses, and the correlation between parts: a reward model that stops agreeing with the verifier is
a sign of hacking). A failing part fails the step like any scorer.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from concurrent.futures import ThreadPoolExecutor
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from thresher.core.build import build_nested
from thresher.core.checks import as_rewards
from thresher.core.config import Section, resolve_plugin_section
from thresher.core.errors import ConfigError
from thresher.core.nested import ScorerSection
from thresher.core.normalize import zscore_within_groups
from thresher.core.types import PartRewards, PluginContext, Rollout, is_remote


class Part(Section):
    name: str = Field(..., pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="The part's name in records and metrics.")
    weight: float = Field(1.0, description="Its weight in the sum (or factor in the product).")
    normalize: Literal["none", "zscore"] = Field("none", description="zscore: standardise within each prompt's N.")
    scorer: ScorerSection = Field(..., description="Any scorer section: {type: ..., ...}.")


class CombineScorer:
    name: ClassVar[str] = "combine"

    class Config(Section):
        mode: Literal["sum", "product", "gate"] = Field("sum", description="How the parts make one reward.")
        parts: list[Part] = Field(..., min_length=1, description="Named parts, each any registered scorer.")
        gate_threshold: float = Field(0.5, description="gate: the first part passes at this reward or above.")
        fail_reward: float = Field(0.0, description="gate: the reward of a response that fails the first part.")

        @field_validator("parts", mode="before")
        @classmethod
        def _each_part_at_its_place(cls, value: Any, info: ValidationInfo) -> Any:
            """Validate each part with its own place as the context's ``where``: a problem in a part's
            scorer then names ``scorer.parts[1].scorer.function`` (validated as one, every part's scorer
            would be ``scorer.scorer``), and every bad part is reported at once."""
            context = info.context
            if not isinstance(value, list) or not context or "registry" not in context:
                return value  # no registry: nested sections are only checked for their shape
            where = context.get("where", "scorer")
            parts: list[Any] = []
            problems: list[str] = []
            for i, item in enumerate(value):
                try:
                    parts.append(Part.model_validate(item, context={**context, "where": f"{where}.parts[{i}]"}))
                except ConfigError as err:  # its scorer section's own problems, with their full paths
                    problems.extend(err.problems)
                except ValidationError:  # validated again with the list, where pydantic locates the error
                    parts.append(item)
            if problems:
                raise ConfigError(problems)
            return parts

        @model_validator(mode="after")
        def _distinct_names(self) -> CombineScorer.Config:
            names = [part.name for part in self.parts]
            repeated = sorted({n for n in names if names.count(n) > 1})
            if repeated:
                raise ValueError(f"parts: each name once; repeated: {', '.join(repeated)}")
            if self.mode == "gate" and len(self.parts) < 2:
                raise ValueError("mode gate needs the verifier and at least one other part")
            return self

        def check_columns(self, columns: Collection[str], where: str, registry: Any) -> list[str]:
            """Each part's scorer checked against the data's columns (see Run's data check)."""
            problems: list[str] = []
            for i, part in enumerate(self.parts):
                place = f"{where}.parts[{i}].scorer"
                spec = resolve_plugin_section("scorer", part.scorer, registry, place)
                check = getattr(spec.config, "check_columns", None)
                if check is not None:
                    problems.extend(check(columns, place, registry))
            return problems

        @model_validator(mode="after")
        def _finite_numbers(self, info: ValidationInfo) -> CombineScorer.Config:
            """A NaN or infinite weight, threshold or fail reward makes every reward non-finite (or
            every gate shut), which the run would then blame on the scorer (exit 3) at its first
            step: a config error, found when the config is checked, naming the field."""
            where = (info.context or {}).get("where", "scorer")
            numbers = [(f"parts[{i}].weight", part.weight) for i, part in enumerate(self.parts)]
            numbers += [("gate_threshold", self.gate_threshold), ("fail_reward", self.fail_reward)]
            problems = [
                f"{where}.{name}: must be a finite number (got {value})"
                for name, value in numbers
                if not math.isfinite(value)
            ]
            if problems:
                raise ConfigError(problems)  # resolve_plugin_section reports these lines as they are
            return self

    def __init__(self, config: Config, context: PluginContext):
        self.config = config
        self.parts = [build_nested("scorer", part.scorer, context) for part in config.parts]
        self.remote = any(is_remote(scorer) for scorer in self.parts)
        remote_count = sum(is_remote(scorer) for scorer in self.parts)
        self._pool = (
            ThreadPoolExecutor(max_workers=remote_count, thread_name_prefix="combine") if remote_count else None
        )

    def score(self, rollouts: list[Rollout]) -> PartRewards:
        parts = self._score_parts(rollouts)
        groups = [r.group for r in rollouts]
        weighted = []
        for part, rewards in zip(self.config.parts, parts.values(), strict=True):
            values = zscore_within_groups(rewards, groups) if part.normalize == "zscore" else rewards
            weighted.append(part.weight * values)
        stacked = torch.stack(weighted)
        if self.config.mode == "sum":
            total = stacked.sum(dim=0)
        elif self.config.mode == "product":
            total = stacked.prod(dim=0)
        else:
            passed = parts[self.config.parts[0].name] >= self.config.gate_threshold
            total = torch.where(passed, stacked.sum(dim=0), torch.full_like(stacked[0], self.config.fail_reward))
        return PartRewards(total.float(), parts)

    def _score_parts(self, rollouts: list[Rollout]) -> dict[str, torch.Tensor]:
        """Every part's raw rewards; remote parts in flight together while local ones compute."""
        pool = self._pool  # present whenever a part is remote
        futures = {
            part.name: pool.submit(scorer.score, rollouts)
            for part, scorer in zip(self.config.parts, self.parts, strict=True)
            if is_remote(scorer) and pool is not None
        }
        results: dict[str, Any] = {
            part.name: scorer.score(rollouts)
            for part, scorer in zip(self.config.parts, self.parts, strict=True)
            if not is_remote(scorer)
        }
        results.update({name: future.result() for name, future in futures.items()})
        parts = {}
        for part in self.config.parts:
            value = results[part.name]
            value = value.total if isinstance(value, PartRewards) else value
            parts[part.name] = as_rewards(value, len(rollouts), f"{self.name}.{part.name}")
        return parts

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        for scorer in self.parts:
            scorer.close()
