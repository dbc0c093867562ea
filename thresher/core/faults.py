"""Failpoints: kill the process at a named point, so tests can prove a crash there loses nothing.

``THRESHER_FAILPOINT=checkpoint@3`` sends SIGKILL to the process itself when the checkpoint of step 3
is half written — a real ``kill -9``, not a simulated exception. Points: ``generated`` (after a step's
generation, before scoring), ``train`` (after the first backward pass, before the optimizer step),
``checkpoint`` (weights written, not yet renamed into place), ``checkpointed`` (the checkpoint
complete, the step's validation not yet run). Unset in normal runs: one env lookup.
"""

from __future__ import annotations

import os
import signal

ENV = "THRESHER_FAILPOINT"


def failpoint(name: str, step: int) -> None:
    if os.environ.get(ENV) == f"{name}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)
