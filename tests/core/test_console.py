"""Progress that tells the time: bars with done/total on a terminal, one duration line per phase
off a terminal, and the run's ETA from the steps so far."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml
from rich.console import Console

from thresher.core.console import ConsoleReporter, _duration

ROOT = Path(__file__).resolve().parents[2]
STEP = {
    "step": 2, "reward_mean": 0.25, "reward_kept_mean": 0.75, "kept": 3, "rollouts": 16, "loss": 1.5,
    "time_generate": 4.0, "time_train": 2.0,
}  # fmt: skip


def reporter(terminal: bool) -> tuple[ConsoleReporter, io.StringIO]:
    out = io.StringIO()
    return ConsoleReporter(Console(file=out, force_terminal=terminal, width=160)), out


def test_off_a_terminal_each_phase_ends_with_one_line_saying_how_long_it_took():
    console, out = reporter(terminal=False)
    console.phase("loading the model")
    console.phase("step 1/3: generating 4×4 responses", total=16)
    console.advance(16)
    console.info("a message")  # ends the phase too
    console.phase("writing final model")
    console.done()
    console.done()  # a second done() prints nothing more
    lines = out.getvalue().splitlines()
    assert [re.sub(r"\d+\.\d s$", "N s", line) for line in lines] == [
        "loading the model: N s",
        "step 1/3: generating 4×4 responses: N s",
        "a message",
        "writing final model: N s",
    ]


def test_on_a_terminal_a_phase_is_a_bar_with_done_of_total_and_the_run_eta():
    console, out = reporter(terminal=True)
    console.step(STEP, max_steps=5, seconds_per_step=65.0)  # 3 steps left: 3m15s
    console.phase("step 3/5: generating 4×4 responses", total=16)
    console.advance(5)
    console.done()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", out.getvalue())
    assert "ETA 3m15s" in shown.splitlines()[0]
    assert "5/16" in shown and "run ETA 3m15s" in shown
    assert "step 3/5: generating 4×4 responses:" not in shown  # no duration line on a terminal


def test_quiet_prints_nothing():
    console, out = reporter(terminal=False)
    console.quiet = True
    console.phase("loading", total=3)
    console.advance()
    console.step(STEP, 5, 1.0)
    console.done()
    assert out.getvalue() == ""


def test_the_eta_is_the_remaining_steps_at_the_mean_pace():
    console, out = reporter(terminal=False)
    console.step(STEP, max_steps=2, seconds_per_step=10.0)  # the last step: nothing left
    console.step({**STEP, "skipped": "no rollout selected"}, max_steps=100, seconds_per_step=90.0)
    first, second = out.getvalue().splitlines()
    assert "ETA" not in first
    assert second.endswith("skipped: no rollout selected  ETA 2h27m")  # 98 × 90 s
    durations = [_duration(s) for s in (0.4, 59.6, 61, 3599, 3600, 7322)]
    assert durations == ["0s", "1m00s", "1m01s", "59m59s", "1h00m", "2h02m"]


def test_a_run_in_a_log_file_shows_every_phase_and_its_duration(tmp_path):
    config = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())
    config["rs"].update({"max_steps": 2, "prompts_per_step": 4, "num_rollouts_per_prompt": 4, "val_max_prompts": 2})
    config["output"] = {"dir": str(tmp_path / "run")}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [sys.executable, "-m", "thresher", "train", str(tmp_path / "run.yaml")],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    log = done.stderr
    for phase in (
        r"loading model .+",
        r"validating on 2 prompts",
        r"step 1/2: generating 4×4 responses",
        r"step 1/2: scoring 16 responses",
        r"step 1: training on \d+ responses",
        r"step 2: training on \d+ responses",
        r"writing final model",
    ):
        assert re.search(rf"^{phase}: \d+\.\d s$", log, re.MULTILINE), (phase, log)
    assert re.search(r"^step 1/2 .* ETA \d+s$", log, re.MULTILINE), log
    assert re.search(r"^step 2/2 .*train [\d.]+s$", log, re.MULTILINE), log  # the last step: no ETA


def test_off_a_terminal_a_long_phase_says_it_is_still_running():
    """A log never goes quiet for long (once, the demo printed nothing for 20 minutes on a busy
    machine): a phase prints a line every heartbeat_s seconds, with its count so far, until it ends."""
    out = io.StringIO()
    console = ConsoleReporter(Console(file=out, force_terminal=False, width=160), heartbeat_s=0.05)
    console.phase("step 1/3: generating 4×4 responses", total=16)
    console.advance(5)
    deadline = time.monotonic() + 30  # generous: a loaded machine may run the heartbeat thread late
    while "still running" not in out.getvalue() and time.monotonic() < deadline:
        time.sleep(0.05)
    console.done()
    lines = out.getvalue().splitlines()
    beats = [line for line in lines if "still running" in line]
    assert beats, lines
    assert re.fullmatch(r"step 1/3: generating 4×4 responses: still running \(\d+s, 5/16\)", beats[0])
    assert re.fullmatch(r"step 1/3: generating 4×4 responses: \d+\.\d s", lines[-1])  # the phase's end
    time.sleep(0.3)
    assert out.getvalue().splitlines() == lines  # nothing after the phase ended
    assert not any(t.name == "thresher-heartbeat" for t in threading.enumerate())


def test_a_terminal_gets_no_heartbeat_lines():
    out = io.StringIO()
    console = ConsoleReporter(Console(file=out, force_terminal=True, width=160), heartbeat_s=0.05)
    console.phase("loading the model")
    time.sleep(0.3)
    console.done()
    assert "still running" not in out.getvalue()
