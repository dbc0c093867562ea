"""What the built-in generators share: the policy from the plugin context and the EOS ids. Their
sampling options are the core's :class:`~thresher.core.config.sampling.SamplingConfig`."""

from __future__ import annotations

from typing import Any

import torch

from thresher.core.config.sampling import SamplingConfig
from thresher.core.model import CausalLM

__all__ = ["SamplingConfig", "eos_token_ids", "require_policy"]  # SamplingConfig: defined by the core


def require_policy(context: Any, generator: str) -> tuple[CausalLM, Any]:
    """The policy and tokenizer a generator samples with; both must be in the plugin context."""
    if context.policy is None or context.tokenizer is None:
        raise ValueError(f"the {generator} generator needs the policy and its tokenizer in the plugin context")
    return context.policy, context.tokenizer


def eos_token_ids(model: torch.nn.Module, tokenizer: Any, ignore_eos: bool = False) -> set[int]:
    """Every token id that ends a response: the model's generation config may list several
    (chat models often add an end-of-turn token) besides the tokenizer's own EOS. None with
    ``ignore_eos``."""
    ids: set[int] = set()
    if ignore_eos:
        return ids
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(configured)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
