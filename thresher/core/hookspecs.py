"""The hooks a Thresher plugin can implement.

Each hook receives a ``register`` callback; the plugin calls it once per class it provides. The
registry (:mod:`thresher.core.registry`) owns the rules: type checks and duplicate names.
Implementations may accept any subset of a hook's arguments, so hooks can grow without breaking
plugins. Call hooks with keyword arguments only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "thresher"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[[type], None]


@hookspec
def register_generators(register: Register) -> None:
    """Register Generator classes (produce N responses per prompt) by calling ``register(cls)``."""


@hookspec
def register_scorers(register: Register) -> None:
    """Register Scorer classes (reward every rollout) by calling ``register(cls)``."""


@hookspec
def register_selectors(register: Register) -> None:
    """Register Selector classes (choose which rollouts to train on) by calling ``register(cls)``."""


@hookspec
def register_losses(register: Register) -> None:
    """Register Loss classes (the training objective on kept rollouts) by calling ``register(cls)``."""


@hookspec
def register_loggers(register: Register) -> None:
    """Register Logger classes (receive every metrics record: TensorBoard, W&B, MLflow, …) by calling
    ``register(cls)``."""


@hookspec
def register_commands(app: Any) -> None:
    """Add sub-commands to the ``thresher`` typer app."""
