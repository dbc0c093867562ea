"""Loggers: the tensorboard event file read back with TensorBoard's own reader equals metrics.jsonl
and the rollout files; a resumed run leaves no duplicate steps; a failing logger never stops training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

import thresher
from thresher.core.errors import ConfigError
from thresher.core.types import PluginContext
from thresher.loggers.tags import metric_tag as scalar_tag
from thresher.loggers.tensorboard import TensorBoardLogger
from thresher.plugin import Section

pytest.importorskip("tensorboard", reason="the tensorboard extra (scripts/install.sh installs it)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import read_jsonl

ROOT = Path(__file__).resolve().parents[2]
PRESET = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())


def tiny_config(run: Path, **rs) -> dict:
    config = json.loads(json.dumps(PRESET))
    config["rs"].update(
        {"max_steps": 2, "prompts_per_step": 4, "num_rollouts_per_prompt": 4, "val_max_prompts": 2, **rs}
    )
    config["output"] = {"dir": str(run)}
    config["loggers"] = [{"type": "tensorboard", "samples": 1}]
    return config


def train(
    tmp_path: Path, config: dict, *args: str, env: dict | None = None, quiet: bool = True
) -> subprocess.CompletedProcess:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "thresher", "train", str(path), *(["-q"] if quiet else []), *args],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def events(run: Path) -> EventAccumulator:
    accumulator = EventAccumulator(
        str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0}
    )
    accumulator.Reload()
    return accumulator


def expected_scalars(metrics: list[dict]) -> dict[str, list[tuple[int, float, float]]]:
    """An independent reading of metrics.jsonl: every finite number but step and time, by tag."""
    out: dict[str, list[tuple[int, float, float]]] = {}
    for record in metrics:
        for key, value in record.items():
            if key in ("kind", "step", "time") or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                out.setdefault(scalar_tag(key, record["kind"]), []).append((record["step"], value, record["time"]))
    return out


def assert_event_file_matches_the_run(run: Path) -> None:
    accumulator = events(run)
    expected = expected_scalars(read_jsonl(run / "metrics.jsonl"))
    assert set(accumulator.Tags()["scalars"]) == set(expected)
    for tag, points in expected.items():
        got = accumulator.Scalars(tag)
        assert [e.step for e in got] == [step for step, _, _ in points], tag  # each step once, in order
        assert [e.value for e in got] == pytest.approx([v for _, v, _ in points], rel=1e-6, abs=1e-6), tag
        assert [e.wall_time for e in got] == pytest.approx([t for _, _, t in points], abs=1e-3), tag
    histograms = {
        tag: {e.step: e.histogram_value for e in accumulator.Histograms(tag)} for tag in ("reward/all", "reward/kept")
    }
    texts = {
        e.step: e.tensor_proto.string_val[0].decode() for e in accumulator.Tensors("samples/best_kept/text_summary")
    }
    steps = sorted(int(p.stem.removeprefix("step_")) for p in (run / "rollouts").glob("step_*.jsonl"))
    assert steps and sorted(histograms["reward/all"]) == steps
    for step in steps:
        rows = read_jsonl(run / "rollouts" / f"step_{step}.jsonl")
        for tag, chosen in (("reward/all", rows), ("reward/kept", [r for r in rows if r["kept"]])):
            rewards = [r["reward"] for r in chosen if r["reward"] is not None]
            histogram = histograms[tag][step]
            assert (histogram.num, histogram.min, histogram.max) == (len(rewards), min(rewards), max(rewards))
            assert histogram.sum == pytest.approx(sum(rewards))
        best = max((r for r in rows if r["kept"]), key=lambda r: r["reward"])
        assert f"**reward {best['reward']:.4g}**" in texts[step]
        assert "\n".join("    " + line for line in best["response"].splitlines()) in texts[step]


def test_the_tensorboard_event_file_equals_metrics_jsonl_and_the_rollouts(tmp_path):
    run = tmp_path / "run"
    done = train(tmp_path, tiny_config(run))
    assert done.returncode == 0, done.stderr
    assert_event_file_matches_the_run(run)
    tags = events(run).Tags()["scalars"]
    for group in ("reward", "selection", "diversity", "validation", "time", "train"):
        assert any(tag.startswith(f"{group}/") for tag in tags), group
    assert "reward/kept_mean" in tags and "validation/reward_greedy" in tags


def test_a_resumed_run_appends_without_duplicate_steps(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, max_steps=4, save_every=2, val_every=2)
    killed = train(tmp_path, config, env={"THRESHER_FAILPOINT": "generated@4"})
    assert killed.returncode == -9, killed.stderr
    before = events(run)
    assert [e.step for e in before.Scalars("reward/mean")] == [1, 2, 3]  # step 3 lies past the checkpoint
    resumed = train(tmp_path, config, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert [m["step"] for m in read_jsonl(run / "metrics.jsonl") if m["kind"] == "train"] == [1, 2, 3, 4]
    assert_event_file_matches_the_run(run)  # step 3 once: the resumed run's


def test_an_overwritten_run_starts_a_fresh_event_file(tmp_path):
    run = tmp_path / "run"
    assert train(tmp_path, tiny_config(run, max_steps=1)).returncode == 0
    (run / "tensorboard" / "notes.txt").write_text("mine")
    config = tiny_config(run, max_steps=1)
    config["output"]["overwrite"] = True
    assert train(tmp_path, config).returncode == 0
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert (run / "tensorboard" / "notes.txt").read_text() == "mine"  # never delete what Thresher did not write
    assert_event_file_matches_the_run(run)


@pytest.mark.parametrize(
    ("loggers", "problem"),
    [
        ({"type": "tensorboard"}, "loggers: expected a list like [{type: tensorboard}], got dict"),
        ([{"type": "comet"}], "loggers[0].type: unknown logger 'comet'; available: jsonl, mlflow, tensorboard, wandb"),
        (
            [{"type": "tensorboard", "samples": -1}],
            "loggers[0].samples: Input should be greater than or equal to 0 (got -1)",
        ),
        ([{"type": "tensorboard"}, {"type": "tensorboard"}], "loggers[1].type: 'tensorboard' is listed twice"),
        ([{"kind": "tensorboard"}], "loggers[0].type: required (choose one of: jsonl, mlflow, tensorboard, wandb)"),
    ],
)
def test_a_bad_loggers_section_is_one_line_naming_it(tmp_path, loggers, problem):
    config = tiny_config(tmp_path / "run")
    config["loggers"] = loggers
    with pytest.raises(ConfigError) as err:
        thresher.load_config(config)
    assert err.value.problems == [problem]


class Recorder:
    """A third-party logger: keeps what it gets (in process, through thresher.register)."""

    name = "recorder"
    seen: ClassVar[list[tuple[str, object]]] = []

    class Config(Section):
        fail_at_step: int = 0

    def __init__(self, config, context):
        self.config = config
        Recorder.seen.append(("run_dir", context.run_dir))

    def log(self, record):
        Recorder.seen.append((record["kind"], record["step"]))
        if record["kind"] == "train" and record["step"] == self.config.fail_at_step:
            raise ConnectionError("tracking server went away\nsecond line")

    def log_rollouts(self, step, rows):
        Recorder.seen.append(("rollouts", len(rows)))

    def close(self):
        Recorder.seen.append(("closed", None))


@pytest.fixture
def recorder():
    Recorder.seen = []
    thresher.register(Recorder, kind="logger")
    yield Recorder
    thresher.unregister(Recorder)


def test_a_plugin_logger_gets_every_record_and_the_rollouts_in_order(tmp_path, recorder):
    config = tiny_config(tmp_path / "run")
    config["loggers"] = [{"type": "recorder"}]
    with thresher.Run.from_config(config, quiet=True) as run:
        run.train()
    assert recorder.seen == [
        ("run_dir", tmp_path / "run"),
        ("validation", 0),
        ("rollouts", 16),
        ("train", 1),
        ("rollouts", 16),
        ("train", 2),
        ("validation", 2),
        ("closed", None),
    ]


def test_a_failing_logger_is_reported_once_and_switched_off_while_training_goes_on(tmp_path, recorder, capsys):
    run_dir = tmp_path / "run"
    config = tiny_config(run_dir)
    config["loggers"] = [{"type": "recorder", "fail_at_step": 1}]
    with thresher.Run.from_config(config) as run:
        history = run.train()
    assert [r["step"] for r in history] == [1, 2]
    assert ("train", 2) not in recorder.seen and ("closed", None) not in recorder.seen
    assert [m["step"] for m in read_jsonl(run_dir / "metrics.jsonl") if m["kind"] == "train"] == [1, 2]
    err = capsys.readouterr().err
    assert (
        "warning: logger 'recorder' failed in log (ConnectionError: tracking server went away); it is switched off "
        "for the rest of the run"
    ) in err
    assert err.count("logger 'recorder' failed") == 1


def assert_switched_off_in_one_line(done: subprocess.CompletedProcess, folder: Path) -> None:
    """The run went on: exit 0, no traceback (main or writer thread), one warning naming logger and folder."""
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stdout + done.stderr and "Exception in thread" not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "logger 'tensorboard'" in line]
    assert len(warnings) == 1, done.stderr
    assert warnings[0].startswith("warning: logger 'tensorboard' failed") and str(folder) in warnings[0], warnings
    assert "switched off" in warnings[0]


def test_a_file_named_tensorboard_switches_the_logger_off_and_training_goes_on(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, max_steps=1)
    config["loggers"] = []
    assert train(tmp_path, config).returncode == 0
    (run / "tensorboard").write_text("my notes, not a folder")  # a user's file where the event folder goes
    config = tiny_config(run, max_steps=2)
    config["output"]["overwrite"] = True
    done = train(tmp_path, config, quiet=False)
    assert_switched_off_in_one_line(done, run / "tensorboard")
    assert "it is a file, not a folder" in done.stderr
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [(m["kind"], m["step"]) for m in metrics if m["kind"] != "stop"] == [
        ("validation", 0), ("train", 1), ("train", 2), ("validation", 2)
    ]  # fmt: skip
    assert (run / "tensorboard").read_text() == "my notes, not a folder"  # left as it was
    assert (run / "final").is_dir()


def unwritable_folder(folder: Path) -> None:
    """Make ``folder`` one where no new file can be created, also for root (whom chmod does not stop)."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return
    # root: a folder of sysfs, where the kernel refuses new files to everyone, in the folder's place.
    target = Path("/sys/kernel")
    try:
        (target / "thresher-probe").open("wb").close()
    except OSError:
        folder.rename(folder.with_name("tensorboard.before"))
        folder.symlink_to(target, target_is_directory=True)
        return
    (target / "thresher-probe").unlink()
    pytest.skip("running as root and /sys/kernel accepts new files: no folder here refuses root's writes")


def test_a_resume_into_an_unwritable_event_folder_switches_the_logger_off_and_training_goes_on(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, max_steps=4, save_every=2, val_every=2)
    killed = train(tmp_path, config, env={"THRESHER_FAILPOINT": "generated@4"})
    assert killed.returncode == -9, killed.stderr
    unwritable_folder(run / "tensorboard")
    try:
        done = train(tmp_path, config, "--resume", quiet=False)
    finally:
        if not (run / "tensorboard").is_symlink():
            (run / "tensorboard").chmod(0o755)
    assert_switched_off_in_one_line(done, run / "tensorboard")
    metrics = read_jsonl(run / "metrics.jsonl")
    assert [m["step"] for m in metrics if m["kind"] == "train"] == [1, 2, 3, 4]
    assert [m["step"] for m in metrics if m["kind"] == "validation"] == [0, 2, 4]
    assert (run / "final").is_dir()


def test_a_write_that_fails_mid_run_is_one_error_of_the_logging_call_with_no_writer_thread(tmp_path):
    """A full disk, for root too: a file size limit (RLIMIT_FSIZE) stops the event file from growing."""
    resource = pytest.importorskip("resource")
    threads = threading.active_count()
    logger = TensorBoardLogger(TensorBoardLogger.Config(), PluginContext(run_dir=tmp_path))
    assert threading.active_count() == threads  # no background writer whose errors no caller could catch
    logger.log({"kind": "train", "step": 1, "time": 100.0, "reward_mean": 0.5})
    (event_file,) = (tmp_path / "tensorboard").glob("events.out.tfevents.*")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (event_file.stat().st_size, hard))
    try:
        with pytest.raises(OSError) as err:
            logger.log({"kind": "train", "step": 2, "time": 200.0, "reward_mean": 0.75})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert str(err.value) == f"cannot write event files to {tmp_path / 'tensorboard'} (File too large)"
    assert [(e.step, e.value) for e in events(tmp_path).Scalars("reward/mean")] == [(1, 0.5)]
