"""The learning yardstick: the `arithmetic` preset's prompt files, validation per prompt group, and
``benchmarks/learning.py``'s plumbing end to end on the tiny model (every trainer, TRL where
installed, and the one evaluator agreeing with a run's own final validation)."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from tests.helpers import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
PRESETS = ROOT / "thresher" / "presets"


def test_the_arithmetic_files_are_what_the_seeded_script_writes(tmp_path):
    done = subprocess.run(
        [sys.executable, ROOT / "scripts" / "make_arithmetic.py", "--out-dir", tmp_path], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    for split in ("train", "val"):
        name = f"arithmetic_{split}.jsonl"
        assert (tmp_path / name).read_text() == (PRESETS / name).read_text()


def test_arithmetic_problems_are_right_distinct_and_balanced(tmp_path):
    train, val = (read_jsonl(PRESETS / f"arithmetic_{split}.jsonl") for split in ("train", "val"))
    pattern = re.compile(r"What is (\d+) ([-+*]) (\d+)\? Answer with just the number\.")
    for row in train + val:
        a, op, b = pattern.fullmatch(row["prompt"]).groups()
        assert row["answer"] == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert len({r["prompt"] for r in train + val}) == len(train) + len(val)  # no problem twice, nor in both
    per_level = Counter(r["level"] for r in val)
    assert len(val) >= 128 and len(set(per_level.values())) == 1, per_level
    levels = "add1,sub1,add2,sub2,mul2"  # mul1 has 64 problems in all: no room for more training ones
    bigger = subprocess.run(
        [sys.executable, ROOT / "scripts" / "make_arithmetic.py", "--out-dir", tmp_path, "--train", "55",
         "--levels", levels],
        capture_output=True, text=True,
    )  # fmt: skip
    assert bigger.returncode == 0, bigger.stderr
    # more training problems, fewer levels: the same held-out problems for the levels kept
    assert read_jsonl(tmp_path / "arithmetic_val.jsonl") == [r for r in val if r["level"] in levels.split(",")]
    assert [r["level"] for r in val[:6]] == ["add1", "sub1", "mul1", "add2", "sub2", "mul2"]  # balanced prefixes


def test_validation_reports_the_mean_reward_of_each_group(tmp_path, tiny_config, write_config, cli):
    prompts = tmp_path / "val.jsonl"
    rows = [{"prompt": f"What is {i} + {i}?", "answer": 2 * i, "level": "low" if i < 4 else "high/2"} for i in range(6)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tiny_config["data"].update(validation=str(prompts), group_field="level")
    tiny_config["rs"].update(max_steps=1, val_max_prompts=None, val_sampled=False)
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    metrics = read_jsonl(Path(tiny_config["output"]["dir"]) / "metrics.jsonl")
    validations = [r for r in metrics if r["kind"] == "validation"]
    assert [r["step"] for r in validations] == [0, 1]
    for record in validations:
        low, high = record["val_reward_greedy_level_low"], record["val_reward_greedy_level_high_2"]
        assert record["val_reward_greedy"] == pytest.approx((4 * low + 2 * high) / 6, abs=1e-6)


@pytest.mark.parametrize("with_trl", [False, True], ids=["thresher trainers", "trl"])
def test_the_learning_benchmark_runs_end_to_end_and_its_evaluator_agrees_with_the_run(tmp_path, with_trl):
    if with_trl and importlib.util.find_spec("trl") is None:
        pytest.skip("TRL is not installed (pip install -e '.[bench]')")
    trainers = "trl" if with_trl else "thresher,random"
    reward = tmp_path / "varied.py"  # graded and rarely 0, so agreeing scores are not agreeing zeros
    reward.write_text("def reward(responses):\n    return [len(set(r)) / (1 + len(r)) for r in responses]\n")
    command = [
        sys.executable, ROOT / "benchmarks" / "learning.py", "--task", "arithmetic", "--steps", "2",
        "--max-val", "6", "--trainers", trainers, "--out", tmp_path / "bench",
        "--set", "model.path=builtin:tiny", "--set", "data.chat_template=never",
        "--set", f"scorer.function={reward}:reward",
        "--set", "rs.prompts_per_step=2", "--set", "rs.num_rollouts_per_prompt=2",
        "--set", "generator.max_new_tokens=8",
    ]  # fmt: skip
    if not with_trl:
        # a token budget (spent by step 1 of 2) ends that run a step early: validated as a last step
        command += ["--thresher", "lr_high:optim.lr=0.01,rs.max_generated_tokens=1"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=1800)
    assert done.returncode == 0, done.stdout + done.stderr
    results = json.loads((tmp_path / "bench" / "results.json").read_text())
    names = [r["trainer"] for r in results]
    assert names == (["trl", "base"] if with_trl else ["thresher", "random", "lr_high", "base"])
    for r in results:
        assert 0 <= r["greedy"] <= 1 and 0 <= r["sampled"] <= 1
        levels = [k for k in r if k.startswith("greedy_") and k != "greedy_all"]
        assert len(levels) == 6  # add1 … mul2: the per-level scores of the held-out prompts used
        per_prompt = read_jsonl(tmp_path / "bench" / f"eval_{r['trainer']}_s{r['seed']}.jsonl")
        assert len(per_prompt) == 12  # 6 prompts, greedy and sampled
        greedy = [row["reward"] for row in per_prompt if row["mode"] == "greedy"]
        assert r["greedy"] == pytest.approx(sum(greedy) / len(greedy))
        if r["trainer"] != "base":
            assert r["generated_tokens"] > 0 and r["peak_rss_mb"] > 0 and r["wall_s"] > 0
            assert 0 < r["entropy_last"] < 20 and 0 < r["entropy_first"] < 20  # nats per token, vocabulary ~50k
    for r in results:
        if r["trainer"] in ("thresher", "random", "lr_high"):
            assert r["greedy"] > 0
            assert r["greedy"] == pytest.approx(r["own_final_val_reward_greedy"], abs=1e-6)
            assert r["steps"] == (1 if r["trainer"] == "lr_high" else 2)
    table = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| trainer | seeds | wall_s") and len(table) == 1 + len(results)  # one seed each
    if not with_trl:  # --reuse: an interrupted benchmark goes on from what it finished; here, everything
        again = subprocess.run([*command, "--reuse"], capture_output=True, text=True, cwd=ROOT, timeout=600)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "training" not in again.stdout and "evaluating" not in again.stdout
        assert again.stdout.count("reusing") == 2 * 3 + 1  # 3 trainings, their evaluations, the base's
        assert json.loads((tmp_path / "bench" / "results.json").read_text()) == results
