"""Loggers: the tensorboard event file read back with TensorBoard's own reader equals metrics.jsonl
and the rollout files; a resumed run leaves no duplicate steps; a failing logger never stops training."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

import thresher
from thresher.core.errors import ConfigError
from thresher.loggers.tensorboard import scalar_tag
from thresher.plugin import Section

pytest.importorskip("tensorboard", reason="the tensorboard extra (scripts/install.sh installs it)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

ROOT = Path(__file__).resolve().parent.parent
PRESET = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())


def tiny_config(run: Path, **rs) -> dict:
    config = json.loads(json.dumps(PRESET))
    config["rs"].update(
        {"max_steps": 2, "prompts_per_step": 4, "num_rollouts_per_prompt": 4, "val_max_prompts": 2, **rs}
    )
    config["output"] = {"dir": str(run)}
    config["loggers"] = [{"type": "tensorboard", "samples": 1}]
    return config


def train(tmp_path: Path, config: dict, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run(
        [sys.executable, "-m", "thresher", "train", str(path), "-q", *args], capture_output=True, text=True,
        timeout=300, cwd=ROOT, env={**os.environ, **(env or {})},
    )  # fmt: skip


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


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
    assert "reward/reward_kept_mean" in tags and "validation/val_reward_greedy" in tags


def test_a_resumed_run_appends_without_duplicate_steps(tmp_path):
    run = tmp_path / "run"
    config = tiny_config(run, max_steps=4, save_every=2, val_every=2)
    killed = train(tmp_path, config, env={"THRESHER_FAILPOINT": "generated@4"})
    assert killed.returncode == -9, killed.stderr
    before = events(run)
    assert [e.step for e in before.Scalars("reward/reward_mean")] == [1, 2, 3]  # step 3 lies past the checkpoint
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
        ([{"type": "wandb"}], "loggers[0].type: unknown logger 'wandb'; available: jsonl, tensorboard"),
        (
            [{"type": "tensorboard", "samples": -1}],
            "loggers[0].samples: Input should be greater than or equal to 0 (got -1)",
        ),
        ([{"type": "tensorboard"}, {"type": "tensorboard"}], "loggers[1].type: 'tensorboard' is listed twice"),
        ([{"kind": "tensorboard"}], "loggers[0].type: required (choose one of: jsonl, tensorboard)"),
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
