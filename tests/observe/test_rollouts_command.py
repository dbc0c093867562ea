"""``thresher rollouts``: a step's responses per prompt, kept and rejected, checked against the rollout
files themselves; filters (--kept/--rejected/--grep/--best/--worst), --json, and one-line errors."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import pytest
from typer.testing import CliRunner

from thresher.cli import build_app
from thresher.core.registry import get_plugin_manager


def invoke(*args: object):
    return CliRunner().invoke(
        build_app(get_plugin_manager(load_entrypoints=False)), [str(a) for a in args], catch_exceptions=False
    )


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A real tiny run: 2 steps, 4 prompts x 6 rollouts, the best 2 of each kept."""
    path = tmp_path_factory.mktemp("rollouts") / "exp"
    done = invoke("train", "tiny", "--set", f"output.dir={path}", "--set", "rs.max_steps=2",
                  "--set", "rs.prompts_per_step=4", "--set", "rs.num_rollouts_per_prompt=6",
                  "--set", "selector.top_n_rollouts=2", "--set", "rs.val_max_prompts=2", "-q")  # fmt: skip
    assert done.exit_code == 0, done.output
    return path


def raw(run: Path, step: int) -> list[dict]:
    return [json.loads(line) for line in (run / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]


def by_prompt(records: list[dict]) -> dict[tuple[int, int], list[dict]]:
    groups = defaultdict(list)
    for r in records:
        groups[(r["group"], r["prompt_index"])].append(r)
    return groups


def view(*args: object) -> dict:
    result = invoke("rollouts", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def shown(data: dict) -> list[tuple[int, int, int]]:
    """(group, prompt_index, sample) of every response shown."""
    return [(p["group"], p["prompt_index"], r["sample"]) for p in data["prompts"] for r in p["responses"]]


def test_json_holds_every_rollout_of_the_latest_step_grouped_and_sorted(run):
    data = view(run)
    assert data["step"] == 2 and data["steps"] == [1, 2] and data["run"] == str(run)
    records = raw(run, 2)
    groups = by_prompt(records)
    assert [(p["group"], p["prompt_index"]) for p in data["prompts"]] == sorted(groups)
    assert data["totals"] == {"prompts": 4, "rollouts": 24, "kept": 8}
    assert sorted(shown(data)) == sorted((r["group"], r["prompt_index"], r["sample"]) for r in records)
    for prompt in data["prompts"]:
        originals = {r["sample"]: r for r in groups[(prompt["group"], prompt["prompt_index"])]}
        assert prompt["prompt"] == next(iter(originals.values()))["prompt"]
        assert prompt["rollouts"] == 6 and prompt["kept"] == 2
        rewards = [r["reward"] for r in prompt["responses"]]
        assert rewards == sorted(rewards, reverse=True)
        for response in prompt["responses"]:
            original = originals[response["sample"]]
            for key in ("response", "response_ids", "reward", "kept", "finish_reason"):
                assert response[key] == original[key]  # nothing truncated or rounded
    assert view(run, "--step", 1)["totals"]["rollouts"] == len(raw(run, 1))


def test_kept_and_rejected_show_exactly_what_the_selector_did(run):
    records = raw(run, 1)
    kept = view(run, "--step", 1, "--kept")
    assert sorted(shown(kept)) == sorted((r["group"], r["prompt_index"], r["sample"]) for r in records if r["kept"])
    assert all(r["kept"] is True for p in kept["prompts"] for r in p["responses"])
    rejected = view(run, "--step", 1, "--rejected")
    assert sorted(shown(rejected)) == sorted(
        (r["group"], r["prompt_index"], r["sample"]) for r in records if r["kept"] is False
    )


def test_best_and_worst_pick_per_prompt(run):
    groups = by_prompt(raw(run, 2))
    best = view(run, "--best", 1)
    worst = view(run, "--worst", 2)
    assert len(best["prompts"]) == len(worst["prompts"]) == len(groups)
    for b, w in zip(best["prompts"], worst["prompts"], strict=True):
        rewards = sorted(r["reward"] for r in groups[(b["group"], b["prompt_index"])])
        assert [r["reward"] for r in b["responses"]] == [rewards[-1]]
        assert [r["reward"] for r in w["responses"]] == [rewards[1], rewards[0]]  # still highest first
    best_rejected = view(run, "--best", 1, "--rejected")
    for prompt in best_rejected["prompts"]:
        rejected = [r["reward"] for r in groups[(prompt["group"], prompt["prompt_index"])] if r["kept"] is False]
        assert [r["reward"] for r in prompt["responses"]] == [max(rejected)]
        assert prompt["responses"][0]["kept"] is False


def test_grep_matches_responses_or_prompts_in_any_case(run):
    records = raw(run, 2)
    word = next(r["response"][i : i + 2] for r in records for i in range(len(r["response"]) - 1)
                if r["response"][i : i + 2].isalpha())  # fmt: skip
    data = view(run, "--grep", word.swapcase())
    expected = {(r["group"], r["prompt_index"], r["sample"]) for r in records
                if word.lower() in r["response"].lower() or word.lower() in r["prompt"].lower()}  # fmt: skip
    assert expected and set(shown(data)) == expected
    prompt = records[0]["prompt"]
    data = view(run, "--grep", prompt.upper())
    assert {p["prompt"] for p in data["prompts"]} == {prompt}
    assert len(shown(data)) == sum(r["prompt"] == prompt for r in records)  # a matching prompt shows all
    assert view(run, "--grep", "no such text anywhere")["prompts"] == []


def test_the_terminal_layout_shows_each_prompt_once_then_its_responses(run):
    result = invoke("rollouts", run, "--step", 1)
    assert result.exit_code == 0, result.output
    out = result.stdout
    records = raw(run, 1)
    for prompt in {r["prompt"] for r in records}:
        assert out.count(prompt) == sum(1 for g in by_prompt(records).values() if g[0]["prompt"] == prompt)
    assert out.count("[kept]") == sum(r["kept"] is True for r in records)
    assert out.count("[rejected]") == sum(r["kept"] is False for r in records)
    assert f"{max(r['reward'] for r in records):.4f}" in out
    assert "step 1 (steps with rollouts: 1-2)" in out.splitlines()[0]
    assert "\x1b[" not in out  # piped: plain text


def test_unscored_rollouts_odd_text_and_a_torn_line(tmp_path):
    run = tmp_path / "odd"
    (run / "rollouts").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    rows = [
        {"step": 5, "prompt_index": 3, "group": 0, "sample": 0, "prompt": "Say hi", "response": "hi\x1b[31m red",
         "response_ids": [1], "finish_reason": "eos", "reward": 0.5, "kept": True},
        {"step": 5, "prompt_index": 3, "group": 0, "sample": 1, "prompt": "Say hi", "response": "line one\nline two",
         "response_ids": [2], "finish_reason": "length", "reward": None, "kept": None},
        {"step": 5, "prompt_index": 3, "group": 0, "sample": 2, "prompt": "Say hi", "response": "[bold]x[/]",
         "response_ids": [3], "finish_reason": "stop", "reward": -1.0, "kept": False},
    ]  # fmt: skip
    text = "\n".join(json.dumps(r) for r in rows) + '\n{"step": 5, "prompt_in'
    (run / "rollouts" / "step_5.jsonl").write_text(text)
    (run / "rollouts" / ".step_6.jsonl.tmp").write_text("being written")
    data = view(run)
    assert data["step"] == 5 and data["steps"] == [5]
    responses = data["prompts"][0]["responses"]
    assert [r["sample"] for r in responses] == [0, 2, 1]  # no reward: last
    assert responses[0]["response"] == "hi\x1b[31m red"  # JSON: exactly as generated
    assert [r["sample"] for r in view(run, "--worst", 1)["prompts"][0]["responses"]] == [2]
    assert view(run, "--kept")["totals"]["kept"] == 1
    out = invoke("rollouts", run).stdout
    assert "[unscored]" in out and "\x1b" not in out and "hi\\x1b[31m red" in out
    assert "[bold]x[/]" in out  # markup in a response is shown, not applied
    assert out.count("Say hi") == 1 and "line two" in out


def error_lines(result) -> list[str]:
    assert "Traceback" not in result.output
    return [line.removeprefix("error: ") for line in result.output.splitlines() if line.startswith("error: ")]


def test_mistakes_are_one_line_each(run, tmp_path):
    result = invoke("rollouts", run, "--step", 7)
    assert result.exit_code == 2
    assert error_lines(result) == [f"--step 7: {run} has no rollouts for that step; steps with rollouts: 1-2"]
    result = invoke("rollouts", run, "--kept", "--rejected", "--best", 1, "--worst", 1)
    assert result.exit_code == 2
    assert error_lines(result) == [
        "--kept and --rejected: give one of them (neither shows both)",
        "--best and --worst: give one of them",
    ]
    result = invoke("rollouts", run, "--best", 0)
    assert result.exit_code == 2 and error_lines(result) == ["--best 0: must be at least 1"]
    result = invoke("rollouts", tmp_path)
    assert result.exit_code == 2 and error_lines(result) == [f"{tmp_path}: not a run directory (no metrics.jsonl)"]
    (tmp_path / "metrics.jsonl").write_text("")
    result = invoke("rollouts", tmp_path)
    assert result.exit_code == 2
    assert error_lines(result) == [f"{tmp_path}: no rollouts written yet (rollouts/step_N.jsonl)"]


# Text a model (or anyone who edits a rollout file) could write to attack or fool a terminal: a title
# change (OSC ... BEL), a screen clear, a colour, right-to-left overrides, rich markup and an emoji code.
HOSTILE = "a\x1b]0;title\x07b\x1b[2Jc\x1b[31md\u202ee\u2066f\u200fg\x9bh\r\x00i :thumbs_up: [bold]j[/] [red]k"
RAW = ["\x1b", "\x07", "\x9b", "\r", "\x00", "\u202e", "\u2066", "\u200f", "\ud800", "\U0001f44d"]  # 👍 last


def shown_literally(text: str) -> str:
    """What the terminal view must print for ``text``: each control character as its Python escape."""
    return "".join(ch if ch in "\t\n" or (ch.isprintable() and ch not in "\u202e\u2066\u200f") else
                   (f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}") for ch in text)  # fmt: skip


def test_every_field_is_printed_literally_with_control_characters_made_visible(tmp_path):
    run = tmp_path / "run\x1b[2J\u202e:thumbs_up:[bold]"
    (run / "rollouts").mkdir(parents=True)
    (run / "metrics.jsonl").write_text("")
    rows = [
        {"step": 1, "prompt_index": "p" + HOSTILE, "group": "g" + HOSTILE, "sample": 0, "prompt": "P" + HOSTILE,
         "response": "R" + HOSTILE + "\nsecond line " + HOSTILE + " \ud800", "response_ids": [1],
         "finish_reason": "F" + HOSTILE, "reward": 0.5, "kept": True,
         "rewards": {"N" + HOSTILE: 0.25, "other": "V" + HOSTILE}},
        {"step": 1, "prompt_index": "p" + HOSTILE, "group": "g" + HOSTILE, "sample": 1, "prompt": "P" + HOSTILE,
         "response": ":smile: [link=file:///etc/passwd]x[/link]", "response_ids": [2], "finish_reason": None,
         "reward": "high" + HOSTILE, "kept": "maybe" + HOSTILE},
        {"step": 1, "prompt_index": [7, HOSTILE], "group": {"g": HOSTILE}, "sample": 0, "prompt": "list index",
         "response": "x", "response_ids": [3], "finish_reason": "eos", "reward": 0.0, "kept": [True]},
    ]  # fmt: skip
    (run / "rollouts" / "step_1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    result = invoke("rollouts", run)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert [ch for ch in RAW if ch in out] == []  # nothing the terminal would obey, no emoji put in
    assert "\\ud800" in out  # a lone surrogate (valid in JSON) is shown, not a crash on printing
    for text in (str(run), "p" + HOSTILE, "g" + HOSTILE, "P" + HOSTILE, "R" + HOSTILE, "second line " + HOSTILE,
                 "F" + HOSTILE, "N" + HOSTILE, ":smile: [link=file:///etc/passwd]x[/link]"):  # fmt: skip
        assert shown_literally(text) in out, text
    escaped = r"a\x1b]0;title\x07b\x1b[2Jc\x1b[31md\u202ee\u2066f\u200fg\x9bh\x0d\x00i :thumbs_up: [bold]j[/]"
    assert escaped in out  # the notation: \xNN below U+0100, \uNNNN above
    assert "[unscored]" in out and "[kept]" in out  # a reward or kept flag that is text: no number, no mark

    assert "prompt [7, " in out and "list index" in out  # an index that is not a number is shown, not a crash

    data = view(run)  # the JSON stays the exact data, escapes and all
    assert data["run"] == str(run)
    assert [(p["prompt_index"], p["group"], p["prompt"]) for p in data["prompts"]] == [
        ("p" + HOSTILE, "g" + HOSTILE, "P" + HOSTILE),
        ([7, HOSTILE], {"g": HOSTILE}, "list index"),
    ]
    responses = [r for p in data["prompts"] for r in p["responses"]]
    for got, row in zip(responses, rows, strict=True):
        assert got == {k: v for k, v in row.items() if k not in ("step", "prompt_index", "group", "prompt")}
