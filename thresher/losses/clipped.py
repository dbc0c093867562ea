"""What the importance-weighted losses share: PPO's clipped surrogate on a response's tokens.

A step's rollouts were sampled by the policy *before* its update (π_old). After the first optimizer
update of the step — a second micro-batch group, a second epoch (``optim.epochs_per_step``) — the
policy π_θ has moved, and the log-likelihood gradient of those rollouts is no longer that of the
objective. Weighting each token by the ratio r = π_θ(y_t)/π_old(y_t), and clipping r to
[1 − ε, 1 + ε] where moving further would only increase the objective, keeps the update near the
sampling policy (PPO). Before the step's first update r = 1 and the gradient equals the unweighted
one: RAFT++ then coincides with masked mean log-prob on the first update.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from thresher.core.config import Section
from thresher.core.types import PluginContext


class ClippedLossConfig(Section):
    """The options the clipped losses share."""

    epsilon: float = Field(0.2, gt=0.0, lt=1.0, description="Clip the importance ratio to [1 − ε, 1 + ε].")
    normalize: Literal["sequence", "token"] = Field(
        "sequence", description="Average per sequence then over sequences, or over all tokens."
    )


class ConfiguredLoss:
    """Built as every plugin is, ``cls(config, context)``; a loss needs only its config."""

    def __init__(self, config: ClippedLossConfig, context: PluginContext | None = None):
        self.config = config


def clipped_surrogate(
    token_logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    epsilon: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Per-token min(r·A, clip(r, 1−ε, 1+ε)·A) [B, T] (zero off the response), and the ratio's
    statistics on the response tokens: mean, max, and the fraction of tokens whose gradient the
    clipping stopped."""
    mask = response_mask.to(token_logprobs.dtype)
    ratio = torch.exp((token_logprobs - old_logprobs) * mask)  # 1 off the response
    a = advantages[:, None].to(token_logprobs.dtype)
    unclipped = ratio * a
    clipped = ratio.clamp(1.0 - epsilon, 1.0 + epsilon) * a
    objective = torch.minimum(unclipped, clipped) * mask
    on_response = response_mask.bool()
    r = ratio.detach()[on_response]
    stopped = (clipped < unclipped).detach()[on_response]  # the clipped (constant) branch is the minimum
    stats = {
        "ratio_mean": float(r.mean()) if r.numel() else 1.0,
        "ratio_max": float(r.max()) if r.numel() else 1.0,
        "ratio_min": float(r.min()) if r.numel() else 1.0,
        "clip_fraction": float(stopped.float().mean()) if stopped.numel() else 0.0,
    }
    return objective, stats


def reduce_objective(
    objective: torch.Tensor,
    response_mask: torch.Tensor,
    normalize: Literal["sequence", "token"],
    num_sequences: int,
    num_tokens: int,
) -> torch.Tensor:
    """−(the micro-batch's share of the step's mean objective): per sequence then over the step's
    sequences, or over the step's tokens (as ``masked_mean_logprob`` normalizes)."""
    per_sequence = objective.sum(dim=1)
    if normalize == "sequence":
        lengths = response_mask.sum(dim=1).clamp(min=1).to(objective.dtype)
        return -(per_sequence / lengths).sum() / num_sequences
    return -per_sequence.sum() / num_tokens
