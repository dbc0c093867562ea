"""The memory plan (``thresher train --dry-run``), the refusal of a run that cannot fit, and
activation checkpointing — against real models, real processes and their measured peak memory."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tests.training.test_loss import make_batch
from thresher.core.config import LoraOptions, load_config
from thresher.core.model import build_tiny_model, tiny_config
from thresher.core.training.memory import model_shape, plan_auto_micro_batch, plan_memory, with_micro_batch
from thresher.core.training.trainer import accumulate_gradients
from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30


def llama_8b_dir(path: Path, tokenizer) -> Path:
    """A model directory with Llama-3-8B's config.json and a tokenizer, and no weights at all."""
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
    ).save_pretrained(path)  # fmt: skip
    tokenizer.save_pretrained(path)
    return path


def test_plan_counts_parameters_exactly_without_allocating(tiny_tokenizer):
    model = build_tiny_model(tiny_tokenizer)
    shape = model_shape(tiny_config(tiny_tokenizer))
    assert shape.parameters == shape.trainable == sum(p.numel() for p in model.parameters())
    from thresher.core.training.lora import apply_lora

    apply_lora(model, LoraOptions(r=4))
    lora_shape = model_shape(tiny_config(tiny_tokenizer), LoraOptions(r=4))
    assert lora_shape.parameters == sum(p.numel() for p in model.parameters())
    assert lora_shape.trainable == lora_shape.adapters == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, cli):
    run = tmp_path / "run"
    result = cli("train", "tiny", "--dry-run", "--set", f"output.dir={run}")
    assert result.exit_code == 0, result.output
    for item in ("weights", "master weights", "gradients", "optimizer state", "activations", "generation KV cache"):
        assert f"  {item} " in result.output
    assert "fits" in result.output
    assert not run.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="plans for a GPU this machine does not have")
def test_a_dry_run_plans_for_a_gpu_this_machine_lacks_and_a_run_is_refused(tmp_path, cli):
    run = tmp_path / "run"
    cuda = ("--set", "model.device=cuda", "--set", "model.dtype=bfloat16", "--set", f"output.dir={run}")
    planned = cli("train", "tiny", "--dry-run", *cuda)
    assert planned.exit_code == 0, planned.output
    assert "memory plan on cuda:" in planned.output and "master weights" in planned.output
    assert "note: planned for a CUDA device this machine does not have" in planned.output
    assert "available" in planned.output and "unknown" in planned.output and not run.exists()
    refused = cli("train", "tiny", *cuda)
    assert refused.exit_code == 2
    assert "error: model.device: 'cuda' requested but CUDA is not available" in refused.output


def test_an_8b_policy_plans_to_fit_80gb_only_with_lora_and_checkpointing(tmp_path, tiny_tokenizer, registry):
    """Llama-3-8B's shape (all 32 layers), bf16: 512-token prompts + 256 new tokens, micro-batches of 16."""
    model_dir = llama_8b_dir(tmp_path / "llama8b", tiny_tokenizer)
    raw = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())
    raw["model"] = {"path": str(model_dir), "dtype": "bfloat16"}
    raw["generator"]["max_new_tokens"] = 256
    raw["optim"]["micro_batch_size"] = 16

    def plan(*overrides):
        path = tmp_path / "run.yaml"
        path.write_text(yaml.safe_dump(raw))
        config = load_config(path, list(overrides), registry)
        shape = model_shape(__import__("transformers").AutoConfig.from_pretrained(model_dir), config.model.lora)
        return plan_memory(config, shape, 512, torch.device("cuda"), available=80 * GiB)

    full = plan()
    assert 7.9e9 < sum(i.bytes for i in full.items if i.name == "weights") / 2 < 8.1e9  # 8.03B × 2 B
    assert not full.fits
    checkpointed = plan("optim.activation_checkpointing=true")  # fp32 masters and AdamW remain too big
    assert not checkpointed.fits and checkpointed.biggest().name == "optimizer state"
    assert "model.lora" in checkpointed.biggest().shrink
    lora_only = plan("model.lora.r=16")
    assert not lora_only.fits and lora_only.biggest().name == "activations"
    assert "activation_checkpointing" in lora_only.biggest().shrink
    both = plan("model.lora.r=16", "optim.activation_checkpointing=true")
    assert both.fits, both.render()


def test_a_micro_batch_larger_than_a_step_is_planned_at_what_the_step_holds(tmp_path, tiny_tokenizer, registry):
    """2 prompts × N = 2 make at most 4 training sequences a step: micro_batch_size 8 trains them in
    one micro-batch of 4 (micro-batches are cut from the step's sequences, never padded up), so its
    activations are planned as 4's, not 8's; over 2 ranks each holds 2."""
    model_dir = llama_8b_dir(tmp_path / "llama8b", tiny_tokenizer)
    raw = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())
    raw["model"] = {"path": str(model_dir), "dtype": "bfloat16", "lora": {"r": 16}}
    raw["rs"].update(prompts_per_step=2, num_rollouts_per_prompt=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))

    def activations(micro_batch: int, world_size: int = 1):
        config = load_config(path, [f"optim.micro_batch_size={micro_batch}"], registry)
        shape = model_shape(__import__("transformers").AutoConfig.from_pretrained(model_dir), config.model.lora)
        plan = plan_memory(config, shape, 512, torch.device("cuda"), available=80 * GiB, world_size=world_size)
        return next(item for item in plan.items if item.name == "activations")

    eight, four, three = activations(8), activations(4), activations(3)
    assert eight.bytes == four.bytes > three.bytes
    assert "4 sequences" in eight.detail and "all a step can hold, under micro_batch_size 8" in eight.detail
    assert "under micro_batch_size" not in four.detail
    assert activations(8, world_size=2).bytes == activations(2).bytes  # each rank's share: 2


def test_auto_micro_batch_is_the_largest_whose_training_peak_leaves_the_headroom(tmp_path, tiny_tokenizer, registry):
    """Llama-3-8B's shape, LoRA + checkpointing, 64 prompts × N = 8 on an 80 GiB card: the bisection's
    pick against the plan of every micro-batch from 1 to a whole optimizer batch (512)."""
    from transformers import AutoConfig

    model_dir = llama_8b_dir(tmp_path / "llama8b", tiny_tokenizer)
    raw = yaml.safe_load((ROOT / "thresher" / "presets" / "tiny.yaml").read_text())
    raw["model"] = {"path": str(model_dir), "dtype": "bfloat16", "lora": {"r": 16}, "memory_limit_gb": 80}
    raw["generator"]["max_new_tokens"] = 128
    raw["rs"].update(prompts_per_step=64, num_rollouts_per_prompt=8)
    raw["optim"].update(micro_batch_size="auto", activation_checkpointing=True)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    config = load_config(path, [], registry)
    shape = model_shape(AutoConfig.from_pretrained(model_dir), config.model.lora)

    def plan_for(run_config):
        return plan_memory(run_config, shape, 512, torch.device("cuda"), available=80 * GiB)

    plan = plan_auto_micro_batch(config, plan_for)
    peaks = [plan_for(with_micro_batch(config, size)).training_peak for size in range(1, 513)]
    fitting = [size for size, peak in enumerate(peaks, start=1) if peak <= 0.85 * 80 * GiB]
    assert plan.micro_batch_size == max(fitting) and 1 < max(fitting) < 512  # a real bracket, not a bound
    assert plan.training_peak == peaks[max(fitting) - 1]
    assert f"optim.micro_batch_size auto: {max(fitting)} (the largest whose training peak fits in 85%" in plan.render()
    headroom = load_config(path, ["optim.micro_batch_headroom=0.5"], registry)
    assert plan_auto_micro_batch(headroom, plan_for).micro_batch_size < max(fitting)
    capped = load_config(path, ["optim.batch_size=24"], registry)  # nothing beyond one optimizer batch
    assert plan_auto_micro_batch(capped, plan_for).micro_batch_size == 24
    unknown = plan_auto_micro_batch(config, lambda c: plan_memory(c, shape, 512, torch.device("cuda")))
    assert unknown.micro_batch_size == 8 and "the available memory is unknown" in unknown.render()


def test_auto_micro_batch_run_stays_within_its_plan(tmp_path, long_prompts):
    """SmolLM2 on 4 sequences of 512+ tokens in a fresh process, with a memory limit that lets the
    plan pick fewer than all 4: the run trains with that micro-batch and its measured peak resident set
    stays within the plan's peak plus the headroom (and within the limit)."""
    record, run_dir, stderr = run_once(tmp_path, long_prompts, checkpointing=False, micro_batch="auto", limit_gb=5.5)
    picked = re.search(r"optim.micro_batch_size auto: (\d+) \(the largest", (run_dir / "memory_plan.txt").read_text())
    assert picked, (run_dir / "memory_plan.txt").read_text()
    size = int(picked.group(1))
    # measured 2026-11-30: 0.65 GB of activations a sequence, 3 fit in 85% of 5.5 GB (4.35 GB), 4 do not
    # (5.0 GB): the limit sits between them so that the process's own runtime moving ±0.3 GB changes nothing
    assert size == 3, (run_dir / "memory_plan.txt").read_text()
    assert f"optim.micro_batch_size auto: {size} (the memory plan's pick)" in stderr
    assert record["kept"] == 4
    assert record["memory_peak_mb"] <= 1.15 * record["memory_planned_peak_mb"], record
    assert record["memory_peak_mb"] <= 5.5 * 1024, record


def test_a_run_that_cannot_fit_stops_before_loading_in_one_line(tmp_path, tiny_tokenizer):
    """An 8B policy with no weight files: the plan alone must stop it (loading would fail otherwise)."""
    model_dir = llama_8b_dir(tmp_path / "llama8b", tiny_tokenizer)
    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "thresher", "train", "tiny", "--set", f"model.path={model_dir}",
         "--set", f"output.dir={run}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "memory plan: this run needs about" in errors[0]
    assert "the biggest item is optimizer state" in errors[0] and "model.lora" in errors[0]
    assert "Traceback" not in result.stderr and not run.exists()
    dry = subprocess.run(
        [sys.executable, "-m", "thresher", "train", "tiny", "--dry-run", "--set", f"model.path={model_dir}"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert dry.returncode == 2 and "DOES NOT FIT" in dry.stdout  # scripts can tell it would be refused


def test_activation_checkpointing_gives_the_same_gradients(tiny_tokenizer):
    from thresher.core.training.memory import enable_activation_checkpointing

    grads = []
    for checkpointing in (False, True):
        model = build_tiny_model(tiny_tokenizer, seed=0)
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
        accumulate_gradients(model, loss, make_batch(tiny_tokenizer), 2, tiny_tokenizer.pad_token_id, "cpu")
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert any(float(g.abs().max()) > 0 for g in grads[0].values())
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def long_prompts(tmp_path_factory) -> Path:
    """Prompts of ~510 SmolLM2 tokens: with 8 new tokens every training sequence is over 512."""
    rng = random.Random(0)
    words = [
        "the",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "while",
        "seven",
        "cats",
        "watch",
        "from",
        "a",
        "red",
        "barn",
        "near",
        "river",
    ]
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    rows = [" ".join(rng.choice(words) for _ in range(500)) + f" What is {i} + 3?" for i in range(4)]
    path.write_text("".join(json.dumps({"prompt": r}) + "\n" for r in rows))
    return path


def run_once(
    tmp: Path, prompts: Path, checkpointing: bool, micro_batch: int | str = 8, limit_gb: float | None = None
) -> tuple[dict, Path, str]:
    """One step of SmolLM2 on 4 sequences of 512+ tokens in a fresh process: its metrics line, its
    run directory and what it printed on stderr."""
    config = {
        "model": {"path": "builtin:smollm2", "dtype": "float32", "device": "cpu"},
        "data": {"train": str(prompts), "chat_template": "never"},
        "rs": {"max_steps": 1, "prompts_per_step": 2, "num_rollouts_per_prompt": 2, "seed": 1, "save_every": 0},
        "generator": {"type": "hf", "max_new_tokens": 8, "batch_size": 2},
        "scorer": {"type": "rule", "function": "thresher.presets.rewards:digit_share"},
        "selector": {"type": "topk", "top_n_rollouts": 2},  # keep all 4: one micro-batch of 4
        "optim": {"lr": 1e-5, "micro_batch_size": micro_batch, "activation_checkpointing": checkpointing},
        "output": {"dir": str(tmp / f"run-{checkpointing}"), "save_final": False},
    }
    if limit_gb is not None:
        config["model"]["memory_limit_gb"] = limit_gb
    path = tmp / f"mem-{checkpointing}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "thresher", "train", str(path)],
        capture_output=True, text=True, timeout=600, cwd=ROOT, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    run_dir = tmp / f"run-{checkpointing}"
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r["kind"] == "train"), run_dir, result.stderr


def test_plan_is_within_25_percent_of_measured_peak_rss_on_smollm2(tmp_path, long_prompts):
    """Measured: the process's peak resident set (VmHWM) after a step with 512+-token sequences."""
    from thresher.core.model import load_tokenizer

    tokenizer = load_tokenizer("builtin:smollm2")
    lengths = [len(tokenizer(json.loads(line)["prompt"])["input_ids"]) for line in long_prompts.open()]
    assert min(lengths) >= 505  # + up to 8 new tokens: sequences of 512 or more
    plain = run_once(tmp_path, long_prompts, checkpointing=False)[0]
    checkpointed = run_once(tmp_path, long_prompts, checkpointing=True)[0]
    assert plain["kept"] == checkpointed["kept"] == 4  # one micro-batch of all 4 (micro_batch_size 8)
    for record in (plain, checkpointed):
        ratio = record["memory_planned_peak_mb"] / record["memory_peak_mb"]
        assert 0.75 < ratio < 1.25, record
    # checkpointing lowers the measured peak by far more than noise (about 4.6 GB → 2.8 GB here)
    assert checkpointed["memory_peak_mb"] < 0.7 * plain["memory_peak_mb"]


def test_the_host_mmap_threshold_is_set_on_glibc_unless_the_user_set_one():
    code = "from thresher.core.training.memory import return_large_frees_to_the_os as f; print(f())"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    mine = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    users = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True,
        env={**env, "MALLOC_MMAP_THRESHOLD_": "65536"},
    )  # fmt: skip
    assert (mine.stdout.strip(), users.stdout.strip()) == ("True", "False")
