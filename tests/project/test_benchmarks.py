"""Smoke tests of the GPU benchmarks on the CPU: they run end to end in seconds and print figures."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


GPU_STEP_DOC = (ROOT / "benchmarks" / "gpu_step.py").read_text()


def run(*args: str) -> str:
    result = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_gpu_step_runs_the_documented_smoke_command_with_lora_and_checkpointing():
    """The docstring's smoke command (``--shape tiny --device cpu``: small by default), plus the flags
    that change the training path."""
    documented = re.search(r"python (benchmarks/gpu_step.py --shape tiny --device cpu) ", GPU_STEP_DOC)
    assert documented, "the smoke command is no longer in gpu_step.py's docstring"
    out = run(*documented.group(1).split(), "--lora", "--checkpointing")
    assert "4 prompts × N=2 × 8 new tokens; micro-batch 4" in out
    assert "LoRA r16, checkpointing" in out
    rows = [line.split() for line in out.splitlines() if re.match(r"\s+[12] ", line)]
    assert len(rows) == 2
    for row in rows:
        generated_tps, train_tps, peak_gb = float(row[2]), float(row[5]), float(row[9])
        assert generated_tps > 0 and train_tps > 0 and peak_gb > 0
    ratio = float(out.strip().splitlines()[-1].split()[-1])  # memory plan / measured peak
    assert 0.5 < ratio < 1.5


def test_generation_benchmark_on_a_random_shape_at_fixed_length():
    out = run(
        "benchmarks/generation.py", "--shape", "tiny", "--fixed-length", "--prompts", "2", "--n", "2",
        "--tokens", "6", "--repeats", "1", "--only", "generate,fast,static",
    )  # fmt: skip
    assert "exactly 6 new tokens" in out
    rows = {line[:40].strip(): line[40:].split() for line in out.splitlines() if re.search(r"\d+\.\d+x ", line)}
    assert set(rows) == {"transformers generate(), eager", "fast: shared prefill + compaction", "static (eager on CPU)"}
    for figures in rows.values():
        assert float(figures[1]) > 0  # real tokens/s: exactly 2 × 2 × 6 tokens were produced
