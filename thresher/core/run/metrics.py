"""``metrics.jsonl``: one flushed JSON line per event, each with its ``kind`` — ``"train"`` (one per
global step), ``"validation"`` or ``"stop"`` — and the wall-clock ``time`` it was written."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from thresher.core.errors import OutputError


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN; null says "not defined this step"
    return value


class MetricsWriter:
    """Appends JSON lines and flushes each one, so a crash never loses a finished step."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self._handle = path.open("a", encoding="utf-8")
        except OSError as err:
            raise OutputError(f"cannot write {path} ({err.strerror or err})") from None

    def write(self, record: dict[str, Any]) -> None:
        """Append one line; every line carries the wall-clock ``time`` (Unix seconds) it was written."""
        record = {**record, "time": record.get("time", time.time())}
        try:
            self._handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
            self._handle.flush()
        except OSError as err:
            raise OutputError(f"cannot write {self.path} ({err.strerror or err})") from None

    def close(self) -> None:
        self._handle.close()
