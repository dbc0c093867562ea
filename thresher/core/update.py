"""Update the policy on a step's kept sequences, then hand the new weights to the generator."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from thresher.core.console import ConsoleReporter
from thresher.core.interrupt import Interrupts
from thresher.core.session import Plugins, Policy, Session
from thresher.core.training.trainer import Trainer, TrainSequence
from thresher.core.trainset import TrainingSet
from thresher.core.types import ReportsMetrics


@dataclass
class Updater:
    """One global step's optimizer update and the generator's refresh."""

    trainer: Trainer
    trainset: TrainingSet
    policy: Policy
    plugins: Plugins
    reporter: ConsoleReporter
    interrupts: Interrupts

    @classmethod
    def of(cls, session: Session) -> Updater:
        return cls(
            session.trainer, session.trainset, session.policy, session.plugins, session.reporter, session.interrupts
        )

    def train(self, step: int, sequences: list[TrainSequence]) -> dict[str, Any]:
        """Train on ``sequences``; ReST-EM style training sets start again from the base model."""
        if not self.trainset.restarts_from_base:
            return self.trainer.train_step(step, sequences)
        if self.policy.base_state is None:  # Run.setup keeps it whenever rs.restart_from_base is set
            raise RuntimeError("this training set restarts from the base model, but no base weights were kept")
        # Past this point the previous step's weights are gone, so the step is no longer abandoned on
        # an interrupt.
        self.interrupts.check(f"during step {step}")
        self.policy.holder.load_weights(self.policy.base_state)
        self.trainer.reset_optimizer()
        return self.trainer.train_step(step, sequences, abandonable=False)

    def refresh(self) -> dict[str, Any]:
        """Hand the updated policy to the generator (under FSDP, gathered from the shards first)."""
        self.reporter.phase("refreshing generator weights")
        t0 = time.perf_counter()
        self.policy.holder.sync_full()
        generator = self.plugins.generator
        generator.load_weights(self.policy.model)
        record: dict[str, Any] = {"time_refresh": time.perf_counter() - t0}
        if isinstance(generator, ReportsMetrics):
            record.update({f"generator_{k}": v for k, v in generator.metrics().items()})
        return record
