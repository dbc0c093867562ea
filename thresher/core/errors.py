"""Errors a user can cause. The CLI prints them as one line and exits with `exit_code`.

Everything that is the user's mistake (a config field, a data file, a plugin name) raises a subclass
of :class:`ThresherError`; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any


class ThresherError(Exception):
    """A user-facing error: its message is complete on its own, no traceback needed."""

    exit_code = 1


class EarlyStop(Exception):
    """A guardrail or the early-stop rule ended the run: not an error (the run checkpoints and ends)."""

    def __init__(self, step: int, reason: str):
        super().__init__(reason)
        self.step, self.reason = step, reason


class ConfigError(ThresherError):
    """The run configuration is invalid; carries one `loc: message` line per problem."""

    exit_code = 2

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class PluginError(ThresherError):
    """A plugin is unknown, registered twice, or does not follow its kind's protocol."""

    exit_code = 2


class DataError(ThresherError):
    """A prompt file is missing, malformed or empty; the message names file, line and field."""

    exit_code = 2


class ScorerError(ThresherError):
    """A reward function or reward model failed or returned something that is not a reward."""

    exit_code = 3


class ScoringInterrupted(ThresherError):
    """A scorer stopped early because the run was asked to stop (its ``should_stop`` said so)."""

    exit_code = 130


class OutputError(ThresherError):
    """The run directory cannot hold what the run must write (permissions, a full disk)."""

    exit_code = 4


class GeneratorError(ThresherError):
    """The generation engine cannot run as configured, or lost track of the policy's weights."""

    exit_code = 6


# --- user code that tries to end the process -------------------------------------------------------


class _SigintWatch:
    """Records whether a real SIGINT raised a ``KeyboardInterrupt`` while installed (main thread only).

    The handler it installs passes each SIGINT on to the handler it replaced (Python's default one,
    or a run's :class:`~thresher.core.interrupt.Interrupts`), so Ctrl-C behaves exactly as before;
    it only notes whether that handler raised ``KeyboardInterrupt``. Outside the main thread no
    signal handler ever runs, so every ``KeyboardInterrupt`` there was raised by the code itself.
    """

    def __init__(self) -> None:
        self.signalled: KeyboardInterrupt | None = None
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> _SigintWatch:
        if threading.current_thread() is threading.main_thread():
            try:
                self._previous = signal.signal(signal.SIGINT, self._handle)
                self._installed = True
            except ValueError:  # an embedded interpreter may refuse; then no Ctrl-C is told apart
                self._installed = False
        return self

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        previous = self._previous
        if previous is signal.SIG_IGN:
            return
        try:
            if callable(previous):
                previous(signum, frame)
            else:  # SIG_DFL or a handler set outside Python: Python's own behaviour for Ctrl-C
                raise KeyboardInterrupt
        except KeyboardInterrupt as err:
            self.signalled = err
            raise


@contextmanager
def guard_user_code(fail: Callable[[str], ThresherError]) -> Iterator[None]:
    """Run user code (a reward function, a reward module's or a plugin's import) so that it cannot
    end the run looking like success.

    ``sys.exit(0)`` inside a reward would otherwise end ``thresher train`` with status 0 and nothing
    trained, and a ``KeyboardInterrupt`` raised by the code itself would read as the user's Ctrl-C
    (exit 130, the step's rollouts lost). Both become ``fail(what happened)``, the caller's one-line
    error naming the function or module. A real Ctrl-C (a SIGINT that raised the interrupt) is
    re-raised untouched, so it still stops the run the usual way.
    """
    with _SigintWatch() as watch:
        try:
            yield
        except SystemExit as err:
            raise fail(f"called sys.exit({err.code!r})") from None
        except KeyboardInterrupt:
            if watch.signalled is not None:  # the user pressed Ctrl-C (or sent SIGINT)
                raise
            raise fail("raised KeyboardInterrupt (no Ctrl-C was received: the code raised it itself)") from None
