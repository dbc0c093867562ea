"""Everything one run is made of, built once by :class:`~thresher.core.runner.Run` and read by the
loop and its phases. A plain container: no behaviour, so the loop reads top to bottom."""

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
from thresher.core.types import Prompt


@dataclass
class Progress:
    """Where the loop stands: steps done and checkpointed, and the metrics records so far."""

    start_step: int = 0
    completed_step: int = 0
    checkpointed_step: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    validation_history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Components:
    config: RunConfig
    registry: Registry
    reporter: ConsoleReporter
    run_dir: RunDir
    dist: Distributed = field(default_factory=Distributed)
    interrupts: Interrupts = field(default_factory=Interrupts)
    progress: Progress = field(default_factory=Progress)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    tokenizer: Any = None
    train_prompts: list[Prompt] = field(default_factory=list)
    val_prompts: list[Prompt] = field(default_factory=list)
    skipped_long_prompts: int = 0
    memory_plan: MemoryPlan | None = None
    # built by Run.setup
    model: torch.nn.Module | None = None
    peft_model: Any = None
    holder: PolicyHolder | None = None
    stream: PromptStream | None = None
    generator: Any = None
    scorer: Any = None
    selector: Any = None
    loss: Any = None
    validation_scorer: Any = None
    trainer: Trainer | None = None
    trainset: TrainingSet | None = None
    guardrails: Guardrails | None = None
    loggers: Any = None  # a training run's RunLoggers (core.run.loggers), while it trains
    base_state: dict[str, torch.Tensor] | None = None  # rs.restart_from_base: the weights each step starts from
