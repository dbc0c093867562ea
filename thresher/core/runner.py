"""``Run``: the composition root. It resolves a config, builds every component once (model,
tokenizer, plugins, trainer, run directory) and owns their lifetime; the CLI, the benchmarks and the
tests all go through it.

    import thresher

    with thresher.Run.from_config("run.yaml", overrides={"rs.max_steps": 5}) as run:
        history = run.train()

Building happens on the first ``train()`` / ``produce()`` / ``plan()``, in this order, so a run that
cannot work stops before anything heavy is loaded or anything is written: the tokenizer, the model's
config and the prompts; the memory plan; the run directory (locked, then checked for a resume); the
weights; the plugins.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from thresher.core import loop, phases
from thresher.core.build import instantiate
from thresher.core.components import Components
from thresher.core.config import RunConfig, dump_config, load_config, resolve_config
from thresher.core.console import ConsoleReporter
from thresher.core.data import PromptStream, load_prompts
from thresher.core.errors import ConfigError
from thresher.core.interrupt import Interrupts
from thresher.core.model import DTYPES, load_model_config, load_policy, load_tokenizer, resolve_device
from thresher.core.registry import Registry, build_registry
from thresher.core.run.directory import RunDir
from thresher.core.scoring import wrap_scorer
from thresher.core.selection import Guardrails
from thresher.core.training.distributed import init_distributed
from thresher.core.training.lora import apply_lora
from thresher.core.training.memory import (
    MemoryPlan,
    checkpoint_sizes,
    enable_activation_checkpointing,
    format_bytes,
    plan_run_memory,
)
from thresher.core.training.precision import check_trainable_precision, wants_master_weights
from thresher.core.training.sharding import PolicyHolder
from thresher.core.training.trainer import Trainer
from thresher.core.trainset import training_set_for
from thresher.core.types import PluginContext, Prompt

ConfigSource = str | Path | dict[str, Any] | RunConfig


class Run:
    """One configured experiment: ``train()`` trains; ``produce()`` only makes best-of-N data."""

    def __init__(self, config: RunConfig, *, registry: Registry | None = None, reporter: ConsoleReporter | None = None):
        self.config = config
        self.registry = registry or build_registry()
        self.parts = Components(
            config=config,
            registry=self.registry,
            reporter=reporter or ConsoleReporter(),
            run_dir=RunDir(Path(config.output.dir)),
        )
        self._built: str | None = None  # "training" or "producing" once set up

    @classmethod
    def from_config(
        cls,
        source: ConfigSource,
        overrides: dict[str, Any] | list[str] | None = None,
        *,
        registry: Registry | None = None,
        quiet: bool = False,
    ) -> Run:
        """A run from a config file, a preset name (``demo``, ``tiny``), a dict of config data or a
        :class:`RunConfig`; ``overrides`` are ``{"rs.max_steps": 5}`` or ``["rs.max_steps=5"]``."""
        registry = registry or build_registry()
        config = resolve_source(source, overrides, registry)
        return cls(config, registry=registry, reporter=ConsoleReporter(quiet=quiet))

    # --- what a user calls --------------------------------------------------------------------

    def train(self, resume: bool | str = False) -> list[dict[str, Any]]:
        """Train for ``rs.max_steps`` global steps; the per-step metrics (also in ``metrics.jsonl``).
        ``resume=True`` continues from the newest checkpoint, a path from that checkpoint."""
        self.setup(training=True, resume=resume)
        return loop.train(self.parts)

    def step(self) -> dict[str, Any]:
        """One more global step, on its own: no checkpoint, no validation (benchmarks, notebooks)."""
        self.setup(training=True)
        progress = self.parts.progress
        record = loop.global_step(self.parts, progress.completed_step + 1)
        progress.history.append(record)
        progress.completed_step += 1
        return record

    def produce(self, out: str | Path, *, limit: int | None = None, write_all: bool = False) -> dict[str, int]:
        """Best-of-N data production, no training: the kept (prompt, response) pairs as JSONL."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError([f"limit: expected a whole number of prompts >= 1 (or None for all), got {limit!r}"])
        self.setup(training=False)
        return loop.produce(self.parts, Path(out), limit=limit, write_all=write_all)

    def plan(self, training: bool = True) -> MemoryPlan:
        """The memory plan, from the config, the model's config and the prompts (nothing heavy)."""
        parts = self.parts
        if self._built is None:  # a dry run; a real one has resolved the device (its rank's GPU) already
            parts.device = resolve_device(self.config.model.device)
        parts.reporter.phase("reading the tokenizer, the model config and the prompts")
        parts.tokenizer = load_tokenizer(self.config.model.path)
        model_config = load_model_config(self.config.model.path, parts.tokenizer)
        parts.train_prompts, parts.skipped_long_prompts = self._prompts(self.config.data.train, model_config)
        if self.config.data.validation:
            parts.val_prompts = self._prompts(self.config.data.validation, model_config)[0]
        if self.config.rs.val_max_prompts is not None:
            parts.val_prompts = parts.val_prompts[: self.config.rs.val_max_prompts]
        if parts.skipped_long_prompts:
            parts.reporter.info(f"skipped {parts.skipped_long_prompts} training prompts longer than the limit")
        generator_cls = self.registry.get("generator", self.config.generator.type)
        parts.memory_plan = plan_run_memory(
            self.config, model_config, parts.train_prompts, parts.device, training, parts.dist.world_size, generator_cls
        )
        return parts.memory_plan

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics records of the steps trained so far."""
        return self.parts.progress.history

    @property
    def model(self) -> torch.nn.Module | None:
        """The policy being trained (after ``train()`` has set the run up)."""
        return self.parts.model

    @property
    def is_main_process(self) -> bool:
        return self.parts.dist.is_main

    def close(self) -> None:
        """Release the plugins (servers, engines), the run directory's lock and the process group."""
        parts = self.parts
        for plugin in (parts.generator, parts.scorer, parts.validation_scorer):
            if plugin is not None:
                plugin.close()
        parts.run_dir.release()
        parts.dist.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building -----------------------------------------------------------------------------

    def setup(self, *, training: bool = True, resume: bool | str = False) -> None:
        """Build everything (optional: ``train()``, ``step()`` and ``produce()`` do it when needed)."""
        purpose = "training" if training else "producing"
        if self._built == purpose and not resume:
            return
        if self._built is not None:
            raise RuntimeError(f"this Run was already set up for {self._built}; make a new Run for this")
        self._built = purpose
        cfg, parts = self.config, self.parts
        precision_warning = check_trainable_precision(cfg.model.dtype, cfg.optim.master_weights) if training else None
        if training and cfg.model.lora is not None and cfg.optim.strategy == "fsdp":
            raise ConfigError(
                ["model.lora: not with optim.strategy=fsdp yet; use ddp (LoRA's optimizer state is adapter-sized)"]
            )
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        parts.dist = init_distributed(cfg.distributed.timeout_s)
        if parts.dist.enabled:
            # torchrun delivers signals to every rank, which would stop at different phases and leave
            # the others waiting in a collective: let signals end the job; resume from the last checkpoint.
            parts.interrupts = Interrupts(enabled=False)
            parts.reporter.quiet = parts.reporter.quiet or not parts.dist.is_main
            if cfg.rs.prompts_per_step % parts.dist.world_size:
                raise ConfigError(
                    [
                        f"rs.prompts_per_step: {cfg.rs.prompts_per_step} prompts cannot be split evenly over "
                        f"{parts.dist.world_size} ranks"
                    ]
                )
        parts.device = resolve_device(cfg.model.device)
        if parts.dist.backend == "nccl":
            parts.device = torch.device("cuda", parts.dist.local_rank)
        self.plan(training)  # light inputs and the memory plan first: stop before anything heavy
        if not parts.memory_plan.fits and cfg.model.memory_check:
            raise ConfigError([parts.memory_plan.refusal()])
        resume_path = self._prepare_directory(resume) if training else None
        self._load_policy(training)
        if precision_warning:
            parts.reporter.info(f"[yellow]warning:[/] {precision_warning}")
        self._warn_greedy_duplicates()
        self._build_plugins()
        parts.trainer = Trainer(
            parts.holder.train_model,
            parts.loss,
            cfg.optim,
            max_steps=cfg.rs.max_steps,
            pad_id=parts.tokenizer.pad_token_id,
            device=parts.device,
            seed=cfg.rs.seed,
            interrupt_check=parts.interrupts.check,
            dist=parts.dist,
            on_micro_batch=parts.reporter.advance,
        )
        parts.trainset = training_set_for(cfg.rs)
        parts.guardrails = Guardrails(cfg.guardrails)
        if training and parts.dist.is_main:
            sizes = checkpoint_sizes(parts.model, parts.trainer.params, cfg.output, lora=parts.peft_model is not None)
            parts.run_dir.check_space(*sizes)
        if resume_path is not None:
            phases.resume(parts, resume_path, fall_back=resume is True)
        parts.reporter.done()

    def _prepare_directory(self, resume: bool | str) -> Path | None:
        """Lock the directory, then check the resume point, and only then write anything: a refused
        resume leaves the run exactly as it was."""
        cfg, parts = self.config, self.parts
        if parts.dist.is_main:
            parts.run_dir.prepare(resume=bool(resume), overwrite=cfg.output.overwrite, origin=cfg.origin)
        parts.dist.barrier()
        resume_path = phases.resume_point(parts, resume) if resume else None
        if parts.dist.is_main:
            parts.run_dir.write_config(dump_config(cfg))
            parts.run_dir.write_atomic(parts.run_dir.path / "memory_plan.txt", parts.memory_plan.render() + "\n")
        parts.dist.barrier()
        return resume_path

    def _load_policy(self, training: bool) -> None:
        cfg, parts = self.config, self.parts
        parts.reporter.phase(f"loading model {cfg.model.path}")
        t0 = time.perf_counter()
        parts.model, parts.tokenizer = load_policy(
            cfg.model.path, cfg.model.dtype, cfg.rs.seed, parts.tokenizer, parts.device
        )
        parts.peft_model = apply_lora(parts.model, cfg.model.lora, cfg.rs.seed) if cfg.model.lora else None
        parts.model.to(parts.device)
        if training and cfg.optim.activation_checkpointing:
            enable_activation_checkpointing(parts.model)
        if cfg.rs.restart_from_base:  # the weights every step restarts from (before any resume)
            parts.base_state = {k: v.detach().to("cpu", copy=True) for k, v in parts.model.state_dict().items()}
        trainable = sum(p.numel() for p in parts.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in parts.model.parameters())
        adapters = f", {trainable / 1e6:.2f}M of them LoRA adapters" if parts.peft_model is not None else ""
        parts.reporter.info(
            f"model {cfg.model.path}: {total / 1e6:.1f}M parameters{adapters}, {cfg.model.dtype} "
            f"on {parts.device} ({time.perf_counter() - t0:.1f}s); planned peak memory "
            f"{format_bytes(parts.memory_plan.peak)}"
        )
        masters = wants_master_weights(cfg.optim.master_weights, DTYPES[cfg.model.dtype])
        parts.holder = PolicyHolder(parts.model, parts.dist, cfg.optim.strategy, master_weights=masters)
        if cfg.optim.strategy == "fsdp" and not parts.holder.sharded:
            parts.reporter.info("optim.strategy fsdp: one process, nothing to shard (it applies under torchrun)")
        parts.stream = PromptStream(parts.train_prompts, seed=cfg.rs.seed, shuffle=cfg.data.shuffle)

    def _build_plugins(self) -> None:
        cfg, parts = self.config, self.parts
        context = PluginContext(
            tokenizer=parts.tokenizer,
            policy=parts.model,
            device=parts.device,
            seed=cfg.rs.seed,
            should_stop=lambda: parts.interrupts.requested,
            registry=self.registry,
        )
        parts.reporter.phase("starting plugins")
        parts.generator = instantiate(self.registry, "generator", cfg.generator, context)
        parts.scorer = wrap_scorer(instantiate(self.registry, "scorer", cfg.scorer, context), cfg.scorer.options)
        parts.selector = instantiate(self.registry, "selector", cfg.selector, context)
        parts.loss = instantiate(self.registry, "loss", cfg.loss, context)
        if cfg.validation_scorer is not None:
            scorer = instantiate(self.registry, "scorer", cfg.validation_scorer, context)
            parts.validation_scorer = wrap_scorer(scorer, cfg.validation_scorer.options)

    def _warn_greedy_duplicates(self) -> None:
        cfg = self.config
        if getattr(cfg.generator.config, "temperature", None) == 0 and cfg.rs.num_rollouts_per_prompt > 1:
            self.parts.reporter.info(
                f"[yellow]warning:[/] generator.temperature=0 decodes greedily: the {cfg.rs.num_rollouts_per_prompt} "
                "responses of each prompt will be identical, leaving the selector nothing to choose from"
            )

    def _prompts(self, source: str, model_config: Any) -> tuple[list[Prompt], int]:
        data = self.config.data
        limit, limit_name = prompt_token_limit(self.config, model_config)
        return load_prompts(
            source,
            self.parts.tokenizer,
            field=data.field,
            messages_field=data.messages_field,
            chat_template=data.chat_template,
            max_prompt_tokens=limit,
            limit_name=limit_name,
            on_long_prompt=data.on_long_prompt,
        )


def resolve_source(source: ConfigSource, overrides: dict[str, Any] | list[str] | None, registry: Registry) -> RunConfig:
    """Any config source plus overrides → a validated :class:`RunConfig` (one line per problem)."""
    from thresher.core.config import apply_overrides

    if isinstance(overrides, dict):
        items = [f"{key}={_yaml_scalar(value)}" for key, value in overrides.items()]
    else:
        items = list(overrides or [])
    if isinstance(source, RunConfig):
        if not items:
            return source
        config = resolve_config(apply_overrides(source.to_dict(), items), registry)
        config._origin = source.origin
        return config
    if isinstance(source, dict):
        return resolve_config(apply_overrides(source, items), registry)
    return load_config(source, items, registry)


def _yaml_scalar(value: Any) -> str:
    """A Python value as the YAML text ``--set`` parses back to it."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


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
