"""Prompts from CSV, Parquet and `datasets` saves: each read like the same rows in JSONL, errors in one line.

The files are real (csv.writer, pyarrow.parquet, ``Dataset.save_to_disk``); each is loaded and compared
with the JSONL holding the same rows, and each way a file can be wrong is asserted by its exact message.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from thresher.core.data import load_prompts
from thresher.core.datasource import read_rows
from thresher.core.errors import DataError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
datasets = pytest.importorskip("datasets")

CHAT = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}<assistant>"
COLUMNS = ("prompt", "messages", "answer", "id")
ROWS: list[dict[str, Any]] = [
    {"prompt": "2+2?", "answer": 4, "id": "a"},
    {
        "messages": [{"role": "system", "content": "Be brief.", "name": "rules"}, {"role": "user", "content": "3+3?"}],
        "answer": 6,
        "id": "b",
    },
    {"prompt": 'line one\nline two, "quoted"', "answer": 7, "id": "c"},
]


@pytest.fixture
def chat_tokenizer(tiny_tokenizer):
    tiny_tokenizer.chat_template = CHAT
    yield tiny_tokenizer
    tiny_tokenizer.chat_template = None


def as_table(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every row with every column, absent ones null: what a table holds (a struct gets every key too)."""
    names = sorted({key for row in rows for message in row.get("messages", []) for key in message})
    table = []
    for row in rows:
        full = {column: row.get(column) for column in COLUMNS}
        if full["messages"] is not None:
            full["messages"] = [{key: message.get(key) for key in names} for message in full["messages"]]
        table.append(full)
    return table


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> str:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(COLUMNS)
        for row in rows:
            cells = [row.get(c) for c in COLUMNS]
            writer.writerow(["" if v is None else json.dumps(v) if isinstance(v, list) else v for v in cells])
    return str(path)


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> str:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def save_dataset(path: Path, rows: list[dict[str, Any]]) -> str:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return str(path)


def write_lines(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


def loaded(source: str, tokenizer: Any, **options: Any) -> list[tuple[str, tuple[int, ...], dict[str, Any]]]:
    prompts, _ = load_prompts(source, tokenizer, chat_template="never", **options)
    return [(p.text, p.token_ids, p.extra) for p in prompts]


def rows_of(source: str) -> list[dict[str, Any]]:
    return [row for _, row in read_rows(source)]


def error(source: str, tokenizer: Any, **options: Any) -> str:
    with pytest.raises(DataError) as raised:
        load_prompts(source, tokenizer, chat_template="never", **options)
    return str(raised.value)


# --- each format reads like the same rows in JSONL ---------------------------------------------------


def test_csv_reads_like_jsonl_with_string_cells(tmp_path, chat_tokenizer):
    as_strings = [{**row, "answer": str(row["answer"])} for row in ROWS]  # CSV cells are strings
    jsonl = write_jsonl(tmp_path / "p.jsonl", as_strings)
    path = write_csv(tmp_path / "p.csv", ROWS)
    # the chat row's message has "name" only where JSONL has it: a CSV cell is that JSON, unchanged
    assert rows_of(path) == rows_of(jsonl)
    assert loaded(path, chat_tokenizer) == loaded(jsonl, chat_tokenizer)
    assert loaded(path, chat_tokenizer)[0][2] == {"answer": "4", "id": "a"}
    # where a row starts: line 2, 3, then 4-5 (a quoted cell spans two lines)
    assert [where for where, _ in read_rows(path)] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_parquet_reads_like_jsonl_keeping_its_types(tmp_path, chat_tokenizer):
    jsonl = write_jsonl(tmp_path / "p.jsonl", ROWS)
    path = write_parquet(tmp_path / "p.parquet", as_table(ROWS))
    assert rows_of(path) == rows_of(jsonl)  # null prompt / messages cells and null struct keys dropped
    assert loaded(path, chat_tokenizer) == loaded(jsonl, chat_tokenizer)
    assert loaded(path, chat_tokenizer)[0][2] == {"answer": 4, "id": "a"}
    assert [where for where, _ in read_rows(path)] == [f"{path} row 0", f"{path} row 1", f"{path} row 2"]


def test_a_saved_dataset_reads_like_jsonl(tmp_path, chat_tokenizer):
    jsonl = write_jsonl(tmp_path / "p.jsonl", ROWS)
    path = save_dataset(tmp_path / "saved", as_table(ROWS))
    assert rows_of(path) == rows_of(jsonl)
    assert loaded(path, chat_tokenizer) == loaded(jsonl, chat_tokenizer)
    assert read_rows(path)[2][0] == f"{path} row 2"


def test_a_saved_dataset_dict_is_read_one_split_at_a_time(tmp_path, chat_tokenizer):
    splits = {"train": as_table(ROWS), "test": as_table(ROWS[:1])}
    path = tmp_path / "saved"
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(path)
    )
    assert loaded(f"{path}:train", chat_tokenizer) == loaded(write_jsonl(tmp_path / "t.jsonl", ROWS), chat_tokenizer)
    assert loaded(f"{path}:test", chat_tokenizer) == loaded(write_jsonl(tmp_path / "v.jsonl", ROWS[:1]), chat_tokenizer)
    assert read_rows(f"{path}:test")[0][0] == f"{path}:test row 0"


def test_field_and_messages_field_name_the_columns(tmp_path, chat_tokenizer):
    renamed = [
        {"question": "2+2?", "conversation": None, "answer": "4"},
        {"question": None, "conversation": [{"role": "user", "content": "3+3?"}], "answer": "6"},
    ]
    names = {"field": "question", "messages_field": "conversation"}
    parquet = write_parquet(tmp_path / "p.parquet", renamed)
    path = tmp_path / "p.csv"
    path.write_text('question,conversation,answer\n2+2?,,4\n,"[{""role"": ""user"", ""content"": ""3+3?""}]",6\n')
    chat = "<user>3+3?\n<assistant>"
    expected = [
        ("2+2?", tuple(chat_tokenizer("2+2?")["input_ids"]), {"answer": "4"}),
        (chat, tuple(chat_tokenizer(chat, add_special_tokens=False)["input_ids"]), {"answer": "6"}),
    ]
    assert loaded(str(path), chat_tokenizer, **names) == loaded(parquet, chat_tokenizer, **names) == expected
    jsonl_rows = [{"question": "2+2?", "answer": "4"}, {"conversation": renamed[1]["conversation"], "answer": "6"}]
    assert loaded(write_jsonl(tmp_path / "p.jsonl", jsonl_rows), chat_tokenizer, **names) == expected


def test_the_format_follows_the_name_and_anything_else_is_json_lines(tmp_path, tiny_tokenizer):
    path = write_lines(tmp_path / "prompts.txt", json.dumps({"prompt": "2+2?"}) + "\n")
    assert [text for text, _, _ in loaded(path, tiny_tokenizer)] == ["2+2?"]
    path = write_lines(tmp_path / "P.CSV", "prompt\n2+2?\n")
    assert [text for text, _, _ in loaded(path, tiny_tokenizer)] == ["2+2?"]


# --- every way a file can be wrong, in one line ---------------------------------------------------------


BAD_JSON = "is not valid JSON (Expecting property name enclosed in double quotes)"
CSV_ERRORS = [
    ("question,answer\n2+2?,4\n", "{path}:1: no column 'prompt' (or 'messages'); columns: question, answer"),
    ("prompt,answer\nok,1\n,4\n", "{path}:3: field 'prompt' must be a non-empty string"),
    ('prompt,answer\n"two\nlines",1\n"",4\n', "{path}:4: field 'prompt' must be a non-empty string"),
    ("prompt,answer\nok,1,extra\n", "{path}:2: expected 2 cells (one per header column), got 3"),
    ("prompt,prompt\na,b\n", "{path}:1: column 'prompt' appears twice"),
    ("messages\n[{oops\n", "{path}:2: column 'messages' " + BAD_JSON),
    ('messages\n"{""role"": ""user""}"\n', "{path}:2: field 'messages' must be a list of {{role, content}} objects"),
    ("prompt,messages\n,\n", "{path}:2: field 'prompt' must be a non-empty string"),
    ("", "{path}: no prompts (the file is empty)"),
    ("prompt,answer\n", "{path}: no prompts (the file is empty)"),
    ("\n\nquestion\nx\n", "{path}:3: no column 'prompt' (or 'messages'); columns: question"),
    ("prompt\nok\n" + "y" * 200_000 + "\n", "{path}:3: malformed CSV (field larger than field limit (131072))"),
    # a messages cell is JSON, where "\ud800" decodes to a lone surrogate: not text, and a tokenizer TypeError
    (
        'prompt,messages\nok,\n,"[{""role"": ""user"", ""content"": ""a\\ud800""}]"\n',
        "{path}:3: field 'messages'[0].content is not valid Unicode text: lone surrogate \\ud800 at character 1 "
        "(an unpaired \\uD800-\\uDFFF escape in the file)",
    ),
    (
        'messages\n"[{""role"": ""hacker"", ""content"": ""x""}]"\n',
        "{path}:2: messages[0].role 'hacker' is not a chat role; accepted: system, user, assistant, tool",
    ),
]


@pytest.mark.parametrize(("text", "message"), CSV_ERRORS)
def test_bad_csv_files_name_file_line_and_column(tmp_path, tiny_tokenizer, text, message):
    path = write_lines(tmp_path / "p.csv", text)
    assert error(path, tiny_tokenizer) == message.format(path=path)


def test_csv_that_is_not_utf8(tmp_path, tiny_tokenizer):
    path = tmp_path / "p.csv"
    path.write_bytes(b"prompt\ncaf\xe9\n")
    assert error(str(path), tiny_tokenizer) == f"{path}: not valid UTF-8 (byte 10)"


PARQUET_ERRORS = [
    ([{"question": "2+2?"}], "{path}: no column 'prompt' (or 'messages'); columns: question"),
    ([{"prompt": "ok"}, {"prompt": None}], "{path} row 1: field 'prompt' must be a non-empty string"),
    ([{"prompt": "ok"}, {"prompt": ""}], "{path} row 1: field 'prompt' must be a non-empty string"),
    ([{"messages": "[{oops"}], "{path} row 0: column 'messages' " + BAD_JSON),
    ([{"messages": [{"role": "user"}]}], "{path} row 0: field 'messages' must be a list of {{role, content}} objects"),
    (
        [{"messages": '[{"role": "user", "content": "\\udc00"}]'}],
        "{path} row 0: field 'messages'[0].content is not valid Unicode text: lone surrogate \\udc00 at character 0 "
        "(an unpaired \\uD800-\\uDFFF escape in the file)",
    ),
    (
        [{"prompt": "ok", "messages": None}, {"prompt": None, "messages": [{"role": "hacker", "content": "x"}]}],
        "{path} row 1: messages[0].role 'hacker' is not a chat role; accepted: system, user, assistant, tool",
    ),
]


@pytest.mark.parametrize(("rows", "message"), PARQUET_ERRORS)
@pytest.mark.parametrize("store", ["parquet", "datasets"])
def test_bad_parquet_files_and_saved_datasets_name_the_source_row_and_column(
    tmp_path, tiny_tokenizer, rows, message, store
):
    write = {
        "parquet": lambda: write_parquet(tmp_path / "p.parquet", rows),
        "datasets": lambda: save_dataset(tmp_path / "saved", rows),
    }
    path = write[store]()
    assert error(path, tiny_tokenizer) == message.format(path=path)


def test_empty_and_unreadable_parquet(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string())}), empty)
    assert error(str(empty), tiny_tokenizer) == f"{empty}: no prompts (the file is empty)"
    garbage = write_lines(tmp_path / "garbage.parquet", "not parquet\n")
    assert error(garbage, tiny_tokenizer).startswith(f"{garbage}: not a readable Parquet file (")
    assert "\n" not in error(garbage, tiny_tokenizer)
    missing = tmp_path / "missing.parquet"
    assert error(str(missing), tiny_tokenizer) == f"{missing}: prompt file not found"


def test_saved_dataset_errors(tmp_path, tiny_tokenizer):
    empty = tmp_path / "empty"
    datasets.Dataset.from_dict({"prompt": []}).save_to_disk(str(empty))
    assert error(str(empty), tiny_tokenizer) == f"{empty}: no prompts (the dataset is empty)"
    single = save_dataset(tmp_path / "single", [{"prompt": "ok"}])
    no_splits = f"{single}:train: a single Dataset, which has no splits; drop ':train'"
    assert error(f"{single}:train", tiny_tokenizer) == no_splits
    plain = tmp_path / "plain"
    plain.mkdir()
    not_saved = f"{plain}: not a directory written by datasets' save_to_disk (no state.json)"
    assert error(str(plain), tiny_tokenizer) == not_saved
    assert error(f"{tmp_path}/nowhere:train", tiny_tokenizer) == f"{tmp_path}/nowhere:train: prompt file not found"


def test_a_dataset_dict_needs_a_known_split(tmp_path, tiny_tokenizer):
    path = tmp_path / "saved"
    split = datasets.Dataset.from_list([{"prompt": "ok"}])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(path))
    assert error(str(path), tiny_tokenizer) == f"{path}: a DatasetDict with splits test, train; name one: {path}:train"
    assert error(f"{path}:nope", tiny_tokenizer) == f"{path}:nope: no split 'nope'; available: test, train"


def test_a_missing_data_extra_is_one_line_naming_it(tmp_path, tiny_tokenizer, monkeypatch):
    parquet = write_parquet(tmp_path / "p.parquet", [{"prompt": "ok"}])
    saved = save_dataset(tmp_path / "saved", [{"prompt": "ok"}])
    for module in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` now raises ImportError
    assert error(parquet, tiny_tokenizer) == f"{parquet}: reading Parquet needs pyarrow: pip install 'thresher[data]'"
    assert error(saved, tiny_tokenizer) == (
        f"{saved}: reading a saved dataset needs the datasets library: pip install 'thresher[data]'"
    )
    csv_path = write_lines(tmp_path / "p.csv", "prompt\nok\n")  # CSV and JSONL need neither
    assert [text for text, _, _ in loaded(csv_path, tiny_tokenizer)] == ["ok"]


# --- through the CLI ------------------------------------------------------------------------------------


def test_tiny_preset_trains_on_a_parquet_file(tmp_path, cli):
    from thresher.core.datasource import read_jsonl, resolve_data_path

    rows = [row for _, row in read_jsonl(resolve_data_path("builtin:addition_train"))]
    path = write_parquet(tmp_path / "train.parquet", rows)
    run = tmp_path / "run"
    result = cli(
        "train", "tiny", "--set", f"data.train={path}", "--set", "data.validation=null",
        "--set", f"output.dir={run}", "--set", "rs.max_steps=1", "-q",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    rollouts = [json.loads(line) for line in (run / "rollouts" / "step_1.jsonl").read_text().splitlines()]
    assert rollouts and {r["prompt"] for r in rollouts} <= {row["prompt"] for row in rows}
