"""The phases of a global step, each a function over the run's :class:`Components`: sample (generate
and score), select, write rollouts, train, refresh the generator, validate, checkpoint, save.

Sampling seeds are derived from ``(rs.seed, step)``, which makes a step's rollouts independent of what
ran before it (and a resumed run sample exactly what an uninterrupted one would). What every plugin
returns is checked here, so a plugin's mistake is one line naming the plugin, never a silent result.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from thresher.core.checks import as_scored, call_selector, check_generated
from thresher.core.components import Components
from thresher.core.config.resolve import resolve_config
from thresher.core.errors import ScorerError, ScoringInterrupted, ThresherError
from thresher.core.faults import failpoint
from thresher.core.interrupt import StopRequested
from thresher.core.normalize import normalize_within_prompts
from thresher.core.run.checkpoint import (
    STEP_DIR,
    DamagedCheckpoint,
    check_resume_compatible,
    checkpoint_files,
    checkpoint_problem,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from thresher.core.run.loggers import NoLoggers, RunLoggers
from thresher.core.run.records import ScoredStep, rollout_record
from thresher.core.selection import diversity, duplicate_mask
from thresher.core.training.lora import load_adapters, merged_state_dict
from thresher.core.training.trainer import TrainSequence
from thresher.core.types import GeneratesInChunks, Prompt, ReportsMetrics, Rollout, is_remote

VALIDATION_SEED_OFFSET = 7_919
RANK_SEED_STRIDE = 104_729  # each rank samples its shard with its own seed

# (rollouts, a call that returns their reward tensors, timings)
Generated = tuple[list[Rollout], Callable[[], list[torch.Tensor]], dict[str, float]]


class EarlyStop(Exception):
    """A guardrail or the early-stop rule ended the run; not an error."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def sampling_seed(run: Components, step: int) -> int:
    return step_seed(run.config.rs.seed, step) + RANK_SEED_STRIDE * run.dist.rank


# --- sample: generate and score, then select ----------------------------------------------------


def sample(run: Components, prompts: list[Prompt], step: int, label: str) -> ScoredStep:
    """Generate N responses per prompt (this rank's shard), score them, gather, and select."""
    n = run.config.rs.num_rollouts_per_prompt
    low, high = run.dist.shard_bounds(len(prompts))
    # A chunked generator's progress is countable: this rank's responses, as chunks come out.
    total = (high - low) * n if isinstance(run.generator, GeneratesInChunks) else None
    run.reporter.phase(f"{label}: generating {len(prompts)}×{n} responses", total=total)
    generate = _generate_and_score_overlapped if overlap_scoring(run) else _generate_then_score
    rollouts, scores, timings = generate(run, prompts[low:high], n, step, label)
    try:
        flat, parts = as_scored(scores(), len(rollouts), run.config.scorer.type)
    except ScoringInterrupted:
        run.interrupts.check(f"while scoring step {step}")  # the stop request: abandon the step
        raise
    except ThresherError:
        write_rollouts(run, step, ScoredStep(rollouts, None, None, None))  # nothing generated is lost
        raise
    timings["time_score"] = time.perf_counter() - timings.pop("_scoring_from")
    if isinstance(run.scorer, ReportsMetrics):  # each rank scored its share: combine their numbers
        combined = over_ranks(run.dist.gather(run.scorer.metrics()))
        timings.update({f"scorer_{k}": v for k, v in combined.items()})
    rollouts, flat, parts = _gather(run, rollouts, flat, parts, low)
    return select(run, rollouts, flat.view(len(prompts), n), step, timings, parts)


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


def select(
    run: Components,
    rollouts: list[Rollout],
    rewards: torch.Tensor,
    step: int,
    timings: dict,
    parts: dict[str, torch.Tensor] | None = None,
) -> ScoredStep:
    """Drop non-finite rewards (or stop), mark duplicates, and ask the selector for its mask (on
    rewards normalised within each prompt, with ``selector.normalize``; records keep the raw ones)."""
    parts = parts or {}
    valid = torch.isfinite(rewards)
    if not bool(valid.all()) and run.config.rs.on_nonfinite_reward == "error":
        write_rollouts(run, step, ScoredStep(rollouts, rewards, valid, torch.zeros_like(valid), parts=parts))
        raise ScorerError(
            f"scorer returned {int((~valid).sum())} non-finite reward(s) at step {step} (rollouts saved; NaN, "
            "infinite, or beyond float32's ±3.4e38; set rs.on_nonfinite_reward=drop to skip such responses)"
        )
    dedup = run.config.selector.options.get("dedup", "none")
    duplicates = duplicate_mask(rollouts, tuple(rewards.shape), dedup)
    eligible = valid & ~duplicates
    seen = normalize_within_prompts(rewards, eligible, run.config.selector.options.get("normalize", "none"))
    kept = call_selector(run.selector, seen, eligible, rollouts, run.config.selector.type) & eligible
    if dedup != "none":
        timings["duplicates_not_selectable"] = int(duplicates.sum())
    if isinstance(run.selector, ReportsMetrics):
        timings.update({f"selector_{k}": v for k, v in run.selector.metrics().items()})
    tokens = sum(len(r.response_ids) for r in rollouts)
    timings["generated_tokens"] = tokens
    timings["tokens_per_s_generate"] = tokens / timings["time_generate"] if timings["time_generate"] > 0 else 0.0
    return ScoredStep(rollouts, rewards, valid, kept, timings, parts)


def overlap_scoring(run: Components) -> bool:
    setting = run.config.rs.overlap_scoring
    if not isinstance(run.generator, GeneratesInChunks):
        return False
    if setting == "auto":
        return is_remote(run.scorer)
    return setting


def _generate_then_score(run: Components, prompts: list[Prompt], n: int, step: int, label: str) -> Generated:
    t0 = time.perf_counter()
    if isinstance(run.generator, GeneratesInChunks):  # the same rollouts as generate(), counted
        rollouts = []
        for chunk in run.generator.generate_chunks(prompts, n, seed=sampling_seed(run, step)):
            rollouts.extend(chunk)
            run.reporter.advance(len(chunk))
    else:
        rollouts = run.generator.generate(prompts, n, seed=sampling_seed(run, step))
    timings = {"time_generate": time.perf_counter() - t0}
    _after_generation(run, rollouts, len(prompts), n, step)
    run.reporter.phase(f"{label}: scoring {len(rollouts)} responses")
    timings["_scoring_from"] = time.perf_counter()
    return rollouts, lambda: [run.scorer.score(rollouts)], timings


def _generate_and_score_overlapped(run: Components, prompts: list[Prompt], n: int, step: int, label: str) -> Generated:
    """Score each generated chunk on a worker thread while the next chunk is generated.

    ``time_score`` then counts only the scoring left after generation ends (what the step waits
    for); ``time_score_busy`` is the scorer's total working time.
    """
    busy = [0.0]

    def timed_score(chunk: list[Rollout]) -> torch.Tensor:
        t = time.perf_counter()
        try:
            return run.scorer.score(chunk)
        finally:
            busy[0] += time.perf_counter() - t

    t0 = time.perf_counter()
    rollouts: list[Rollout] = []
    futures = []
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thresher-score")
    try:
        for chunk in run.generator.generate_chunks(prompts, n, seed=sampling_seed(run, step)):
            rollouts.extend(chunk)
            run.reporter.advance(len(chunk))
            if not run.interrupts.requested:
                futures.append((len(chunk), pool.submit(timed_score, chunk)))
        timings = {"time_generate": time.perf_counter() - t0}
        _after_generation(run, rollouts, len(prompts), n, step)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    run.reporter.phase(f"{label}: scoring the last of {len(rollouts)} responses", total=len(rollouts))
    counted = [future.done() for _, future in futures]  # scored while generating: already done
    run.reporter.advance(sum(size for (size, _), done in zip(futures, counted, strict=True) if done))
    timings["_scoring_from"] = time.perf_counter()

    def scores() -> list[torch.Tensor]:
        results = []
        try:
            for (size, future), done in zip(futures, counted, strict=True):
                results.append(future.result())
                if not done:
                    run.reporter.advance(size)
            return results
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            timings["time_score_busy"] = busy[0]

    return rollouts, scores, timings


def _after_generation(run: Components, rollouts: list[Rollout], prompts: int, n: int, step: int) -> None:
    run.interrupts.check(f"during step {step}")  # a stopped generation returns partial rollouts
    check_generated(rollouts, prompts, n, run.config.generator.type)
    failpoint("generated", step)


def _gather(
    run: Components, rollouts: list[Rollout], rewards: torch.Tensor, parts: dict[str, torch.Tensor], offset: int
) -> tuple[list[Rollout], torch.Tensor, dict[str, torch.Tensor]]:
    """Every rank's rollouts and rewards (and reward parts), in prompt order, on every rank (group =
    global position)."""
    if not run.dist.enabled:
        return rollouts, rewards, parts
    for r in rollouts:
        r.group += offset
    shards = run.dist.gather((rollouts, rewards, parts))
    merged = {name: torch.cat([shard[2][name] for shard in shards]) for name in parts}
    return [r for shard in shards for r in shard[0]], torch.cat([shard[1] for shard in shards]), merged


def write_rollouts(run: Components, step: int, scored: ScoredStep) -> None:
    if not run.dist.is_main:
        return
    rewards = scored.rewards.flatten().tolist() if scored.rewards is not None else None
    kept = scored.kept.flatten().tolist() if scored.kept is not None else None
    parts = {name: values.tolist() for name, values in scored.parts.items()}
    rows = [
        rollout_record(
            r,
            rewards[i] if rewards is not None else None,
            kept[i] if kept is not None else None,
            {name: values[i] for name, values in parts.items()},
        )
        for i, r in enumerate(scored.rollouts)
    ]
    run.run_dir.write_rollouts(step, rows)
    if run.loggers is not None:
        run.loggers.log_rollouts(step, rows)


# --- train and refresh ----------------------------------------------------------------------------


def train(run: Components, step: int, sequences: list[TrainSequence]) -> dict[str, Any]:
    """One global step's update; ReST-EM style strategies start again from the base model."""
    if not run.trainset.restarts_from_base:
        return run.trainer.train_step(step - 1, sequences)
    # Past this point the previous step's weights are gone, so the step is no longer abandoned on
    # an interrupt.
    run.interrupts.check(f"during step {step}")
    run.holder.load_weights(run.base_state)
    run.trainer.reset_optimizer()
    return run.trainer.train_step(step - 1, sequences, abandonable=False)


def refresh(run: Components) -> dict[str, Any]:
    """Hand the updated policy to the generator (under FSDP, gathered from the shards first)."""
    run.reporter.phase("refreshing generator weights")
    t0 = time.perf_counter()
    run.holder.sync_full()
    run.generator.load_weights(run.model)
    record: dict[str, Any] = {"time_refresh": time.perf_counter() - t0}
    if isinstance(run.generator, ReportsMetrics):
        record.update({f"generator_{k}": v for k, v in run.generator.metrics().items()})
    return record


# --- validate ---------------------------------------------------------------------------------------


def validation_due(run: Components, step: int) -> bool:
    every = run.config.rs.val_every
    return bool(run.val_prompts) and (bool(every and step % every == 0) or step == run.config.rs.max_steps)


def validated(run: Components, step: int) -> bool:
    return any(record.get("step") == step for record in run.progress.validation_history)


def validate(run: Components, step: int, metrics: RunLoggers | NoLoggers) -> None:
    """Greedy (and sampled) answers to the held-out prompts, scored by the training scorer and,
    if configured, by a separate ``validation_scorer`` that catches over-optimisation."""
    run.reporter.phase(f"validating on {len(run.val_prompts)} prompts")
    t0 = time.perf_counter()
    record: dict[str, Any] = {"kind": "validation", "step": step, "val_prompts": len(run.val_prompts)}
    modes = ("greedy", "sampled") if run.config.rs.val_sampled else ("greedy",)
    low, high = run.dist.shard_bounds(len(run.val_prompts))
    for mode in modes:
        seed = sampling_seed(run, step) + VALIDATION_SEED_OFFSET
        rollouts = run.generator.generate(run.val_prompts[low:high], 1, seed=seed, greedy=mode == "greedy")
        run.interrupts.check(f"while validating after step {step}")
        rewards = as_scored([run.scorer.score(rollouts)], len(rollouts), run.config.scorer.type)[0]
        heldout = (
            as_scored([run.validation_scorer.score(rollouts)], len(rollouts), run.config.validation_scorer.type)[0]
            if run.validation_scorer is not None
            else torch.zeros(len(rollouts))
        )
        gathered = run.dist.gather((rollouts, rewards, heldout))
        rollouts = [r for part, _, _ in gathered for r in part]
        record[f"val_reward_{mode}"] = _mean_finite(torch.cat([g[1] for g in gathered]))
        if run.config.data.group_field:
            scores = torch.cat([g[1] for g in gathered])
            record.update(group_means(rollouts, scores, run.config.data.group_field, f"val_reward_{mode}"))
        if run.validation_scorer is not None:
            record[f"val_heldout_reward_{mode}"] = _mean_finite(torch.cat([g[2] for g in gathered]))
        record[f"val_distinct_2_{mode}"] = diversity(rollouts, "")["distinct_2"]
        record[f"val_response_len_{mode}"] = sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts))
    record["val_reward_mean"] = record["val_reward_greedy"]
    record["time_validate"] = time.perf_counter() - t0
    metrics.write(record)
    run.progress.validation_history.append(record)
    run.reporter.validation(record)
    reason = run.guardrails.after_validation(record)
    if reason:
        raise EarlyStop(step, reason)


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
        f"{prefix}_{field}_{label}": _mean_finite(rewards[torch.tensor(members)])
        for label, members in sorted(groups.items())
    }


def _mean_finite(values: torch.Tensor) -> float:
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def check_diversity(run: Components, step: int, record: dict[str, Any]) -> None:
    """The diversity guardrail: warn, or checkpoint and stop early."""
    reason = run.guardrails.after_step(record)
    if reason is None:
        return
    if run.config.guardrails.on_diversity_collapse == "warn":
        run.reporter.info(f"[yellow]warning:[/] {reason}")
        return
    if run.progress.checkpointed_step != step:
        checkpoint(run, step)
    raise EarlyStop(step, reason)


# --- checkpoints, resume and the final model --------------------------------------------------------


def policy_weights(run: Components) -> dict[str, torch.Tensor]:
    """The policy at training precision (under FSDP gathered from the shards: a collective);
    with LoRA only the adapters, since the frozen base is reloaded from model.path."""
    if run.holder.sharded:
        return run.holder.full_state_dict()
    weights = run.trainer.weights()
    if run.peft_model is not None:
        trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
        weights = {name: t for name, t in weights.items() if name in trainable}
    return weights


def checkpoint_due(run: Components, step: int) -> bool:
    """Every ``rs.save_every`` steps, after the last, and when the run was asked to stop."""
    rs = run.config.rs
    return bool(rs.save_every and step % rs.save_every == 0) or step == rs.max_steps or run.interrupts.requested


def checkpoint(run: Components, step: int) -> None:
    run.reporter.phase(f"step {step}: writing checkpoint")
    state = {
        "data": run.stream.state_dict(),
        "config": run.config.to_dict(),
        "nonfinite_in_a_row": run.trainer.nonfinite_in_a_row,
        "guardrails": run.guardrails.state_dict(),
        **run.trainset.state_dict(),
        "world_size": run.dist.world_size,
    }
    optimizer_state = run.holder.optimizer_state(run.trainer.optimizer)  # gathered on every rank under FSDP
    weights = policy_weights(run)
    if run.dist.is_main:  # every rank holds the same weights and optimizer state
        folder = save_checkpoint(
            run.run_dir.checkpoints, step, weights, optimizer_state, state, keep_last=run.config.rs.keep_last
        )
        run.run_dir.record(run.run_dir.checkpoints, folder, *checkpoint_files(folder))
    run.dist.barrier()
    run.progress.checkpointed_step = step
    failpoint("checkpointed", step)


def _with_defaults(saved: dict[str, Any], run: Components) -> dict[str, Any]:
    """The checkpoint's config with every field it lacks at its default: a run saved before a field
    existed ran as that default does, so resuming it with the default is no change."""
    try:
        return resolve_config(saved, run.registry).to_dict()
    except ThresherError:  # no longer valid (a renamed option): compare what was written
        return saved


def resume_point(run: Components, resume: str | bool) -> Path:
    """The checkpoint to resume from (the newest undamaged one for ``--resume``), checked against
    this config and world size before anything is loaded or written."""
    from thresher.core.errors import ConfigError

    checkpoints = run.run_dir.checkpoints
    if resume is True:
        path = latest_valid_checkpoint(checkpoints, lambda line: run.reporter.info(f"[yellow]warning:[/] {line}"))
        if path is None:
            raise ThresherError(f"--resume: no usable checkpoint in {checkpoints}")
    else:
        path = Path(str(resume))
        if not (path / "state.json").is_file():
            raise ThresherError(f"--resume: {path} is not a checkpoint directory (no state.json)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ThresherError(f"--resume-from: checkpoint {path} is damaged ({problem})")
        _check_checkpoint_of_this_run(run, path)
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
    check_resume_compatible(_with_defaults(saved["config"], run), run.config.to_dict(), path)
    if int(saved.get("world_size", 1)) != run.dist.world_size:
        raise ConfigError(
            [
                f"--resume: {path} was made by {saved.get('world_size', 1)} process(es); resume with the same "
                f"number (now {run.dist.world_size})"
            ]
        )
    return path


def _check_checkpoint_of_this_run(run: Components, path: Path) -> None:
    """A run's metrics and rollouts continue from the checkpoint's step: one of another run would
    leave this run's history with a gap (steps 1–3, then 5) or another run's steps mixed in."""
    from thresher.core.errors import ConfigError

    if path.resolve().parent == run.run_dir.checkpoints.resolve():
        return
    steps = [int(r["step"]) for r in run.run_dir.read_metrics() if r.get("kind") == "train" and "step" in r]
    if steps:
        raise ConfigError(
            [
                f"--resume-from: {path} is not a checkpoint of {run.run_dir.path} (which has steps "
                f"{min(steps)}–{max(steps)}): continuing from it would mix two runs' histories; resume from "
                f"{run.run_dir.checkpoints}/step_N, or continue that run in its own directory"
            ]
        )


def resume(run: Components, path: Path, *, fall_back: bool = False) -> None:
    """Load a checkpoint into the policy, optimizer, data stream, strategies and metrics history.

    With ``fall_back`` (``--resume``: the newest checkpoint was picked for the user), a checkpoint
    whose files cannot be read back is reported and the one before it is loaded instead.
    """

    def load_weights(state: dict[str, torch.Tensor]) -> None:
        if run.peft_model is not None:  # adapters only: the frozen base came from model.path
            load_adapters(run.model, state)
        else:
            run.holder.load_weights(state)
        run.trainer.load_weights(state)

    def warn(line: str) -> None:
        run.reporter.info(f"[yellow]warning:[/] {line}")

    while True:
        try:
            load_checkpoint(path, load_weights, lambda s: run.holder.load_optimizer_state(run.trainer.optimizer, s))
            break
        except DamagedCheckpoint as err:
            if not fall_back:
                raise
            step = int(STEP_DIR.match(path.name).group(1)) if STEP_DIR.match(path.name) else 0
            warn(f"checkpoint {path.name} is damaged ({str(err).partition(': ')[2]}); trying the one before it")
            earlier = latest_valid_checkpoint(run.run_dir.checkpoints, warn, below=step)
            if earlier is None:
                raise ThresherError(f"--resume: no usable checkpoint in {run.run_dir.checkpoints}") from None
            path = earlier
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
    run.stream.load_state_dict(saved["data"])
    progress = run.progress
    progress.start_step = progress.completed_step = progress.checkpointed_step = int(saved["step"])
    run.trainer.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
    run.guardrails.load_state_dict(saved["guardrails"])
    run.trainset.load_state_dict(saved)
    if run.dist.is_main:
        run.run_dir.truncate_metrics(progress.start_step)
    run.dist.barrier()
    kept_lines = [r for r in run.run_dir.read_metrics() if r.get("step", 0) <= progress.start_step]
    progress.history = [r for r in kept_lines if r.get("kind") == "train"]
    progress.validation_history = [r for r in kept_lines if r.get("kind") == "validation"]
    run.generator.load_weights(run.model)  # an engine holding its own copy must take the resumed weights
    run.reporter.info(f"resumed from {path} at step {progress.start_step}")


def stopped(run: Components, stop: StopRequested) -> StopRequested:
    """Checkpoint the last completed step (if not yet) and say how to resume."""
    step = run.progress.completed_step
    if step == 0:
        return StopRequested(stop.signum, "interrupted before the first step completed; nothing to resume")
    if run.progress.checkpointed_step != step:
        checkpoint(run, step)
    return StopRequested(
        stop.signum,
        f"interrupted: stopped after step {step}, checkpoint {run.run_dir.checkpoints / f'step_{step}'}; "
        f"continue with `thresher train {run.run_dir.path} --resume` (the run directory holds its config)",
    )


def save_final(run: Components) -> None:
    """``final/``: the trained policy (or LoRA adapter, and optionally the merged model)."""
    weights = policy_weights(run)  # a collective under FSDP: every rank takes part
    if not run.dist.is_main:
        return
    run.reporter.phase("writing final model")
    distinct = {t.data_ptr(): t for t in weights.values() if t.is_floating_point()}.values()  # tied once
    bad = sum(int((~torch.isfinite(t)).sum()) for t in distinct)
    if bad:  # a model of NaNs would load and "work"; the checkpoints of earlier steps stay for resuming
        total = sum(t.numel() for t in distinct)
        raise ThresherError(
            f"final model not written: {bad} of {total} weights are NaN or infinite after training (check "
            f"optim.lr and the loss); earlier checkpoints are in {run.run_dir.checkpoints}"
        )
    out = run.config.output
    if run.peft_model is None:
        run.run_dir.save_final(run.model, run.tokenizer, weights, out.final_dtype)
        run.reporter.info(f"final model: {run.run_dir.final} (load with from_pretrained)")
        return
    merged = merged_state_dict(run.model) if out.merge_lora else None
    run.run_dir.save_final_adapter(run.peft_model, run.tokenizer, out.final_dtype, run.model, merged)
    extra = f"; merged model: {run.run_dir.final / 'merged'}" if merged is not None else ""
    run.reporter.info(f"final adapter: {run.run_dir.final} (load with PeftModel.from_pretrained){extra}")
