"""LoRA through ``peft``: only low-rank adapters train, the base weights stay frozen.

``peft.get_peft_model`` injects the adapter layers into the policy's own modules; the policy that
the trainer, the ``hf`` generator and checkpoints see stays the same ``PreTrainedModel`` object
(``peft_model.get_base_model()``), so nothing downstream needs to know about peft. The ``PeftModel``
wrapper is kept only to write ``final/`` in peft's format (``PeftModel.from_pretrained`` loads it).

Adapters start with B = 0, so step 0 samples exactly what the base model samples. peft keeps the
adapter weights in fp32 even in a bf16 model (``autocast_adapter_dtype``): they are their own master
weights, and AdamW's state is adapter-sized.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from thresher.core.errors import ConfigError

if TYPE_CHECKING:
    from thresher.core.config import LoraOptions

ADAPTER = "default"


def require_peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ConfigError(
            ["model.lora: needs the peft package: pip install 'thresher[lora]' (or pip install peft)"]
        ) from None
    return peft


def apply_lora(model: torch.nn.Module, options: LoraOptions, seed: int = 0) -> Any:
    """Inject adapters into ``model`` in place and freeze everything else; returns the ``PeftModel``.

    The adapters' random init (A; B starts at zero) is drawn from ``seed``, so two runs of one config
    start from the same adapters. Call it while the model is on the CPU (the CPU generator is seeded).
    """
    peft = require_peft()
    target: str | list[str] = options.target_modules
    config = peft.LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=target,
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return peft.get_peft_model(model, config)
    except ValueError as err:  # no module matched target_modules, say
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError([f"model.lora.target_modules: {first}"]) from None


def lora_layers(model: torch.nn.Module) -> dict[str, Any]:
    """The modules peft injected (``q_proj``, …) by qualified name; empty for a plain model."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: torch.nn.Module) -> bool:
    return bool(lora_layers(model))


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The policy as a plain model's state dict: every adapted weight is ``W + B·A·scale`` under its
    original name, the adapter tensors are gone. What an engine without peft (vLLM) loads.

    A model without adapters returns its own ``state_dict()``. The model is not modified.
    """
    layers = lora_layers(model)
    state = model.state_dict()
    if not layers:
        return state
    merged: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if ".lora_" in key:
            continue
        module_name, _, leaf = key.rpartition(".base_layer.")
        if module_name in layers and leaf == "weight":
            delta = layers[module_name].get_delta_weight(ADAPTER)
            merged[f"{module_name}.weight"] = (tensor.float() + delta.float()).to(tensor.dtype)
        elif module_name in layers:
            merged[f"{module_name}.{leaf}"] = tensor
        else:
            merged[key] = tensor
    return merged


def save_adapter(peft_model: Any, directory: Path, dtype: str) -> None:
    """Write ``directory`` in peft's format (``adapter_config.json``, ``adapter_model.safetensors``),
    the adapter tensors cast to ``dtype``."""
    from safetensors.torch import load_file, save_file

    peft_model.save_pretrained(str(directory))
    if dtype != "float32":
        path = os.path.join(directory, "adapter_model.safetensors")
        tensors = {k: v.to(getattr(torch, dtype)) for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})


@torch.no_grad()
def load_adapters(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a checkpoint's adapter tensors (names as in ``model.named_parameters()``)."""
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    missing = sorted(trainable - set(state))
    if missing:
        raise ConfigError([f"--resume: the checkpoint lacks {len(missing)} adapter tensor(s), e.g. {missing[0]}"])
    for name in trainable:
        params[name].copy_(state[name])
