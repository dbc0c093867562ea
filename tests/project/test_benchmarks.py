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


def test_gpu_step_lets_the_plan_pick_the_micro_batch():
    out = run("benchmarks/gpu_step.py", "--shape", "tiny", "--device", "cpu", "--micro-batch", "auto")
    picked = re.search(r"micro-batch (\d+) \(auto\)", out)
    assert picked, out
    # tiny: 4 prompts × N = 2, so a whole optimizer batch is 8 sequences, far within this machine's memory
    assert int(picked.group(1)) == 8
    assert "note: optim.micro_batch_size auto: 8 (a whole optimizer batch" in out


def test_gpu_step_plans_the_full_8b_shape_for_an_80gb_card_without_a_gpu():
    """Llama-3-8B's 32 layers, nothing allocated: LoRA with checkpointing fits 80 GiB and the plan picks
    a micro-batch; full fine-tuning (fp32 masters and AdamW moments: 16 bytes per weight) does not."""
    lora = run(
        *[
            "benchmarks/gpu_step.py",
            "--shape",
            "8b",
            "--lora",
            "--checkpointing",
            "--micro-batch",
            "auto",
            "--plan-gb",
            "80",
        ]
    )
    assert "planned for a 80 GiB CUDA card" in lora and "7.38B × 2 B (bfloat16)" in lora
    assert re.search(r"available\s+80\.0 GB\s+fits", lora), lora
    picked = int(re.search(r"optim.micro_batch_size auto: (\d+) \(the largest whose", lora).group(1))
    assert 16 < picked < 512
    full = run(*["benchmarks/gpu_step.py", "--shape", "8b", "--micro-batch", "auto", "--plan-gb", "80"])
    assert "DOES NOT FIT" in full and "not even 1 sequence" in full


def test_generation_benchmark_profiles_where_a_call_goes():
    out = run(
        "benchmarks/generation.py", "--shape", "tiny", "--fixed-length", "--prompts", "2", "--n", "2",
        "--tokens", "4", "--only", "static", "--profile",
    )  # fmt: skip
    total = re.search(r"profile of one call: [\d.]+ ms wall, (\d+) operator calls; CPU time by kind", out)
    assert total, out
    rows = [re.match(r"\s+(\S.*?)\s+([\d.]+) ms\s+([\d.]+)%\s+(\d+) x\s+[\d.]+ us$", line) for line in out.splitlines()]
    shares = {m.group(1): float(m.group(3)) for m in rows if m}
    counts = {m.group(1): int(m.group(4)) for m in rows if m}
    assert shares.get("matmul", 0) > 5, out  # the projections are there, named as such
    assert abs(sum(shares.values()) - 100) < 1, out
    assert sum(counts.values()) == int(total.group(1)), out
    # 3 decode steps after the prefill, each 2 layers x 7 projections + the output head
    assert counts["matmul"] >= 3 * (2 * 7 + 1), out


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
