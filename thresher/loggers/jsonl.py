"""The ``jsonl`` logger: ``metrics.jsonl`` in the run directory, one flushed line per record.

Always on: it is the run's own record (``--resume`` trims it back to the checkpoint, ``thresher
report`` reads it), so listing it in ``loggers:`` changes nothing.
"""

from __future__ import annotations

from typing import Any, ClassVar

from thresher.core.config import Section
from thresher.core.run.metrics import MetricsWriter
from thresher.core.types import PluginContext


class JsonlLogger:
    name: ClassVar[str] = "jsonl"

    class Config(Section):
        """No options: metrics.jsonl is always written."""

    def __init__(self, config: Config, context: PluginContext):
        if context.run_dir is None:
            raise ValueError("the jsonl logger needs the run directory in its context")
        self.writer = MetricsWriter(context.run_dir / "metrics.jsonl")

    def log(self, record: dict[str, Any]) -> None:
        self.writer.write(record)

    def close(self) -> None:
        self.writer.close()
