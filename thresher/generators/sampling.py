"""What every generator shares: the sampling options of its config section, and the EOS ids.

Keeping them in one place means ``type: hf`` and ``type: vllm`` accept the same section and
interpret it the same way, so switching engines never changes what a config asks for.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator


class SamplingConfig(BaseModel):
    """Sampling options common to all built-in generators (mapped one to one onto each engine)."""

    model_config = ConfigDict(extra="forbid")
    max_new_tokens: int = Field(64, ge=1, description="Longest response, in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature; 0 means greedy.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1: off).")
    top_k: int = Field(0, ge=0, description="Sample from the k likeliest tokens (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (kept in the response).")
    ignore_eos: bool = Field(
        False, description="Never stop at EOS: every response is max_new_tokens long (benchmarks of fixed length)."
    )

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        # "" occurs in every text: each response would stop after its first token, and train on that.
        for i, text in enumerate(value):
            if text == "":
                raise ValueError(f"stop[{i}] is empty: an empty stop string matches at once and ends every response")
        return value


def require_policy(context: Any, generator: str) -> tuple[torch.nn.Module, Any]:
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
