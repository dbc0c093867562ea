"""What a step trains on, as one small strategy instead of flags threaded through the loop.

- :class:`KeptThisStep` (the default): the responses the selector kept in this step (RAFT, best-of-N).
- :class:`BestEverPool` (``rs.pool_best``): for each of the step's prompts, the best response ever
  kept for it, whichever step found it.
- :class:`EverythingSoFar` (``rs.restart_from_base``, ReST-EM / STaR): everything kept so far (or
  with ``pool_best`` the pool's best for every prompt seen), trained from the base model afresh each
  step — ``restarts_from_base`` tells the trainer to reload the base weights and a fresh optimizer.

Each strategy's state goes into checkpoints, so a resumed run trains on the very same sequences.
"""

from __future__ import annotations

from typing import Any

import torch

from thresher.core.config import RSConfig
from thresher.core.run.records import ScoredStep, group_means
from thresher.core.selection import BestPool
from thresher.core.training.trainer import TrainSequence
from thresher.core.types import Prompt


class KeptThisStep:
    """This step's kept rollouts; ``whole_groups`` (a loss with ``trains_on = "groups"``): every valid
    rollout of each prompt with at least one kept, rejected ones too. Each sequence carries what the
    losses may ask for: its generation-time log-probs, reward, kept flag, group and group statistics."""

    restarts_from_base = False

    def __init__(self, whole_groups: bool = False):
        self.whole_groups = whole_groups

    def sequences(
        self, step: int, prompts: list[Prompt], scored: ScoredStep, record: dict[str, Any]
    ) -> list[TrainSequence]:
        kept, valid, rewards = scored.kept, scored.valid, scored.rewards
        trained = (valid & kept.any(dim=1, keepdim=True)) if self.whole_groups else kept
        mean, std = group_statistics(rewards, valid)
        at = scored.rollout_index()  # ragged groups: a cell's rollout is not at p * N + s
        sequences = []
        for group, sample in trained.nonzero().tolist():
            r = scored.rollouts[int(at[group, sample])]
            sequences.append(
                TrainSequence(
                    r.prompt.token_ids,
                    tuple(r.response_ids),
                    old_logprobs=tuple(r.logprobs) if r.logprobs is not None else None,
                    reward=float(rewards[group, sample]),
                    kept=bool(kept[group, sample]),
                    group=group,
                    group_reward_mean=float(mean[group]),
                    group_reward_std=float(std[group]),
                )
            )
        if self.whole_groups:
            record["trained_rejected"] = sum(not s.kept for s in sequences)
        return sequences

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def group_statistics(rewards: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prompt's mean reward and sample standard deviation (as GRPO's) over its valid rollouts;
    the deviation is 0 for a prompt with fewer than two (nothing to compare)."""
    mean, counts = group_means(rewards, valid)
    deviations = (rewards.double() - mean[:, None]) ** 2
    squares = torch.where(valid, deviations, torch.zeros_like(deviations)).sum(dim=1)
    std = (squares / (counts - 1).clamp(min=1)).sqrt()
    return mean.float(), torch.where(counts > 1, std, torch.zeros_like(std)).float()


class BestEverPool:
    """The best kept response ever seen per prompt; ``every_prompt``: train on all prompts in the pool."""

    def __init__(self, every_prompt: bool = False):
        self.pool = BestPool()
        self.every_prompt = every_prompt
        self.restarts_from_base = every_prompt

    def sequences(
        self, step: int, prompts: list[Prompt], scored: ScoredStep, record: dict[str, Any]
    ) -> list[TrainSequence]:
        self.pool.update(scored.kept_rollouts(), scored.rewards[scored.kept].tolist(), step)
        chosen = sorted(self.pool.entries) if self.every_prompt else [p.index for p in prompts]
        entries = [self.pool.entries[i] for i in dict.fromkeys(chosen) if i in self.pool.entries]
        record["pool_size"] = len(self.pool.entries)
        record["trained_from_earlier_steps"] = sum(e.step < step for e in entries)
        return [TrainSequence(tuple(e.prompt_ids), tuple(e.response_ids)) for e in entries]

    def state_dict(self) -> dict[str, Any]:
        return {"pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pool.load_state_dict(state.get("pool", {}))


class EverythingSoFar:
    """Every response kept in any step so far, retrained from the base model each step."""

    restarts_from_base = True

    def __init__(self) -> None:
        self.kept: list[TrainSequence] = []

    def sequences(
        self, step: int, prompts: list[Prompt], scored: ScoredStep, record: dict[str, Any]
    ) -> list[TrainSequence]:
        self.kept.extend(KeptThisStep().sequences(step, prompts, scored, record))
        record["kept_so_far"] = len(self.kept)
        return list(self.kept)

    def state_dict(self) -> dict[str, Any]:
        return {"kept_so_far": [[list(s.prompt_ids), list(s.response_ids)] for s in self.kept]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept = [TrainSequence(tuple(p), tuple(r)) for p, r in state.get("kept_so_far", [])]


TrainingSet = KeptThisStep | BestEverPool | EverythingSoFar


def training_set_for(rs: RSConfig, whole_groups: bool = False) -> TrainingSet:
    """The strategy ``rs.pool_best`` and ``rs.restart_from_base`` ask for; ``whole_groups``: the loss
    trains on every rollout of the selected groups (see :func:`check_training_set`)."""
    if rs.pool_best:
        return BestEverPool(every_prompt=rs.restart_from_base)
    if rs.restart_from_base:
        return EverythingSoFar()
    return KeptThisStep(whole_groups)


def check_training_set(rs: RSConfig, loss_type: str, whole_groups: bool, inputs: frozenset[str]) -> list[str]:
    """Config errors for a loss that needs this step's rollouts (rejected ones, or their rewards and
    groups) combined with a training set of responses kept in earlier steps, which have none."""
    needs_step = whole_groups or bool(inputs - {"old_logprobs"})
    options = {"rs.pool_best": rs.pool_best, "rs.restart_from_base": rs.restart_from_base}
    pooled = [name for name, on in options.items() if on]
    if needs_step and pooled:
        what = "every rollout of a group" if whole_groups else "each response's reward and group"
        return [
            f"loss.type: {loss_type!r} needs {what} from the step that sampled it; "
            f"{' and '.join(pooled)} train on responses of earlier steps — use one or the other"
        ]
    return []
