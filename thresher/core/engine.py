"""The rejection-sampling recipe: generate → score → select → train → refresh, once per global step.

One helper per phase, in the order they run; plugins are found through the registry, so this module
imports no plugin. Sampling seeds are derived from ``(rs.seed, step)``, which makes a step's rollouts
independent of what ran before it (and a resumed run sample exactly what an uninterrupted one would).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thresher.core.build import instantiate
from thresher.core.config import RunConfig, dump_config
from thresher.core.data import PromptStream, load_prompts
from thresher.core.errors import ConfigError, OutputError, ScorerError, ScoringInterrupted, ThresherError
from thresher.core.faults import failpoint
from thresher.core.interrupt import Interrupts, StopRequested
from thresher.core.model import DTYPES, load_model_config, load_policy, load_tokenizer, resolve_device
from thresher.core.registry import Registry
from thresher.core.run.checkpoint import (
    check_resume_compatible,
    checkpoint_problem,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from thresher.core.run.directory import RunDir
from thresher.core.run.metrics import ConsoleReporter, MetricsWriter, NullWriter
from thresher.core.run.records import rollout_record, step_statistics
from thresher.core.selection import BestPool, Guardrails, diversity, duplicate_mask
from thresher.core.training.distributed import Distributed, init_distributed
from thresher.core.training.lora import apply_lora, load_adapters, merged_state_dict
from thresher.core.training.memory import (
    MemoryPlan,
    checkpoint_sizes,
    enable_activation_checkpointing,
    format_bytes,
    peak_memory,
    plan_run_memory,
)
from thresher.core.training.precision import check_trainable_precision, wants_master_weights
from thresher.core.training.sharding import PolicyHolder
from thresher.core.training.trainer import Trainer, TrainSequence
from thresher.core.types import PluginContext, Prompt, Rollout

VALIDATION_SEED_OFFSET = 7_919
RANK_SEED_STRIDE = 104_729  # each rank samples its shard with its own seed


def step_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


# (rollouts, a call that returns their reward tensors, timings)
GeneratedStep = tuple[list[Rollout], Callable[[], list[torch.Tensor]], dict[str, float]]


@dataclass
class ScoredStep:
    """A step's rollouts with their rewards [P, N], validity and the selector's decision."""

    rollouts: list[Rollout]
    rewards: torch.Tensor | None  # None when scoring failed (the rollouts are still written)
    valid: torch.Tensor | None
    kept: torch.Tensor | None
    timings: dict[str, float] = field(default_factory=dict)

    def kept_rollouts(self) -> list[Rollout]:
        flat = self.kept.flatten().tolist()
        return [r for r, keep in zip(self.rollouts, flat, strict=True) if keep]


class Engine:
    """Runs one configured experiment. ``run()`` trains; ``produce()`` only makes best-of-N data."""

    def __init__(self, config: RunConfig, registry: Registry, reporter: ConsoleReporter | None = None):
        self.config = config
        self.registry = registry
        self.reporter = reporter or ConsoleReporter()
        self.run_dir = RunDir(Path(config.output.dir))
        self.dist = Distributed()
        self.interrupts = Interrupts()
        self.history: list[dict[str, Any]] = []
        self.validation_history: list[dict[str, Any]] = []
        self.start_step = 0
        self.resume_path: Path | None = None
        self.completed_step = 0
        self.checkpointed_step: int | None = None
        self.guardrails = Guardrails(config.guardrails)
        self.pool = BestPool()
        self.kept_so_far: list[TrainSequence] = []

    # --- setup -------------------------------------------------------------------------------

    def setup(self, *, training: bool = True, resume: str | bool | None = None) -> None:
        cfg = self.config
        precision_warning = check_trainable_precision(cfg.model.dtype, cfg.optim.master_weights) if training else None
        if training and cfg.model.lora is not None and cfg.optim.strategy == "fsdp":
            raise ConfigError(
                ["model.lora: not with optim.strategy=fsdp yet; use ddp (LoRA's optimizer state is adapter-sized)"]
            )
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        self.dist = init_distributed(cfg.distributed.timeout_s)
        if self.dist.enabled:
            # torchrun delivers signals to every rank, which would stop at different phases and leave
            # the others waiting in a collective: let signals end the job; resume from the last checkpoint.
            self.interrupts = Interrupts(enabled=False)
            self.reporter.quiet = self.reporter.quiet or not self.dist.is_main
            self._check_divisible()
        self.device = resolve_device(cfg.model.device)
        if self.dist.backend == "nccl":
            self.device = torch.device("cuda", self.dist.local_rank)
        # Everything light first — tokenizer, model config, prompts, the memory plan — so a run that
        # cannot work stops before its directory is touched or any weights are read.
        self.plan(training)
        if not self.memory_plan.fits and cfg.model.memory_check:
            raise ConfigError([self.memory_plan.refusal()])
        if training:
            # Lock the directory, then check the resume point, and only then write anything: a refused
            # resume leaves the run exactly as it was.
            if self.dist.is_main:
                self.run_dir.prepare(resume=bool(resume), overwrite=cfg.output.overwrite, origin=cfg.origin)
            self.dist.barrier()
            self.resume_path = self._resume_point(resume) if resume else None
            if self.dist.is_main:
                self.run_dir.write_config(dump_config(cfg))
                self.run_dir.write_atomic(self.run_dir.path / "memory_plan.txt", self.memory_plan.render() + "\n")
        self.dist.barrier()
        self.reporter.phase(f"loading model {cfg.model.path}")
        t0 = time.perf_counter()
        self.model, self.tokenizer = load_policy(
            cfg.model.path, cfg.model.dtype, cfg.rs.seed, self.tokenizer, self.device
        )
        self.peft_model = apply_lora(self.model, cfg.model.lora, cfg.rs.seed) if cfg.model.lora else None
        self.model.to(self.device)
        if training and cfg.optim.activation_checkpointing:
            enable_activation_checkpointing(self.model)
        if precision_warning:
            self.reporter.info(f"[yellow]warning:[/] {precision_warning}")
        temperature = getattr(cfg.generator.config, "temperature", None)
        if temperature == 0 and cfg.rs.num_rollouts_per_prompt > 1:
            self.reporter.info(
                f"[yellow]warning:[/] generator.temperature=0 decodes greedily: the {cfg.rs.num_rollouts_per_prompt} "
                "responses of each prompt will be identical, leaving the selector nothing to choose from"
            )
        if cfg.rs.restart_from_base:  # the base model every step restarts from (before any resume)
            self.base_state = {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()}
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        adapters = f", {trainable / 1e6:.2f}M of them LoRA adapters" if self.peft_model is not None else ""
        self.reporter.info(
            f"model {cfg.model.path}: {total / 1e6:.1f}M parameters{adapters}, {cfg.model.dtype} "
            f"on {self.device} ({time.perf_counter() - t0:.1f}s); planned peak memory "
            f"{format_bytes(self.memory_plan.peak)}"
        )
        masters = wants_master_weights(cfg.optim.master_weights, DTYPES[cfg.model.dtype])
        self.holder = PolicyHolder(self.model, self.dist, cfg.optim.strategy, master_weights=masters)
        if cfg.optim.strategy == "fsdp" and not self.holder.sharded:
            self.reporter.info("optim.strategy fsdp: one process, nothing to shard (it applies under torchrun)")
        self.stream = PromptStream(self.train_prompts, seed=cfg.rs.seed, shuffle=cfg.data.shuffle)
        context = PluginContext(
            tokenizer=self.tokenizer,
            policy=self.model,
            device=self.device,
            seed=cfg.rs.seed,
            should_stop=lambda: self.interrupts.requested,
            registry=self.registry,
        )
        self.reporter.phase("starting plugins")
        self.generator = instantiate(self.registry, "generator", cfg.generator, context)
        self.scorer = instantiate(self.registry, "scorer", cfg.scorer, context)
        self.selector = instantiate(self.registry, "selector", cfg.selector, context)
        self.loss = instantiate(self.registry, "loss", cfg.loss, context)
        self.validation_scorer = (
            instantiate(self.registry, "scorer", cfg.validation_scorer, context) if cfg.validation_scorer else None
        )
        self.trainer = Trainer(
            self.holder.train_model,
            self.loss,
            cfg.optim,
            max_steps=cfg.rs.max_steps,
            pad_id=self.tokenizer.pad_token_id,
            device=self.device,
            seed=cfg.rs.seed,
            interrupt_check=self.interrupts.check,
            dist=self.dist,
        )
        if training and self.dist.is_main:
            sizes = checkpoint_sizes(self.model, self.trainer.params, cfg.output, lora=self.peft_model is not None)
            self.run_dir.check_space(*sizes)
        if training and self.resume_path is not None:
            self._resume(self.resume_path)
        self.reporter.done()

    def plan(self, training: bool = True) -> MemoryPlan:
        """Read the tokenizer, the model's config and the prompts (nothing heavy) and plan the memory."""
        cfg = self.config
        if not hasattr(self, "device"):
            self.device = resolve_device(cfg.model.device)
        self.reporter.phase("reading the tokenizer, the model config and the prompts")
        self.tokenizer = load_tokenizer(cfg.model.path)
        model_config = load_model_config(cfg.model.path, self.tokenizer)
        self.train_prompts, self.skipped_long_prompts = self._load(cfg.data.train, model_config)
        self.val_prompts = self._load(cfg.data.validation, model_config)[0] if cfg.data.validation else []
        if cfg.rs.val_max_prompts is not None:
            self.val_prompts = self.val_prompts[: cfg.rs.val_max_prompts]
        if self.skipped_long_prompts:
            self.reporter.info(f"skipped {self.skipped_long_prompts} training prompts longer than the limit")
        generator_cls = self.registry.get("generator", cfg.generator.type)
        self.memory_plan = plan_run_memory(
            cfg, model_config, self.train_prompts, self.device, training, self.dist.world_size, generator_cls
        )
        return self.memory_plan

    def _check_divisible(self) -> None:
        # Every rank's shard must be non-empty; equal shards keep generation balanced.
        per_step, world = self.config.rs.prompts_per_step, self.dist.world_size
        if per_step % world:
            raise ConfigError([f"rs.prompts_per_step: {per_step} prompts cannot be split evenly over {world} ranks"])

    def _load(self, source: str, model_config: Any) -> tuple[list[Prompt], int]:
        d = self.config.data
        limit, limit_name = prompt_token_limit(self.config, model_config)
        return load_prompts(
            source,
            self.tokenizer,
            field=d.field,
            chat_template=d.chat_template,
            max_prompt_tokens=limit,
            limit_name=limit_name,
            on_long_prompt=d.on_long_prompt,
        )

    def _resume_point(self, resume: str | bool) -> Path:
        """The checkpoint to resume from (the newest undamaged one for ``--resume``), checked against
        this config and world size before anything is loaded or written."""
        checkpoints = self.run_dir.checkpoints
        if resume is True:
            path = latest_valid_checkpoint(checkpoints, lambda line: self.reporter.info(f"[yellow]warning:[/] {line}"))
            if path is None:
                raise ThresherError(f"--resume: no usable checkpoint in {checkpoints}")
        else:
            path = Path(str(resume))
            if not (path / "state.json").is_file():
                raise ThresherError(f"--resume: {path} is not a checkpoint directory (no state.json)")
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ThresherError(f"--resume-from: checkpoint {path} is damaged ({problem})")
        saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
        check_resume_compatible(saved["config"], self.config.to_dict(), path)
        if int(saved.get("world_size", 1)) != self.dist.world_size:
            raise ConfigError(
                [
                    f"--resume: {path} was made by {saved.get('world_size', 1)} process(es); resume with the same "
                    f"number (now {self.dist.world_size})"
                ]
            )
        return path

    def _resume(self, path: Path) -> None:
        saved = json.loads((path / "state.json").read_text(encoding="utf-8"))
        load_checkpoint(
            path, self._load_weights, lambda state: self.holder.load_optimizer_state(self.trainer.optimizer, state)
        )
        self.stream.load_state_dict(saved["data"])
        self.start_step = self.completed_step = self.checkpointed_step = int(saved["step"])
        self.trainer.nonfinite_in_a_row = int(saved.get("nonfinite_in_a_row", 0))
        self.guardrails.load_state_dict(saved["guardrails"])
        self.pool.load_state_dict(saved["pool"])
        self.kept_so_far = [TrainSequence(tuple(p), tuple(r)) for p, r in saved["kept_so_far"]]
        if self.dist.is_main:
            self.run_dir.truncate_metrics(self.start_step)
        self.dist.barrier()
        kept_lines = [r for r in self.run_dir.read_metrics() if r.get("step", 0) <= self.start_step]
        self.history = [r for r in kept_lines if r.get("kind") == "train"]
        self.validation_history = [r for r in kept_lines if r.get("kind") == "validation"]
        self.generator.load_weights(self.model)  # an engine holding its own copy must take the resumed weights
        self.reporter.info(f"resumed from {path} at step {self.start_step}")

    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Checkpointed weights (training precision) into the policy, its shards and the masters."""
        if self.peft_model is not None:  # adapters only: the frozen base came from model.path
            load_adapters(self.model, state)
        else:
            self.holder.load_weights(state)
        self.trainer.load_weights(state)

    def _policy_weights(self) -> dict[str, torch.Tensor]:
        """The policy at training precision (under FSDP gathered from the shards: a collective);
        with LoRA only the adapters, since the frozen base is reloaded from model.path."""
        if self.holder.sharded:
            return self.holder.full_state_dict()
        weights = self.trainer.weights()
        if self.peft_model is not None:
            trainable = {name for name, p in self.model.named_parameters() if p.requires_grad}
            weights = {name: t for name, t in weights.items() if name in trainable}
        return weights

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> list[dict[str, Any]]:
        """Train for ``rs.max_steps`` global steps; returns the per-step metrics.

        On SIGINT/SIGTERM: the step in progress is finished if its weights already changed, else
        abandoned; a checkpoint of the last completed step is written and
        :class:`~thresher.core.interrupt.StopRequested` is raised.
        """
        metrics = MetricsWriter(self.run_dir.metrics) if self.dist.is_main else NullWriter()
        try:
            with self.interrupts:
                try:
                    self._loop(metrics)
                except StopRequested as stop:
                    raise self._stopped(stop) from None
                except EarlyStop as stop:
                    if self.checkpointed_step != self.completed_step:
                        self._checkpoint(self.completed_step)
                    metrics.write({"kind": "stop", "step": stop.step, "reason": stop.reason})
                    self.reporter.info(f"[yellow]stopped early after step {stop.step}:[/] {stop.reason}")
            weights = self._policy_weights() if self.config.output.save_final else None
            if weights is not None and self.dist.is_main:
                self.reporter.phase("writing final model")
                self._save_final(weights)
        finally:
            metrics.close()
            self.reporter.done()
        self.reporter.curve(self.history, self.validation_history)
        return self.history

    def _save_final(self, weights: dict[str, torch.Tensor]) -> None:
        out = self.config.output
        if self.peft_model is None:
            self.run_dir.save_final(self.model, self.tokenizer, weights, out.final_dtype)
            self.reporter.info(f"final model: {self.run_dir.final} (load with from_pretrained)")
            return
        merged = merged_state_dict(self.model) if out.merge_lora else None
        self.run_dir.save_final_adapter(self.peft_model, self.tokenizer, out.final_dtype, self.model, merged)
        extra = f"; merged model: {self.run_dir.final / 'merged'}" if merged is not None else ""
        self.reporter.info(f"final adapter: {self.run_dir.final} (load with PeftModel.from_pretrained){extra}")

    def _loop(self, metrics: MetricsWriter) -> None:
        cfg = self.config.rs
        if self.val_prompts and self.start_step == 0:
            self._validate(0, metrics)
        elif self.val_prompts and self._validation_due(self.start_step) and not self._validated(self.start_step):
            # Killed between the checkpoint and the validation of its step: validate it now, so the
            # resumed metrics equal an uninterrupted run's (early stopping reads them).
            self._validate(self.start_step, metrics)
        for step in range(self.start_step + 1, cfg.max_steps + 1):
            record = self.step(step)
            metrics.write(record)
            self.history.append(record)
            self.completed_step = step
            self.reporter.step(record, cfg.max_steps)
            self._check_diversity(step, record)
            last = step == cfg.max_steps
            if (cfg.save_every and step % cfg.save_every == 0) or last or self.interrupts.requested:
                self._checkpoint(step)
            self.interrupts.check(f"after step {step}")
            if self.val_prompts and self._validation_due(step):
                self._validate(step, metrics)

    def _validation_due(self, step: int) -> bool:
        every = self.config.rs.val_every
        return bool(every and step % every == 0) or step == self.config.rs.max_steps

    def _validated(self, step: int) -> bool:
        return any(record.get("step") == step for record in self.validation_history)

    def _check_diversity(self, step: int, record: dict[str, Any]) -> None:
        reason = self.guardrails.after_step(record)
        if reason is None:
            return
        if self.config.guardrails.on_diversity_collapse == "warn":
            self.reporter.info(f"[yellow]warning:[/] {reason}")
            return
        if self.checkpointed_step != step:
            self._checkpoint(step)
        raise EarlyStop(step, reason)

    def _stopped(self, stop: StopRequested) -> StopRequested:
        """Checkpoint the last completed step (if not yet) and say how to resume."""
        step = self.completed_step
        if step == 0:
            return StopRequested(stop.signum, "interrupted before the first step completed; nothing to resume")
        if self.checkpointed_step != step:
            self._checkpoint(step)
        return StopRequested(
            stop.signum,
            f"interrupted: stopped after step {step}, checkpoint {self.run_dir.checkpoints / f'step_{step}'}; "
            f"continue with `thresher train {self.run_dir.path} --resume` (the run directory holds its config)",
        )

    def step(self, step: int) -> dict[str, Any]:
        """One global step. Returns its metrics record (also the rollouts file is written).

        Interrupted before its weights change, the step is abandoned: the prompt stream is rewound,
        so a resumed run takes the same prompts again.
        """
        t0 = time.perf_counter()
        position = self.stream.state_dict()
        try:
            self.interrupts.check(f"before step {step}")
            prompts = self.stream.next_batch(self.config.rs.prompts_per_step)
            scored = self.sample_and_select(prompts, step, label=self._step_label(step))
            self._write_rollouts(step, scored)
            record = {"kind": "train", "step": step, **step_statistics(scored)}
            record["prompts_consumed"] = self.stream.consumed
            record["prompts_skipped_too_long"] = self.skipped_long_prompts
            sequences = self._training_set(step, prompts, scored, record)
            if sequences:
                self.reporter.phase(f"step {step}: training on {len(sequences)} responses")
                record.update(self._train(step, sequences))
                record["skipped"] = None
            else:
                record.update(loss=None, grad_norm=None, time_train=0.0, train_tokens=0)
                record["skipped"] = "no rollout selected"
        except StopRequested:
            self.stream.load_state_dict(position)
            raise
        if sequences:
            self.reporter.phase(f"step {step}: refreshing generator weights")
            t_refresh = time.perf_counter()
            self.holder.sync_full()  # under FSDP: gather the updated shards into the full copy
            self.generator.load_weights(self.model)
            record["time_refresh"] = time.perf_counter() - t_refresh
            generator_metrics = getattr(self.generator, "metrics", None)
            if generator_metrics is not None:
                record.update({f"generator_{k}": v for k, v in generator_metrics().items()})
        record.update(scored.timings)
        record["time_step"] = time.perf_counter() - t0
        record["memory_peak_mb"] = peak_memory(self.device) / 2**20
        record["memory_planned_peak_mb"] = self.memory_plan.peak / 2**20
        return record

    def _training_set(
        self, step: int, prompts: list[Prompt], scored: ScoredStep, record: dict[str, Any]
    ) -> list[TrainSequence]:
        """What this step trains on: the kept rollouts, or with ``rs.pool_best`` the best response
        ever seen for each of the step's prompts; with ``rs.restart_from_base``, everything so far."""
        rs = self.config.rs
        kept = scored.kept_rollouts()
        if rs.pool_best:
            self.pool.update(kept, scored.rewards[scored.kept].tolist(), step)
            chosen = sorted(self.pool.entries) if rs.restart_from_base else [p.index for p in prompts]
            entries = [self.pool.entries[i] for i in dict.fromkeys(chosen) if i in self.pool.entries]
            record["pool_size"] = len(self.pool.entries)
            record["trained_from_earlier_steps"] = sum(e.step < step for e in entries)
            return [TrainSequence(tuple(e.prompt_ids), tuple(e.response_ids)) for e in entries]
        sequences = [TrainSequence(r.prompt.token_ids, tuple(r.response_ids)) for r in kept]
        if rs.restart_from_base:
            self.kept_so_far.extend(sequences)
            record["kept_so_far"] = len(self.kept_so_far)
            return list(self.kept_so_far)
        return sequences

    def _train(self, step: int, sequences: list[TrainSequence]) -> dict[str, Any]:
        if not self.config.rs.restart_from_base:
            return self.trainer.train_step(step - 1, sequences)
        # ReST-EM: start again from the base model with a fresh optimizer. Past this point the
        # previous step's weights are gone, so the step is no longer abandoned on an interrupt.
        self.interrupts.check(f"during step {step}")
        self.holder.load_weights(self.base_state)
        self.trainer.reset_optimizer()
        return self.trainer.train_step(step - 1, sequences, abandonable=False)

    def _step_label(self, step: int) -> str:
        """``step 3/15`` plus the last step's rewards, for the live status line."""
        label = f"step {step}/{self.config.rs.max_steps}"
        if self.history:
            last = self.history[-1]
            label += f" (last: reward {last['reward_mean']:.3f}, kept {last['reward_kept_mean'] or 0:.3f})"
        return label

    def sample_and_select(self, prompts: list[Prompt], step: int, label: str) -> ScoredStep:
        n = self.config.rs.num_rollouts_per_prompt
        self.reporter.phase(f"{label}: generating {len(prompts)}×{n} responses")
        pipelined = self._overlap_scoring()
        generate = self._generate_and_score_overlapped if pipelined else self._generate_then_score
        low, high = self.dist.shard_bounds(len(prompts))
        rollouts, scores, timings = generate(prompts[low:high], n, step, label)
        try:
            flat = _as_rewards(torch.cat([s.flatten() for s in scores()]), len(rollouts))
        except ScoringInterrupted:
            self.interrupts.check(f"while scoring step {step}")  # the stop request: abandon the step
            raise
        except ThresherError:
            self._write_rollouts(step, ScoredStep(rollouts, None, None, None))  # nothing generated is lost
            raise
        timings["time_score"] = time.perf_counter() - timings.pop("_scoring_from")
        rollouts, flat = self._gather(rollouts, flat, low)
        rewards = flat.view(len(prompts), n)
        valid = torch.isfinite(rewards)
        if not bool(valid.all()) and self.config.rs.on_nonfinite_reward == "error":
            self._write_rollouts(step, ScoredStep(rollouts, rewards, valid, torch.zeros_like(valid)))
            bad = int((~valid).sum())
            raise ScorerError(
                f"scorer returned {bad} non-finite reward(s) at step {step} (rollouts saved; set "
                "rs.on_nonfinite_reward=drop to skip such responses)"
            )
        duplicates = duplicate_mask(rollouts, tuple(rewards.shape), self.config.selector.options.get("dedup", "none"))
        eligible = valid & ~duplicates
        kept = self.selector.select(rewards, eligible).to(torch.bool) & eligible
        if self.config.selector.options.get("dedup"):
            timings["duplicates_not_selectable"] = int(duplicates.sum())
        selector_metrics = getattr(self.selector, "metrics", None)
        if selector_metrics is not None:
            timings.update({f"selector_{k}": v for k, v in selector_metrics().items()})
        tokens = sum(len(r.response_ids) for r in rollouts)
        timings["generated_tokens"] = tokens
        timings["tokens_per_s_generate"] = tokens / timings["time_generate"] if timings["time_generate"] > 0 else 0.0
        return ScoredStep(rollouts, rewards, valid, kept, timings)

    def _gather(
        self, rollouts: list[Rollout], rewards: torch.Tensor, offset: int
    ) -> tuple[list[Rollout], torch.Tensor]:
        """Every rank's rollouts and rewards, in prompt order, on every rank (group = global position)."""
        if not self.dist.enabled:
            return rollouts, rewards
        for r in rollouts:
            r.group += offset
        parts = self.dist.gather((rollouts, rewards))
        return [r for part, _ in parts for r in part], torch.cat([part for _, part in parts])

    def _sampling_seed(self, step: int) -> int:
        return step_seed(self.config.rs.seed, step) + RANK_SEED_STRIDE * self.dist.rank

    def _overlap_scoring(self) -> bool:
        setting = self.config.rs.overlap_scoring
        if not hasattr(self.generator, "generate_chunks"):
            return False
        if setting == "auto":
            return bool(getattr(self.scorer, "remote", False))
        return setting

    def _generate_then_score(self, prompts: list[Prompt], n: int, step: int, label: str) -> GeneratedStep:
        t0 = time.perf_counter()
        rollouts = self.generator.generate(prompts, n, seed=self._sampling_seed(step))
        timings = {"time_generate": time.perf_counter() - t0}
        self._after_generation(rollouts, len(prompts), n, step)
        self.reporter.phase(f"{label}: scoring {len(rollouts)} responses")
        timings["_scoring_from"] = time.perf_counter()
        return rollouts, lambda: [self.scorer.score(rollouts)], timings

    def _generate_and_score_overlapped(self, prompts: list[Prompt], n: int, step: int, label: str) -> GeneratedStep:
        """Score each generated chunk on a worker thread while the next chunk is generated.

        ``time_score`` then counts only the scoring left after generation ends (what the step waits
        for); ``time_score_busy`` is the scorer's total working time.
        """
        busy = [0.0]

        def timed_score(chunk: list[Rollout]) -> torch.Tensor:
            t = time.perf_counter()
            try:
                return self.scorer.score(chunk)
            finally:
                busy[0] += time.perf_counter() - t

        t0 = time.perf_counter()
        rollouts: list[Rollout] = []
        futures = []
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="thresher-score")
        try:
            for chunk in self.generator.generate_chunks(prompts, n, seed=self._sampling_seed(step)):
                rollouts.extend(chunk)
                if not self.interrupts.requested:
                    futures.append(pool.submit(timed_score, chunk))
            timings = {"time_generate": time.perf_counter() - t0}
            self._after_generation(rollouts, len(prompts), n, step)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        self.reporter.phase(f"{label}: scoring the last of {len(rollouts)} responses")
        timings["_scoring_from"] = time.perf_counter()

        def scores() -> list[torch.Tensor]:
            try:
                return [future.result() for future in futures]
            finally:
                pool.shutdown(wait=True, cancel_futures=True)
                timings["time_score_busy"] = busy[0]

        return rollouts, scores, timings

    def _after_generation(self, rollouts: list[Rollout], prompts: int, n: int, step: int) -> None:
        self.interrupts.check(f"during step {step}")  # a stopped generation returns partial rollouts
        _check_generated(rollouts, prompts, n)
        failpoint("generated", step)

    def _validate(self, step: int, metrics: MetricsWriter) -> None:
        """Greedy (and sampled) answers to the held-out prompts, scored by the training scorer and,
        if configured, by a separate ``validation_scorer`` that catches over-optimisation."""
        self.reporter.phase(f"validating on {len(self.val_prompts)} prompts")
        t0 = time.perf_counter()
        record: dict[str, Any] = {"kind": "validation", "step": step, "val_prompts": len(self.val_prompts)}
        modes = ("greedy", "sampled") if self.config.rs.val_sampled else ("greedy",)
        low, high = self.dist.shard_bounds(len(self.val_prompts))
        for mode in modes:
            seed = self._sampling_seed(step) + VALIDATION_SEED_OFFSET
            rollouts = self.generator.generate(self.val_prompts[low:high], 1, seed=seed, greedy=mode == "greedy")
            self.interrupts.check(f"while validating after step {step}")
            rewards = torch.as_tensor(self.scorer.score(rollouts), dtype=torch.float32).flatten()
            heldout = (
                torch.as_tensor(self.validation_scorer.score(rollouts), dtype=torch.float32).flatten()
                if self.validation_scorer is not None
                else torch.zeros(len(rollouts))
            )
            gathered = self.dist.gather((rollouts, rewards, heldout))
            rollouts = [r for part, _, _ in gathered for r in part]
            record[f"val_reward_{mode}"] = _mean_finite(torch.cat([g[1] for g in gathered]), len(rollouts))
            if self.validation_scorer is not None:
                record[f"val_heldout_reward_{mode}"] = _mean_finite(torch.cat([g[2] for g in gathered]), len(rollouts))
            record[f"val_distinct_2_{mode}"] = diversity(rollouts, "")["distinct_2"]
            record[f"val_response_len_{mode}"] = sum(len(r.response_ids) for r in rollouts) / max(1, len(rollouts))
        record["val_reward_mean"] = record["val_reward_greedy"]
        record["time_validate"] = time.perf_counter() - t0
        metrics.write(record)
        self.validation_history.append(record)
        self.reporter.validation(record)
        reason = self.guardrails.after_validation(record)
        if reason:
            raise EarlyStop(step, reason)

    def _checkpoint(self, step: int) -> None:
        self.reporter.phase(f"step {step}: writing checkpoint")
        state = {
            "data": self.stream.state_dict(),
            "config": self.config.to_dict(),
            "nonfinite_in_a_row": self.trainer.nonfinite_in_a_row,
            "guardrails": self.guardrails.state_dict(),
            "pool": self.pool.state_dict(),
            "kept_so_far": [[list(s.prompt_ids), list(s.response_ids)] for s in self.kept_so_far],
            "world_size": self.dist.world_size,
        }
        optimizer_state = self.holder.optimizer_state(self.trainer.optimizer)  # gathered on every rank under FSDP
        weights = self._policy_weights()
        if self.dist.is_main:  # every rank holds the same weights and optimizer state
            save_checkpoint(
                self.run_dir.checkpoints,
                step,
                weights,
                optimizer_state,
                state,
                keep_last=self.config.rs.keep_last,
            )
        self.dist.barrier()
        self.checkpointed_step = step
        failpoint("checkpointed", step)

    def _write_rollouts(self, step: int, scored: ScoredStep) -> None:
        if not self.dist.is_main:
            return
        rewards = scored.rewards.flatten().tolist() if scored.rewards is not None else None
        kept = scored.kept.flatten().tolist() if scored.kept is not None else None
        rows = [
            rollout_record(r, rewards[i] if rewards is not None else None, kept[i] if kept is not None else None)
            for i, r in enumerate(scored.rollouts)
        ]
        self.run_dir.write_rollouts(step, rows)

    # --- best-of-N data production (no training) ---------------------------------------------

    def produce(self, out: Path, *, limit: int | None = None, write_all: bool = False) -> dict[str, int]:
        """Generate, score and select for every training prompt (once); write the kept pairs.

        The output appears under its final name only when complete (``.partial`` until then).
        """
        prompts = self.train_prompts[:limit] if limit else self.train_prompts
        per_batch = self.config.rs.prompts_per_step
        counts = {"prompts": 0, "rollouts": 0, "kept": 0}
        tmp = out.with_name(out.name + ".partial")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            handle = tmp.open("w", encoding="utf-8")
        except OSError as err:
            raise OutputError(f"--out {out}: cannot write ({err.strerror or err})") from None
        with self.interrupts, handle:
            for batch_number, start in enumerate(range(0, len(prompts), per_batch), start=1):
                batch = prompts[start : start + per_batch]
                label = f"prompts {start + 1}-{start + len(batch)}/{len(prompts)}"
                scored = self.sample_and_select(batch, batch_number, label=label)
                rewards, kept = scored.rewards.flatten().tolist(), scored.kept.flatten().tolist()
                for r, reward, keep in zip(scored.rollouts, rewards, kept, strict=True):
                    if keep or write_all:
                        row = rollout_record(r, reward, keep)
                        handle.write(json.dumps({**r.prompt.extra, **row}) + "\n")
                counts["prompts"] += len(batch)
                counts["rollouts"] += len(scored.rollouts)
                counts["kept"] += int(scored.kept.sum())
                self.reporter.info(f"{label}: kept {int(scored.kept.sum())}/{len(scored.rollouts)}")
        tmp.replace(out)
        self.reporter.done()
        return counts

    def close(self) -> None:
        for plugin in (getattr(self, name, None) for name in ("generator", "scorer", "validation_scorer")):
            if plugin is not None:
                plugin.close()
        self.run_dir.release()
        self.dist.close()


def prompt_token_limit(config: RunConfig, model_config: Any) -> tuple[int | None, str]:
    """The longest prompt that fits: ``data.max_prompt_tokens`` and the model's context minus the
    generator's ``max_new_tokens``, whichever is smaller."""
    limits: list[tuple[int, str]] = []
    if config.data.max_prompt_tokens is not None:
        limits.append((config.data.max_prompt_tokens, f"data.max_prompt_tokens={config.data.max_prompt_tokens}"))
    context = getattr(model_config, "max_position_embeddings", None)
    new_tokens = getattr(config.generator.config, "max_new_tokens", 0) or 0
    if isinstance(context, int):
        if new_tokens >= context:
            raise ConfigError(
                [
                    f"generator.max_new_tokens: {new_tokens} leaves no room for a prompt in the model's context "
                    f"({context} tokens); use at most {context - 1}"
                ]
            )
        reason = f"the model's context ({context} tokens) minus generator.max_new_tokens={new_tokens}"
        limits.append((context - new_tokens, reason))
    return min(limits) if limits else (None, "")


class EarlyStop(Exception):
    """A guardrail or the early-stop rule ended the run; not an error."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


def _mean_finite(rewards: Any, expected: int) -> float:
    values = _as_rewards(rewards, expected)
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else float("nan")


def _as_rewards(value: Any, expected: int) -> torch.Tensor:
    rewards = torch.as_tensor(value, dtype=torch.float32).flatten().cpu()
    if rewards.numel() != expected:
        raise ScorerError(f"scorer returned {rewards.numel()} rewards for {expected} responses")
    return rewards


def _check_generated(rollouts: list[Rollout], prompts: int, n: int) -> None:
    if len(rollouts) != prompts * n:
        raise ThresherError(f"generator returned {len(rollouts)} rollouts for {prompts} prompts × N={n}")
    for i, r in enumerate(rollouts):
        if (r.group, r.sample) != (i // n, i % n):
            raise ThresherError(
                f"generator returned rollouts out of order at {i}: (group, sample) = "
                f"({r.group}, {r.sample}), expected ({i // n}, {i % n})"
            )
