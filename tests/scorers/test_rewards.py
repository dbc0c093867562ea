"""Rewards the way users build them: composite scorers, per-prompt normalisation before selection,
each distinct response scored once — against independent arithmetic, through real runs."""

from __future__ import annotations

import json
import textwrap
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import thresher
from thresher.core.build import instantiate
from thresher.core.config import resolve_plugin_section
from thresher.core.normalize import normalize_within_prompts
from thresher.core.scoring import DedupScorer
from thresher.plugin import PartRewards, PluginContext, Prompt, Rollout, Section

REWARDS_MODULE = """
def correct(responses, answer):
    return [float(r.strip() == str(a)) for r, a in zip(responses, answer)]

def length(responses):
    return [float(len(r)) for r in responses]

def minus_length(responses):
    return [-float(len(r)) for r in responses]

def broken(responses):
    raise RuntimeError("the verifier is down")
"""


@pytest.fixture
def rewards_module(tmp_path, monkeypatch):
    (tmp_path / "parts_rewards.py").write_text(textwrap.dedent(REWARDS_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "parts_rewards"


def batch() -> list[Rollout]:
    """2 prompts × 4 responses: answers right and wrong, of several lengths (some repeated)."""
    texts = [["12", "12", "13", "twelve!"], ["7", "7 ", "8", "77777"]]
    answers = [12, 7]
    out = []
    for p, (group, answer) in enumerate(zip(texts, answers, strict=True)):
        prompt = Prompt(p, f"What is {answer}?", (5, 6), {"answer": answer})
        for s, text in enumerate(group):
            out.append(Rollout(prompt, p, s, [7 + len(text)], text, "eos"))
    return out


def build(registry, section: dict):
    spec = resolve_plugin_section("scorer", section, registry)
    return instantiate(registry, "scorer", spec, PluginContext(registry=registry))


def section(mode: str, module: str, **extra) -> dict:
    return {
        "type": "combine",
        "mode": mode,
        "parts": [
            {"name": "correct", "weight": 2.0, "scorer": {"type": "rule", "function": f"{module}:correct"}},
            {"name": "length", "weight": -0.5, "scorer": {"type": "rule", "function": f"{module}:length"}},
        ],
        **extra,
    }


@pytest.mark.parametrize("mode", ["sum", "product", "gate"])
def test_combined_rewards_are_the_parts_arithmetic(registry, rewards_module, mode):
    rollouts = batch()
    scorer = build(registry, section(mode, rewards_module, fail_reward=-100.0))
    result = scorer.score(rollouts)
    assert isinstance(result, PartRewards)
    correct = torch.tensor([float(r.text.strip() == str(r.prompt.extra["answer"])) for r in rollouts])
    length = torch.tensor([float(len(r.text)) for r in rollouts])
    torch.testing.assert_close(result.parts["correct"], correct)
    torch.testing.assert_close(result.parts["length"], length)
    weighted = 2.0 * correct - 0.5 * length
    expected = {
        "sum": weighted,
        "product": (2.0 * correct) * (-0.5 * length),
        "gate": torch.where(correct >= 0.5, weighted, torch.full_like(weighted, -100.0)),
    }[mode]
    torch.testing.assert_close(result.total, expected)


def test_the_gate_never_lets_a_fluent_wrong_answer_win(registry, rewards_module):
    """A short wrong answer beats a long right one on length; behind the verifier it cannot."""
    rollouts = batch()
    summed = build(registry, section("sum", rewards_module)).score(rollouts).total
    gated = build(registry, section("gate", rewards_module, fail_reward=-1000.0)).score(rollouts).total
    # prompt 1: "7" (right, 1 char) vs "8" (wrong, 1 char) vs "77777" (wrong, 5 chars)
    assert gated[4] > gated[6] and gated[4] > gated[7]
    right = [i for i, r in enumerate(rollouts) if r.text.strip() == str(r.prompt.extra["answer"])]
    wrong = [i for i in range(len(rollouts)) if i not in right]
    assert min(gated[i] for i in right) > max(gated[i] for i in wrong)
    assert summed[2] > summed[3]  # without the gate, the short wrong "13" beats the long wrong "twelve!"


def test_a_part_normalised_within_each_prompt(registry, rewards_module):
    config = section("sum", rewards_module)
    config["parts"][1]["normalize"] = "zscore"
    result = build(registry, config).score(batch())
    length = result.parts["length"].view(2, 4)
    z = (length - length.mean(dim=1, keepdim=True)) / length.std(dim=1, unbiased=False, keepdim=True)
    expected = 2.0 * result.parts["correct"].view(2, 4) - 0.5 * z
    torch.testing.assert_close(result.total.view(2, 4), expected)


def test_combine_config_mistakes_are_reported_with_their_paths(registry, rewards_module):
    from thresher.core.errors import ConfigError

    bad = section("gate", rewards_module)
    bad["parts"] = [bad["parts"][0], {**bad["parts"][0]}, {"name": "x", "scorer": {"type": "nope"}}]
    with pytest.raises(ConfigError) as caught:
        resolve_plugin_section("scorer", bad, registry)
    problems = "\n".join(caught.value.problems)
    assert "scorer.parts.2.scorer.type: unknown scorer 'nope'" in problems or "unknown scorer 'nope'" in problems


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    ("change", "problems"),
    [
        (lambda c: c["parts"][1].update(weight=NAN), ["scorer.parts[1].weight: must be a finite number (got nan)"]),
        (
            lambda c: c.update(gate_threshold=INF, fail_reward=-INF),
            [
                "scorer.gate_threshold: must be a finite number (got inf)",
                "scorer.fail_reward: must be a finite number (got -inf)",
            ],
        ),
        (
            lambda c: c["parts"][0].update(scorer={"type": "combine", "parts": [{**c["parts"][0], "weight": -INF}]}),
            ["scorer.parts[0].scorer.parts[0].weight: must be a finite number (got -inf)"],
        ),
        (
            lambda c: c["parts"].extend(
                [
                    {"name": "x", "scorer": {"type": "rule", "function": "no_module_here_xyz:f"}},
                    {"name": "y", "scorer": {"type": "nope"}},
                ]
            ),
            [
                "scorer.parts[2].scorer.function: cannot import module 'no_module_here_xyz' (No module named "
                "'no_module_here_xyz') (got 'no_module_here_xyz:f')",
                "scorer.parts[3].scorer.type: unknown scorer 'nope'; available: combine, local, rule, triton",
            ],
        ),
    ],
)
def test_combine_numbers_must_be_finite_and_each_part_is_named_by_its_place(registry, rewards_module, change, problems):
    """A NaN weight used to pass validation and fail the first step as the scorer's fault (exit 3); a
    part's scorer problem was named ``scorer.scorer.…`` whichever part it was."""
    from thresher.core.errors import ConfigError

    config = section("gate", rewards_module)
    change(config)
    with pytest.raises(ConfigError) as caught:
        resolve_plugin_section("scorer", config, registry)
    assert caught.value.problems == problems


def test_a_nan_weight_is_exit_2_before_anything_runs(tiny_config, write_config, cli, rewards_module):
    tiny_config["scorer"] = section("sum", rewards_module)
    tiny_config["scorer"]["parts"][0]["weight"] = NAN
    path = write_config(tiny_config)
    for args in (("config", "validate", path), ("train", path, "-q")):
        result = cli(*args)
        assert result.exit_code == 2, result.output
        assert "error: scorer.parts[0].weight: must be a finite number (got nan)" in result.output
    assert not Path(tiny_config["output"]["dir"]).exists()


class SlowRemote:
    """A remote-like scorer: each call waits until all three parts' calls have started (or 30 s
    pass), so the parts can only finish quickly when they are called concurrently."""

    name = "slow_remote"
    remote = True
    started = threading.Barrier(3)
    calls: ClassVar[list[str]] = []

    class Config(Section):
        value: float = 1.0

    def __init__(self, config, context=None):
        self.config = config

    def score(self, rollouts):
        try:
            SlowRemote.started.wait(timeout=30)
            SlowRemote.calls.append("together")
        except threading.BrokenBarrierError:
            SlowRemote.calls.append("alone")
        return torch.full((len(rollouts),), self.config.value)

    def close(self):
        pass


def test_remote_parts_are_called_concurrently(registry):
    thresher.register(SlowRemote)
    try:
        from thresher.core.registry import build_registry

        fresh = build_registry()
        parts = [{"name": f"p{i}", "scorer": {"type": "slow_remote", "value": float(i)}} for i in range(3)]
        scorer = build(fresh, {"type": "combine", "parts": parts})
        SlowRemote.started.reset()
        SlowRemote.calls.clear()
        result = scorer.score(batch())
        scorer.close()
    finally:
        thresher.unregister(SlowRemote)
    # Called one after another, the first call would wait at the barrier alone and time out: the three
    # met there, so they ran at the same time (whatever the machine's load).
    assert SlowRemote.calls == ["together"] * 3
    torch.testing.assert_close(result.total, torch.full((8,), 0.0 + 1.0 + 2.0))
    assert scorer.remote  # so the loop overlaps it with generation by default


def test_normalisation_within_prompts_handles_ties_and_equal_groups():
    rewards = torch.tensor([[1.0, 2.0, 2.0, 4.0], [3.0, 3.0, 3.0, 3.0], [5.0, 0.0, 1.0, 9.0]])
    valid = torch.tensor([[True] * 4, [True] * 4, [True, False, True, False]])
    z = normalize_within_prompts(rewards, valid, "zscore")
    torch.testing.assert_close(z[0], (rewards[0] - 2.25) / rewards[0].std(unbiased=False))
    assert z[1].tolist() == [0.0] * 4  # zero variance: nobody is better
    torch.testing.assert_close(z[2][valid[2]], torch.tensor([1.0, -1.0]))
    rank = normalize_within_prompts(rewards, valid, "rank")
    assert rank[0].tolist() == [0.0, 0.5, 0.5, 1.0]  # the tied pair shares the middle of places 1 and 2
    assert rank[1].tolist() == [0.5] * 4
    assert rank[2][valid[2]].tolist() == [1.0, 0.0]
    assert normalize_within_prompts(rewards, valid, "none") is rewards


def test_global_selection_on_normalised_rewards_picks_each_prompts_best(tmp_path, tiny_config, write_config, cli):
    """On raw rewards a global top fraction takes an easy prompt's mediocre answers; normalised, each
    prompt's best comes first. The raw rewards stay in the records."""
    tiny_config["selector"] = {"type": "global_top_fraction", "fraction": 0.25, "normalize": "rank"}
    tiny_config["rs"].update(max_steps=1)
    tiny_config["data"]["validation"] = None
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    rows = [json.loads(x) for x in (Path(tiny_config["output"]["dir"]) / "rollouts" / "step_1.jsonl").open()]
    for row in (r for r in rows if r["kept"]):
        group = [r["reward"] for r in rows if r["group"] == row["group"]]
        assert row["reward"] == max(group)  # rank 1.0 within its prompt (or tied for it)


class Counting:
    """A deterministic scorer that counts what it is asked to score."""

    name = "counting"
    rollouts_seen = 0

    class Config(Section):
        pass

    def __init__(self, config=None, context=None):
        pass

    def score(self, rollouts):
        type(self).rollouts_seen += len(rollouts)
        return torch.tensor([float(len(r.text)) + 0.1 * r.prompt.index for r in rollouts])

    def close(self):
        pass


def test_each_distinct_response_is_scored_once_and_the_cache_returns_what_scoring_returns():
    rollouts = batch()  # "12" twice for prompt 0, "7" and "7 " differ in text
    Counting.rollouts_seen = 0
    plain = Counting().score(rollouts)
    assert Counting.rollouts_seen == 8
    Counting.rollouts_seen = 0
    deduped = DedupScorer(Counting())
    torch.testing.assert_close(deduped.score(rollouts), plain)
    assert Counting.rollouts_seen == 7 and deduped.metrics()["cache_hits"] == 1
    cached = DedupScorer(Counting(), cache_size=4)
    Counting.rollouts_seen = 0
    torch.testing.assert_close(cached.score(rollouts), plain)
    torch.testing.assert_close(cached.score(rollouts[4:]), plain[4:])  # the 4 most recent are remembered
    assert Counting.rollouts_seen == 7
    assert cached.metrics()["cache_hits"] == 1 + 4


def test_a_run_records_every_part_and_the_step_compares_them(tmp_path, tiny_config, write_config, cli, rewards_module):
    tiny_config["scorer"] = {
        "type": "combine",
        "parts": [
            {"name": "digits", "scorer": {"type": "rule", "function": "thresher.presets.rewards:digit_share"}},
            {"name": "short", "weight": 0.01, "scorer": {"type": "rule", "function": f"{rewards_module}:minus_length"}},
        ],
        "cache": {"size": 1000},
    }
    tiny_config["rs"].update(max_steps=2)
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    run = Path(tiny_config["output"]["dir"])
    rows = [json.loads(x) for x in (run / "rollouts" / "step_2.jsonl").open()]
    for row in rows:
        assert row["reward"] == pytest.approx(row["rewards"]["digits"] + 0.01 * row["rewards"]["short"], abs=1e-6)
    record = next(
        m for m in map(json.loads, (run / "metrics.jsonl").open()) if m.get("step") == 2 and m["kind"] == "train"
    )
    digits = torch.tensor([r["rewards"]["digits"] for r in rows], dtype=torch.float64)
    short = torch.tensor([r["rewards"]["short"] for r in rows], dtype=torch.float64)
    kept = torch.tensor([r["kept"] for r in rows])
    assert record["reward_part_digits_mean"] == pytest.approx(float(digits.mean()), abs=1e-6)
    assert record["reward_part_short_kept_mean"] == pytest.approx(float(short[kept].mean()), abs=1e-5)
    assert record["reward_corr_digits_short"] == pytest.approx(
        float(torch.corrcoef(torch.stack([digits, short]))[0, 1]), abs=1e-5
    )
    assert "scorer_cache_hits" in record


def test_a_failing_part_fails_the_step_with_the_rollouts_saved(
    tmp_path, tiny_config, write_config, cli, rewards_module
):
    tiny_config["scorer"] = {
        "type": "combine",
        "mode": "gate",
        "parts": [
            {"name": "verifier", "scorer": {"type": "rule", "function": f"{rewards_module}:broken"}},
            {"name": "digits", "scorer": {"type": "rule", "function": "thresher.presets.rewards:digit_share"}},
        ],
    }
    tiny_config["data"]["validation"] = None
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 3
    assert "raised RuntimeError: the verifier is down" in result.output
    rows = (Path(tiny_config["output"]["dir"]) / "rollouts" / "step_1.jsonl").read_text().splitlines()
    assert len(rows) == 16 and all(json.loads(r)["reward"] is None for r in rows)
