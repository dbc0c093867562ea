"""What a run is made of once :meth:`thresher.core.runner.Run.setup` has built it.

Three stages, each a typed object whose fields are all present (``Optional`` only where the config
makes a thing optional):

- :class:`Inputs` — read before anything heavy: the tokenizer, the prompts, the memory plan.
- :class:`Policy` and :class:`Plugins` — the model being trained and the plugin instances.
- :class:`Session` — everything above plus the trainer, the prompt stream and the step
  bookkeeping; the loop and the phases take it (or the few parts of it they use).

Plain containers: no behaviour beyond the bookkeeping of :class:`Progress`, so the loop reads top to
bottom.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from thresher.core.config import RunConfig
from thresher.core.console import ConsoleReporter
from thresher.core.data import PromptStream
from thresher.core.interrupt import Interrupts
from thresher.core.registry import Registry
from thresher.core.run.directory import RunDir
from thresher.core.selection import Guardrails
from thresher.core.training.distributed import Distributed
from thresher.core.training.memory import MemoryPlan
from thresher.core.training.sharding import PolicyHolder
from thresher.core.training.trainer import Trainer
from thresher.core.trainset import TrainingSet
from thresher.core.types import Generator, Loss, Prompt, Scorer, Selector


@dataclass
class Progress:
    """Where the loop stands. Steps count from 1 everywhere; 0 means "none yet"."""

    start_step: int = 0  # the step a resumed run continues after (0: a fresh run)
    completed_step: int = 0
    checkpointed_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    validation_history: list[dict[str, Any]] = field(default_factory=list)

    def step_done(self, record: dict[str, Any]) -> None:
        """Book a finished global step's metrics record (``Run.step`` and the training loop alike)."""
        self.history.append(record)
        self.completed_step = int(record["step"])

    @property
    def next_step(self) -> int:
        return self.completed_step + 1


@dataclass
class Inputs:
    """What ``Run.plan`` reads without loading weights: enough to refuse a run that cannot work."""

    tokenizer: Any  # a transformers tokenizer (PreTrainedTokenizerBase; untyped upstream)
    train_prompts: list[Prompt]
    val_prompts: list[Prompt]
    skipped_long_prompts: int
    memory_plan: MemoryPlan


@dataclass
class Policy:
    """The model being trained, and how it is held (sharded, with fp32 masters, with LoRA adapters)."""

    model: torch.nn.Module
    holder: PolicyHolder
    peft_model: Any | None  # peft.PeftModel when model.lora is set
    base_state: dict[str, torch.Tensor] | None  # rs.restart_from_base: the weights each step starts from

    @property
    def lora(self) -> bool:
        return self.peft_model is not None


@dataclass
class Plugins:
    """The run's plugin instances, typed by the protocol of their kind."""

    generator: Generator
    scorer: Scorer
    selector: Selector
    loss: Loss
    validation_scorer: Scorer | None  # the optional `validation_scorer:` section

    def close(self) -> None:
        for plugin in (self.generator, self.scorer, self.validation_scorer):
            if plugin is not None:
                plugin.close()


@dataclass
class Session:
    """A built run: what the loop and its phases work with."""

    config: RunConfig
    registry: Registry
    reporter: ConsoleReporter
    run_dir: RunDir
    dist: Distributed
    interrupts: Interrupts
    device: torch.device
    inputs: Inputs
    policy: Policy
    plugins: Plugins
    stream: PromptStream
    trainer: Trainer
    trainset: TrainingSet
    guardrails: Guardrails
    progress: Progress
