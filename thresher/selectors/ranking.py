"""Shared ranking helper for selectors: order rollouts within each prompt, best first."""

from __future__ import annotations

import torch


def rank_within_prompt(rewards: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Rank [P, N] of every rollout in its prompt's group: 0 = best.

    Ties go to the lower rollout index (a stable sort), and invalid rollouts rank after every valid
    one, so "rank < k" keeps the k best valid rollouts deterministically.
    """
    keys = torch.where(valid, rewards.float(), torch.full_like(rewards, float("-inf"), dtype=torch.float))
    order = torch.sort(-keys, dim=1, stable=True).indices  # -(-inf) = +inf sorts invalid last
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())
    return ranks
