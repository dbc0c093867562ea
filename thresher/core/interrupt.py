"""Ctrl-C and SIGTERM without losing work.

The first signal only sets a flag; the engine looks at it between phases (and generation and
training look at it too), abandons or finishes the step in progress, writes a checkpoint of the last
completed step and exits with 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM). A second
signal exits at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import Any

from thresher.core.errors import ThresherError

HANDLED = (signal.SIGINT, signal.SIGTERM)


class StopRequested(ThresherError):
    """The run was asked to stop; the message says where it stopped and how to resume."""

    def __init__(self, signum: int, message: str = "interrupted"):
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(message)


class Interrupts:
    """Turns SIGINT/SIGTERM into a flag while installed (main thread only; elsewhere a no-op)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}  # signal.signal's handlers

    def __enter__(self) -> Interrupts:
        if self.enabled and threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:
            sys.stderr.write("second interrupt: exiting now\n")
            os._exit(128 + signum)
        self.signum = signum
        name = signal.Signals(signum).name
        sys.stderr.write(f"{name}: stopping after the current phase (again to exit at once)\n")

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def check(self, where: str = "") -> None:
        if self.signum is not None:
            raise StopRequested(self.signum, f"interrupted {where}".strip())
