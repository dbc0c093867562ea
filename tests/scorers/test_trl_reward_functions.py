"""Reward functions written for TRL's GRPOTrainer work as rules without edits: called as TRL calls
them, their required arguments checked before the model loads, their module found beside the config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from thresher.core.build import instantiate
from thresher.core.config import resolve_plugin_section
from thresher.plugin import PluginContext, Prompt, Rollout

ROOT = Path(__file__).resolve().parents[2]

TRL_STYLE = """
SEEN = {}

def everything(prompts, completions, completion_ids, **kwargs):
    SEEN.update(prompts=prompts, completions=completions, completion_ids=completion_ids, kwargs=kwargs)
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]

def sometimes_none(completions, answer, **kwargs):
    return [None if a is None else float(c == a) for c, a in zip(completions, answer)]
"""


@pytest.fixture
def trl_module(tmp_path, monkeypatch):
    (tmp_path / "trl_style.py").write_text(textwrap.dedent(TRL_STYLE))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("trl_style")


def rollouts() -> list[Rollout]:
    """A plain prompt and a chat prompt, two responses each."""
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    plain = Prompt(0, "<rendered>What is 1+1?", (1, 2), {"answer": "2"}, given="What is 1+1?")
    chatted = Prompt(1, "<rendered chat>", (3, 4), {}, given=chat)
    return [
        Rollout(plain, 0, 0, [50, 51], "2", "eos"),
        Rollout(plain, 0, 1, [52], "11", "length"),
        Rollout(chatted, 1, 0, [53, 54, 55], "4", "eos"),
        Rollout(chatted, 1, 1, [56], "four", "eos"),
    ]


def scorer(registry, function: str):
    spec = resolve_plugin_section("scorer", {"type": "rule", "function": function}, registry)
    return instantiate(registry, "scorer", spec, PluginContext(registry=registry))


def test_a_trl_function_gets_what_grpo_trainer_passes(registry, trl_module):
    rewards = scorer(registry, "trl_style:everything").score(rollouts())
    seen = trl_module.SEEN
    chat = rollouts()[2].prompt.given
    assert seen["prompts"] == ["What is 1+1?", "What is 1+1?", chat, chat]  # as the rows gave them
    assert seen["completions"] == [
        "2",
        "11",
        [{"role": "assistant", "content": "4"}],
        [{"role": "assistant", "content": "four"}],
    ]
    assert seen["completion_ids"] == [[50, 51], [52], [53, 54, 55], [56]]
    assert seen["kwargs"]["answer"] == ["2", "2", None, None]  # a dataset column, None where a row lacks it
    assert rewards.tolist() == [1.0, 2.0, 1.0, 4.0]


def test_none_is_nan_as_in_trl(registry, trl_module):
    rewards = scorer(registry, "trl_style:sometimes_none").score(rollouts())
    assert rewards[:2].tolist() == [1.0, 0.0]
    assert all(math.isnan(value) for value in rewards[2:].tolist())


def test_trls_own_think_format_reward_on_chat_prompts(registry):
    pytest.importorskip("trl")
    rewards = scorer(registry, "trl.rewards:think_format_reward").score(
        [
            Rollout(rollouts()[2].prompt, 1, 0, [1], "<think>\nadd\n</think>\n4", "eos"),
            Rollout(rollouts()[2].prompt, 1, 1, [1], "4", "eos"),
        ]
    )
    assert rewards.tolist() == [1.0, 0.0]


def thresher(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "thresher", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env
    )


def test_a_module_beside_the_config_is_found_from_any_directory(tmp_path):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    project.mkdir(), elsewhere.mkdir()
    (project / "my_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [-len(c) for c in completions]\n"
    )
    config = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())
    config["scorer"] = {"type": "rule", "function": "my_rewards:short"}
    config["output"] = {"dir": str(tmp_path / "run")}
    config["rs"].update(max_steps=1, prompts_per_step=2, num_rollouts_per_prompt=2)
    (project / "config.yaml").write_text(yaml.safe_dump(config))
    checked = thresher("config", "validate", str(project / "config.yaml"), cwd=elsewhere)
    assert checked.returncode == 0, checked.stderr
    assert yaml.safe_load(checked.stdout)["scorer"]["function"] == f"{project / 'my_rewards.py'}:short"
    trained = thresher("train", str(project / "config.yaml"), "-q", cwd=elsewhere)
    assert trained.returncode == 0, trained.stderr
    train = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in train if r["kind"] == "train"] == [1]
    missing = thresher(
        "config", "validate", str(project / "config.yaml"), "--set", "scorer.function=nope:f", cwd=elsewhere
    )
    assert missing.returncode == 2 and "scorer.function: cannot import module 'nope'" in missing.stderr


def test_an_argument_the_data_cannot_give_stops_the_run_before_the_model_loads(tmp_path):
    (tmp_path / "needs.py").write_text(
        "def graded(completions, solution, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    done = thresher(
        "train", "tiny", "--set", "scorer.function=needs:graded", "--set", f"output.dir={tmp_path / 'run'}",
        cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: scorer.function: needs:graded requires 'solution', which no call passes; it may "
        "take prompts, responses, finish_reasons, completions, completion_ids and the data's columns (answer)"
    ]
    assert "model builtin:tiny" not in done.stderr and not (tmp_path / "run").exists()


def test_a_combine_part_that_needs_a_missing_column_is_named_before_the_model_loads(tmp_path):
    (tmp_path / "needs.py").write_text(
        "def graded(completions, solution, **kwargs):\n    return [0.0] * len(completions)\n"
    )
    combine = (
        "scorer={type: combine, parts: [{name: digits, scorer: {type: rule, function: "
        "'thresher.presets.rewards:digit_share'}}, {name: graded, scorer: {type: rule, function: 'needs:graded'}}]}"
    )
    done = thresher("train", "tiny", "--set", combine, "--set", f"output.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: scorer.parts[1].scorer.function: needs:graded requires 'solution', which no call passes"
    ), errors
    assert not (tmp_path / "run").exists()
