"""Prompt data handed over from Python: a ``datasets.Dataset``, a pandas DataFrame or a list of dicts.

A config is text (it is written to the run directory and compared on resume), so in-memory data
cannot sit in it. It is held here instead, under a name that says what it was and fingerprints its
content: ``python:120 rows, sha256 1f0c…``. That name is what ``data.train`` holds, what
``config.yaml`` records, and what a resume compares, so a run resumed with other data is refused
like any other config change. The rows live as long as the process; another process (a CLI
``--resume``) has no rows under that name and says so in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from thresher.core.errors import ConfigError, DataError

PREFIX = "python:"
_HELD: dict[str, list[dict[str, Any]]] = {}


def is_in_memory(value: Any) -> bool:
    """Whether ``value`` is data to hold rather than a path (a string) or a config value."""
    if isinstance(value, list):
        return bool(value) and all(isinstance(row, dict) for row in value)
    kind = type(value)
    return (kind.__module__.split(".")[0], kind.__name__) in {
        ("datasets", "Dataset"),
        ("datasets", "DatasetDict"),
        ("datasets", "IterableDataset"),
        ("pandas", "DataFrame"),
    }


def hold(value: Any, key: str) -> str:
    """Hold ``value``'s rows; the source name to put in the config under ``key`` (for errors)."""
    kind = type(value).__name__
    if kind == "DatasetDict":
        splits = ", ".join(repr(name) for name in value)
        raise ConfigError([f"{key}: a DatasetDict; pass one split, e.g. dataset['train'] (splits: {splits})"])
    if kind == "IterableDataset":
        raise ConfigError([f"{key}: an IterableDataset; pass a Dataset (e.g. Dataset.from_list(list(iterable)))"])
    if kind == "DataFrame":
        rows = [{str(k): _from_pandas(v) for k, v in row.items()} for row in value.to_dict(orient="records")]
    elif kind == "Dataset":
        rows = value.to_list()
    else:
        rows = [dict(row) for row in value]
    if not rows:
        raise ConfigError([f"{key}: the {kind} holds no rows"])
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True, default=str).encode()).hexdigest()
    # the name holds the rows' count and digest, not the container: the same rows are the same data
    name = f"{PREFIX}{len(rows)} row{'s' if len(rows) > 1 else ''}, sha256 {digest[:16]}"
    _HELD[name] = rows
    return name


def held_rows(source: str) -> tuple[list[str], list[dict[str, Any]]]:
    """The columns and a copy of the rows held under ``source`` (readers may edit rows in place)."""
    rows = _HELD.get(source)
    if rows is None:
        raise DataError(
            f"{source}: this data was given from Python to another process; run it from Python with the "
            "same data (Run.from_config(..., overrides={'data.train': data}))"
        )
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return list(columns), [json.loads(json.dumps(row, default=str)) for row in rows]


def _from_pandas(value: Any) -> Any:
    """A DataFrame cell as plain Python: NaN (pandas' missing value) becomes None, numpy scalars
    and arrays become numbers and lists."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
