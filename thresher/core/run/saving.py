"""Checkpoints, resume and the final model of a run: what :mod:`thresher.core.run.checkpoint` writes
and reads, applied to a built run (policy, optimizer, prompt stream, training set, guardrails)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thresher.core.config import RunConfig, resolve_config
from thresher.core.console import ConsoleReporter
from thresher.core.errors import ConfigError, ThresherError
from thresher.core.faults import failpoint
from thresher.core.interrupt import StopRequested
from thresher.core.registry import Registry
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
from thresher.core.run.directory import RunDir
from thresher.core.session import Policy, Progress, Session
from thresher.core.training.distributed import Distributed
from thresher.core.training.lora import load_adapters, merged_state_dict
from thresher.core.training.trainer import Trainer


@dataclass
class Saver:
    """Writes checkpoints and the final model of a built run, and loads a checkpoint back into it."""

    session: Session

    # The parts a checkpoint is made of, named for the reader.
    @property
    def policy(self) -> Policy:
        return self.session.policy

    @property
    def trainer(self) -> Trainer:
        return self.session.trainer

    @property
    def run_dir(self) -> RunDir:
        return self.session.run_dir

    @property
    def dist(self) -> Distributed:
        return self.session.dist

    @property
    def progress(self) -> Progress:
        return self.session.progress

    @property
    def reporter(self) -> ConsoleReporter:
        return self.session.reporter

    def due(self, step: int) -> bool:
        """Every ``rs.save_every`` steps, after the last, and when the run was asked to stop."""
        rs = self.session.config.rs
        every = bool(rs.save_every and step % rs.save_every == 0)
        last = self.progress.is_last_step(step, rs.max_steps, rs.max_generated_tokens)
        return every or last or self.session.interrupts.requested

    def policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy at training precision (under FSDP gathered from the shards: a collective);
        with LoRA only the adapters, since the frozen base is reloaded from model.path."""
        if self.policy.holder.sharded:
            return self.policy.holder.full_state_dict()
        weights = self.trainer.weights()
        if self.policy.lora:
            trainable = {name for name, p in self.policy.model.named_parameters() if p.requires_grad}
            weights = {name: t for name, t in weights.items() if name in trainable}
        return weights

    def checkpoint(self, step: int) -> None:
        session = self.session
        self.reporter.phase(f"step {step}: writing checkpoint")
        state = {
            "data": session.stream.state_dict(),
            "config": session.config.to_dict(),
            "nonfinite_in_a_row": self.trainer.nonfinite_in_a_row,
            "micro_batch_size": self.trainer.micro_batch_size,
            "guardrails": session.guardrails.state_dict(),
            **session.trainset.state_dict(),
            "world_size": self.dist.world_size,
        }
        # gathered on every rank under FSDP
        optimizer_state = self.policy.holder.optimizer_state(self.trainer.optimizer)
        weights = self.policy_weights()
        if self.dist.is_main:  # every rank holds the same weights and optimizer state
            keep_last = session.config.rs.keep_last
            checkpoints = self.run_dir.checkpoints
            folder = save_checkpoint(checkpoints, step, weights, optimizer_state, state, keep_last=keep_last)
            self.run_dir.record(self.run_dir.checkpoints, folder, *checkpoint_files(folder))
        self.dist.barrier()
        self.progress.checkpointed_step = step
        failpoint("checkpointed", step)

    def resume(self, path: Path, *, fall_back: bool = False) -> None:
        """Load a checkpoint into the policy, optimizer, data stream, training set and metrics history.

        With ``fall_back`` (``--resume``: the newest checkpoint was picked for the user), a checkpoint
        whose files cannot be read back is reported and the one before it is loaded instead.
        """
        session, policy, trainer = self.session, self.policy, self.trainer

        def load_weights(state: dict[str, torch.Tensor]) -> None:
            if policy.lora:  # adapters only: the frozen base came from model.path
                load_adapters(policy.model, state)
            else:
                policy.holder.load_weights(state)
            trainer.load_weights(state)

        def load_optimizer(state: dict[str, Any]) -> None:
            policy.holder.load_optimizer_state(trainer.optimizer, state)

        while True:
            try:
                load_checkpoint(path, load_weights, load_optimizer)
                break
            except DamagedCheckpoint as err:
                if not fall_back:
                    raise
                match = STEP_DIR.match(path.name)
                step = int(match.group(1)) if match else 0
                why = str(err).partition(": ")[2]
                self._warn(f"checkpoint {path.name} is damaged ({why}); trying the one before it")
                earlier = latest_valid_checkpoint(self.run_dir.checkpoints, self._warn, below=step)
                if earlier is None:
                    raise ThresherError(f"--resume: no usable checkpoint in {self.run_dir.checkpoints}") from None
                path = earlier
        saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
        session.stream.load_state_dict(saved["data"])
        progress = self.progress
        progress.start_step = progress.completed_step = progress.checkpointed_step = int(saved["step"])
        trainer.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
        self._keep_micro_batch(saved.get("micro_batch_size"))
        session.guardrails.load_state_dict(saved["guardrails"])
        session.trainset.load_state_dict(saved)
        if self.dist.is_main:
            self.run_dir.truncate_metrics(progress.start_step)
        self.dist.barrier()
        kept_lines = [r for r in self.run_dir.read_metrics() if r.get("step", 0) <= progress.start_step]
        progress.history = [r for r in kept_lines if r.get("kind") == "train"]
        progress.validation_history = [r for r in kept_lines if r.get("kind") == "validation"]
        # an engine holding its own copy of the weights must take the resumed ones
        session.plugins.generator.load_weights(policy.model)
        self.reporter.info(f"resumed from {path} at step {progress.start_step}")

    def _keep_micro_batch(self, saved: int | None) -> None:
        """``optim.micro_batch_size: auto`` resumes with the micro-batch the run had: the free memory
        may differ now, and another size would sum the gradients in another order (not bit-exact)."""
        trainer = self.trainer
        if self.session.config.optim.micro_batch_size != "auto" or saved is None or saved == trainer.micro_batch_size:
            return
        self.reporter.info(
            f"optim.micro_batch_size auto: {saved}, as in the checkpoint (the memory plan now allows "
            f"{trainer.micro_batch_size})"
        )
        trainer.micro_batch_size = int(saved)

    def stopped(self, stop: StopRequested) -> StopRequested:
        """Checkpoint the last completed step (if not yet) and say how to resume."""
        step = self.progress.completed_step
        if step == 0:
            return StopRequested(stop.signum, "interrupted before the first step completed; nothing to resume")
        if self.progress.checkpointed_step != step:
            self.checkpoint(step)
        return StopRequested(
            stop.signum,
            f"interrupted: stopped after step {step}, checkpoint {self.run_dir.checkpoints / f'step_{step}'}; "
            f"continue with `thresher train {self.run_dir.path} --resume` (the run directory holds its config)",
        )

    def save_final(self) -> None:
        """``final/``: the trained policy (or LoRA adapter, and optionally the merged model)."""
        weights = self.policy_weights()  # a collective under FSDP: every rank takes part
        if not self.dist.is_main:
            return
        self.reporter.phase("writing final model")
        distinct = {t.data_ptr(): t for t in weights.values() if t.is_floating_point()}.values()  # tied once
        bad = sum(int((~torch.isfinite(t)).sum()) for t in distinct)
        if bad:  # a model of NaNs would load and "work"; the checkpoints of earlier steps stay for resuming
            total = sum(t.numel() for t in distinct)
            raise ThresherError(
                f"final model not written: {bad} of {total} weights are NaN or infinite after training (check "
                f"optim.lr and the loss); earlier checkpoints are in {self.run_dir.checkpoints}"
            )
        out, policy, tokenizer = self.session.config.output, self.policy, self.session.inputs.tokenizer
        if policy.peft_model is None:
            self.run_dir.save_final(policy.model, tokenizer, weights, out.final_dtype)
            self.reporter.info(f"final model: {self.run_dir.final} (load with from_pretrained)")
            return
        merged = merged_state_dict(policy.model) if out.merge_lora else None
        self.run_dir.save_final_adapter(policy.peft_model, tokenizer, out.final_dtype, policy.model, merged)
        extra = f"; merged model: {self.run_dir.final / 'merged'}" if merged is not None else ""
        self.reporter.info(f"final adapter: {self.run_dir.final} (load with PeftModel.from_pretrained){extra}")

    def _warn(self, line: str) -> None:
        self.reporter.warning(line)


def resume_point(
    resume: str | bool, run_dir: RunDir, config: RunConfig, registry: Registry, dist: Distributed, warn: Any
) -> Path:
    """The checkpoint to resume from (the newest undamaged one for ``--resume``), checked against
    this config and world size before anything is loaded or written."""
    checkpoints = run_dir.checkpoints
    if resume is True:
        path = latest_valid_checkpoint(checkpoints, warn)
        if path is None:
            raise ThresherError(f"--resume: no usable checkpoint in {checkpoints}")
    else:
        path = Path(str(resume))
        if not (path / "state.json").is_file():
            raise ThresherError(f"--resume: {path} is not a checkpoint directory (no state.json)")
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ThresherError(f"--resume-from: checkpoint {path} is damaged ({problem})")
        _check_checkpoint_of_this_run(run_dir, path)
    saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
    check_resume_compatible(_with_defaults(saved["config"], registry), config.to_dict(), path)
    if int(saved.get("world_size", 1)) != dist.world_size:
        raise ConfigError(
            [
                f"--resume: {path} was made by {saved.get('world_size', 1)} process(es); resume with the same "
                f"number (now {dist.world_size})"
            ]
        )
    return path


def _with_defaults(saved: dict[str, Any], registry: Registry) -> dict[str, Any]:
    """The checkpoint's config with every field it lacks at its default: a run saved before a field
    existed ran as that default does, so resuming it with the default is no change."""
    try:
        return resolve_config(saved, registry).to_dict()
    except ThresherError:  # no longer valid (a renamed option): compare what was written
        return saved


def _check_checkpoint_of_this_run(run_dir: RunDir, path: Path) -> None:
    """A run's metrics and rollouts continue from the checkpoint's step: one of another run would
    leave this run's history with a gap (steps 1–3, then 5) or another run's steps mixed in."""
    if path.resolve().parent == run_dir.checkpoints.resolve():
        return
    steps = [int(r["step"]) for r in run_dir.read_metrics() if r.get("kind") == "train" and "step" in r]
    if steps:
        raise ConfigError(
            [
                f"--resume-from: {path} is not a checkpoint of {run_dir.path} (which has steps "
                f"{min(steps)}–{max(steps)}): continuing from it would mix two runs' histories; resume from "
                f"{run_dir.checkpoints}/step_N, or continue that run in its own directory"
            ]
        )
