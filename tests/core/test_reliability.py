"""Nothing lost, nothing silently wrong: real processes killed (SIGKILL) or interrupted (SIGINT,
SIGTERM) at chosen points, then resumed and compared with an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.helpers import MEASURED, read_jsonl

STEPS = 5


def make_config(tmp: Path, name: str, **rs) -> Path:
    config = yaml.safe_load((Path(__file__).resolve().parents[2] / "thresher" / "presets" / "tiny.yaml").read_text())
    defaults = {"max_steps": STEPS, "prompts_per_step": 4, "num_rollouts_per_prompt": 4, "val_max_prompts": 2}
    config["rs"].update({**defaults, "save_every": 1, "keep_last": 2, **rs})
    config["output"]["dir"] = str(tmp / name)
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def thresher(*args, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "thresher", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
        **kwargs,
    )


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "thresher", *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def comparable(run: Path) -> dict:
    """What must be identical between an interrupted-and-resumed run and an uninterrupted one."""
    train = [m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]
    return {
        "metrics": [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in train],
        "rollouts": [read_jsonl(run / "rollouts" / f"step_{s}.jsonl") for s in range(1, STEPS + 1)],
    }


def assert_same_run(resumed: Path, reference: Path) -> None:
    a, b = comparable(resumed), comparable(reference)
    assert [m["step"] for m in a["metrics"]] == list(range(1, STEPS + 1))
    assert a["metrics"] == b["metrics"]
    assert a["rollouts"] == b["rollouts"]
    final_a = load_file(resumed / "final" / "model.safetensors")
    final_b = load_file(reference / "final" / "model.safetensors")
    for name, tensor in final_b.items():
        torch.testing.assert_close(final_a[name], tensor, atol=1e-6, rtol=0)  # stated tolerance: 1e-6


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("reference")
    done = thresher("train", make_config(tmp, "run"), "-q")
    assert done.returncode == 0, done.stderr
    return tmp / "run"


@pytest.mark.parametrize("point", ["generated@2", "train@3", "checkpoint@2", "checkpoint@4"])
def test_sigkill_at_a_failpoint_then_resume_matches_uninterrupted(tmp_path, reference, point):
    config = make_config(tmp_path, "run")
    killed = thresher("train", config, "-q", env={"THRESHER_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL
    run = tmp_path / "run"
    step = int(point.split("@")[1])
    complete = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert f"step_{step}" not in complete  # the step in progress is lost, nothing before it
    assert f"step_{step - 1}" in complete
    assert not (run / "final").exists()
    resumed = thresher("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {run / 'checkpoints' / f'step_{step - 1}'} at step {step - 1}" in resumed.stderr
    assert_same_run(run, reference)
    assert not list((run / "checkpoints").glob(".tmp-*"))  # leftovers of the killed write are cleaned
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{STEPS - 1}", f"step_{STEPS}"]


def test_sigkill_at_an_arbitrary_moment_then_resume_matches(tmp_path, reference):
    config = make_config(tmp_path, "run")
    process = start("train", config, "-q")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while (
        time.time() < deadline
        and sum(1 for m in (read_jsonl(metrics) if metrics.exists() else []) if m["kind"] == "train") < 2
    ):
        time.sleep(0.01)
    time.sleep(0.05)
    process.kill()
    process.wait(timeout=30)
    resumed = thresher("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(tmp_path / "run", reference)


@pytest.fixture
def slow_reward(tmp_path) -> str:
    """A reward function that blocks in user code at step 3 (counted by calls), giving signals a target."""
    path = tmp_path / "slow_rewards.py"
    path.write_text(
        "import os, time\n"
        "from thresher.presets.rewards import digit_share\n"
        "CALLS = [0]\n"
        "def slow(responses):\n"
        "    CALLS[0] += 1\n"
        "    if CALLS[0] == int(os.environ.get('SLOW_AT_CALL', '0')):\n"
        "        open(os.environ['SLOW_MARKER'], 'w').close()\n"
        "        time.sleep(float(os.environ.get('SLOW_SECONDS', '3')))\n"
        "    return digit_share(responses)\n"
    )
    return f"{path}:slow"


def wait_for(path: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.01)


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_checkpoints_the_last_completed_step_and_resume_matches(tmp_path, reference, slow_reward, sig, code):
    config = make_config(tmp_path, "run")
    data = yaml.safe_load(config.read_text())
    data["scorer"]["function"] = slow_reward
    config.write_text(yaml.safe_dump(data))
    marker = tmp_path / "marker"
    # calls 1-2 are the step-0 validation (greedy, sampled); call 5 is the scoring of step 3
    env = {"SLOW_AT_CALL": "5", "SLOW_MARKER": str(marker), "SLOW_SECONDS": "3"}
    process = start("train", config, env=env)
    wait_for(marker)
    process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    run = tmp_path / "run"
    assert "stopped after step 2, checkpoint" in stderr and "--resume" in stderr
    assert "Traceback" not in stderr
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"] == [1, 2]
    assert (run / "checkpoints" / "step_2" / "state.json").is_file()
    assert not (run / "checkpoints" / "step_3").exists() and not (run / "final").exists()
    state = json.loads((run / "checkpoints" / "step_2" / "state.json").read_text())
    assert state["data"]["consumed"] == 8  # 2 steps × 4 prompts: the abandoned step's prompts come again
    resumed = thresher("train", config, "--resume", env={"SLOW_AT_CALL": "0"})
    assert resumed.returncode == 0, resumed.stderr
    assert_same_run(run, reference)


def test_second_ctrl_c_exits_at_once(tmp_path, slow_reward):
    config = make_config(tmp_path, "run")
    data = yaml.safe_load(config.read_text())
    data["scorer"]["function"] = slow_reward
    config.write_text(yaml.safe_dump(data))
    marker = tmp_path / "marker"
    # calls 1-2: step-0 validation; call 4: the scoring of step 2, after step 1 completed
    process = start("train", config, env={"SLOW_AT_CALL": "4", "SLOW_MARKER": str(marker), "SLOW_SECONDS": "60"})
    wait_for(marker)
    process.send_signal(signal.SIGINT)
    time.sleep(0.5)
    assert process.poll() is None  # the first one waits for the phase (a 60 s reward call) to end
    began = time.time()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert time.time() - began < 10
    assert process.returncode == 130
    assert "second interrupt: exiting now" in stderr
    # the completed step 1 had already been checkpointed (save_every: 1): nothing done is lost
    assert (tmp_path / "run" / "checkpoints" / "step_1" / "state.json").is_file()


def test_resume_refuses_a_config_that_changes_the_run(tmp_path, cli):
    config = make_config(tmp_path, "run")
    assert cli("train", config, "-q", "--set", "rs.max_steps=2").exit_code == 0
    result = cli("train", config, "--resume", "--set", "rs.num_rollouts_per_prompt=2", "--set", "optim.lr=0.1")
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert lines[0].startswith("error: --resume: ") and "was made with a different config" in lines[0]
    assert lines[1:] == [
        "error:   optim.lr: 0.003 in the checkpoint, 0.1 now",
        "error:   rs.num_rollouts_per_prompt: 4 in the checkpoint, 2 now",
    ]
    allowed = cli("train", config, "--resume", "-q", "--set", "rs.max_steps=3", "--set", "rs.val_every=1")
    assert allowed.exit_code == 0, allowed.output
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"] == [1, 2, 3]


def test_resume_without_a_run_or_a_checkpoint_says_so(tmp_path, cli):
    result = cli("train", make_config(tmp_path, "run"), "--resume")
    assert result.exit_code == 2
    assert f"error: --resume: {str(tmp_path / 'run')!r} holds no Thresher run to resume" in result.output
    config = make_config(tmp_path, "run")
    assert cli("train", config, "-q").exit_code == 0
    shutil.rmtree(tmp_path / "run" / "checkpoints")  # a run, but its checkpoints are gone
    result = cli("train", config, "--resume")
    assert result.exit_code == 1
    # one error line, no traceback; the phase that finished before it (a log line off a terminal) may precede it
    assert result.output.endswith(f"error: --resume: no usable checkpoint in {tmp_path / 'run' / 'checkpoints'}\n")
    assert result.output.count("error:") == 1 and "Traceback" not in result.output


def test_checkpoints_hold_rng_data_position_and_are_pruned(tmp_path, cli):
    config = make_config(tmp_path, "run")
    assert cli("train", config, "-q").exit_code == 0
    checkpoints = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_4", "step_5"]  # keep_last: 2
    state = json.loads((checkpoints / "step_5" / "state.json").read_text())
    assert state["step"] == 5 and state["data"]["consumed"] == 20
    assert {"python", "numpy"} <= set(state["rng"]) and state["config"]["rs"]["max_steps"] == STEPS
    rng = torch.load(checkpoints / "step_5" / "rng.pt", weights_only=True)
    assert rng["cpu"].dtype == torch.uint8
    optimizer = torch.load(checkpoints / "step_5" / "optimizer.pt", weights_only=True)
    assert optimizer["state"]  # AdamW moments are there


def test_torn_last_metrics_line_is_ignored_on_resume(tmp_path, cli):
    config = make_config(tmp_path, "run")
    assert cli("train", config, "-q", "--set", "rs.max_steps=2").exit_code == 0
    with (tmp_path / "run" / "metrics.jsonl").open("a") as handle:
        handle.write('{"kind": "train", "step": 3, "rew')  # a kill in the middle of a write
    result = cli("train", config, "--resume", "-q", "--set", "rs.max_steps=3")
    assert result.exit_code == 0, result.output
    assert [m["step"] for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"] == [1, 2, 3]


class NaNLoss:
    """A loss that is NaN for the first ``bad`` calls: the non-finite guard must keep the weights."""

    name = "nan_loss"

    from pydantic import BaseModel as _Base

    class Config(_Base):
        bad: int = 1000

    def __init__(self, config, context=None):
        self.config, self.calls = config, 0

    def __call__(self, token_logprobs, response_mask, *, num_sequences, num_tokens):
        self.calls += 1
        loss = -(token_logprobs * response_mask).sum() / num_sequences
        return (loss * float("nan") if self.calls <= self.config.bad else loss), {}


@pytest.fixture
def nan_loss_plugin(plugin_manager):
    import thresher

    class Plugin:
        @thresher.hookimpl
        def register_losses(self, register):
            register(NaNLoss)

    plugin_manager.register(Plugin(), name="nan-loss")


def test_nonfinite_updates_are_skipped_then_the_run_stops(tmp_path, cli, nan_loss_plugin):
    from thresher.core.model import build_tiny_model, build_tiny_tokenizer

    config = make_config(tmp_path, "run")
    result = cli("train", config, "--set", "loss.type=nan_loss", "--set", "optim.max_nonfinite_updates=3")
    assert result.exit_code == 5
    assert (
        "error: 3 updates in a row had a non-finite loss or gradient (optim.max_nonfinite_updates=3)" in result.output
    )
    train = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert [m["nonfinite_updates_skipped"] for m in train] == [2]  # tiny: 2 epochs per step
    initial = build_tiny_model(build_tiny_tokenizer(), seed=1234).state_dict()
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_1" / "model.safetensors")
    for name, tensor in initial.items():
        assert torch.equal(saved[name], tensor), name  # the NaN never reached the weights


def test_an_isolated_nonfinite_update_is_skipped_and_counted(tmp_path, cli, nan_loss_plugin):
    config = make_config(tmp_path, "run")
    result = cli(
        "train", config, "-q", "--set", "loss.type=nan_loss", "--set", "loss.bad=2", "--set", "rs.max_steps=2"
    )  # NaN for the micro-batch calls of step 1's first update only
    assert result.exit_code == 0, result.output
    train = [m for m in read_jsonl(tmp_path / "run" / "metrics.jsonl") if m["kind"] == "train"]
    assert train[0]["nonfinite_updates_skipped"] >= 1 and train[1]["nonfinite_updates_skipped"] == 0
    assert train[1]["loss"] is not None
