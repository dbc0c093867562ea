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
from thresher.core.run.records import ScoredStep, group_means, rollout_record
from thresher.core.selection import duplicate_mask
from thresher.core.session import Plugins, Session
from thresher.core.training.distributed import Distributed
from thresher.core.types import GeneratesInChunks, Prompt, ReportsMetrics, Rollout, is_remote

RANK_SEED_STRIDE = 104_729  # each rank samples its shard with its own seed
ROUND_SEED_STRIDE = 7_919  # and each round of rs.sampling.mode: until_accepted its own (round 1: the step's)
CALL_SEED_STRIDE = 3_571  # and, in a round, each call for the prompts that need fewer (call 1: the round's)

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
        rewards, kept = scored.per_rollout(scored.rewards).tolist(), scored.per_rollout(scored.kept).tolist()
        parts = {name: values.tolist() for name, values in scored.parts.items()}
        pass_rates = prompt_reward_means(scored)
        rows = [
            rollout_record(r, rewards[i], kept[i], {name: values[i] for name, values in parts.items()})
            | {"prompt_reward_mean": pass_rates[r.group]}
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

    def sample(
        self,
        prompts: list[Prompt],
        step: int,
        label: str,
        write_rollouts: RolloutWriter,
        budgets: list[int] | None = None,
    ) -> ScoredStep:
        """N responses per prompt (this rank's shard), scored, gathered and selected — or, with
        ``rs.sampling.mode: until_accepted``, rounds of them until each prompt has enough kept.
        ``budgets``: each prompt's own count instead of N (``rs.prompt_pool.allocate: by_pass_rate``;
        with ``until_accepted`` its most). Rollouts whose scoring failed are written
        (``write_rollouts``) before the error propagates: nothing generated is lost."""
        rs = self.config.rs
        if rs.sampling.mode == "until_accepted":
            caps = budgets or [rs.max_rollouts()] * len(prompts)
            scored = self._sample_in_rounds(prompts, step, label, write_rollouts, rs.round_size(), caps, True)
            wanted = rs.sampling.min_accepted
            accepted = int((scored.kept.sum(dim=1) >= wanted).sum())
            scored.step_metrics.update(prompts_accepted=accepted)
            return scored
        n = rs.num_rollouts_per_prompt
        if budgets is not None:  # a decode call never takes more than N per prompt: what memory is planned for
            return self._sample_in_rounds(prompts, step, label, write_rollouts, n, budgets, False)
        rollouts, flat, parts, step_metrics = self._round(prompts, n, step, label, self.seed(step), write_rollouts)
        return self.select(rollouts, flat.view(len(prompts), n), step, step_metrics, write_rollouts, parts)

    def _round(
        self, prompts: list[Prompt], n: int, step: int, label: str, seed: int, write_rollouts: RolloutWriter
    ) -> tuple[list[Rollout], torch.Tensor, dict[str, torch.Tensor], dict[str, Any]]:
        """``n`` responses for each of ``prompts``: this rank generates and scores its shard, then every
        rank gets all of them (``group`` = the prompt's position in ``prompts``)."""
        generator = self.plugins.generator
        low, high = self.dist.shard_bounds(len(prompts))
        # A chunked generator's progress is countable: this rank's responses, as chunks come out.
        total = (high - low) * n if isinstance(generator, GeneratesInChunks) else None
        self.reporter.phase(f"{label}: generating {len(prompts)}×{n} responses", total=total)
        if low == high:  # more ranks than prompts left in this round: nothing to generate here
            step_metrics: dict[str, Any] = {"time_generate": 0.0, "time_score": 0.0, **self._scorer_metrics()}
            rollouts, flat, parts = self._gather([], torch.zeros(0), {}, low)
            return rollouts, flat, parts, step_metrics
        generate = self._generate_and_score_overlapped if self.overlap_scoring() else self._generate_then_score
        rollouts, scores, step_metrics = generate(prompts[low:high], n, step, label, seed)
        try:
            flat, parts = as_scored(scores(), len(rollouts), self.config.scorer.type)
        except ScoringInterrupted:
            self.interrupts.check(f"while scoring step {step}")  # the stop request: abandon the step
            raise
        except ThresherError:
            write_rollouts.unscored(step, rollouts)
            raise
        step_metrics["time_score"] = time.perf_counter() - step_metrics.pop("_scoring_from")
        step_metrics.update(self._scorer_metrics())
        rollouts, flat, parts = self._gather(rollouts, flat, parts, low)
        return rollouts, flat, parts, step_metrics

    def _scorer_metrics(self) -> dict[str, Any]:
        """The scorer's numbers, combined over ranks (each scored its share; every rank takes part in
        the gather, one that scored nothing this round too)."""
        scorer = self.plugins.scorer
        if not isinstance(scorer, ReportsMetrics):
            return {}
        combined = over_ranks(self.dist.gather(scorer.metrics()))
        return {f"scorer_{k}": v for k, v in combined.items()}

    def _sample_in_rounds(
        self,
        prompts: list[Prompt],
        step: int,
        label: str,
        write_rollouts: RolloutWriter,
        size: int,
        caps: list[int],
        until_accepted: bool,
    ) -> ScoredStep:
        """Rounds of up to ``size`` responses for each prompt still open, until each has its ``caps``
        (and, ``until_accepted``, leaves once the selector keeps ``rs.sampling.min_accepted`` of all it
        got: the selector sees everything sampled so far after each round). Prompts that need fewer
        than ``size`` in a round are sampled in a call of their own. Every rank sees every round's
        rollouts, so all agree on who leaves."""
        wanted = self.config.rs.sampling.min_accepted
        grid = RaggedGroups(len(prompts))
        open_prompts = list(range(len(prompts)))
        totals: dict[str, Any] = {"time_generate": 0.0, "time_score": 0.0}
        rounds = 0
        scored: ScoredStep | None = None
        while open_prompts:
            takes: dict[int, list[int]] = {}  # responses this round → the prompts that get that many
            for p in open_prompts:
                takes.setdefault(min(size, caps[p] - grid.count(p)), []).append(p)
            for call, (take, members) in enumerate(sorted(takes.items(), key=lambda item: -item[0])):
                seed = self.seed(step) + ROUND_SEED_STRIDE * rounds + CALL_SEED_STRIDE * call
                call_label = f"{label} round {rounds + 1}" if until_accepted or rounds else label
                batch = [prompts[p] for p in members]
                rollouts, flat, parts, metrics = self._round(batch, take, step, call_label, seed, write_rollouts)
                for key, value in metrics.items():  # times and counts add up over calls; rates: the last one's
                    adds = key.startswith("time_") or (isinstance(value, int) and not isinstance(value, bool))
                    totals[key] = totals.get(key, 0) + value if adds else value
                grid.add([members[r.group] for r in rollouts], rollouts, flat, parts)
            rounds += 1
            open_prompts = [p for p in open_prompts if grid.count(p) < caps[p]]
            if until_accepted or not open_prompts:
                rewards, present = grid.rewards()
                scored = self.select(grid.rollouts(), rewards, step, totals, write_rollouts, grid.parts(), present)
                if until_accepted:
                    kept = scored.kept.sum(dim=1)
                    open_prompts = [p for p in open_prompts if kept[p] < wanted]
        assert scored is not None  # at least one round: a batch has a prompt, a cap is at least 1
        scored.step_metrics.update(sampling_rounds=rounds)
        return scored

    def select(
        self,
        rollouts: list[Rollout],
        rewards: torch.Tensor,
        step: int,
        step_metrics: dict[str, Any],
        write_rollouts: RolloutWriter,
        parts: dict[str, torch.Tensor] | None = None,
        present: torch.Tensor | None = None,
    ) -> ScoredStep:
        """Drop non-finite rewards (or stop), mark duplicates, and ask the selector for its mask (on
        rewards normalised within each prompt, with ``selector.normalize``; records keep the raw ones).
        ``present`` [P, W]: the cells that hold a rollout (ragged groups); the others are invalid."""
        parts = parts or {}
        selector_options = self.config.selector.selector_options()
        cells = present if present is not None else torch.ones(rewards.shape, dtype=torch.bool)
        valid = torch.isfinite(rewards) & cells
        bad = int((cells & ~valid).sum())
        if bad and self.config.rs.on_nonfinite_reward == "error":
            unselected = torch.zeros_like(valid)
            write_rollouts(step, ScoredStep(rollouts, rewards, valid, unselected, parts=parts, present=present))
            raise ScorerError(
                f"scorer returned {bad} non-finite reward(s) at step {step} (rollouts saved; NaN, "
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
        return ScoredStep(rollouts, rewards, valid, kept, step_metrics, parts, present)

    def overlap_scoring(self) -> bool:
        setting = self.config.rs.overlap_scoring
        if not isinstance(self.plugins.generator, GeneratesInChunks):
            return False
        if setting == "auto":
            return is_remote(self.plugins.scorer)
        return bool(setting)

    def _generate_then_score(self, prompts: list[Prompt], n: int, step: int, label: str, seed: int) -> Generated:
        t0 = time.perf_counter()
        generator = self.plugins.generator
        if isinstance(generator, GeneratesInChunks):  # the same rollouts as generate(), counted
            rollouts: list[Rollout] = []
            for chunk in generator.generate_chunks(prompts, n, seed=seed):
                rollouts.extend(chunk)
                self.reporter.advance(len(chunk))
        else:
            rollouts = generator.generate(prompts, n, seed=seed)
        step_metrics = {"time_generate": time.perf_counter() - t0}
        self._after_generation(rollouts, len(prompts), n, step)
        self.reporter.phase(f"{label}: scoring {len(rollouts)} responses")
        step_metrics["_scoring_from"] = time.perf_counter()
        scorer = self.plugins.scorer
        return rollouts, lambda: [scorer.score(rollouts)], step_metrics

    def _generate_and_score_overlapped(
        self, prompts: list[Prompt], n: int, step: int, label: str, seed: int
    ) -> Generated:
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
            for chunk in generator.generate_chunks(prompts, n, seed=seed):
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
        names = next((list(shard[2]) for shard in shards if shard[2]), [])  # a rank with no prompts has none
        merged = {name: torch.cat([shard[2][name] for shard in shards if shard[0]]) for name in names}
        return [r for shard in shards for r in shard[0]], torch.cat([shard[1] for shard in shards]), merged


class RaggedGroups:
    """A step's rollouts as they come in rounds: each prompt's own list, and the [P, W] grid a
    selector reads (W = the most any prompt has; a shorter prompt's missing cells are NaN)."""

    def __init__(self, prompts: int):
        self.by_prompt: list[list[tuple[Rollout, float, dict[str, float]]]] = [[] for _ in range(prompts)]

    def count(self, prompt: int) -> int:
        return len(self.by_prompt[prompt])

    def add(
        self, positions: list[int], rollouts: list[Rollout], rewards: torch.Tensor, parts: dict[str, torch.Tensor]
    ) -> None:
        """A round's rollouts; ``positions[i]``: the prompt (position in the step) of rollout i."""
        values = rewards.tolist()
        for i, (prompt, r) in enumerate(zip(positions, rollouts, strict=True)):
            r.group, r.sample = prompt, self.count(prompt)
            self.by_prompt[prompt].append((r, values[i], {name: float(v[i]) for name, v in parts.items()}))

    def rollouts(self) -> list[Rollout]:
        return [r for rows in self.by_prompt for r, _, _ in rows]

    def rewards(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Rewards [P, W] (NaN where a prompt has fewer) and the cells that hold a rollout."""
        width = max(len(rows) for rows in self.by_prompt)
        rewards = torch.full((len(self.by_prompt), width), float("nan"))
        present = torch.zeros((len(self.by_prompt), width), dtype=torch.bool)
        for p, rows in enumerate(self.by_prompt):
            rewards[p, : len(rows)] = torch.tensor([reward for _, reward, _ in rows], dtype=torch.float32)
            present[p, : len(rows)] = True
        return rewards, present

    def parts(self) -> dict[str, torch.Tensor]:
        rows = [parts for prompt_rows in self.by_prompt for _, _, parts in prompt_rows]
        names = list(rows[0]) if rows else []
        return {name: torch.tensor([row[name] for row in rows], dtype=torch.float32) for name in names}


def prompt_reward_means(scored: ScoredStep) -> list[float | None]:
    """Each prompt's mean reward over its valid rollouts (its pass rate when rewards are 0/1)."""
    mean, counts = group_means(scored.rewards, scored.valid)
    return [float(m) if int(c) else None for m, c in zip(mean, counts, strict=True)]


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
