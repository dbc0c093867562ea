"""Did-you-mean for unknown config keys: a near spelling among the keys valid at that place, or the
Thresher name of a setting a TRL user knows by another name (``learning_rate`` is ``optim.lr``)."""

from __future__ import annotations

import difflib
import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel

# TRL's names (GRPOConfig / SFTConfig / TrainingArguments) for settings Thresher has, wherever the key
# is written. Only settings that mean the same thing: TRL's gradient accumulation or epochs do not.
TRL_NAMES: dict[str, str] = {
    "learning_rate": "optim.lr",
    "num_generations": "rs.num_rollouts_per_prompt",
    "max_completion_length": "generator.max_new_tokens",
    "max_prompt_length": "data.max_prompt_tokens",
    "per_device_train_batch_size": "optim.micro_batch_size",
    "report_to": "loggers (a list, e.g. [{type: tensorboard}])",
    "output_dir": "output.dir",
    "model_name_or_path": "model.path",
    "max_steps": "rs.max_steps",
    "seed": "rs.seed",
    "max_grad_norm": "optim.grad_clip",
    "lr_scheduler_type": "optim.schedule",
}


def suggestion(key: str, where: str, valid_keys: list[str]) -> str | None:
    """What to write instead of ``key`` at ``where`` (the dotted path of its section, "" at the top)."""
    close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.75)
    if close:
        return f"{where}.{close[0]}" if where else close[0]
    known = TRL_NAMES.get(key)
    if known is not None and known != (f"{where}.{key}" if where else key):
        return known
    return None


def keys_at(model: type[BaseModel] | None, loc: tuple[Any, ...]) -> list[str]:
    """The keys valid inside the section at ``loc`` of ``model`` (empty when it cannot be followed)."""
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        model = _model_in(model.model_fields[part].annotation)
    return list(model.model_fields) if model is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X``, ``X | None``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [m for m in map(_model_in, get_args(annotation)) if m is not None]
        return models[0] if len(models) == 1 else None
    return None
