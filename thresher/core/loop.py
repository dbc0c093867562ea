"""The rejection-sampling recipe, top to bottom: generate → score → select → train → refresh, once
per global step; validate and checkpoint on schedule; save the final model.

    thresher train run.yaml          # the CLI
    with thresher.Run.from_config("run.yaml") as run:
        history = run.train()        # Python

The phases live beside their subject — :mod:`~thresher.core.sampling` (generate, score, select),
:mod:`~thresher.core.update` (train, refresh), :mod:`~thresher.core.validation`,
:mod:`~thresher.core.run.saving` (checkpoint, resume, final model) — and each takes only the parts of
the built :class:`~thresher.core.session.Session` it uses. On SIGINT/SIGTERM the step in progress is
finished if its weights already changed, else abandoned; the last completed step is checkpointed and
the run says how to resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from thresher.core.data import PromptStream
from thresher.core.errors import EarlyStop, OutputError
from thresher.core.interrupt import StopRequested
from thresher.core.run.loggers import NoLoggers, RunLoggers, open_loggers
from thresher.core.run.records import rollout_record, step_statistics
from thresher.core.run.saving import Saver
from thresher.core.sampling import RolloutWriter, Sampler
from thresher.core.session import Session
from thresher.core.training.memory import peak_memory
from thresher.core.types import Prompt
from thresher.core.update import Updater
from thresher.core.validation import Validator


def train(session: Session) -> list[dict[str, Any]]:
    """Train for ``rs.max_steps`` global steps (from where a resumed run stopped); the step loggers."""
    rs, progress, reporter = session.config.rs, session.progress, session.reporter
    validator, saver = Validator.of(session), Saver(session)
    loggers = open_loggers(session)
    try:
        with session.interrupts:
            try:
                if validator.due_at_start():
                    validator.validate(progress.start_step, loggers)
                started = time.perf_counter()  # this process's steps (with checkpoints, validation) for the ETA
                for step in range(progress.next_step, rs.max_steps + 1):
                    record = global_step(session, step, loggers)
                    seconds_per_step = (time.perf_counter() - started) / (step - progress.start_step)
                    reporter.step(record, rs.max_steps, seconds_per_step)
                    check_diversity(session, saver, step, record)
                    if saver.due(step):
                        saver.checkpoint(step)
                    session.interrupts.check(f"after step {step}")
                    if validator.due(step):
                        validator.validate(step, loggers)
            except StopRequested as stop:
                raise saver.stopped(stop) from None
            except EarlyStop as stop:
                if progress.checkpointed_step != progress.completed_step:
                    saver.checkpoint(progress.completed_step)
                loggers.write({"kind": "stop", "step": stop.step, "reason": stop.reason})
                reporter.info(f"[yellow]stopped early after step {stop.step}:[/] {stop.reason}")
        if session.config.output.save_final:
            saver.save_final()
    finally:
        loggers.close()
        reporter.done()
    reporter.curve(progress.history, progress.validation_history)
    return progress.history


def global_step(session: Session, step: int, loggers: RunLoggers | NoLoggers) -> dict[str, Any]:
    """One global step, written to ``loggers`` and booked in ``session.progress``; its metrics record.
    Interrupted before its weights change, the step is abandoned: the prompt stream is rewound, so a
    resumed run takes the same prompts again."""
    t0 = time.perf_counter()
    stream, updater = session.stream, Updater.of(session)
    position = stream.state_dict()
    try:
        session.interrupts.check(f"before step {step}")
        prompts = stream.next_batch(session.config.rs.prompts_per_step)
        if not prompts:  # the prompt pool is dry: every prompt rests, none is due back
            stream.load_state_dict(position)
            raise EarlyStop(step - 1, POOL_DRY)
        budgets = allocate(session, prompts)
        write_rollouts = RolloutWriter(session.run_dir, session.dist, loggers)
        scored = Sampler.of(session).sample(prompts, step, _step_label(session, step), write_rollouts, budgets)
        write_rollouts(step, scored)
        stream.record(prompts, scored.rewards, scored.valid, scored.kept)
        record = {"kind": "train", "step": step, **step_statistics(scored)}
        record.update(prompts_consumed=stream.consumed, prompts_skipped_too_long=session.inputs.skipped_long_prompts)
        record.update(pool_statistics(stream, budgets))
        sequences = session.trainset.sequences(step, prompts, scored, record)
        if sequences:
            micro_batches = session.trainer.micro_batch_count(len(sequences))
            session.reporter.phase(f"step {step}: training on {len(sequences)} responses", total=micro_batches)
            record.update(updater.train(step, sequences), skipped=None)
        else:
            record.update(loss=None, grad_norm=None, time_train=0.0, train_tokens=0, skipped="no rollout selected")
    except StopRequested:
        stream.load_state_dict(position)
        raise
    if sequences:
        record.update(updater.refresh())
    record.update(scored.step_metrics, time_step=time.perf_counter() - t0)
    peak_planned = session.inputs.memory_plan.peak
    record.update(memory_peak_mb=peak_memory(session.device) / 2**20, memory_planned_peak_mb=peak_planned / 2**20)
    loggers.write(record)
    session.progress.step_done(record)
    return record


POOL_DRY = (
    "every training prompt rests as solved or hopeless and none is due back (rs.prompt_pool; set revisit_every "
    "to visit them again)"
)


def allocate(session: Session, prompts: list[Prompt]) -> list[int] | None:
    """Each prompt's responses this step with ``rs.prompt_pool.allocate: by_pass_rate`` (None: N each)."""
    rs, pool = session.config.rs, session.stream.pool
    if pool is None or pool.config.allocate != "by_pass_rate":
        return None
    budget = len(prompts) * rs.max_rollouts()
    return pool.allocate([p.index for p in prompts], budget, pool.config.min_rollouts, rs.pool_max_rollouts())


def pool_statistics(stream: PromptStream, budgets: list[int] | None) -> dict[str, Any]:
    """What the prompt pool did this step: prompts passed over, prompts resting, the budget's spread."""
    if stream.pool is None:
        return {}
    record: dict[str, Any] = {f"prompts_skipped_{why}": count for why, count in stream.skipped.items()}
    record.update(stream.pool.metrics())
    if budgets is not None:
        record.update(rollouts_allocated_min=min(budgets), rollouts_allocated_max=max(budgets))
    return record


def check_diversity(session: Session, saver: Saver, step: int, record: dict[str, Any]) -> None:
    """The diversity guardrail: warn, or checkpoint and stop early."""
    reason = session.guardrails.after_step(record)
    if reason is None:
        return
    if session.config.guardrails.on_diversity_collapse == "warn":
        session.reporter.info(f"[yellow]warning:[/] {reason}")
        return
    if session.progress.checkpointed_step != step:
        saver.checkpoint(step)
    raise EarlyStop(step, reason)


def _step_label(session: Session, step: int) -> str:
    """``step 3/15`` plus the last step's rewards, for the live status line."""
    label = f"step {step}/{session.config.rs.max_steps}"
    if session.progress.history:
        last = session.progress.history[-1]
        label += f" (last: reward {last['reward_mean']:.3f}, kept {last['reward_kept_mean'] or 0:.3f})"
    return label


def produce(session: Session, out: Path, *, limit: int | None = None, write_all: bool = False) -> dict[str, int]:
    """Best-of-N data: generate, score and select for every training prompt once; write the kept pairs
    (all rollouts with ``write_all``). The file appears under its name only when complete."""
    prompts = session.inputs.train_prompts
    prompts = prompts if limit is None else prompts[:limit]
    per_batch = session.config.rs.prompts_per_step
    counts = {"prompts": 0, "rollouts": 0, "kept": 0}
    tmp = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = tmp.open("w", encoding="utf-8")
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write ({err.strerror or err})") from None
    sampler = Sampler.of(session)
    # a scorer's failure keeps the batch's rollouts in the run directory, as in training
    write_rollouts = RolloutWriter(session.run_dir, session.dist, NoLoggers())
    with session.interrupts, handle:
        for batch_number, start in enumerate(range(0, len(prompts), per_batch), start=1):
            batch = prompts[start : start + per_batch]
            label = f"prompts {start + 1}-{start + len(batch)}/{len(prompts)}"
            scored = sampler.sample(batch, batch_number, label, write_rollouts)
            rewards, kept = scored.per_rollout(scored.rewards).tolist(), scored.per_rollout(scored.kept).tolist()
            parts = {name: values.tolist() for name, values in scored.parts.items()}
            for i, (r, reward, keep) in enumerate(zip(scored.rollouts, rewards, kept, strict=True)):
                if keep or write_all:
                    row = rollout_record(r, reward, keep, {name: values[i] for name, values in parts.items()})
                    handle.write(json.dumps({**r.prompt.extra, **row}) + "\n")
            counts["prompts"] += len(batch)
            counts["rollouts"] += len(scored.rollouts)
            counts["kept"] += int(scored.kept.sum())
            session.reporter.info(f"{label}: kept {int(scored.kept.sum())}/{len(scored.rollouts)}")
    tmp.replace(out)
    session.reporter.done()
    return counts
