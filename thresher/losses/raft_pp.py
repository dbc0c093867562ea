"""The ``raft_pp`` loss (RAFT++): masked mean log-prob on kept responses, importance-weighted and clipped.

RAFT trains on its kept samples as if the policy had not moved since it drew them; with several
updates per step (``optim.batch_size`` smaller than the kept set, or ``optim.epochs_per_step`` > 1)
it has. RAFT++ ("A Minimalist Approach to LLM Reasoning: from Rejection Sampling to Reinforce",
Xiong et al., 2025) weights each token by r = π_θ/π_old, clipped to [1 − ε, 1 + ε] as in PPO with
advantage 1:

    L = −mean over kept sequences of (1/|y|)·Σ_t min(r_t, clip(r_t, 1 − ε, 1 + ε))

(``normalize: token``: over all kept tokens). π_old is the log-prob the generator recorded for each
token. Before the step's first update r = 1, so the first update equals ``masked_mean_logprob``'s.

Example config section::

    loss: {type: raft_pp, epsilon: 0.2}
    optim: {epochs_per_step: 2}
"""

from __future__ import annotations

from typing import ClassVar

import torch

from thresher.losses.clipped import ClippedLossConfig, ConfiguredLoss, clipped_surrogate, reduce_objective


class RaftPlusPlusLoss(ConfiguredLoss):
    name: ClassVar[str] = "raft_pp"
    trains_on: ClassVar[str] = "kept"

    class Config(ClippedLossConfig):
        pass

    def __call__(
        self,
        token_logprobs: torch.Tensor,
        response_mask: torch.Tensor,
        *,
        num_sequences: int,
        num_tokens: int,
        old_logprobs: torch.Tensor,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        advantages = torch.ones(token_logprobs.shape[0], dtype=token_logprobs.dtype, device=token_logprobs.device)
        objective, stats = clipped_surrogate(
            token_logprobs, old_logprobs, advantages, response_mask, self.config.epsilon
        )
        loss = reduce_objective(objective, response_mask, self.config.normalize, num_sequences, num_tokens)
        mask = response_mask.to(token_logprobs.dtype)
        mean_logprob = float((token_logprobs.detach() * mask).sum() / mask.sum().clamp(min=1))
        return loss, {
            **stats,
            "token_logprob_mean": mean_logprob,
            "positive_count": float(token_logprobs.shape[0]),
            "negative_count": 0.0,
        }
