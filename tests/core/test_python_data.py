"""Prompt data from Python: a ``datasets.Dataset``, a pandas DataFrame or a list of dicts, as
``data.train`` / ``data.validation``: the same prompts as from a file, recorded by fingerprint, and
a resume with other data refused; and `model.chat_template` for a tokenizer without one."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import datasets
import pandas as pd
import pytest

import thresher
from tests.helpers import read_jsonl
from thresher.core.errors import ConfigError, DataError

ROOT = Path(__file__).resolve().parents[2]

ROWS = [{"prompt": f"What is {i} + 2?", "answer": str(i + 2), "level": "easy" if i < 4 else "hard"} for i in range(8)]


def prompts_of(train, tmp_path) -> list[tuple[str, tuple[int, ...], dict]]:
    """The tokenized prompts a run reads from ``train`` (the plan reads them; nothing is loaded)."""
    overrides = {"data.train": train, "output.dir": str(tmp_path / "unused")}
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        run.plan()
        assert run.inputs is not None
        return [(p.text, p.token_ids, p.extra) for p in run.inputs.train_prompts]


def test_a_dataset_a_dataframe_and_a_list_give_the_prompts_the_same_rows_give_from_a_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    from_file = prompts_of(str(path), tmp_path)
    assert len(from_file) == 8 and from_file[0][2] == {"answer": "2", "level": "easy"}
    for data in (datasets.Dataset.from_list(ROWS), pd.DataFrame(ROWS), [dict(row) for row in ROWS]):
        assert prompts_of(data, tmp_path) == from_file, type(data).__name__


def test_the_config_records_the_data_by_fingerprint_and_a_resume_checks_it(tmp_path):
    data = datasets.Dataset.from_list(ROWS)
    overrides = {"data.train": data, "rs.max_steps": 1, "rs.prompts_per_step": 4, "output.dir": str(tmp_path / "run")}
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        name = run.config.data.train
        run.train()
    assert name.startswith("python:8 rows, sha256 ")
    assert f"train: {name}" in (tmp_path / "run" / "config.yaml").read_text()
    # the same rows in another container have the same fingerprint: the resume goes on
    same = {**overrides, "data.train": [dict(row) for row in ROWS], "rs.max_steps": 2}
    with thresher.Run.from_config("tiny", overrides=same, quiet=True) as run:
        run.train(resume=True)
    assert [r["step"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"] == [1, 2]
    other = {**same, "data.train": [*ROWS[:4], {"prompt": "something else"}], "rs.max_steps": 3}
    with pytest.raises(ConfigError) as refused, thresher.Run.from_config("tiny", overrides=other, quiet=True) as run:
        run.train(resume=True)
    assert "was made with a different config" in refused.value.problems[0]
    assert refused.value.problems[1].startswith(f"  data.train: {name!r} in the checkpoint, 'python:5 rows, sha256 ")


def test_a_run_of_python_data_resumed_from_the_cli_says_how_to_resume_it(tmp_path):
    overrides = {"data.train": ROWS, "rs.max_steps": 1, "rs.prompts_per_step": 4, "output.dir": str(tmp_path / "run")}
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        run.train()
    done = subprocess.run(
        [sys.executable, "-m", "thresher", "train", str(tmp_path / "run"), "--resume"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("error:")]
    assert line.startswith("error: python:8 rows, sha256 ")
    assert line.endswith("run it from Python with the same data (Run.from_config(..., overrides={'data.train': data}))")


def test_what_cannot_be_held_is_one_line_naming_the_key(tmp_path):
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(ConfigError, match=r"data\.train: a DatasetDict; pass one split, e.g\. dataset\['train'\]"):
        thresher.Run.from_config("tiny", overrides={"data.train": splits})
    empty = pd.DataFrame({"prompt": []})
    with pytest.raises(ConfigError, match=r"data\.validation: the DataFrame holds no rows"):
        thresher.Run.from_config("tiny", overrides={"data.validation": empty})
    with pytest.raises(DataError, match=r"python:1 row, sha256 \w+: no column 'prompt' \(or 'messages'\)"):
        prompts_of([{"question": "no prompt field"}], tmp_path)


TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}[assistant] "


def test_model_chat_template_renders_prompts_and_goes_with_the_final_model(tmp_path):
    (tmp_path / "chat.jinja").write_text(TEMPLATE)
    for given in (TEMPLATE, str(tmp_path / "chat.jinja")):
        overrides = {"model.chat_template": given, "data.chat_template": "always", "data.train": ROWS[:4],
                     "rs.max_steps": 1, "rs.prompts_per_step": 4, "output.dir": str(tmp_path / "run"),
                     "output.overwrite": True}  # fmt: skip
        with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
            run.train()
            assert run.inputs is not None
            assert run.inputs.train_prompts[0].text == "[user] What is 0 + 2?\n[assistant] "
        from transformers import AutoTokenizer

        assert AutoTokenizer.from_pretrained(tmp_path / "run" / "final").chat_template == TEMPLATE
    with pytest.raises(ConfigError, match=r"model\.chat_template: .*not a valid Jinja template: unexpected '}'"):
        thresher.load_config("tiny", {"model.chat_template": "{{ messages }"})
    with pytest.raises(ConfigError, match=r"model\.chat_template: 'nowhere\.jinja' is neither a file nor a Jinja"):
        thresher.load_config("tiny", {"model.chat_template": "nowhere.jinja"})
