"""Who may write a run directory, and what a run may delete: one owner per run (an OS lock), a
marker that tells a Thresher run from anything else, overwrite that removes only Thresher's own
files, and a refused resume that changes nothing. Through the real CLI, in real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tests.helpers import MEASURED, read_jsonl
from thresher.core.run.checkpoint import file_checksum

ROOT = Path(__file__).resolve().parents[2]
PRESET = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())


def thresher(*args, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "thresher", *map(str, args)], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )  # fmt: skip


def errors(result: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line.removeprefix("error: ") for line in result.stderr.splitlines() if line.startswith("error: ")]


def user_config(tmp: Path, run: Path, name: str = "user.yaml", **rs) -> Path:
    config = json.loads(json.dumps(PRESET))
    config["rs"].update(
        {"max_steps": 2, "prompts_per_step": 4, "num_rollouts_per_prompt": 4, "val_max_prompts": 2, **rs}
    )
    config["output"] = {"dir": str(run)}
    path = tmp / name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def slow_reward(tmp_path) -> str:
    """0.3 s per call; after its first call it also waits while the file ``hold`` exists."""
    path = tmp_path / "slow_reward.py"
    path.write_text(
        "import os, time\n"
        f"HOLD = {str(tmp_path / 'hold')!r}\n"
        "calls = []\n\n"
        "def reward(responses):\n"
        "    calls.append(1)\n"
        "    while len(calls) > 1 and os.path.exists(HOLD):\n"
        "        time.sleep(0.05)\n"
        "    time.sleep(0.3)\n"
        "    return [0.5] * len(responses)\n"
    )
    return f"{path}:reward"


def start_slow_run(tmp_path: Path, run: Path, slow_reward: str, steps: int = 4) -> subprocess.Popen:
    config = json.loads(json.dumps(PRESET))
    config["rs"].update(max_steps=steps, prompts_per_step=2, num_rollouts_per_prompt=2, val_max_prompts=1)
    config["scorer"]["function"] = slow_reward
    config["output"] = {"dir": str(run)}
    path = tmp_path / "slow.yaml"
    path.write_text(yaml.safe_dump(config))
    process = subprocess.Popen(
        [sys.executable, "-m", "thresher", "train", str(path), "-q"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists():
        assert process.poll() is None and time.time() < deadline, process.stderr.read()
        time.sleep(0.05)
    return process


def test_a_second_process_is_refused_while_the_first_owns_the_run(tmp_path, slow_reward):
    run = tmp_path / "run"
    (tmp_path / "hold").touch()  # the owner waits in its second step until the checks are done
    owner = start_slow_run(tmp_path, run, slow_reward)
    try:
        for extra in ([], ["--resume"]):
            second = thresher("train", "tiny", "--set", f"output.dir={run}", "--set", "output.overwrite=true", *extra)
            assert second.returncode == 4, second.stderr
            (line,) = errors(second)
            assert f"is in use by another Thresher process (PID {owner.pid})" in line
        (tmp_path / "hold").unlink()
        assert owner.wait(timeout=300) == 0, owner.stderr.read()
    finally:
        owner.kill()
    lines = read_jsonl(run / "metrics.jsonl")
    steps = [m["step"] for m in lines if m["kind"] == "train"]
    assert steps == [1, 2, 3, 4]  # the owner's metrics are whole: no second writer, no truncation
    assert any(m["kind"] == "validation" and m["step"] == 4 for m in lines)


def test_the_lock_dies_with_its_owner(tmp_path, slow_reward):
    run = tmp_path / "run"
    owner = start_slow_run(tmp_path, run, slow_reward, steps=30)
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step_*/state.json")):
        assert time.time() < deadline
        time.sleep(0.05)
    owner.send_signal(signal.SIGKILL)
    owner.wait(timeout=30)
    resumed = thresher("train", run, "--resume", "--set", "rs.max_steps=2", "-q")  # the run's own config
    assert resumed.returncode == 0, resumed.stderr


def test_a_fresh_run_refuses_a_directory_it_did_not_make_and_deletes_nothing(tmp_path):
    foreign = tmp_path / "P"
    (foreign / "checkpoints" / "x").mkdir(parents=True)
    (foreign / "final").mkdir()
    (foreign / "final" / "weights.bin").write_text("mine")
    result = thresher("train", user_config(tmp_path, foreign), "--set", "output.overwrite=true")
    assert result.returncode == 2
    (line,) = errors(result)
    assert "is not empty and is not a Thresher run directory" in line
    assert (foreign / "checkpoints" / "x").is_dir() and (foreign / "final" / "weights.bin").read_text() == "mine"


def test_output_dir_must_not_be_empty_and_expands_home(tmp_path):
    empty = thresher("train", "tiny", "--set", "output.dir=")
    assert empty.returncode == 2
    assert errors(empty) == [
        "output.dir: must name a directory (an empty path would write into the current directory) (got '')"
    ]
    home = tmp_path / "home"
    home.mkdir()
    done = thresher("train", "tiny", "--set", "output.dir=~/runs/x", "--set", "rs.max_steps=1", "-q",
                    env={"HOME": str(home)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (home / "runs" / "x" / "metrics.jsonl").is_file() and not (ROOT / "~").exists()


def test_overwrite_removes_only_what_thresher_wrote(tmp_path):
    run = tmp_path / "run"
    config = user_config(tmp_path, run, save_every=1, keep_last=5)
    assert thresher("train", config, "-q").returncode == 0
    (run / "notes.txt").write_text("keep me")
    (run / "checkpoints" / "my_eval").mkdir()
    refused = thresher("train", config)
    assert refused.returncode == 2 and "already holds a run" in errors(refused)[0]
    again = thresher("train", config, "--set", "rs.max_steps=1", "--set", "output.overwrite=true", "-q")
    assert again.returncode == 0, again.stderr
    assert (run / "notes.txt").read_text() == "keep me" and (run / "checkpoints" / "my_eval").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_1"]  # step_2 was the old run's
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step_1.jsonl"]


def test_a_preset_overwrites_only_its_own_runs(tmp_path):
    mine = tmp_path / "mine"
    assert thresher("train", user_config(tmp_path, mine), "-q").returncode == 0
    refused = thresher("train", "tiny", "--set", f"output.dir={mine}")
    assert refused.returncode == 2
    (line,) = errors(refused)
    assert f"holds a run made by {tmp_path / 'user.yaml'}; the tiny preset overwrites only its own runs" in line
    assert read_jsonl(mine / "metrics.jsonl")  # untouched
    presets = tmp_path / "presets"
    for _ in range(2):  # the tiny preset (overwrite: true) replaces its own earlier run
        done = thresher("train", "tiny", "--set", f"output.dir={presets}", "--set", "rs.max_steps=1", "-q")
        assert done.returncode == 0, done.stderr


def test_a_refused_resume_changes_nothing_and_the_original_still_resumes(tmp_path):
    run = tmp_path / "run"
    config = user_config(tmp_path, run)
    assert thresher("train", config, "-q").returncode == 0
    before = (run / "config.yaml").read_text()
    refused = thresher("train", config, "--resume", "--set", "selector.top_n_rollouts=3")
    assert refused.returncode == 2 and "was made with a different config" in refused.stderr
    assert (run / "config.yaml").read_text() == before
    resumed = thresher("train", config, "--resume", "--set", "rs.max_steps=3", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert "max_steps: 3" in (run / "config.yaml").read_text()  # a change a resume may make is recorded


@pytest.mark.parametrize("point", ["checkpointed@2", "checkpointed@4"])
def test_resumed_metrics_keep_every_validation_line(tmp_path, point):
    """Killed between a checkpoint and the validation of its step: the resumed run validates that
    step, and its metrics equal an uninterrupted run's, validation included."""
    whole, parted = tmp_path / "whole", tmp_path / "parted"
    assert thresher("train", user_config(tmp_path, whole, "w.yaml", max_steps=4, val_every=2), "-q").returncode == 0
    config = user_config(tmp_path, parted, "p.yaml", max_steps=4, val_every=2)
    killed = thresher("train", config, "-q", env={"THRESHER_FAILPOINT": point})
    assert killed.returncode == -signal.SIGKILL
    assert thresher("train", config, "--resume", "-q").returncode == 0

    def lines(run: Path) -> list[dict]:
        return [{k: v for k, v in m.items() if not k.startswith(MEASURED)} for m in read_jsonl(run / "metrics.jsonl")]

    assert lines(parted) == lines(whole)
    assert [m["step"] for m in lines(parted) if m["kind"] == "validation"] == [0, 2, 4]


@pytest.mark.parametrize(
    "damage", ["truncate state.json", "truncate model.safetensors", "flip a byte", "garbage optimizer.pt, checksummed"]
)
def test_a_damaged_latest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, damage):
    run = tmp_path / "run"
    config = user_config(tmp_path, run, max_steps=3, save_every=1, keep_last=3)
    assert thresher("train", config, "-q", env={"THRESHER_FAILPOINT": "checkpointed@3"}).returncode == -9
    latest = run / "checkpoints" / "step_3"
    if damage == "truncate state.json":
        (latest / "state.json").write_text('{"step": 3, "da')
    elif damage == "truncate model.safetensors":
        data = (latest / "model.safetensors").read_bytes()
        (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        data = bytearray((latest / "model.safetensors").read_bytes())
        data[-10] ^= 0xFF
        (latest / "model.safetensors").write_bytes(bytes(data))
    else:  # damaged before its checksum was taken: only reading it back can tell
        (latest / "optimizer.pt").write_bytes(b"\x80\x02not a pickle at all" * 50)
        sums = json.loads((latest / "checksums.json").read_text())
        sums["optimizer.pt"] = file_checksum(latest / "optimizer.pt")
        (latest / "checksums.json").write_text(json.dumps(sums))
    resumed = thresher("train", config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "warning: checkpoint step_3 is damaged (" in resumed.stderr
    assert f"resumed from {run / 'checkpoints' / 'step_2'} at step 2" in resumed.stderr
    assert (run / "final" / "model.safetensors").is_file()


def test_the_stop_message_names_a_resume_command_that_works(tmp_path, slow_reward):
    run = tmp_path / "run"
    owner = start_slow_run(tmp_path, run, slow_reward, steps=30)
    deadline = time.time() + 120
    while len([m for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"]) < 1:
        assert time.time() < deadline
        time.sleep(0.05)
    owner.send_signal(signal.SIGINT)
    _, stderr = owner.communicate(timeout=120)
    assert owner.returncode == 130, stderr
    assert f"continue with `thresher train {run} --resume`" in " ".join(stderr.split())
    resumed = thresher("train", run, "--resume", "--set", "rs.max_steps=2", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"][-1] == 2


def test_final_follows_the_umask_and_metrics_lines_carry_the_time(tmp_path):
    run = tmp_path / "run"
    started = time.time()
    done = subprocess.run(
        f"umask 022 && {sys.executable} -m thresher train {user_config(tmp_path, run)} -q", shell=True, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (run / "final").stat().st_mode & 0o777 == 0o755
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in (run / "final").iterdir())
    times = [m["time"] for m in read_jsonl(run / "metrics.jsonl")]
    assert started <= times[0] <= times[-1] <= time.time()
    assert load_file(run / "final" / "model.safetensors")


def test_a_directory_without_the_marker_is_never_emptied(tmp_path):
    """Files named like a run's (an old run, the user's own) without Thresher's marker: nothing is
    Thresher's to delete, ``overwrite`` or not."""
    run = tmp_path / "mine"
    theirs = {
        "config.yaml": "model: mine\n",
        "checkpoints/step_1000/model.pt": "weights",
        "final/pytorch_model.bin": "weights",
    }
    for name, text in theirs.items():
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text(text)
    refused = thresher("train", user_config(tmp_path, run), "--set", "output.overwrite=true")
    assert refused.returncode == 2
    (line,) = errors(refused)
    assert "is not empty and is not a Thresher run directory" in line
    assert {n: (run / n).read_text() for n in theirs} == theirs
    assert sorted(p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()) == sorted(
        [*theirs, ".thresher.lock"]
    )


def test_overwrite_leaves_files_put_inside_thresher_folders(tmp_path):
    """Only what the manifest says Thresher wrote goes: a note in final/, a file named like a
    checkpoint, a file inside a checkpoint folder all stay, and final/ is rewritten around them."""
    run = tmp_path / "run"
    config = user_config(tmp_path, run, save_every=1, keep_last=5)
    assert thresher("train", config, "-q").returncode == 0
    user_files = {
        "final/MY_README.md": "how I evaluated this",
        "checkpoints/step_99_mine.txt": "notes",
        "checkpoints/step_2/eval.json": "{}",
        "rollouts/step_7.jsonl": "my own rollouts",
    }
    for name, text in user_files.items():
        (run / name).write_text(text)
    again = thresher("train", config, "--set", "rs.max_steps=1", "--set", "output.overwrite=true", "-q")
    assert again.returncode == 0, again.stderr
    assert {n: (run / n).read_text() for n in user_files} == user_files
    assert (run / "final" / "model.safetensors").is_file()  # the new model, beside the user's note
    assert sorted(p.name for p in (run / "checkpoints" / "step_2").iterdir()) == ["eval.json"]
    assert sorted(p.name for p in (run / "rollouts").iterdir()) == ["step_1.jsonl", "step_7.jsonl"]
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"] == [1]
    # and once more: the user's files are still not in the manifest
    third = thresher("train", config, "--set", "rs.max_steps=1", "--set", "output.overwrite=true", "-q")
    assert third.returncode == 0, third.stderr
    assert {n: (run / n).read_text() for n in user_files} == user_files


def test_pruning_old_checkpoints_leaves_a_users_file_in_one(tmp_path):
    run = tmp_path / "run"
    config = user_config(tmp_path, run, max_steps=2, save_every=1, keep_last=1)
    killed = thresher("train", config, "-q", env={"THRESHER_FAILPOINT": "checkpointed@1"})
    assert killed.returncode == -signal.SIGKILL
    (run / "checkpoints" / "step_1" / "notes.txt").write_text("mine")
    assert thresher("train", config, "--resume", "-q").returncode == 0
    assert sorted(p.name for p in (run / "checkpoints" / "step_1").iterdir()) == ["notes.txt"]
    assert (run / "checkpoints" / "step_2" / "model.safetensors").is_file()


def test_the_run_directory_given_is_the_one_resumed_and_written(tmp_path):
    """``cp -a runs/base runs/copy; thresher train runs/copy --resume`` continues the copy, not the
    run whose output.dir its config recorded."""
    import shutil

    base, copy = tmp_path / "base", tmp_path / "copy"
    assert thresher("train", user_config(tmp_path, base), "-q").returncode == 0
    shutil.copytree(base, copy, symlinks=True)
    (copy / ".thresher.lock").unlink()
    before = {p: p.read_bytes() for p in base.rglob("*") if p.is_file() and p.name != ".thresher.lock"}
    resumed = thresher("train", copy, "--resume", "--set", "rs.max_steps=3", "-q")
    assert resumed.returncode == 0, resumed.stderr
    assert f"run directory: {copy}" in resumed.stdout
    assert [m["step"] for m in read_jsonl(copy / "metrics.jsonl") if m["kind"] == "train"] == [1, 2, 3]
    assert (copy / "checkpoints" / "step_3").is_dir() and not (base / "checkpoints" / "step_3").exists()
    assert {p: p.read_bytes() for p in base.rglob("*") if p.is_file() and p.name != ".thresher.lock"} == before
    elsewhere = thresher("train", copy, "--resume", "--set", f"output.dir={tmp_path / 'other'}")
    assert elsewhere.returncode == 2
    (line,) = errors(elsewhere)
    assert f"output.dir: {str(tmp_path / 'other')!r} is not the run directory given ({str(copy)!r})" in line


def test_resume_from_another_runs_checkpoint_is_refused(tmp_path):
    """Steps 1–3 here, another run's step_4: continuing would leave step 4 missing from this run's
    metrics and rollouts (they would hold 1, 2, 3, 5)."""
    mine, other = tmp_path / "mine", tmp_path / "other"
    assert thresher("train", user_config(tmp_path, mine, "a.yaml", max_steps=3), "-q").returncode == 0
    assert thresher("train", user_config(tmp_path, other, "b.yaml", max_steps=4), "-q").returncode == 0
    metrics = (mine / "metrics.jsonl").read_text()
    refused = thresher("train", mine, "--resume-from", other / "checkpoints" / "step_4", "--set", "rs.max_steps=5")
    assert refused.returncode == 2
    (line,) = errors(refused)
    assert f"--resume-from: {other / 'checkpoints' / 'step_4'} is not a checkpoint of {mine} (which has steps 1–3)" in (
        line
    )
    assert (mine / "metrics.jsonl").read_text() == metrics
    assert sorted(p.name for p in (mine / "rollouts").iterdir()) == ["step_1.jsonl", "step_2.jsonl", "step_3.jsonl"]
