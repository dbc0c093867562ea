"""The ``reinforce_rej`` loss (Reinforce-Rej): policy gradient on every rollout of the selected groups.

RAFT learns only from the kept (right) responses. Reinforce-Rej ("A Minimalist Approach to LLM
Reasoning: from Rejection Sampling to Reinforce", Xiong et al., 2025) also pushes the wrong ones
down: each rollout of a prompt gets the advantage A = reward − the mean reward of its prompt's
rollouts (``scale: std``: divided by their standard deviation too, as GRPO), and the tokens follow
PPO's clipped surrogate with r = π_θ/π_old:

    L = −mean over sequences of (1/|y|)·Σ_t min(r_t·A, clip(r_t, 1 − ε, 1 + ε)·A)

It trains on *every* valid rollout of each prompt the selector kept any rollout of
(``trains_on = "groups"``). The "Rej" is the selector's job: the study discards prompts whose
rollouts are all right or all wrong (their advantages are all zero, and they dilute the mean), which
is the ``band`` selector. Pair them::

    loss: {type: reinforce_rej, epsilon: 0.2}
    selector: {type: band}

With a selector that keeps such groups (``topk`` keeps all-right ones) they train with advantage 0:
no gradient, but they count in the mean over sequences.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field

from thresher.losses.clipped import ClippedLossConfig, ConfiguredLoss, clipped_surrogate, reduce_objective


class ReinforceRejLoss(ConfiguredLoss):
    name: ClassVar[str] = "reinforce_rej"
    trains_on: ClassVar[str] = "groups"

    class Config(ClippedLossConfig):
        scale: Literal["none", "std"] = Field(
            "none", description="Advantage = reward − group mean ('none'), or that divided by the group's std ('std')."
        )

    config: Config

    def __call__(
        self,
        token_logprobs: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        num_sequences: int,
        num_tokens: int,
        old_logprobs: torch.Tensor,
        rewards: torch.Tensor,
        group_reward_mean: torch.Tensor,
        group_reward_std: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        advantages = group_advantages(rewards, group_reward_mean, group_reward_std, self.config.scale)
        objective, stats = clipped_surrogate(
            token_logprobs, old_logprobs, advantages, response_mask, self.config.epsilon
        )
        loss = reduce_objective(objective, response_mask, self.config.normalize, num_sequences, num_tokens)
        return loss, {
            **stats,
            "advantage_abs_mean": float(advantages.abs().mean()),
            "positive_count": float((advantages > 0).sum()),
            "negative_count": float((advantages < 0).sum()),
        }


def group_advantages(
    rewards: torch.Tensor, group_mean: torch.Tensor, group_std: torch.Tensor, scale: str, eps: float = 1e-6
) -> torch.Tensor:
    """reward − its group's mean; with ``scale="std"`` divided by the group's std (+ ``eps``, as GRPO)."""
    centred = rewards - group_mean
    return centred / (group_std + eps) if scale == "std" else centred
