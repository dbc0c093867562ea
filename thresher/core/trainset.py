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

from thresher.core.config import RSConfig
from thresher.core.run.records import ScoredStep
from thresher.core.selection import BestPool
from thresher.core.training.trainer import TrainSequence
from thresher.core.types import Prompt


class KeptThisStep:
    restarts_from_base = False

    def sequences(
        self, step: int, prompts: list[Prompt], scored: ScoredStep, record: dict[str, Any]
    ) -> list[TrainSequence]:
        return [TrainSequence(r.prompt.token_ids, tuple(r.response_ids)) for r in scored.kept_rollouts()]

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


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


def training_set_for(rs: RSConfig) -> TrainingSet:
    """The strategy ``rs.pool_best`` and ``rs.restart_from_base`` ask for."""
    if rs.pool_best:
        return BestEverPool(every_prompt=rs.restart_from_base)
    if rs.restart_from_base:
        return EverythingSoFar()
    return KeptThisStep()
