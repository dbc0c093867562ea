"""Sample a batch: generate N responses per prompt, score them, gather them over ranks, select.

Sampling seeds are derived from ``(rs.seed, step)``, which makes a step's rollouts independent of what
ran before it (and a resumed run sample exactly what an uninterrupted one would). What every plugin
returns is checked here, so a plugin's mistake is one line naming the plugin, never a silent result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from thresher.core.checks import as_scored, call_selector, check_generated
from thresher.core.config import RunConfig
from thresher.core.console import ConsoleReporter
from thresher.core.errors import ScorerError, ScoringInterrupted, ThresherError
from thresher.core.faults import failpoint
from thresher.core.interrupt import Interrupts
from thresher.core.normalize import normalize_within_prompts
from thresher.core.run.directory import RunDir
from thresher.core.run.loggers import NoLoggers, RunLoggers
from thresher.core.run.records import ScoredStep, rollout_record
from thresher.core.selection import duplicate_mask
from thresher.core.session import Plugins, Session
from thresher.core.training.distributed import Distributed
from thresher.core.types import GeneratesInChunks, Prompt, ReportsMetrics, Rollout, is_remote

RANK_SEED_STRIDE = 104_729  # each rank samples its shard with its own seed

# (rollouts, a call that returns their reward results, step_metrics)
Generated = tuple[list[Rollout], Callable[[], list[Any]], dict[str, float]]


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def sampling_seed(seed: int, step: int, rank: int) -> int:
    return step_seed(seed, step) + RANK_SEED_STRIDE * rank


@dataclass
class RolloutWriter:
    """Writes a step's rollouts (``rollouts/step_N.jsonl``, main process only) and hands the same
    rows to the loggers that take rollouts."""

    run_dir: RunDir
    dist: Distributed
    loggers: RunLoggers | NoLoggers

    def __call__(self, step: int, scored: ScoredStep) -> None:
        rewards, kept = scored.rewards.flatten().tolist(), scored.kept.flatten().tolist()
        parts = {name: values.tolist() for name, values in scored.parts.items()}
        rows = [
            rollout_record(r, rewards[i], kept[i], {name: values[i] for name, values in parts.items()})
            for i, r in enumerate(scored.rollouts)
        ]
        self._write(step, rows)

    def unscored(self, step: int, rollouts: list[Rollout]) -> None:
        """Rollouts whose scoring failed: written with no reward, so nothing generated is lost."""
        self._write(step, [rollout_record(r, None, None) for r in rollouts])

    def _write(self, step: int, rows: list[dict[str, Any]]) -> None:
        if not self.dist.is_main:
            return
        self.run_dir.write_rollouts(step, rows)
        self.loggers.log_rollouts(step, rows)


@dataclass
class Sampler:
    """Generates, scores and selects one batch of prompts; what it uses and nothing else."""

    config: RunConfig
    plugins: Plugins
    dist: Distributed
    reporter: ConsoleReporter
    interrupts: Interrupts

    @classmethod
    def of(cls, session: Session) -> Sampler:
        return cls(session.config, session.plugins, session.dist, session.reporter, session.interrupts)

    def seed(self, step: int) -> int:
        return sampling_seed(self.config.rs.seed, step, self.dist.rank)

    def sample(self, prompts: list[Prompt], step: int, label: str, write_rollouts: RolloutWriter) -> ScoredStep:
        """N responses per prompt (this rank's shard), scored, gathered and selected. Rollouts whose
        scoring failed are written (``write_rollouts``) before the error propagates: nothing
        generated is lost."""
        n = self.config.rs.num_rollouts_per_prompt
        generator = self.plugins.generator
        low, high = self.dist.shard_bounds(len(prompts))
        # A chunked generator's progress is countable: this rank's responses, as chunks come out.
        total = (high - low) * n if isinstance(generator, GeneratesInChunks) else None
        self.reporter.phase(f"{label}: generating {len(prompts)}×{n} responses", total=total)
        generate = self._generate_and_score_overlapped if self.overlap_scoring() else self._generate_then_score
        rollouts, scores, step_metrics = generate(prompts[low:high], n, step, label)
        try:
            flat, parts = as_scored(scores(), len(rollouts), self.config.scorer.type)
        except ScoringInterrupted:
            self.interrupts.check(f"while scoring step {step}")  # the stop request: abandon the step
            raise
        except ThresherError:
            write_rollouts.unscored(step, rollouts)
            raise
        step_metrics["time_score"] = time.perf_counter() - step_metrics.pop("_scoring_from")
        scorer = self.plugins.scorer
        if isinstance(scorer, ReportsMetrics):  # each rank scored its share: combine their numbers
            combined = over_ranks(self.dist.gather(scorer.metrics()))
            step_metrics.update({f"scorer_{k}": v for k, v in combined.items()})
        rollouts, flat, parts = self._gather(rollouts, flat, parts, low)
        return self.select(rollouts, flat.view(len(prompts), n), step, step_metrics, write_rollouts, parts)

    def select(
        self,
        rollouts: list[Rollout],
        rewards: torch.Tensor,
        step: int,
        step_metrics: dict[str, Any],
        write_rollouts: RolloutWriter,
        parts: dict[str, torch.Tensor] | None = None,
    ) -> ScoredStep:
        """Drop non-finite rewards (or stop), mark duplicates, and ask the selector for its mask (on
        rewards normalised within each prompt, with ``selector.normalize``; records keep the raw ones)."""
        parts = parts or {}
        selector_options = self.config.selector.selector_options()
        valid = torch.isfinite(rewards)
        if not bool(valid.all()) and self.config.rs.on_nonfinite_reward == "error":
            write_rollouts(step, ScoredStep(rollouts, rewards, valid, torch.zeros_like(valid), parts=parts))
            raise ScorerError(
                f"scorer returned {int((~valid).sum())} non-finite reward(s) at step {step} (rollouts saved; NaN, "
                "infinite, or beyond float32's ±3.4e38; set rs.on_nonfinite_reward=drop to skip such responses)"
            )
        dedup = selector_options.dedup
        duplicates = duplicate_mask(rollouts, (rewards.shape[0], rewards.shape[1]), dedup)
        eligible = valid & ~duplicates
        seen = normalize_within_prompts(rewards, eligible, selector_options.normalize)
        selector = self.plugins.selector
        kept = call_selector(selector, seen, eligible, rollouts, self.config.selector.type) & eligible
        if dedup != "none":
            step_metrics["duplicates_not_selectable"] = int(duplicates.sum())
        if isinstance(selector, ReportsMetrics):
            step_metrics.update({f"selector_{k}": v for k, v in selector.metrics().items()})
        tokens = sum(len(r.response_ids) for r in rollouts)
        step_metrics["generated_tokens"] = tokens
        seconds = step_metrics["time_generate"]
        step_metrics["tokens_per_s_generate"] = tokens / seconds if seconds > 0 else 0.0
        return ScoredStep(rollouts, rewards, valid, kept, step_metrics, parts)

    def overlap_scoring(self) -> bool:
        setting = self.config.rs.overlap_scoring
        if not isinstance(self.plugins.generator, GeneratesInChunks):
            return False
        if setting == "auto":
            return is_remote(self.plugins.scorer)
        return bool(setting)

    def _generate_then_score(self, prompts: list[Prompt], n: int, step: int, label: str) -> Generated:
        t0 = time.perf_counter()
        generator = self.plugins.generator
        if isinstance(generator, GeneratesInChunks):  # the same rollouts as generate(), counted
            rollouts: list[Rollout] = []
            for chunk in generator.generate_chunks(prompts, n, seed=self.seed(step)):
                rollouts.extend(chunk)
                self.reporter.advance(len(chunk))
        else:
            rollouts = generator.generate(prompts, n, seed=self.seed(step))
        step_metrics = {"time_generate": time.perf_counter() - t0}
        self._after_generation(rollouts, len(prompts), n, step)
        self.reporter.phase(f"{label}: scoring {len(rollouts)} responses")
        step_metrics["_scoring_from"] = time.perf_counter()
        scorer = self.plugins.scorer
        return rollouts, lambda: [scorer.score(rollouts)], step_metrics

    def _generate_and_score_overlapped(self, prompts: list[Prompt], n: int, step: int, label: str) -> Generated:
        """Score each generated chunk on a worker thread while the next chunk is generated.

        ``time_score`` then counts only the scoring left after generation ends (what the step waits
        for); ``time_score_busy`` is the scorer's total working time.
        """
        busy = [0.0]
        scorer, generator = self.plugins.scorer, self.plugins.generator
        assert isinstance(generator, GeneratesInChunks)  # overlap_scoring() said so

        def timed_score(chunk: list[Rollout]) -> Any:
            t = time.perf_counter()
            try:
                return scorer.score(chunk)
            finally:
                busy[0] += time.perf_counter() - t

        t0 = time.perf_counter()
        rollouts: list[Rollout] = []
        futures: list[tuple[int, Future[Any]]] = []
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thresher-score")
        try:
            for chunk in generator.generate_chunks(prompts, n, seed=self.seed(step)):
                rollouts.extend(chunk)
                self.reporter.advance(len(chunk))
                if not self.interrupts.requested:
                    futures.append((len(chunk), pool.submit(timed_score, chunk)))
            step_metrics = {"time_generate": time.perf_counter() - t0}
            self._after_generation(rollouts, len(prompts), n, step)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        self.reporter.phase(f"{label}: scoring the last of {len(rollouts)} responses", total=len(rollouts))
        counted = [future.done() for _, future in futures]  # scored while generating: already done
        self.reporter.advance(sum(size for (size, _), done in zip(futures, counted, strict=True) if done))
        step_metrics["_scoring_from"] = time.perf_counter()

        def scores() -> list[Any]:
            results = []
            try:
                for (size, future), done in zip(futures, counted, strict=True):
                    results.append(future.result())
                    if not done:
                        self.reporter.advance(size)
                return results
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                step_metrics["time_score_busy"] = busy[0]

        return rollouts, scores, step_metrics

    def _after_generation(self, rollouts: list[Rollout], prompts: int, n: int, step: int) -> None:
        self.interrupts.check(f"during step {step}")  # a stopped generation returns partial rollouts
        check_generated(rollouts, prompts, n, self.config.generator.type)
        failpoint("generated", step)

    def _gather(
        self, rollouts: list[Rollout], rewards: torch.Tensor, parts: dict[str, torch.Tensor], offset: int
    ) -> tuple[list[Rollout], torch.Tensor, dict[str, torch.Tensor]]:
        """Every rank's rollouts and rewards (and reward parts), in prompt order, on every rank
        (group = global position)."""
        if not self.dist.enabled:
            return rollouts, rewards, parts
        for r in rollouts:
            r.group += offset
        shards = self.dist.gather((rollouts, rewards, parts))
        merged = {name: torch.cat([shard[2][name] for shard in shards]) for name in parts}
        return [r for shard in shards for r in shard[0]], torch.cat([shard[1] for shard in shards]), merged


def over_ranks(per_rank: list[dict[str, Any]]) -> dict[str, Any]:
    """One record from every rank's plugin metrics: counts (ints) are summed, other numbers averaged."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(key for metrics in per_rank for key in metrics):
        values = [metrics[key] for metrics in per_rank if key in metrics]
        if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            out[key] = sum(values)
        elif all(isinstance(v, int | float) for v in values):
            out[key] = sum(values) / len(values)
        else:
            out[key] = values[0]
    return out
