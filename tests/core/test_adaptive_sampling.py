"""Sampling until accepted (issue 24): rounds per prompt, ragged groups, what the selector keeps,
the cost figures, exact resume after SIGKILL, and two ranks agreeing on who leaves a round."""

from __future__ import annotations

import math
import signal

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.core.test_reliability import assert_same_run, make_config, thresher
from tests.helpers import MEASURED, assert_same_rollouts_and_weights, read_jsonl
from thresher.core.run.records import ScoredStep, step_statistics
from thresher.core.types import Prompt, Rollout
from thresher.selectors.topk import TopKSelector

UNTIL_ACCEPTED = {"mode": "until_accepted", "min_accepted": 1, "round_size": 2, "max_rollouts": 6}
# digit_share rewards are graded: a threshold keeps a few, so some prompts leave early and others not
SELECTOR = {"type": "topk", "top_n_rollouts": 1, "min_reward": 0.3}


def adaptive_config(tmp, name, **rs):
    path = make_config(tmp, name, sampling=UNTIL_ACCEPTED, **rs)
    config = yaml.safe_load(path.read_text())
    config["selector"] = SELECTOR
    path.write_text(yaml.safe_dump(config))
    return path


def train_records(run) -> list[dict]:
    return [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]


@pytest.fixture(scope="module")
def adaptive(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("adaptive")
    done = thresher("train", adaptive_config(tmp, "run"), "-q")
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def test_prompts_leave_once_accepted_and_the_rest_sample_up_to_the_maximum(adaptive):
    records = train_records(adaptive)
    ragged = False
    for record in records:
        rows = read_jsonl(adaptive / "rollouts" / f"step_{record['step']}.jsonl")
        assert len(rows) == record["rollouts"]
        for group in range(4):
            mine = sorted((r for r in rows if r["group"] == group), key=lambda r: r["sample"])
            assert [r["sample"] for r in mine] == list(range(len(mine)))
            kept = [r["sample"] for r in mine if r["kept"]]
            rounds = len(mine) // 2
            # a prompt stops at the end of the first round in which something was kept, else at 6
            first_kept_round = min((s // 2 + 1 for s in kept), default=None)
            assert rounds == (first_kept_round if first_kept_round is not None else 3), (record["step"], group)
            assert len(kept) <= 1  # top-1 per prompt
            valid = [r["reward"] for r in mine]
            assert mine[0]["prompt_reward_mean"] == pytest.approx(sum(valid) / len(valid))
        ragged |= len({sum(r["group"] == g for r in rows) for g in range(4)}) > 1
        assert record["sampling_rounds"] == max(len([r for r in rows if r["group"] == g]) // 2 for g in range(4))
        assert record["prompts_accepted"] == len({r["group"] for r in rows if r["kept"]})
        kept_tokens = sum(len(r["response_ids"]) for r in rows if r["kept"])
        generated = sum(len(r["response_ids"]) for r in rows)
        assert record["generated_tokens"] == generated and record["kept_tokens"] == kept_tokens
        if kept_tokens:
            assert record["generated_tokens_per_kept_token"] == pytest.approx(generated / kept_tokens)
            assert record["rollouts_per_kept"] == pytest.approx(len(rows) / record["kept"])
    assert ragged  # the run really had prompts with different counts
    assert any(r["kept"] for r in records)


def test_one_round_of_n_is_the_fixed_mode_exactly(tmp_path):
    """A round as large as N and as max_rollouts: one round whatever is accepted, the same rollouts
    and update as rs.sampling.mode: fixed (whose seeds, and so results, round 1 shares)."""
    fixed = make_config(tmp_path, "fixed", max_steps=2)
    one_round = make_config(
        tmp_path, "one_round", max_steps=2,
        sampling={"mode": "until_accepted", "min_accepted": 1, "round_size": 4, "max_rollouts": 4},
    )  # fmt: skip
    for path in (fixed, one_round):
        done = thresher("train", path, "-q")
        assert done.returncode == 0, done.stderr
    a, b = train_records(tmp_path / "fixed"), train_records(tmp_path / "one_round")
    for x, y in zip(a, b, strict=True):
        assert y.pop("sampling_rounds") == 1 and "prompts_accepted" in y and y.pop("prompts_accepted") >= 0
        assert {k: v for k, v in x.items() if not k.startswith(MEASURED)} == {
            k: v for k, v in y.items() if not k.startswith(MEASURED)
        }
    for step in (1, 2):
        assert read_jsonl(tmp_path / "fixed" / "rollouts" / f"step_{step}.jsonl") == read_jsonl(
            tmp_path / "one_round" / "rollouts" / f"step_{step}.jsonl"
        )
    weights = [load_file(tmp_path / run / "final" / "model.safetensors") for run in ("fixed", "one_round")]
    for name, tensor in weights[0].items():
        assert torch.equal(weights[1][name], tensor)


def ragged_step(rewards: list[list[float]]) -> tuple[list[Rollout], torch.Tensor, torch.Tensor]:
    width = max(len(row) for row in rewards)
    grid = torch.full((len(rewards), width), float("nan"))
    present = torch.zeros((len(rewards), width), dtype=torch.bool)
    rollouts = []
    for p, row in enumerate(rewards):
        grid[p, : len(row)] = torch.tensor(row)
        present[p, : len(row)] = True
        prompt = Prompt(p, f"p{p}", (1,))
        rollouts += [Rollout(prompt, p, s, [5 + s, 2], f"r{p}.{s}", "eos") for s in range(len(row))]
    return rollouts, grid, present


def test_a_ragged_selection_keeps_exactly_what_the_selector_says_of_the_present_rollouts():
    """top-2 with a floor, on prompts with 2, 6 and 4 rollouts: per prompt, the two best present ones
    at or above the floor; a missing cell is never kept, and the statistics count only present ones."""
    from thresher.core.config import load_config
    from thresher.core.registry import build_registry
    from thresher.core.sampling import Sampler

    rewards = [[0.9, 0.1], [0.2, 0.8, 0.5, 0.7, 0.1, 0.0], [0.0, 0.0, 0.6, 0.0]]
    rollouts, grid, present = ragged_step(rewards)
    config = load_config("tiny", ["selector.top_n_rollouts=2", "selector.min_reward=0.15"], build_registry())
    selector = TopKSelector(TopKSelector.Config(top_n_rollouts=2, min_reward=0.15))
    sampler = Sampler(config, type("P", (), {"selector": selector})(), None, None, None)  # type: ignore[arg-type]
    scored = sampler.select(rollouts, grid, 1, {"time_generate": 1.0}, lambda *a: None, {}, present)
    expected = []
    for row in rewards:  # independent: sort each prompt's present rewards
        best = sorted(range(len(row)), key=lambda s: -row[s])[:2]
        expected.append({s for s in best if row[s] >= 0.15})
    assert [set(torch.nonzero(k).flatten().tolist()) for k in scored.kept] == expected
    assert not bool((scored.kept & ~present).any())
    stats = step_statistics(ScoredStep(rollouts, grid, scored.valid, scored.kept, present=present))
    assert stats["rollouts"] == 12 and stats["kept"] == 4
    assert stats["nonfinite_rewards"] == 0  # the 6 missing cells are not rewards the scorer got wrong
    assert stats["accept_rate"] == pytest.approx(4 / 12)
    flat = [v for row in rewards for v in row]
    assert stats["reward_mean"] == pytest.approx(sum(flat) / len(flat))
    assert math.isfinite(stats["generated_tokens_per_kept_token"])


def test_a_killed_adaptive_run_resumes_to_the_same_run(tmp_path, adaptive):
    config = adaptive_config(tmp_path, "run")
    killed = thresher("train", config, "-q", env={"THRESHER_FAILPOINT": "train@3"})
    assert killed.returncode == -signal.SIGKILL
    resumed = thresher("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "run", adaptive)


def test_two_ranks_agree_on_who_leaves_and_match_one_process(tmp_path):
    """Greedy decoding (the same samples on any rank): the rounds, the ragged groups and the update
    of 2 ranks equal one process's."""
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        path = adaptive_config(tmp_path, name, max_steps=2)
        config = yaml.safe_load(path.read_text())
        config["generator"]["temperature"] = 0.0
        config["selector"] = {"type": "global_top_fraction", "fraction": 0.3}  # reads the whole step
        path.write_text(yaml.safe_dump(config))
        done = thresher("train", path, "-q", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = tmp_path / name
    one, two = train_records(runs["one"]), train_records(runs["two"])
    assert [r["rollouts"] for r in one] == [r["rollouts"] for r in two]
    assert [r["sampling_rounds"] for r in one] == [r["sampling_rounds"] for r in two]
    assert_same_rollouts_and_weights(runs["one"], runs["two"], steps=2)


def test_a_round_larger_than_n_is_refused_in_one_line(tmp_path):
    path = make_config(tmp_path, "run", sampling={"mode": "until_accepted", "round_size": 5})
    done = thresher("train", path, "--dry-run")
    assert done.returncode != 0
    assert "rs.sampling.round_size (5) must be at most rs.num_rollouts_per_prompt (4)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_target_the_selector_can_never_reach_is_refused_in_one_line(tmp_path):
    path = make_config(tmp_path, "run", sampling={"mode": "until_accepted", "min_accepted": 2})  # tiny: top-1
    done = thresher("train", path, "--dry-run")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "rs.sampling.min_accepted (2) is more than selector.top_n_rollouts (1) keeps per prompt" in done.stderr
