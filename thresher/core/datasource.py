"""Where prompt rows come from: JSONL, CSV, Parquet or a ``datasets`` save, read locally into dicts.

Every reader returns ``(where, row)`` pairs, ``where`` being the place an error about that row names:
``train.jsonl:2`` and ``train.csv:2`` are line numbers in the file (a CSV header is line 1), and
``train.parquet row 0`` / ``saved:train row 0`` count rows from 0, as ``table[0]`` or ``dataset[0]`` do.
The format follows the name: ``.csv``, ``.parquet``, a directory written by ``save_to_disk``
(``dir`` for a Dataset, ``dir:SPLIT`` for a split of a DatasetDict); anything else is JSON lines, as
it always was. pyarrow and ``datasets`` are imported only when such a source is read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from thresher.core import in_memory
from thresher.core.errors import DataError

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
DATA_EXTRA = "pip install 'thresher[data]'"

Rows = list[tuple[str, dict[str, Any]]]


def resolve_data_path(source: str) -> Path:
    """``builtin:NAME`` → a prompt file shipped in ``thresher/presets``; anything else is a path."""
    if source.startswith("builtin:"):
        path = PRESETS_DIR / f"{source.removeprefix('builtin:')}.jsonl"
        if not path.is_file():
            names = ", ".join(f"builtin:{p.stem}" for p in sorted(PRESETS_DIR.glob("*.jsonl")))
            raise DataError(f"{source}: no such built-in prompt set; available: {names}")
        return path
    return Path(source)


def read_rows(source: str, *, field: str = "prompt", messages_field: str = "messages") -> Rows:
    """Every row of a prompt source, whatever its format, as ``(where, row)`` pairs.

    For the column formats a missing prompt column is reported once for the file (naming the columns
    it has), an empty or null prompt cell beside a filled messages cell means "this row is a chat",
    and a messages cell holding a string is parsed as JSON (CSV has no other way to hold a list).
    """
    if source.startswith(in_memory.PREFIX):
        columns, records = in_memory.held_rows(source)
        return _columnar(source, "data", columns, records, field, messages_field)
    path, split = _split_suffix(source)
    if path.is_dir():
        columns, records = _read_saved_dataset(path, split, source)
        return _columnar(source, "dataset", columns, records, field, messages_field)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, field, messages_field)
    if suffix == ".parquet":
        columns, records = _read_parquet(path)
        return _columnar(str(path), "file", columns, records, field, messages_field)
    return [(f"{path}:{line_number}", row) for line_number, row in read_jsonl(path)]


def read_jsonl(path: Path, what: str = "prompt") -> list[tuple[int, dict[str, Any]]]:
    """Return ``(line_number, row)`` pairs; blank lines are skipped, anything malformed is an error
    (``what`` the rows are, for the messages: prompts, or rollouts for ``thresher export``)."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file not found")
    rows = []
    try:
        with path.open(encoding="utf-8-sig") as handle:  # a UTF-8 byte-order mark is allowed
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{line_number}: malformed JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{line_number}: expected a JSON object, got {type(row).__name__}")
                rows.append((line_number, row))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    if not rows:
        raise DataError(f"{path}: no {what}s (the file is empty)")
    return rows


def _split_suffix(source: str) -> tuple[Path, str | None]:
    """``dir:train`` → ``(dir, "train")`` when ``dir`` is a directory and ``dir:train`` is not a path."""
    path = resolve_data_path(source)
    head, colon, split = source.rpartition(":")
    if colon and split and "/" not in split and not path.exists() and Path(head).is_dir():
        return Path(head), split
    return path, None


def _read_csv(path: Path, field: str, messages_field: str) -> Rows:
    """CSV rows keyed by the header; cells stay strings (``"12"``, and ``""`` for an empty cell)."""
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    rows: Rows = []
    try:
        with path.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle)
            header = next((cells for cells in reader if cells), None)  # the first non-empty line
            if header is None:
                header = []  # no rows follow: the file has no prompts, reported by the caller
            else:
                _check_columns(f"{path}:{reader.line_num}", header, field, messages_field)
            line_end = reader.line_num
            for cells in reader:
                line_number, line_end = line_end + 1, reader.line_num  # a quoted cell may span lines
                if not cells:  # an empty line, skipped as in JSONL (`""` is an empty cell, not a blank line)
                    continue
                where = f"{path}:{line_number}"
                if len(cells) != len(header):
                    raise DataError(f"{where}: expected {len(header)} cells (one per header column), got {len(cells)}")
                rows.append((where, _normalise(dict(zip(header, cells, strict=True)), field, messages_field, where)))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    except csv.Error as err:
        raise DataError(f"{path}:{reader.line_num}: malformed CSV ({err})") from None
    if not rows:
        raise DataError(f"{path}: no prompts (the file is empty)")
    return rows


def _read_parquet(path: Path) -> tuple[list[str], list[dict[str, Any]]]:
    if not path.is_file():
        raise DataError(f"{path}: prompt file not found")
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: {DATA_EXTRA}") from None
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(err)})") from None
    return table.column_names, table.to_pylist()


def _read_saved_dataset(path: Path, split: str | None, source: str) -> tuple[list[str], list[dict[str, Any]]]:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``dir:SPLIT``)."""
    splits_file = path / "dataset_dict.json"
    if splits_file.is_file():
        splits = sorted(_json_file(splits_file, source).get("splits", []))
        if split is None:
            example = "train" if "train" in splits else (splits or ["SPLIT"])[0]
            raise DataError(
                f"{source}: a DatasetDict with splits {', '.join(splits) or '(none)'}; name one: {source}:{example}"
            )
        if split not in splits:
            raise DataError(f"{source}: no split {split!r}; available: {', '.join(splits)}")
        path = path / split
    elif split is not None:
        raise DataError(f"{source}: a single Dataset, which has no splits; drop ':{split}'")
    if not (path / "state.json").is_file():
        raise DataError(f"{source}: not a directory written by datasets' save_to_disk (no state.json)")
    if not _json_file(path / "state.json", source).get("_data_files"):  # load_from_disk fails on these
        raise DataError(f"{source}: no prompts (the dataset is empty)")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading a saved dataset needs the datasets library: {DATA_EXTRA}") from None
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as err:
        raise DataError(f"{source}: cannot load the saved dataset ({_first_line(err)})") from None
    return list(dataset.column_names), dataset.to_list()


def _json_file(path: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{source}: {path.name} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DataError(f"{source}: {path.name} is not a JSON object")
    return data


def _columnar(
    label: str, what: str, columns: list[str], records: list[dict[str, Any]], field: str, messages_field: str
) -> Rows:
    """Rows of a Parquet file or saved dataset, named ``LABEL row N`` with N counted from 0."""
    if not records:
        raise DataError(f"{label}: no prompts (the {what} is empty)")
    _check_columns(label, columns, field, messages_field)
    rows: Rows = []
    for index, record in enumerate(records):
        where = f"{label} row {index}"
        rows.append((where, _normalise(record, field, messages_field, where)))
    return rows


def _check_columns(where: str, columns: Iterable[str], field: str, messages_field: str) -> None:
    names = list(columns)
    for name in names:
        if names.count(name) > 1:
            raise DataError(f"{where}: column {name!r} appears twice")
    if field not in names and messages_field not in names:
        raise DataError(
            f"{where}: no column {field!r} (or {messages_field!r}); columns: {', '.join(names) or '(none)'}"
        )


def _normalise(row: dict[str, Any], field: str, messages_field: str, where: str) -> dict[str, Any]:
    """Give a column-format row the shape a JSONL row would have.

    A table has every column in every row, so a chat row carries an empty (CSV) or null prompt cell;
    that cell is dropped so the row reads as ``{"messages": [...]}``. A messages cell that is a string
    is JSON text (CSV cannot hold anything else) and is parsed here. A Parquet list of structs gives
    every message every key of any message (``name: None``); the null ones are dropped, as a JSONL
    message would not have them and a chat template may test whether they are defined.
    """
    has_prompt = not _blank(row.get(field))
    has_messages = not _blank(row.get(messages_field))
    if not has_prompt and has_messages:
        row.pop(field, None)
    if has_messages and isinstance(row[messages_field], str):
        try:
            row[messages_field] = json.loads(row[messages_field])
        except json.JSONDecodeError as err:
            raise DataError(f"{where}: column {messages_field!r} is not valid JSON ({err.msg})") from None
    elif has_messages and isinstance(row[messages_field], list):  # Parquet structs: every message has every key
        row[messages_field] = [_without_nulls(message) for message in row[messages_field]]
    elif not has_messages and field in row:
        row.pop(messages_field, None)
    return row


def _without_nulls(message: Any) -> Any:
    return {k: v for k, v in message.items() if v is not None} if isinstance(message, dict) else message


def _blank(value: Any) -> bool:
    return value is None or value == ""


def _first_line(err: BaseException) -> str:
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
