"""Whole runs on the tiny preset through the real CLI: the run directory, learning, skipped steps,
non-finite rewards, resume, and best-of-N data production."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import MEASURED, read_jsonl
from thresher.core.config import load_config


def test_run_directory_is_complete_and_consistent(tiny_config, write_config, cli, registry):
    tiny_config["optim"]["epochs_per_step"] = 2
    result = cli("train", write_config(tiny_config), "--quiet")
    assert result.exit_code == 0, result.output
    run = Path(tiny_config["output"]["dir"])
    steps, prompts, n = 3, tiny_config["rs"]["prompts_per_step"], tiny_config["rs"]["num_rollouts_per_prompt"]

    resolved = load_config(run / "config.yaml", [], registry)  # the resolved config is itself valid
    assert resolved.rs.max_steps == steps and resolved.generator.config.max_new_tokens == 16

    metrics = read_jsonl(run / "metrics.jsonl")
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2, 3]
    assert [m["step"] for m in metrics if m["kind"] == "validation"] == [0, 3]
    for m in train:
        rows = read_jsonl(run / "rollouts" / f"step_{m['step']}.jsonl")
        assert len(rows) == prompts * n == m["rollouts"]
        kept = [r for r in rows if r["kept"]]
        assert len(kept) == m["kept"] == prompts  # top-1 per prompt
        rewards = torch.tensor([r["reward"] for r in rows])
        assert m["reward_mean"] == pytest.approx(rewards.mean().item(), abs=1e-6)
        assert m["reward_max"] == pytest.approx(rewards.max().item(), abs=1e-6)
        assert m["reward_kept_mean"] == pytest.approx(sum(r["reward"] for r in kept) / len(kept), abs=1e-6)
        # trained on exactly the kept responses' tokens, once per epoch
        assert m["train_tokens"] == 2 * sum(len(r["response_ids"]) for r in kept)
        assert {(r["group"], r["sample"]) for r in rows} == {(g, s) for g in range(prompts) for s in range(n)}
        for key in (
            "loss",
            "lr",
            "grad_norm",
            "time_generate",
            "time_score",
            "time_train",
            "tokens_per_s_generate",
            "tokens_per_s_train",
            "response_len_mean",
            "accept_rate",
        ):
            assert m[key] is not None, key
    assert sum(m["prompts_consumed"] for m in train[-1:]) == steps * prompts

    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(run / "final", local_files_only=True)
    assert tokenizer("1+1")["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "1+1"]
    from safetensors.torch import load_file

    checkpoint = load_file(run / "checkpoints" / "step_3" / "model.safetensors")
    for name, tensor in final.state_dict().items():
        assert torch.equal(tensor, checkpoint[name]), name


def test_tiny_preset_reward_goes_up(tmp_path, cli):
    """The digit-share reward of the tiny preset with its fixed seed: the mean over the last three
    steps beats the first three by at least 0.1 (measured on the dev machine: 0.10 → 0.62)."""
    run = tmp_path / "learn"
    result = cli("train", "tiny", "--quiet", "--set", f"output.dir={run}", "--set", "rs.val_max_prompts=2")
    assert result.exit_code == 0, result.output
    rewards = [m["reward_mean"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    assert len(rewards) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.1, rewards


def test_a_step_where_nothing_is_selected_is_skipped_not_fatal(tiny_config, write_config, cli):
    tiny_config["selector"] = {"type": "threshold", "threshold": 2.0}  # digit share is at most 1
    tiny_config["rs"]["max_steps"] = 2
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 0, result.output
    assert "skipped: no rollout selected" in result.output
    run = Path(tiny_config["output"]["dir"])
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["skipped"] for m in train] == ["no rollout selected"] * 2
    assert all(m["kept"] == 0 and m["loss"] is None for m in train)
    from transformers import AutoModelForCausalLM

    from thresher.core.model import build_tiny_model, build_tiny_tokenizer

    untouched = build_tiny_model(build_tiny_tokenizer(), seed=tiny_config["rs"]["seed"])
    final = AutoModelForCausalLM.from_pretrained(run / "final", local_files_only=True)
    for name, tensor in untouched.state_dict().items():
        assert torch.equal(tensor, final.state_dict()[name]), name


@pytest.fixture
def nan_reward(tmp_path):
    path = tmp_path / "nan_rewards.py"
    path.write_text(
        "def half_nan(responses):\n    return [float('nan') if i % 2 else 1.0 for i in range(len(responses))]\n"
    )
    return f"{path}:half_nan"


def test_nonfinite_rewards_stop_the_run_after_saving_the_rollouts(tiny_config, write_config, cli, nan_reward):
    tiny_config["scorer"]["function"] = nan_reward
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 3
    assert "error: scorer returned 8 non-finite reward(s) at step 1 (rollouts saved;" in result.output
    assert "Traceback" not in result.output
    rows = read_jsonl(Path(tiny_config["output"]["dir"]) / "rollouts" / "step_1.jsonl")
    assert len(rows) == 16 and [r["reward"] for r in rows[:2]] == [1.0, None]


def test_nonfinite_rewards_can_be_dropped_and_counted(tiny_config, write_config, cli, nan_reward):
    tiny_config["scorer"]["function"] = nan_reward
    tiny_config["rs"].update(on_nonfinite_reward="drop", max_steps=1)
    tiny_config["selector"] = {"type": "threshold", "threshold": 0.0}
    result = cli("train", write_config(tiny_config), "--quiet")
    assert result.exit_code == 0, result.output
    (m,) = [m for m in read_jsonl(Path(tiny_config["output"]["dir"]) / "metrics.jsonl") if m["kind"] == "train"]
    assert m["nonfinite_rewards"] == 8 and m["kept"] == 8 and m["reward_mean"] == 1.0


def test_failing_reward_function_keeps_the_generated_rollouts(tiny_config, write_config, cli, tmp_path):
    (tmp_path / "boom.py").write_text("def boom(responses):\n    raise RuntimeError('verifier offline')\n")
    tiny_config["scorer"]["function"] = f"{tmp_path / 'boom.py'}:boom"
    tiny_config["data"]["validation"] = None  # fail in the first training step, not in validation
    result = cli("train", write_config(tiny_config))
    assert result.exit_code == 3
    assert "raised RuntimeError: verifier offline" in result.output
    rows = read_jsonl(Path(tiny_config["output"]["dir"]) / "rollouts" / "step_1.jsonl")
    assert len(rows) == 16 and all(r["reward"] is None and r["response_ids"] for r in rows)


def test_existing_run_is_not_overwritten_by_accident(tiny_config, write_config, cli):
    tiny_config["output"]["overwrite"] = False
    tiny_config["rs"].update(max_steps=2, keep_last=2)
    path = write_config(tiny_config)
    assert cli("train", path, "--quiet").exit_code == 0
    result = cli("train", path, "--quiet")
    assert result.exit_code == 2
    assert "error: output.dir: " in result.output and "already holds a run; use --resume" in result.output
    # with overwrite, the old run's outputs go (a stale step_2 checkpoint or rollouts file must not
    # survive a 1-step run); a file the user put there is not Thresher's and stays
    run = Path(tiny_config["output"]["dir"])
    (run / "rollouts" / "step_9.jsonl").write_text("{}\n")
    overwritten = cli("train", path, "--quiet", "--set", "output.overwrite=true", "--set", "rs.max_steps=1")
    assert overwritten.exit_code == 0, overwritten.output
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step_1.jsonl", "step_9.jsonl"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_1"]


@pytest.mark.parametrize(
    ("policy", "loss"),
    [
        pytest.param({}, None, id="fp32"),
        pytest.param({"dtype": "bfloat16"}, None, id="bf16-master-weights"),
        pytest.param({"lora": {"r": 4}}, None, id="lora"),
        pytest.param({}, {"type": "raft_pp"}, id="raft_pp"),
        pytest.param({"lora": {"r": 4}}, {"type": "reinforce_rej", "scale": "std"}, id="lora-reinforce_rej"),
    ],
)
def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(
    tiny_config, write_config, cli, tmp_path, policy, loss
):
    tiny_config["rs"].update(max_steps=4, save_every=2)
    tiny_config["model"].update(policy)
    if loss is not None:
        tiny_config["loss"] = loss
    whole = dict(tiny_config, output={**tiny_config["output"], "dir": str(tmp_path / "whole")})
    assert cli("train", write_config(whole, "whole.yaml"), "--quiet").exit_code == 0

    parted = dict(tiny_config, output={**tiny_config["output"], "dir": str(tmp_path / "parted")})
    path = write_config(parted, "parted.yaml")
    assert cli("train", path, "--quiet", "--set", "rs.max_steps=2").exit_code == 0
    result = cli("train", path, "--resume")
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "at step 2" in result.output

    def train_metrics(run):
        rows = [m for m in read_jsonl(tmp_path / run / "metrics.jsonl") if m["kind"] == "train"]
        return [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in rows]

    assert train_metrics("whole") == train_metrics("parted")
    for step in (3, 4):
        a = read_jsonl(tmp_path / "whole" / "rollouts" / f"step_{step}.jsonl")
        b = read_jsonl(tmp_path / "parted" / "rollouts" / f"step_{step}.jsonl")
        assert a == b
    from safetensors.torch import load_file

    weights = "adapter_model.safetensors" if "lora" in policy else "model.safetensors"
    a = load_file(tmp_path / "whole" / "final" / weights)
    b = load_file(tmp_path / "parted" / "final" / weights)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_auto_micro_batch_resumes_with_the_checkpoints_micro_batch(tiny_config, write_config, cli, tmp_path):
    """The plan picks a whole optimizer batch at first; on resume a headroom of 99% would make it pick 1,
    but the run keeps the checkpoint's size and ends as the uninterrupted run does."""
    tiny_config["rs"].update(max_steps=4, save_every=2)
    tiny_config["optim"].update(micro_batch_size="auto", epochs_per_step=2)
    cap = tiny_config["rs"]["prompts_per_step"] * tiny_config["rs"]["num_rollouts_per_prompt"]
    whole = dict(tiny_config, output={**tiny_config["output"], "dir": str(tmp_path / "whole")})
    result = cli("train", write_config(whole, "whole.yaml"))
    assert result.exit_code == 0, result.output
    assert f"optim.micro_batch_size auto: {cap} (the memory plan's pick)" in result.output
    parted = dict(tiny_config, output={**tiny_config["output"], "dir": str(tmp_path / "parted")})
    path = write_config(parted, "parted.yaml")
    assert cli("train", path, "--quiet", "--set", "rs.max_steps=2").exit_code == 0
    result = cli("train", path, "--resume", "--set", "optim.micro_batch_headroom=0.99")
    assert result.exit_code == 0, result.output
    assert "optim.micro_batch_size auto: 1 (the memory plan's pick)" in result.output
    assert f"optim.micro_batch_size auto: {cap}, as in the checkpoint (the memory plan now allows 1)" in result.output

    def train_metrics(run):
        rows = [m for m in read_jsonl(tmp_path / run / "metrics.jsonl") if m["kind"] == "train"]
        return [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in rows]

    assert train_metrics("whole") == train_metrics("parted")


def test_generate_writes_best_of_n_pairs_without_training(tiny_config, write_config, cli, tmp_path):
    out = tmp_path / "best.jsonl"
    result = cli("generate", write_config(tiny_config), "--out", out, "--limit", "6", "--quiet")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}: kept 6 of 24 rollouts for 6 prompts" in result.stdout
    rows = read_jsonl(out)
    assert len(rows) == 6 and all(r["kept"] for r in rows)
    assert all({"prompt", "response", "reward", "answer", "response_ids"} <= set(r) for r in rows)
    assert not (Path(tiny_config["output"]["dir"]) / "metrics.jsonl").exists()  # nothing trained
    everything = tmp_path / "all.jsonl"
    assert cli("generate", write_config(tiny_config), "--out", everything, "--limit", "2", "--all", "-q").exit_code == 0
    rows = read_jsonl(everything)
    assert len(rows) == 8 and sum(r["kept"] for r in rows) == 2
    for group in (0, 1):
        mine = [r for r in rows if r["group"] == group]
        best = max(mine, key=lambda r: (r["reward"], -r["sample"]))
        assert best["kept"] and sum(r["kept"] for r in mine) == 1


def test_config_written_to_run_dir_is_yaml(tiny_config, write_config, cli):
    tiny_config["rs"]["max_steps"] = 1
    assert cli("train", write_config(tiny_config), "-q", "--set", "selector.top_n_rollouts=2").exit_code == 0
    written = yaml.safe_load((Path(tiny_config["output"]["dir"]) / "config.yaml").read_text())
    assert written["selector"] == {"type": "topk", "top_n_rollouts": 2, "min_reward": None}


def test_overlapped_scoring_changes_nothing_but_timing(tiny_config, write_config, cli, tmp_path):
    """Scoring each chunk while the next is generated gives the same run as scoring afterwards."""
    tiny_config["generator"]["batch_size"] = 1  # 4 prompts per step: 4 chunks, 3 scored during generation
    runs = {}
    for overlap in (True, False):
        tiny_config["output"]["dir"] = str(tmp_path / f"overlap-{overlap}")
        tiny_config["rs"]["overlap_scoring"] = overlap
        assert cli("train", write_config(tiny_config), "-q").exit_code == 0
        run = Path(tiny_config["output"]["dir"])
        metrics = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
        runs[overlap] = (
            [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in metrics],
            [read_jsonl(run / "rollouts" / f"step_{s}.jsonl") for s in (1, 2, 3)],
        )
        assert all(("time_score_busy" in m) == overlap for m in metrics)
    assert runs[True] == runs[False]


def test_overlap_is_off_by_default_for_a_scorer_on_the_same_cores(tiny_config, write_config, cli):
    tiny_config["rs"]["max_steps"] = 1
    assert cli("train", write_config(tiny_config), "-q").exit_code == 0
    (m,) = [m for m in read_jsonl(Path(tiny_config["output"]["dir"]) / "metrics.jsonl") if m["kind"] == "train"]
    assert "time_score_busy" not in m  # rs.overlap_scoring: auto, and the rule scorer is not remote


@pytest.mark.parametrize("limit", ["-1", "0"])
def test_generate_refuses_a_limit_that_is_not_a_count(limit, tiny_config, write_config, cli, tmp_path):
    """``--limit -1`` used to produce all but one prompt (a Python slice), ``--limit 0`` all of them."""
    out = tmp_path / "pairs.jsonl"
    result = cli("generate", write_config(tiny_config), "--out", out, "--limit", limit, "-q")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip() == f"error: --limit: expected a number of prompts >= 1, got {limit}"
    assert not out.exists()


def test_a_limit_from_python_must_be_a_count(tiny_config):
    from thresher.core.errors import ConfigError
    from thresher.core.runner import Run

    with Run.from_config(tiny_config, quiet=True) as run, pytest.raises(ConfigError, match=r"limit: expected a whole"):
        run.produce("unused.jsonl", limit=0)


def test_a_policy_with_nonfinite_weights_is_not_saved_as_final(tiny_config):
    """Whatever made the weights NaN (a learning rate too high for the loss), final/ is never a
    model of NaNs that loads and "works"."""
    from thresher.core.errors import ThresherError
    from thresher.core.run.saving import Saver
    from thresher.core.runner import Run

    with Run.from_config(tiny_config, quiet=True) as run:
        run.setup(training=True)
        with torch.no_grad():
            next(run.model.parameters())[0, :3] = float("nan")
        with pytest.raises(ThresherError, match=r"final model not written: 3 of \d+ weights are NaN or infinite"):
            Saver(run.session).save_final()
    assert not (Path(tiny_config["output"]["dir"]) / "final").exists()
