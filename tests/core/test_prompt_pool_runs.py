"""The prompt pool in real runs (issue 24, part 2): a dry pool ends the run cleanly without losing a
kept rollout; a SIGKILLed run with the pool, by_pass_rate and until_accepted resumes to the same
run; two ranks make the same choices as one process; a budget that cannot work is one line."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.core.test_reliability import assert_same_run, make_config, thresher
from tests.helpers import assert_same_rollouts_and_weights, read_jsonl

# solved: every response earns 1; hopeless: every response earns 0.3 (continuous, zero variance,
# under pass_reward); mixed: 1 or 0 by the response's digit count, so groups differ
REWARDS = """
def by_kind(responses, kind):
    out = []
    for response, k in zip(responses, kind):
        if k == "solved":
            out.append(1.0)
        elif k == "hopeless":
            out.append(0.3)
        else:
            out.append(float(sum(c.isdigit() for c in response) % 2))
    return out
"""


def pool_config(tmp: Path, name: str, kinds: list[str], pool: dict, **rs) -> tuple[Path, dict[str, str]]:
    (tmp / "pool_rewards.py").write_text(REWARDS)
    rows = [{"prompt": f"{i} + {i} =", "kind": kind} for i, kind in enumerate(kinds)]
    (tmp / "prompts.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    path = make_config(tmp, name, prompt_pool=pool, **rs)
    config = yaml.safe_load(path.read_text())
    config["data"]["train"] = config["data"]["validation"] = str(tmp / "prompts.jsonl")
    config["scorer"] = {"type": "rule", "function": "pool_rewards:by_kind"}
    config["selector"] = {"type": "topk", "top_n_rollouts": 1, "min_reward": 0.5}
    path.write_text(yaml.safe_dump(config))
    return path, {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp), os.environ.get("PYTHONPATH")]))}


def records(run: Path, kind: str = "train") -> list[dict]:
    return [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == kind]


def test_a_dry_pool_ends_the_run_cleanly_and_trains_every_kept_rollout(tmp_path):
    """Six prompts every response solves, skipped after one visit, never revisited: step 1 takes four,
    step 2 the last two and (epoch 1, where the first four rest) those two again; then nothing is
    left. The run stops early with a reason, exit 0, the final model saved, every kept rollout trained."""
    path, env = pool_config(tmp_path, "run", ["solved"] * 6, {"skip_solved_after": 1}, max_steps=5)
    config = yaml.safe_load(path.read_text())
    config["data"]["shuffle"] = False  # prompts in file order: 0-3, then 4, 5 and (epoch 1) 4, 5
    path.write_text(yaml.safe_dump(config))
    done = thresher("train", path, "-q", env=env)
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    steps = records(run)
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[1]["prompts_skipped_solved"] == 4 and steps[0]["prompts_skipped_solved"] == 0
    assert steps[1]["prompts_resting_solved"] == 6
    (stop,) = records(run, "stop")
    assert stop["step"] == 2 and "every training prompt rests" in stop["reason"]
    assert [r["step"] for r in records(run, "validation")] == [0, 2]  # the last step is validated
    assert (run / "checkpoints" / "step_2").is_dir()
    for record in steps:
        rows = read_jsonl(run / "rollouts" / f"step_{record['step']}.jsonl")
        assert sum(r["kept"] for r in rows) == record["kept"] == 4  # top-1 of each of 4 prompts
        assert record["skipped"] is None and record["train_tokens"] > 0  # trained, nothing dropped
    second = [r["prompt_index"] for r in read_jsonl(run / "rollouts" / "step_2.jsonl") if r["kept"]]
    assert second == [4, 5, 4, 5]
    assert (run / "final" / "model.safetensors").exists()


POOL = {
    "skip_solved_after": 1,
    "skip_hopeless_after": 2,
    "revisit_every": 2,
    "allocate": "by_pass_rate",
    "min_rollouts": 2,
    "max_rollouts": 6,
}
KINDS = ["solved", "hopeless", "mixed"] * 2


def allocation_follows_pass_rates(rows: list[dict], counts: list[int], last_rate: dict[int, float]) -> int:
    """For p̂ >= 1/2, a likelier pass adds less at every count, so a prompt with a higher last pass
    rate never gets more responses than one with a lower; the number of strict cases seen."""
    rate = {r["group"]: last_rate.get(r["prompt_index"], 0.5) for r in rows}
    strict = 0
    for g, p_g in rate.items():
        for h, p_h in rate.items():
            if p_g > p_h >= 0.5:
                assert counts[g] <= counts[h], (rate, counts)
                strict += counts[g] < counts[h]
    return strict


@pytest.fixture(scope="module")
def pooled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pooled")
    path, env = pool_config(tmp, "run", KINDS, POOL, prompts_per_step=3)
    done = thresher("train", path, "-q", env=env)
    assert done.returncode == 0, done.stderr
    return tmp / "run"


def test_the_pool_rests_solved_and_hopeless_prompts_and_shares_the_budget_by_pass_rate(pooled):
    steps = records(pooled)
    last_rate: dict[int, float] = {}  # prompt → its pass rate at the last visit, smoothed
    ordered = 0
    assert sum(r["prompts_skipped_solved"] for r in steps) > 0
    assert sum(r["prompts_skipped_hopeless"] for r in steps) > 0
    for record in steps:
        rows = read_jsonl(pooled / "rollouts" / f"step_{record['step']}.jsonl")
        counts = [sum(r["group"] == g for r in rows) for g in range(record["prompts"])]
        assert sum(counts) == record["prompts"] * 4  # the step's budget: prompts × N, shared out
        assert min(counts) == record["rollouts_allocated_min"] and max(counts) == record["rollouts_allocated_max"]
        assert all(2 <= c <= 6 for c in counts)
        ordered += allocation_follows_pass_rates(rows, counts, last_rate)
        for r in rows:  # this visit is each prompt's last one for the steps that follow
            group = [x for x in rows if x["group"] == r["group"]]
            passes = sum(x["reward"] >= 0.5 for x in group)
            last_rate[r["prompt_index"]] = (passes + 0.5) / (len(group) + 1)
    assert ordered > 0  # some step gave a likelier prompt strictly fewer responses
    assert any(r["rollouts_allocated_max"] > r["rollouts_allocated_min"] for r in steps)


def test_a_killed_run_with_the_pool_resumes_to_the_same_run(tmp_path, pooled):
    path, env = pool_config(tmp_path, "run", KINDS, POOL, prompts_per_step=3)
    killed = thresher("train", path, "-q", env={**env, "THRESHER_FAILPOINT": "train@3"})
    assert killed.returncode == -signal.SIGKILL
    resumed = thresher("train", path, "--resume", env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "run", pooled)


def test_two_ranks_rest_and_allocate_as_one_process(tmp_path):
    """Greedy decoding (the same responses on any rank) and until_accepted rounds: the skipped prompts,
    the allocations, the rollouts and the update of 2 ranks equal one process's."""
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc", "2"])):
        path, env = pool_config(
            tmp_path, name, KINDS, POOL, prompts_per_step=4, max_steps=4,
            sampling={"mode": "until_accepted", "round_size": 2, "max_rollouts": 4},
        )  # fmt: skip
        config = yaml.safe_load(path.read_text())
        config["generator"]["temperature"] = 0.0
        path.write_text(yaml.safe_dump(config))
        done = thresher("train", path, "-q", *extra, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = tmp_path / name
    one, two = records(runs["one"]), records(runs["two"])
    keys = ("prompts_skipped_solved", "prompts_skipped_hopeless", "rollouts_allocated_max", "sampling_rounds")
    assert [[r[k] for k in keys] for r in one] == [[r[k] for k in keys] for r in two]
    assert sum(r["prompts_skipped_solved"] + r["prompts_skipped_hopeless"] for r in one) > 0
    assert_same_rollouts_and_weights(runs["one"], runs["two"], steps=4)


def test_a_budget_that_cannot_be_shared_is_refused_in_one_line(tmp_path):
    path = make_config(tmp_path, "run", prompt_pool={"allocate": "by_pass_rate", "min_rollouts": 5})
    done = thresher("train", path, "--dry-run")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "rs.prompt_pool.min_rollouts (5) must be at most the responses per prompt of a step (4)" in done.stderr


def test_a_generated_token_budget_ends_the_run_after_the_step_that_spends_it(tmp_path):
    """rs.max_generated_tokens: the run stops after the first step whose running total reaches the
    budget — validated, checkpointed and saved as a last step is — and not a step later."""
    path = make_config(tmp_path, "run", max_steps=10, max_generated_tokens=300, val_every=0)
    done = thresher("train", path, "-q")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    steps = records(run)
    totals = [sum(r["generated_tokens"] for r in steps[: i + 1]) for i in range(len(steps))]
    assert totals[-1] >= 300 and all(total < 300 for total in totals[:-1])
    last = steps[-1]["step"]
    assert last < 10
    assert [r["step"] for r in records(run, "validation")] == [0, last]
    assert (run / "checkpoints" / f"step_{last}").is_dir() and (run / "final" / "model.safetensors").exists()
