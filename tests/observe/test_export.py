"""``thresher export``: a run's rollouts as SFT, DPO and KTO data, checked against the rollout files
themselves, loaded with ``datasets``, and (with TRL installed) trained on by TRL's DPOTrainer."""

from __future__ import annotations

import copy
import math

import datasets
import pytest

import thresher
from tests.helpers import read_jsonl


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export") / "run"
    overrides = {
        "rs.max_steps": 2,
        "rs.prompts_per_step": 4,
        "rs.num_rollouts_per_prompt": 4,
        "selector.top_n_rollouts": 2,
        "output.dir": str(folder),
    }
    with thresher.Run.from_config("tiny", overrides=overrides, quiet=True) as run:
        run.train()
    return folder


def rollouts(run_dir, steps=(1, 2)) -> list[dict]:
    return [row for step in steps for row in read_jsonl(run_dir / "rollouts" / f"step_{step}.jsonl")]


def export(cli, run_dir, tmp_path, fmt: str, *extra: str) -> datasets.Dataset:
    out = tmp_path / f"{fmt}.jsonl"
    result = cli("export", str(run_dir), "--format", fmt, "--out", str(out), *extra)
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: ")
    return datasets.load_dataset("json", data_files=str(out), split="train")


def test_sft_rows_are_the_kept_responses_with_their_provenance(cli, run_dir, tmp_path):
    data = export(cli, run_dir, tmp_path, "sft")
    kept = [row for row in rollouts(run_dir) if row["kept"]]
    assert {"prompt", "completion"} <= set(data.column_names)  # TRL's prompt-completion format
    assert len(data) == len(kept) == 2 * 4 * 2
    assert sorted(zip(data["prompt"], data["completion"], data["reward"], strict=True)) == sorted(
        (row["prompt"], row["response"], row["reward"]) for row in kept
    )
    assert set(data["step"]) == {1, 2} and [p + 1 for p in data["policy_step"]] == data["step"]
    assert data[0]["sampling"] == {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "n": 4,
                                   "generator": "hf"}  # fmt: skip
    assert set(data["run"]) == {str(run_dir.resolve())}


def test_dpo_pairs_best_kept_against_worst_only_where_rewards_differ(cli, run_dir, tmp_path):
    data = export(cli, run_dir, tmp_path, "dpo")
    assert {"prompt", "chosen", "rejected"} <= set(data.column_names)
    expected = []
    for step in (1, 2):
        groups: dict[int, list[dict]] = {}
        for row in rollouts(run_dir, [step]):
            groups.setdefault(row["prompt_index"], []).append(row)
        for group in groups.values():
            best = max((r for r in group if r["kept"]), key=lambda r: r["reward"])
            worst = min(group, key=lambda r: r["reward"])
            if best["reward"] > worst["reward"]:
                expected.append((step, best["response"], worst["response"], best["reward"] - worst["reward"]))
    got = [(r["step"], r["chosen"], r["rejected"], r["chosen_reward"] - r["rejected_reward"]) for r in data]
    assert sorted(got) == sorted(expected) and expected
    wide = min(gap for *_, gap in expected) + 1e-6  # a margin above the smallest gap drops that pair
    fewer = export(cli, run_dir, tmp_path, "dpo", "--margin", str(wide))
    assert len(fewer) == sum(gap >= wide for *_, gap in expected) < len(expected)


def test_kto_labels_every_scored_response_by_whether_it_was_kept(cli, run_dir, tmp_path):
    data = export(cli, run_dir, tmp_path, "kto", "--steps", "2:2")
    step_two = [row for row in rollouts(run_dir, [2]) if row["reward"] is not None and math.isfinite(row["reward"])]
    assert {"prompt", "completion", "label"} <= set(data.column_names) and set(data["step"]) == {2}
    assert sorted(zip(data["completion"], data["label"], strict=True)) == sorted(
        (row["response"], row["kept"]) for row in step_two
    )


def test_mistakes_are_one_line(cli, run_dir, tmp_path):
    for args, message in [
        (("--format", "orpo"), "error: --format: expected one of sft, dpo, kto, got 'orpo'"),
        (("--format", "sft", "--steps", "5:"), "no rollouts in the steps asked for (the run has steps 1-2)"),
        (("--format", "sft", "--steps", "3:1"), "--steps '3:1': expected 1 <= A <= B"),
        (("--format", "dpo", "--margin", "-1"), "--margin -1.0: expected a finite number >= 0"),
    ]:
        result = cli("export", str(run_dir), *args, "--out", str(tmp_path / "x.jsonl"))
        assert result.exit_code != 0 and message in result.output and "Traceback" not in result.output, result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_trl_dpo_trainer_takes_the_exported_pairs_for_a_step(cli, run_dir, tmp_path):
    pytest.importorskip("trl")
    from trl import DPOConfig, DPOTrainer

    from thresher.core.model import build_tiny_model, load_tokenizer

    data = export(cli, run_dir, tmp_path, "dpo").select_columns(["prompt", "chosen", "rejected"])
    tokenizer = load_tokenizer("builtin:tiny")
    model = build_tiny_model(tokenizer, seed=0)
    args = DPOConfig(
        output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to=[], use_cpu=True,
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=data,
                         processing_class=tokenizer)  # fmt: skip
    result = trainer.train()
    assert result.training_loss == pytest.approx(math.log(2), abs=1e-4)  # policy = reference: -log σ(0)
