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

from thresher.core import in_memory, loop
from thresher.core.build import instantiate
from thresher.core.config import RunConfig, dump_config, load_config, resolve_config
from thresher.core.config.sampling import sampling_params
from thresher.core.config.schema import chat_template_text
from thresher.core.console import ConsoleReporter
from thresher.core.data import PromptStream, load_prompts
from thresher.core.errors import ConfigError
from thresher.core.interrupt import Interrupts
from thresher.core.model import DTYPES, load_model_config, load_policy, load_tokenizer, resolve_device
from thresher.core.pool import PromptPool
from thresher.core.registry import Registry, build_registry
from thresher.core.run.directory import RunDir
from thresher.core.run.loggers import NoLoggers, RunLoggers, open_loggers
from thresher.core.run.saving import Saver, resume_point
from thresher.core.scoring import wrap_scorer
from thresher.core.selection import Guardrails
from thresher.core.session import Inputs, Plugins, Policy, Progress, Session
from thresher.core.training.distributed import Distributed, init_distributed
from thresher.core.training.lora import apply_lora
from thresher.core.training.memory import (
    MemoryPlan,
    checkpoint_sizes,
    enable_activation_checkpointing,
    format_bytes,
    plan_run_memory,
    return_large_frees_to_the_os,
    with_micro_batch,
)
from thresher.core.training.precision import check_trainable_precision, wants_master_weights
from thresher.core.training.sharding import PolicyHolder
from thresher.core.training.trainer import Trainer
from thresher.core.trainset import check_training_set, training_set_for
from thresher.core.types import Generator, PluginContext, Prompt, Scorer, loss_inputs, trains_on

ConfigSource = str | Path | dict[str, Any] | RunConfig


class Run:
    """One configured experiment: ``train()`` trains; ``produce()`` only makes best-of-N data."""

    def __init__(self, config: RunConfig, *, registry: Registry | None = None, reporter: ConsoleReporter | None = None):
        self.config = config
        self.registry = registry or build_registry()
        self.reporter = reporter or ConsoleReporter()
        self.run_dir = RunDir(Path(config.output.dir))
        self.dist = Distributed()
        self.interrupts = Interrupts()
        self.progress = Progress()
        self.device = torch.device("cpu")
        self.inputs: Inputs | None = None  # set by plan()
        self._session: Session | None = None  # set by setup()
        self._built: str | None = None  # "training" or "producing" once set up
        self._step_loggers: RunLoggers | NoLoggers | None = None  # step()'s, open until close()

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
        return loop.train(self.session)

    def step(self) -> dict[str, Any]:
        """One more global step, on its own: no checkpoint, no validation (benchmarks, notebooks). Its
        metrics record and rollouts are written as in ``train()`` (``metrics.jsonl``, the loggers,
        ``rollouts/``), so ``thresher report`` reads a run made step by step."""
        self.setup(training=True)
        if self._step_loggers is None:
            self._step_loggers = open_loggers(self.session)
        return loop.global_step(self.session, self.progress.next_step, self._step_loggers)

    def produce(self, out: str | Path, *, limit: int | None = None, write_all: bool = False) -> dict[str, int]:
        """Best-of-N data production, no training: the kept (prompt, response) pairs as JSONL."""
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
            raise ConfigError([f"limit: expected a whole number of prompts >= 1 (or None for all), got {limit!r}"])
        self.setup(training=False)
        return loop.produce(self.session, Path(out), limit=limit, write_all=write_all)

    def plan(self, training: bool = True) -> MemoryPlan:
        """The memory plan, from the config, the model's config and the prompts (nothing heavy)."""
        if self._built is None:  # a dry run (maybe for a GPU this machine lacks); a real one resolved it already
            self.device = resolve_device(self.config.model.device, present=False)
        self.reporter.phase("reading the tokenizer, the model config and the prompts")
        tokenizer = load_tokenizer(self.config.model.path)
        if self.config.model.chat_template is not None:
            tokenizer.chat_template = chat_template_text(self.config.model.chat_template)
        model_config = load_model_config(self.config.model.path, tokenizer)
        train_prompts, skipped = self._prompts(self.config.data.train, tokenizer, model_config)
        val_prompts: list[Prompt] = []
        if self.config.data.validation:
            val_prompts = self._prompts(self.config.data.validation, tokenizer, model_config)[0]
        if self.config.rs.val_max_prompts is not None:
            val_prompts = val_prompts[: self.config.rs.val_max_prompts]
        self._check_data_columns(train_prompts + val_prompts)
        self._check_loss()
        if skipped:
            self.reporter.info(f"skipped {skipped} training prompts longer than the limit")
        generator_cls = self.registry.get("generator", self.config.generator.type)
        memory_plan = plan_run_memory(
            self.config, model_config, train_prompts, self.device, training, self.dist.world_size, generator_cls
        )
        if memory_plan.micro_batch_size is not None and self.dist.enabled:
            memory_plan = self._agree_on_micro_batch(memory_plan, model_config, train_prompts, training, generator_cls)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            memory_plan.notes.append(
                "planned for a CUDA device this machine does not have: compare the peaks with its memory"
            )
        self.inputs = Inputs(tokenizer, train_prompts, val_prompts, skipped, memory_plan)
        return memory_plan

    def _agree_on_micro_batch(
        self, plan: MemoryPlan, model_config: Any, prompts: list[Prompt], training: bool, generator_cls: type
    ) -> MemoryPlan:
        """``optim.micro_batch_size: auto`` under torchrun: every rank runs the same micro-batches (FSDP
        pads to the busiest rank's count), so all take the smallest any rank's plan allows."""
        chosen = plan.micro_batch_size
        assert chosen is not None
        agreed = min(self.dist.gather(chosen))
        if agreed == chosen:
            return plan
        resolved = with_micro_batch(self.config, agreed)
        world = self.dist.world_size
        plan = plan_run_memory(resolved, model_config, prompts, self.device, training, world, generator_cls)
        plan.micro_batch_size = agreed
        plan.notes.append(f"optim.micro_batch_size auto: {agreed}, the smallest of the ranks' (this one: {chosen})")
        return plan

    def _check_data_columns(self, prompts: list[Prompt]) -> None:
        """A scorer section's ``Config`` may check itself against the data's columns (optional
        ``check_columns(columns, where, registry)`` returning problems; the rule scorer checks its
        function's arguments, combine its parts'): a reward that cannot be called fails here, before the
        model loads."""
        columns = {key for prompt in prompts for key in prompt.extra}
        problems: list[str] = []
        for where, spec in (("scorer", self.config.scorer), ("validation_scorer", self.config.validation_scorer)):
            check = getattr(spec.config, "check_columns", None) if spec is not None else None
            if check is not None:
                problems.extend(check(columns, where, self.registry))
        if problems:
            raise ConfigError(problems)

    def _check_loss(self) -> None:
        """A loss that trains on rejected rollouts, or reads rewards and groups, needs this step's
        rollouts: refused with the training sets that replay earlier steps' responses."""
        loss_cls = self.registry.get("loss", self.config.loss.type)
        whole_groups = trains_on(loss_cls) == "groups"
        problems = check_training_set(self.config.rs, self.config.loss.type, whole_groups, loss_inputs(loss_cls))
        if problems:
            raise ConfigError(problems)

    @property
    def session(self) -> Session:
        """The built run (after ``setup()``, which ``train()``, ``step()`` and ``produce()`` call)."""
        if self._session is None:
            raise RuntimeError("this Run is not set up yet: call setup(), train(), step() or produce() first")
        return self._session

    @property
    def history(self) -> list[dict[str, Any]]:
        """The metrics records of the steps trained so far."""
        return self.progress.history

    @property
    def model(self) -> torch.nn.Module | None:
        """The policy being trained (after ``train()`` has set the run up)."""
        return self._session.policy.model if self._session is not None else None

    @property
    def is_main_process(self) -> bool:
        return self.dist.is_main

    def close(self) -> None:
        """Release the plugins (servers, engines), the run directory's lock and the process group."""
        self.reporter.done()  # a phase an error left open: its progress line (or heartbeat) ends here
        if self._step_loggers is not None:
            self._step_loggers.close()
            self._step_loggers = None
        if self._plugins is not None:
            self._plugins.close()
        self.run_dir.release()
        self.dist.close()

    def __enter__(self) -> Run:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- building -----------------------------------------------------------------------------

    _plugins: Plugins | None = None  # closed by close(), even when setup() failed after building them

    def setup(self, *, training: bool = True, resume: bool | str = False) -> None:
        """Build everything (optional: ``train()``, ``step()`` and ``produce()`` do it when needed)."""
        purpose = "training" if training else "producing"
        if self._built == purpose and not resume:
            return
        if self._built is not None:
            raise RuntimeError(f"this Run was already set up for {self._built}; make a new Run for this")
        self._built = purpose
        cfg = self.config
        precision_warning = check_trainable_precision(cfg.model.dtype, cfg.optim.master_weights) if training else None
        if training and cfg.model.lora is not None and cfg.optim.strategy == "fsdp":
            raise ConfigError(
                ["model.lora: not with optim.strategy=fsdp yet; use ddp (LoRA's optimizer state is adapter-sized)"]
            )
        if cfg.model.threads:
            torch.set_num_threads(cfg.model.threads)
        self._join_process_group()
        self.device = resolve_device(cfg.model.device)
        if self.dist.backend == "nccl":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.device.type == "cpu":
            return_large_frees_to_the_os()  # before anything large is allocated: see its docstring
        memory_plan = self.plan(training)  # light inputs and the memory plan first: stop before anything heavy
        inputs = self.inputs
        assert inputs is not None  # plan() set it
        if not memory_plan.fits and cfg.model.memory_check:
            raise ConfigError([memory_plan.refusal()])
        resume_path = self._prepare_directory(resume, memory_plan) if training else None
        policy = self._load_policy(training, inputs)
        if precision_warning:
            self.reporter.info(f"[yellow]warning:[/] {precision_warning}")
        self._warn_greedy_duplicates()
        plugins = self._plugins = self._build_plugins(policy.model, inputs.tokenizer)
        optim = cfg.optim
        if memory_plan.micro_batch_size is not None:  # optim.micro_batch_size: auto
            optim = with_micro_batch(cfg, memory_plan.micro_batch_size).optim
            self.reporter.info(f"optim.micro_batch_size auto: {memory_plan.micro_batch_size} (the memory plan's pick)")
        trainer = Trainer(
            policy.holder.train_model,
            plugins.loss,
            optim,
            max_steps=cfg.rs.max_steps,
            pad_id=inputs.tokenizer.pad_token_id,
            device=self.device,
            seed=cfg.rs.seed,
            interrupt_check=self.interrupts.check,
            dist=self.dist,
            on_micro_batch=self.reporter.advance,
        )
        pool = None
        if cfg.rs.prompt_pool is not None:
            field = cfg.data.group_field
            groups = [str(p.extra.get(field)) for p in inputs.train_prompts] if field else None
            pool = PromptPool(cfg.rs.prompt_pool, len(inputs.train_prompts), groups=groups)
        self._session = Session(
            config=cfg,
            registry=self.registry,
            reporter=self.reporter,
            run_dir=self.run_dir,
            dist=self.dist,
            interrupts=self.interrupts,
            device=self.device,
            inputs=inputs,
            policy=policy,
            plugins=plugins,
            stream=PromptStream(inputs.train_prompts, seed=cfg.rs.seed, shuffle=cfg.data.shuffle, pool=pool),
            trainer=trainer,
            trainset=training_set_for(cfg.rs, whole_groups=trains_on(plugins.loss) == "groups"),
            guardrails=Guardrails(cfg.guardrails),
            progress=self.progress,
        )
        if training and self.dist.is_main:
            sizes = checkpoint_sizes(policy.model, trainer.params, cfg.output, lora=policy.lora)
            self.run_dir.check_space(*sizes)
        if resume_path is not None:
            Saver(self._session).resume(resume_path, fall_back=resume is True)
        self.reporter.done()

    def _join_process_group(self) -> None:
        """Under torchrun: the process group, and what it changes (signals, the console)."""
        cfg = self.config
        self.dist = init_distributed(cfg.distributed.timeout_s)
        if not self.dist.enabled:
            return
        # torchrun delivers signals to every rank, which would stop at different phases and leave
        # the others waiting in a collective: let signals end the job; resume from the last checkpoint.
        self.interrupts = Interrupts(enabled=False)
        self.reporter.quiet = self.reporter.quiet or not self.dist.is_main
        if cfg.rs.prompts_per_step % self.dist.world_size:
            raise ConfigError(
                [
                    f"rs.prompts_per_step: {cfg.rs.prompts_per_step} prompts cannot be split evenly over "
                    f"{self.dist.world_size} ranks"
                ]
            )

    def _prepare_directory(self, resume: bool | str, memory_plan: MemoryPlan) -> Path | None:
        """Lock the directory, then check the resume point, and only then write anything: a refused
        resume leaves the run exactly as it was."""
        cfg, run_dir = self.config, self.run_dir
        if self.dist.is_main:
            run_dir.prepare(resume=bool(resume), overwrite=cfg.output.overwrite, origin=cfg.origin)
        self.dist.barrier()
        resume_path = None
        if resume:
            warn = self.reporter.warning
            resume_path = resume_point(resume, run_dir, cfg, self.registry, self.dist, warn)
        if self.dist.is_main:
            run_dir.write_config(dump_config(cfg))
            run_dir.write_atomic(run_dir.path / "memory_plan.txt", memory_plan.render() + "\n")
        self.dist.barrier()
        return resume_path

    def _load_policy(self, training: bool, inputs: Inputs) -> Policy:
        cfg = self.config
        self.reporter.phase(f"loading model {cfg.model.path}")
        t0 = time.perf_counter()
        model, inputs.tokenizer = load_policy(
            cfg.model.path, cfg.model.dtype, cfg.rs.seed, inputs.tokenizer, self.device
        )
        peft_model = apply_lora(model, cfg.model.lora, cfg.rs.seed) if cfg.model.lora else None
        model.to(self.device)
        if training and cfg.optim.activation_checkpointing:
            enable_activation_checkpointing(model)
        base_state = None
        if cfg.rs.restart_from_base:  # the weights every step restarts from (before any resume)
            base_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        adapters = f", {trainable / 1e6:.2f}M of them LoRA adapters" if peft_model is not None else ""
        self.reporter.info(
            f"model {cfg.model.path}: {total / 1e6:.1f}M parameters{adapters}, {cfg.model.dtype} "
            f"on {self.device} ({time.perf_counter() - t0:.1f}s); planned peak memory "
            f"{format_bytes(inputs.memory_plan.peak)}"
        )
        masters = wants_master_weights(cfg.optim.master_weights, DTYPES[cfg.model.dtype])
        holder = PolicyHolder(model, self.dist, cfg.optim.strategy, master_weights=masters)
        if cfg.optim.strategy == "fsdp" and not holder.sharded:
            self.reporter.info("optim.strategy fsdp: one process, nothing to shard (it applies under torchrun)")
        return Policy(model=model, holder=holder, peft_model=peft_model, base_state=base_state)

    def _build_plugins(self, model: torch.nn.Module, tokenizer: Any) -> Plugins:
        cfg, interrupts = self.config, self.interrupts
        context = PluginContext(
            tokenizer=tokenizer,
            policy=model,
            device=self.device,
            seed=cfg.rs.seed,
            should_stop=lambda: interrupts.requested,
            registry=self.registry,
            sampling=sampling_params(cfg),
        )
        self.reporter.phase("starting plugins")
        started: list[Generator | Scorer] = []  # closed again if a later plugin fails to start
        try:
            generator = instantiate(self.registry, "generator", cfg.generator, context)
            started.append(generator)
            scorer = wrap_scorer(instantiate(self.registry, "scorer", cfg.scorer, context), cfg.scorer.scorer_options())
            started.append(scorer)
            selector = instantiate(self.registry, "selector", cfg.selector, context)
            loss = instantiate(self.registry, "loss", cfg.loss, context)
            validation_scorer = None
            if cfg.validation_scorer is not None:
                built = instantiate(self.registry, "scorer", cfg.validation_scorer, context)
                validation_scorer = wrap_scorer(built, cfg.validation_scorer.scorer_options())
        except BaseException:
            for plugin in started:
                plugin.close()
            raise
        return Plugins(generator, scorer, selector, loss, validation_scorer)

    def _warn_greedy_duplicates(self) -> None:
        cfg = self.config
        if sampling_params(cfg).temperature == 0 and cfg.rs.num_rollouts_per_prompt > 1:
            self.reporter.info(
                f"[yellow]warning:[/] generator.temperature=0 decodes greedily: the {cfg.rs.num_rollouts_per_prompt} "
                "responses of each prompt will be identical, leaving the selector nothing to choose from"
            )

    def _prompts(self, source: str, tokenizer: Any, model_config: Any) -> tuple[list[Prompt], int]:
        data = self.config.data
        limit, limit_name = prompt_token_limit(self.config, model_config)
        return load_prompts(
            source,
            tokenizer,
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

    if isinstance(source, dict):
        source = _hold_data(source)
    if isinstance(overrides, dict):
        overrides = {key: _held(key, value) for key, value in overrides.items()}
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


DATA_KEYS = ("data.train", "data.validation")


def _held(key: str, value: Any) -> Any:
    """A Dataset, DataFrame or list of rows given for a data key, as the name it is held under."""
    return in_memory.hold(value, key) if key in DATA_KEYS and in_memory.is_in_memory(value) else value


def _hold_data(source: dict[str, Any]) -> dict[str, Any]:
    """A config dict whose ``data`` section holds in-memory data, with names in its place."""
    data = source.get("data")
    if not isinstance(data, dict):
        return source
    held = {name: _held(f"data.{name}", value) for name, value in data.items()}
    return {**source, "data": held}


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
    new_tokens = sampling_params(config).max_new_tokens
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
