"""Validation: greedy (and sampled) answers to the held-out prompts, scored by the training scorer
and, if configured, by a separate ``validation_scorer`` that catches over-optimisation. With
``data.group_field`` the mean is also reported per group (a difficulty level, a source)."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch

from thresher.core.checks import as_scored
from thresher.core.config import RunConfig
from thresher.core.console import ConsoleReporter
from thresher.core.errors import EarlyStop
from thresher.core.interrupt import Interrupts
from thresher.core.run.loggers import NoLoggers, RunLoggers
from thresher.core.sampling import sampling_seed
from thresher.core.selection import Guardrails, diversity
from thresher.core.session import Plugins, Progress, Session
from thresher.core.training.distributed import Distributed
from thresher.core.types import Prompt, Rollout

VALIDATION_SEED_OFFSET = 7_919


@dataclass
class Validator:
    """Validates the policy on ``prompts`` when due; records land in ``progress.validation_history``."""

    config: RunConfig
    prompts: list[Prompt]
    plugins: Plugins
    dist: Distributed
    reporter: ConsoleReporter
    interrupts: Interrupts
    guardrails: Guardrails
    progress: Progress

    @classmethod
    def of(cls, session: Session) -> Validator:
        return cls(
            session.config,
            session.inputs.val_prompts,
            session.plugins,
            session.dist,
            session.reporter,
            session.interrupts,
            session.guardrails,
            session.progress,
        )

    def due(self, step: int) -> bool:
        """Every ``rs.val_every`` steps and after the last (with validation prompts)."""
        every = self.config.rs.val_every
        last = self.progress.is_last_step(step, self.config.rs.max_steps, self.config.rs.max_generated_tokens)
        return bool(self.prompts) and (bool(every and step % every == 0) or last)

    def due_at_start(self) -> bool:
        """Before the first step, and for a resumed run whose last checkpointed step was due for
        validation but was killed before it: its metrics then equal an uninterrupted run's."""
        start = self.progress.start_step
        due = bool(self.prompts) and (start == 0 or self.due(start))
        return due and not any(record.get("step") == start for record in self.progress.validation_history)

    def validate(self, step: int, loggers: RunLoggers | NoLoggers) -> None:
        """Validate after ``step``; raises :class:`EarlyStop` when a guardrail says so."""
        self.reporter.phase(f"validating on {len(self.prompts)} prompts")
        t0 = time.perf_counter()
        record: dict[str, Any] = {"kind": "validation", "step": step, "val_prompts": len(self.prompts)}
        modes = ("greedy", "sampled") if self.config.rs.val_sampled else ("greedy",)
        for mode in modes:
            record.update(self._one_mode(step, mode))
        record["val_reward_mean"] = record["val_reward_greedy"]
        record["time_validate"] = time.perf_counter() - t0
        loggers.write(record)
        self.progress.validation_history.append(record)
        self.reporter.validation(record)
        reason = self.guardrails.after_validation(record)
        if reason:
            raise EarlyStop(step, reason)

    def _one_mode(self, step: int, mode: str) -> dict[str, Any]:
        config, plugins = self.config, self.plugins
        low, high = self.dist.shard_bounds(len(self.prompts))
        seed = sampling_seed(config.rs.seed, step, self.dist.rank) + VALIDATION_SEED_OFFSET
        rollouts = plugins.generator.generate(self.prompts[low:high], 1, seed=seed, greedy=mode == "greedy")
        self.interrupts.check(f"while validating after step {step}")
        rewards = as_scored([plugins.scorer.score(rollouts)], len(rollouts), config.scorer.type)[0]
        heldout = torch.zeros(len(rollouts))
        if plugins.validation_scorer is not None and config.validation_scorer is not None:
            results = [plugins.validation_scorer.score(rollouts)]
            heldout = as_scored(results, len(rollouts), config.validation_scorer.type)[0]
        gathered = self.dist.gather((rollouts, rewards, heldout))
        rollouts = [r for part, _, _ in gathered for r in part]
        scores = torch.cat([g[1] for g in gathered])
        record: dict[str, Any] = {f"val_reward_{mode}": mean_finite(scores)}
        if config.data.group_field:
            record.update(group_means(rollouts, scores, config.data.group_field, f"val_reward_{mode}"))
        if plugins.validation_scorer is not None:
            record[f"val_heldout_reward_{mode}"] = mean_finite(torch.cat([g[2] for g in gathered]))
        record[f"val_distinct_2_{mode}"] = diversity(rollouts, "")["distinct_2"]
        record[f"val_response_len_{mode}"] = sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts))
        return record


def group_means(rollouts: list[Rollout], rewards: torch.Tensor, field: str, prefix: str) -> dict[str, float]:
    """``{prefix}_{field}_{value}``: the mean reward of the prompts whose ``field`` has each value
    (a difficulty level, a source, a language), so a mean that hides a solved and a hopeless half
    shows both. Values are made safe for metric names (letters, digits, ``_``, ``-``, ``.``)."""
    groups: dict[str, list[int]] = {}
    for i, rollout in enumerate(rollouts):
        value = rollout.prompt.extra.get(field)
        label = "missing" if value is None else re.sub(r"[^A-Za-z0-9_.-]+", "_", str(value)).strip("_") or "empty"
        groups.setdefault(label, []).append(i)
    return {
        f"{prefix}_{field}_{label}": mean_finite(rewards[torch.tensor(members)])
        for label, members in sorted(groups.items())
    }


def mean_finite(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")
