"""The ``tensorboard`` logger: the run's metrics as TensorBoard scalars, histograms and text.

Event files go to ``RUN/tensorboard`` (``tensorboard --logdir runs/`` shows every run beside the
others). Scalars are grouped by what they describe (``reward/mean``, ``selection/``, ``diversity/``,
``generation/``, ``train/``, ``time/``, ``validation/``: see :mod:`thresher.loggers.tags`), each at
its step and at the wall-clock time ``metrics.jsonl`` recorded. Each step also gets histograms of its
rewards (all and kept) and, as text, its best and worst kept responses: reading them is how reward
hacking is caught.

A resumed run starts its event file with a purge at the step after its checkpoint, so the steps a
killed run logged past that point are dropped, as ``metrics.jsonl`` drops them: no duplicate steps.

Events are written in the calling thread, not through ``SummaryWriter``'s background writer: a failure
there (a read-only folder, a full disk) prints a thread traceback no caller can catch, then fails the
next call with a second one. Here every failure, opening the folder included, is one ``OSError`` naming
the folder, raised by a ``log`` call, which the run reports in one line before switching the logger
off (see ``thresher.core.run.loggers``): training goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, ClassVar

from pydantic import Field, model_validator

from thresher.core.config import Section
from thresher.core.errors import PluginError
from thresher.core.types import PluginContext
from thresher.loggers.common import check_installed, run_dir_of
from thresher.loggers.tags import numeric, scalars

LOG_DIR = "tensorboard"
MISSING = "needs the tensorboard package: pip install 'thresher[tensorboard]' (scripts/install.sh installs it)"


def _tensorflow_bins() -> list[float]:
    """SummaryWriter's default histogram buckets (``bins="tensorflow"``), computed as it does: from
    1e-12 growing by 10% up to 1e20, mirrored below 0."""
    value, buckets = 1e-12, []
    while value < 1e20:
        buckets.append(value)
        value *= 1.1
    return [-b for b in reversed(buckets)] + [0.0] + buckets


HISTOGRAM_BINS = _tensorflow_bins()
_FILE_NUMBERS = itertools.count()  # two event files of one process in one second still differ


class TensorBoardLogger:
    name: ClassVar[str] = "tensorboard"

    class Config(Section):
        samples: int = Field(1, ge=0, description="Best and worst kept responses shown as text each step.")
        histograms: bool = Field(True, description="Histograms of each step's rewards (all, kept).")

        @model_validator(mode="after")
        def _installed(self) -> TensorBoardLogger.Config:
            check_installed("tensorboard", MISSING)
            return self

    def __init__(self, config: Config, context: PluginContext):
        try:
            from torch.utils.tensorboard import summary  # noqa: F401 - fails here if tensorboard is missing
        except ImportError:
            raise PluginError(f"logger tensorboard: {MISSING}") from None
        run_dir = run_dir_of(context, self.name)
        self.config = config
        self.log_dir = run_dir / LOG_DIR
        purge = context.resumed_step + 1 if context.resumed_step else None
        # An event folder that cannot be written is not a reason to refuse the run: the error is kept and
        # raised by the first call, where the run reports it and switches this logger off.
        self.events: EventFile | None = None
        self.failure: OSError | None = None
        try:
            self.events = EventFile(self.log_dir, purge)
        except OSError as err:
            self.failure = err

    def _events(self) -> EventFile:
        if self.events is None:
            raise self.failure or OSError(f"cannot write event files to {self.log_dir} (the logger is closed)")
        return self.events

    def log(self, record: dict[str, Any]) -> None:
        from torch.utils.tensorboard.summary import scalar, text

        events = self._events()
        kind, step, walltime = record.get("kind"), int(record.get("step", 0)), record.get("time")
        if kind == "stop":
            events.add(text("run/stopped", str(record.get("reason", ""))), step, walltime)
        else:
            for tag, number in scalars(record).items():
                events.add(scalar(tag, number), step, walltime)
        events.flush()  # a step is seconds to minutes: show it now, lose nothing to a kill

    def log_rollouts(self, step: int, rows: list[dict[str, Any]]) -> None:
        from torch.utils.tensorboard.summary import histogram, text

        events = self._events()
        scored = [row for row in rows if numeric(row.get("reward")) is not None]
        kept = sorted((row for row in scored if row.get("kept")), key=lambda row: row["reward"], reverse=True)
        if self.config.histograms:
            import numpy as np

            for tag, group in (("reward/all", scored), ("reward/kept", kept)):
                if group:
                    events.add(histogram(tag, np.array([row["reward"] for row in group]), HISTOGRAM_BINS), step)
        if self.config.samples and kept:
            count = self.config.samples
            events.add(text("samples/best_kept", _as_markdown(kept[:count])), step)
            events.add(text("samples/worst_kept", _as_markdown(kept[::-1][:count])), step)
        events.flush()

    def close(self) -> None:
        events, self.events = self._events(), None
        self.failure = None
        events.close()


class EventFile:
    """One TensorBoard event file (``events.out.tfevents.…``), each event written in the calling thread.

    Any failure (creating the folder or the file, a write, a flush) closes the file and raises one
    ``OSError`` that names the folder and says what is wrong.
    """

    def __init__(self, folder: Path, purge_step: int | None):
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        from tensorboard.summary.writer.record_writer import RecordWriter

        self.folder = folder
        self._file: IO[bytes] | None = None
        name = f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}.{next(_FILE_NUMBERS)}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._file = (folder / name).open("wb")
        except OSError as err:
            raise self._error(err) from None
        self._records = RecordWriter(self._file)
        self.add_event(Event(file_version="brain.Event:2"))
        if purge_step is not None:  # TensorBoard drops what an earlier file logged from this step on
            self.add_event(Event(file_version="brain.Event:2"), purge_step)
            self.add_event(Event(session_log=SessionLog(status=SessionLog.START)), purge_step)
        self.flush()

    def add(self, summary: Any, step: int, walltime: float | None = None) -> None:
        """A ``Summary`` (from ``torch.utils.tensorboard.summary``) at ``step``, wall-clock ``walltime``."""
        from tensorboard.compat.proto.event_pb2 import Event

        self.add_event(Event(summary=summary), step, walltime)

    def add_event(self, event: Any, step: int | None = None, walltime: float | None = None) -> None:
        event.wall_time = time.time() if walltime is None else walltime
        if step is not None:
            event.step = int(step)
        self._guarded(lambda: self._records.write(event.SerializeToString()))

    def flush(self) -> None:
        self._guarded(lambda: self._records.flush())

    def close(self) -> None:
        if self._file is not None:
            self._guarded(lambda: self._records.close())
            self._file = None

    def _guarded(self, action: Callable[[], object]) -> None:
        if self._file is None:
            raise OSError(f"cannot write event files to {self.folder} (the event file is closed)")
        try:
            action()
        except OSError as err:
            file, self._file = self._file, None
            with contextlib.suppress(OSError):  # the error that matters is the first one
                file.close()
            raise self._error(err) from None

    def _error(self, err: OSError) -> OSError:
        if self.folder.exists() and not self.folder.is_dir():
            reason = "it is a file, not a folder"
        else:
            reason = err.strerror or str(err)
        return OSError(f"cannot write event files to {self.folder} ({reason})")


def _as_markdown(rows: list[dict[str, Any]]) -> str:
    """Prompt, reward and response; the texts indented as code, so markup in them shows as written."""
    blocks = []
    for row in rows:
        prompt = _code(str(row.get("prompt", "")))
        response = _code(str(row.get("response", "")))
        blocks.append(
            f"**reward {row['reward']:.4g}** (prompt {row.get('prompt_index')}, sample {row.get('sample')}, "
            f"{row.get('finish_reason')})\n\nprompt:\n\n{prompt}\n\nresponse:\n\n{response}"
        )
    return "\n\n---\n\n".join(blocks)


def _code(text: str) -> str:
    return "\n".join("    " + line for line in (text.splitlines() or [""]))
