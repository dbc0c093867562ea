"""The rejection-sampling recipe, top to bottom: generate → score → select → train → refresh, once
per global step; validate and checkpoint on schedule; save the final model.

    thresher train run.yaml          # the CLI
    with thresher.Run.from_config("run.yaml") as run:
        history = run.train()        # Python

Every phase is a function in :mod:`thresher.core.phases`; the components were built once by
:class:`thresher.core.runner.Run`. On SIGINT/SIGTERM the step in progress is finished if its weights
already changed, else abandoned; the last completed step is checkpointed and the run says how to resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from thresher.core import phases
from thresher.core.components import Components
from thresher.core.errors import OutputError
from thresher.core.interrupt import StopRequested
from thresher.core.phases import EarlyStop
from thresher.core.run.loggers import open_loggers
from thresher.core.run.records import rollout_record, step_statistics
from thresher.core.training.memory import peak_memory


def train(run: Components) -> list[dict[str, Any]]:
    """Train for ``rs.max_steps`` global steps (from where a resumed run stopped); the step metrics."""
    rs, progress = run.config.rs, run.progress
    metrics = run.loggers = open_loggers(run)
    try:
        with run.interrupts:
            try:
                # Validate before the first step; a run killed between a checkpoint and that step's
                # validation validates it now, so its metrics equal an uninterrupted run's.
                start = progress.start_step
                due = run.val_prompts and (start == 0 or phases.validation_due(run, start))
                if due and not phases.validated(run, start):
                    phases.validate(run, start, metrics)
                started = time.perf_counter()  # this process's steps (with checkpoints, validation) for the ETA
                for step in range(progress.start_step + 1, rs.max_steps + 1):
                    record = global_step(run, step)
                    metrics.write(record)
                    progress.history.append(record)
                    progress.completed_step = step
                    seconds_per_step = (time.perf_counter() - started) / (step - progress.start_step)
                    run.reporter.step(record, rs.max_steps, seconds_per_step)
                    phases.check_diversity(run, step, record)
                    if phases.checkpoint_due(run, step):
                        phases.checkpoint(run, step)
                    run.interrupts.check(f"after step {step}")
                    if phases.validation_due(run, step):
                        phases.validate(run, step, metrics)
            except StopRequested as stop:
                raise phases.stopped(run, stop) from None
            except EarlyStop as stop:
                if progress.checkpointed_step != progress.completed_step:
                    phases.checkpoint(run, progress.completed_step)
                metrics.write({"kind": "stop", "step": stop.step, "reason": stop.reason})
                run.reporter.info(f"[yellow]stopped early after step {stop.step}:[/] {stop.reason}")
        if run.config.output.save_final:
            phases.save_final(run)
    finally:
        run.loggers = None
        metrics.close()
        run.reporter.done()
    run.reporter.curve(progress.history, progress.validation_history)
    return progress.history


def global_step(run: Components, step: int) -> dict[str, Any]:
    """One global step; its metrics record. Interrupted before its weights change, the step is
    abandoned: the prompt stream is rewound, so a resumed run takes the same prompts again."""
    t0 = time.perf_counter()
    position = run.stream.state_dict()
    try:
        run.interrupts.check(f"before step {step}")
        prompts = run.stream.next_batch(run.config.rs.prompts_per_step)
        scored = phases.sample(run, prompts, step, label=_step_label(run, step))
        phases.write_rollouts(run, step, scored)
        record = {"kind": "train", "step": step, **step_statistics(scored)}
        record.update(prompts_consumed=run.stream.consumed, prompts_skipped_too_long=run.skipped_long_prompts)
        sequences = run.trainset.sequences(step, prompts, scored, record)
        if sequences:
            micro_batches = run.trainer.micro_batch_count(len(sequences))
            run.reporter.phase(f"step {step}: training on {len(sequences)} responses", total=micro_batches)
            record.update(phases.train(run, step, sequences), skipped=None)
        else:
            record.update(loss=None, grad_norm=None, time_train=0.0, train_tokens=0, skipped="no rollout selected")
    except StopRequested:
        run.stream.load_state_dict(position)
        raise
    if sequences:
        record.update(phases.refresh(run))
    record.update(scored.timings, time_step=time.perf_counter() - t0)
    record.update(memory_peak_mb=peak_memory(run.device) / 2**20, memory_planned_peak_mb=run.memory_plan.peak / 2**20)
    return record


def _step_label(run: Components, step: int) -> str:
    """``step 3/15`` plus the last step's rewards, for the live status line."""
    label = f"step {step}/{run.config.rs.max_steps}"
    if run.progress.history:
        last = run.progress.history[-1]
        label += f" (last: reward {last['reward_mean']:.3f}, kept {last['reward_kept_mean'] or 0:.3f})"
    return label


def produce(run: Components, out: Path, *, limit: int | None = None, write_all: bool = False) -> dict[str, int]:
    """Best-of-N data: generate, score and select for every training prompt once; write the kept pairs
    (all rollouts with ``write_all``). The file appears under its name only when complete."""
    prompts = run.train_prompts if limit is None else run.train_prompts[:limit]
    per_batch = run.config.rs.prompts_per_step
    counts = {"prompts": 0, "rollouts": 0, "kept": 0}
    tmp = out.with_name(out.name + ".partial")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = tmp.open("w", encoding="utf-8")
    except OSError as err:
        raise OutputError(f"--out {out}: cannot write ({err.strerror or err})") from None
    with run.interrupts, handle:
        for batch_number, start in enumerate(range(0, len(prompts), per_batch), start=1):
            batch = prompts[start : start + per_batch]
            label = f"prompts {start + 1}-{start + len(batch)}/{len(prompts)}"
            scored = phases.sample(run, batch, batch_number, label=label)
            rewards, kept = scored.rewards.flatten().tolist(), scored.kept.flatten().tolist()
            parts = {name: values.tolist() for name, values in scored.parts.items()}
            for i, (r, reward, keep) in enumerate(zip(scored.rollouts, rewards, kept, strict=True)):
                if keep or write_all:
                    row = rollout_record(r, reward, keep, {name: values[i] for name, values in parts.items()})
                    handle.write(json.dumps({**r.prompt.extra, **row}) + "\n")
            counts["prompts"] += len(batch)
            counts["rollouts"] += len(scored.rollouts)
            counts["kept"] += int(scored.kept.sum())
            run.reporter.info(f"{label}: kept {int(scored.kept.sum())}/{len(scored.rollouts)}")
    tmp.replace(out)
    run.reporter.done()
    return counts
