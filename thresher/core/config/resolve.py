"""Validating raw config data: every plugin section by its plugin's own ``Config``, every problem
collected and reported at once, one ``dotted.path: reason`` line each, so a user fixes a file in one
pass."""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Set as AbstractSet
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from thresher.core.config.sampling import SamplingConfig, sampling_contract_problem
from thresher.core.config.schema import FRAMEWORK_OPTIONS, PluginSpec, RunConfig
from thresher.core.config.suggest import keys_at, suggestion
from thresher.core.errors import ConfigError
from thresher.core.registry import PIPELINE_KINDS, Registry

PLUGIN_DEFAULTS: dict[str, str | None] = {
    "generator": "hf",
    "scorer": None,  # no sensible default reward: a config must say what is being optimised
    "selector": "topk",
    "loss": "masked_mean_logprob",
}


# The directory of the config file being resolved: a plugin's validator may look for the user's
# files beside it (``scorer.function: my_rewards:fn`` with my_rewards.py next to the config), however
# deeply its section is nested. Set only while resolve_config runs.
_CONFIG_DIR: ContextVar[Path | None] = ContextVar("thresher_config_dir", default=None)


def config_directory() -> Path | None:
    """The directory of the config file being validated, or None (a dict, a preset, no validation)."""
    return _CONFIG_DIR.get()


def resolve_config(raw: dict[str, Any], registry: Registry, base_dir: Path | None = None) -> RunConfig:
    """Validate raw config data into a :class:`RunConfig`, reporting every problem at once;
    ``base_dir``: the config file's directory (see :func:`config_directory`)."""
    token = _CONFIG_DIR.set(base_dir)
    try:
        return _resolve_config(raw, registry)
    finally:
        _CONFIG_DIR.reset(token)


def _resolve_config(raw: dict[str, Any], registry: Registry) -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError([f"config: expected a mapping of sections, got {type(raw).__name__}"])
    raw = copy.deepcopy(raw)
    problems: list[str] = []
    for kind in PIPELINE_KINDS:
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
    if "loggers" in raw:
        raw["loggers"] = _resolve_loggers(raw["loggers"], registry, problems)
    try:
        config = RunConfig.model_validate(raw)
    except ValidationError as err:
        problems.extend(_format_errors(err, skip_missing={*PIPELINE_KINDS, "validation_scorer"}, model=RunConfig))
        raise ConfigError(problems) from None
    if not isinstance(config.generator.config, SamplingConfig):
        problems.append(sampling_contract_problem(config.generator.type, type(config.generator.config).__name__))
    problems.extend(nonfinite_numbers(config))
    problems.extend(undefined_normalizations(config))
    problems.extend(unreachable_acceptance(config))
    if problems:
        raise ConfigError(problems)
    return config


def undefined_normalizations(config: RunConfig) -> list[str]:
    """Normalising rewards within a prompt's responses compares them with each other: with one
    response per prompt every z-score is 0 (and every rank 0.5), so the selector would choose on
    nothing. Refused rather than run silently."""
    n = config.rs.num_rollouts_per_prompt
    if n > 1:
        return []
    problems = []
    mode = config.selector.selector_options().normalize
    if mode != "none":
        problems.append(
            f"selector.normalize: {mode!r} compares the responses of each prompt, but rs.num_rollouts_per_prompt "
            "is 1 (every reward would become the same); use normalize: none or N >= 2"
        )
    for i, part in enumerate(getattr(config.scorer.config, "parts", None) or []):
        if getattr(part, "normalize", "none") != "none":
            problems.append(
                f"scorer.parts[{i}].normalize: {part.normalize!r} compares the responses of each prompt, but "
                "rs.num_rollouts_per_prompt is 1 (every reward would become 0); use normalize: none or N >= 2"
            )
    return problems


def unreachable_acceptance(config: RunConfig) -> list[str]:
    """``until_accepted`` waits for ``min_accepted`` kept responses per prompt; a selector that keeps
    at most ``top_n_rollouts`` per prompt can never reach more, and every prompt would silently run
    to ``max_rollouts``: the sampling mode's point lost."""
    sampling = config.rs.sampling
    most = getattr(config.selector.config, "top_n_rollouts", None)
    if sampling.mode != "until_accepted" or not isinstance(most, int) or sampling.min_accepted <= most:
        return []
    return [
        f"rs.sampling.min_accepted ({sampling.min_accepted}) is more than selector.top_n_rollouts ({most}) keeps "
        "per prompt: no prompt could ever be accepted; lower it or raise top_n_rollouts"
    ]


def nonfinite_numbers(value: Any, where: str = "") -> list[str]:
    """``where: must be a finite number`` for every NaN or infinity anywhere in a validated config,
    plugin sections included: pydantic's bounds let ``.inf`` through ``gt=0`` and ``.nan`` through
    every comparison, so ``optim.lr: .inf`` would train one step into a model of infinities."""
    if isinstance(value, float):
        return [] if math.isfinite(value) else [f"{where}: must be a finite number (got {value})"]
    if isinstance(value, PluginSpec):
        return nonfinite_numbers(value.config, where) + nonfinite_numbers(value.options, where)
    if isinstance(value, BaseModel):
        return [
            line
            for name in type(value).model_fields
            for line in nonfinite_numbers(getattr(value, name), f"{where}.{name}".lstrip("."))
        ]
    if isinstance(value, dict):
        return [line for key, item in value.items() for line in nonfinite_numbers(item, f"{where}.{key}")]
    if isinstance(value, (list, tuple)):
        return [line for i, item in enumerate(value) for line in nonfinite_numbers(item, f"{where}[{i}]")]
    return []


def _resolve_loggers(sections: Any, registry: Registry, problems: list[str]) -> list[PluginSpec]:
    """``loggers: [{type: tensorboard}, …]``: each section validated like a top-level one; a logger
    named twice is an error (both would write the same files)."""
    if sections is None:
        return []
    if not isinstance(sections, list):
        problems.append(f"loggers: expected a list like [{{type: tensorboard}}], got {type(sections).__name__}")
        return []
    specs, seen = [], set()
    for i, section in enumerate(sections):
        spec = _resolve_plugin_section("logger", section, registry, problems, f"loggers[{i}]")
        if spec is None:
            continue
        if spec.type in seen:
            problems.append(f"loggers[{i}].type: {spec.type!r} is listed twice")
            continue
        seen.add(spec.type)
        specs.append(spec)
    return specs


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
        valid = [*registry.get(kind, name).Config.model_fields, *_framework_keys(kind), "type"]
        problems.extend(f"{where}.{line}" for line in _format_errors(err, where=where, keys=valid))
        return None
    except ConfigError as err:  # raised by a nested section's own resolution
        problems.extend(err.problems)
        return None
    if options is None:
        return None
    return PluginSpec(type=name, config=plugin_config, options=options)


def _framework_options(kind: str, params: dict[str, Any], where: str, problems: list[str]) -> dict[str, Any] | None:
    """Pop the options Thresher applies around any plugin of ``kind`` (a selector's dedup and
    normalize, a scorer's dedup and cache); only values that differ from the default are kept."""
    model = FRAMEWORK_OPTIONS.get(kind)
    if model is None:
        return {}
    given = {key: params.pop(key) for key in list(params) if key in model.model_fields}
    try:
        options = model.model_validate(given)
    except ValidationError as err:
        problems.extend(f"{where}.{line}" for line in _format_errors(err))
        return None
    defaults = model()
    return {
        key: value
        for key, value in options.model_dump(mode="json").items()
        if key in given and value != getattr(defaults, key)
    }


def _framework_keys(kind: str) -> list[str]:
    options = FRAMEWORK_OPTIONS.get(kind)
    return list(options.model_fields) if options is not None else []


def _format_errors(
    err: ValidationError,
    skip_missing: AbstractSet[str] = frozenset(),
    *,
    model: type[BaseModel] | None = None,
    where: str = "",
    keys: list[str] | None = None,
) -> list[str]:
    """One line per problem. An unknown key gets a did-you-mean: the valid keys at its place come from
    ``model`` (followed along the key's path) or, for a plugin section at ``where``, from ``keys``."""
    lines = []
    for e in err.errors():
        loc = e["loc"]
        if e["type"] == "missing" and len(loc) == 1 and loc[0] in skip_missing:
            continue  # already reported by the plugin-section pass
        path = ".".join(_loc_part(p) for p in loc) or "config"
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = "unknown key"
            parent = ".".join(str(p) for p in (where, *loc[:-1]) if p != "")
            valid = keys if keys is not None and len(loc) == 1 else keys_at(model, tuple(loc[:-1]))
            better = suggestion(str(loc[-1]), parent, valid)
            if better:
                message += f"; did you mean {better}?"
        elif e["type"].startswith("value_error"):
            message = message.removeprefix("Value error, ")
        lines.append(f"{path}: {message}" + (f" (got {e['input']!r})" if _show_input(e) else ""))
    return lines


def _loc_part(part: object) -> str:
    # Plain names print as they are; anything else (spaces, newlines, empty) as a quoted literal, so
    # every problem stays on one readable line.
    text = str(part)
    return text if re.fullmatch(r"[A-Za-z0-9_\-\[\]]+", text) else repr(text)


def _show_input(error: Any) -> bool:  # a pydantic ErrorDetails
    return error["type"] not in {"missing", "extra_forbidden"} and isinstance(
        error.get("input"), (str, int, float, bool, type(None))
    )
