"""`rule` and `local` scorers: what they pass, what they return, and how they fail."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from tests.helpers import save_classifier
from thresher.core.config.resolve import resolve_plugin_section
from thresher.core.errors import ConfigError, ScorerError
from thresher.core.registry import build_registry
from thresher.core.types import Prompt, Rollout
from thresher.scorers.local import LocalRewardModelScorer
from thresher.scorers.rules import RuleScorer

CALLS: list[dict] = []


def record_everything(**kwargs):
    CALLS.append(kwargs)
    return [len(r) + a for r, a in zip(kwargs["responses"], kwargs["answer"], strict=True)]


def only_responses(responses):
    return [float(len(responses))] * len(responses)


def wrong_length(responses):
    return [1.0]


def not_numbers(responses):
    return ["good"] * len(responses)


def explodes(responses):
    raise KeyError("reference")


def rollouts(texts_and_answers, finish="eos") -> list[Rollout]:
    out = []
    for i, (text, answer) in enumerate(texts_and_answers):
        prompt = Prompt(i, f"Q{i}:", (5, 6), {"answer": answer} if answer is not None else {})
        out.append(Rollout(prompt, i, 0, [7, 8], text, finish))
    return out


def rule(function: str, **options) -> RuleScorer:
    return RuleScorer(RuleScorer.Config(function=f"{__name__}:{function}", **options))


def test_rule_receives_texts_extra_fields_and_finish_reasons_in_batches():
    CALLS.clear()
    batch = rollouts([("abc", 1), ("", 2), ("hello", 3)], finish="length")
    rewards = rule("record_everything", batch_size=2).score(batch)
    assert rewards.dtype == torch.float32
    assert rewards.tolist() == [4.0, 2.0, 8.0]
    assert len(CALLS) == 2  # batches of 2 and 1
    assert CALLS[0]["prompts"] == ["Q0:", "Q1:"] and CALLS[0]["responses"] == ["abc", ""]
    assert CALLS[0]["finish_reasons"] == ["length", "length"]
    assert CALLS[0]["answer"] == [1, 2] and CALLS[1]["answer"] == [3]


def test_rule_gets_none_for_a_field_some_rows_lack():
    CALLS.clear()
    batch = rollouts([("abc", 1), ("hello", None)])
    with pytest.raises(ScorerError, match="raised TypeError"):  # len(r) + None: the function's own bug
        rule("record_everything", batch_size=1).score(batch)
    assert CALLS[-1]["answer"] == [None]


def test_rule_passes_only_declared_arguments():
    assert rule("only_responses").score(rollouts([("a", 1), ("b", 2)])).tolist() == [2.0, 2.0]


def test_rule_from_a_python_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text("def shout(responses):\n    return [float(r.isupper()) for r in responses]\n")
    scorer = RuleScorer(RuleScorer.Config(function=f"{path}:shout"))
    assert scorer.score(rollouts([("YES", None), ("no", None)])).tolist() == [1.0, 0.0]


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("wrong_length", r"reward function '.*:wrong_length' returned 1 rewards for 2 responses"),
        ("not_numbers", r"reward function '.*:not_numbers' returned a non-number at position 0: 'good'"),
        ("explodes", r"reward function '.*:explodes' raised KeyError: 'reference'"),
    ],
)
def test_rule_failures_are_one_line_scorer_errors(function, message):
    with pytest.raises(ScorerError, match=message):
        rule(function).score(rollouts([("a", 1), ("b", 2)]))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:f", "scorer.function: cannot import module 'no_such_module_xyz'"),
        (f"{__name__}:missing", f"scorer.function: module '{__name__}' has no attribute 'missing'"),
        (f"{__name__}:CALLS", "is not callable"),
        ("/nowhere/r.py:f", "scorer.function: file '/nowhere/r.py' not found"),
    ],
)
def test_rule_bad_function_spec_is_a_config_error(spec, message):
    """Found when the config is validated, before any model is loaded."""
    with pytest.raises(ConfigError) as err:
        resolve_plugin_section("scorer", {"type": "rule", "function": spec}, build_registry())
    [line] = err.value.problems
    assert line.startswith("scorer.function: ") and message.removeprefix("scorer.function: ") in line


def test_builtin_addition_reward():
    from thresher.presets.rewards import addition_correct

    responses = ["12", "7 + 5 = 12", "12.", "The answer is 13", "12 and then 14", "12"]
    reasons = ["eos", "eos", "stop", "eos", "eos", "length"]
    assert addition_correct(responses, [12] * 6, reasons) == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]


@pytest.fixture
def reward_model_dir(tmp_path, tiny_tokenizer):
    path = tmp_path / "rm"
    return path, save_classifier(path, tiny_tokenizer, num_labels=1)


def test_local_scorer_matches_the_model_run_on_each_text_alone(reward_model_dir):
    path, model = reward_model_dir
    batch = rollouts([("short", None), ("a much longer response text", None), ("mid length", None)])
    scorer = LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(path), batch_size=2))
    got = scorer.score(batch)
    model.eval()
    with torch.no_grad():
        expected = []
        for r in batch:
            ids = scorer.tokenizer(r.prompt.text + r.text, return_tensors="pt")["input_ids"]
            expected.append(model(input_ids=ids).logits[0, 0].item())
    torch.testing.assert_close(got, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert len(set(got.tolist())) == 3


def test_local_scorer_rejects_a_model_that_is_not_a_reward_model(tmp_path, tiny_tokenizer):
    save_classifier(tmp_path / "clf", tiny_tokenizer, num_labels=3)
    with pytest.raises(ConfigError, match="is not a reward model: it has 3 labels, expected 1"):
        LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(tmp_path / "clf")))
    with pytest.raises(ConfigError, match="is not a model directory"):
        LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(tmp_path / "nothing")))


def test_rule_module_imports_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "cwd_rewards.py").write_text(textwrap.dedent("def one(responses):\n    return [1] * len(responses)\n"))
    monkeypatch.syspath_prepend(str(tmp_path))
    scorer = RuleScorer(RuleScorer.Config(function="cwd_rewards:one"))
    assert scorer.score(rollouts([("x", None)])).tolist() == [1.0]
    sys.modules.pop("cwd_rewards", None)


@pytest.mark.parametrize(
    ("section", "problems"),
    [
        (
            {"type": "rule", "function": f"{__name__}:only_responses", "batch_size": float("nan")},
            ["scorer.batch_size: Input should be a finite number (got nan)"],
        ),
        (
            {"type": "local", "path": "rm", "batch_size": 0, "max_length": float("inf")},
            [
                "scorer.batch_size: Input should be greater than or equal to 1 (got 0)",
                "scorer.max_length: Input should be a finite number (got inf)",
            ],
        ),
    ],
)
def test_rule_and_local_numbers_are_checked_when_the_config_is(section, problems):
    with pytest.raises(ConfigError) as err:
        resolve_plugin_section("scorer", section, build_registry())
    assert err.value.problems == problems


def test_a_truncated_reward_model_is_one_line_naming_the_file(reward_model_dir):
    """It used to be safetensors' traceback, which names no file."""
    path, _ = reward_model_dir
    weights = path / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(100)
    with pytest.raises(ConfigError) as err:
        LocalRewardModelScorer(LocalRewardModelScorer.Config(path=str(path)))
    assert err.value.problems == [
        f"scorer.path: {weights} is damaged or truncated (Error while deserializing header: invalid header length); "
        "copy or download it again"
    ]
