"""The ``masked_mean_logprob`` loss: supervised fine-tuning on kept responses.

``normalize: sequence`` (default) is L = −mean over kept sequences of (1/|y|)·Σ_t log π(y_t | x, y<t):
every kept response weighs the same whatever its length. ``normalize: token`` is the mean over all
kept response tokens: long responses weigh more. Prompt and padding tokens are masked out; the EOS
that ends a response is a response token (that is how the model learns to stop).

The loss is called per micro-batch and divides by the *global* count of sequences (or tokens) of the
optimizer step, so summing the micro-batch losses gives the full-batch loss and gradients do not
depend on the micro-batch size.

Example config section::

    loss: {type: masked_mean_logprob, normalize: token}
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from thresher.core.config import Section
from thresher.core.types import PluginContext


class MaskedMeanLogprobLoss:
    name: ClassVar[str] = "masked_mean_logprob"

    class Config(Section):
        normalize: Literal["sequence", "token"] = Field(
            "sequence", description="Average per sequence then over sequences, or over all tokens."
        )

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config

    def __call__(
        self,
        token_logprobs: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        num_sequences: int,
        num_tokens: int,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        mask = response_mask.to(token_logprobs.dtype)
        per_sequence = (token_logprobs * mask).sum(dim=1)
        if self.config.normalize == "sequence":
            lengths = mask.sum(dim=1).clamp(min=1)
            loss = -(per_sequence / lengths).sum() / num_sequences
        else:
            loss = -per_sequence.sum() / num_tokens
        # Reported as loss_token_logprob_mean in metrics.jsonl (averaged over the step's micro-batches).
        return loss, {"token_logprob_mean": float(per_sequence.detach().sum() / mask.sum().clamp(min=1))}
