"""Checks that need a CUDA device (marker `gpu`; `scripts/gpu_check.sh` runs them, with the vLLM
ones in test_vllm_generator.py when vLLM is installed). Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from thresher.core.types import PluginContext, Prompt
from thresher.generators.hf import HFGenerator

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
]

TEXTS = ["What is 1 + 2?", "Hi", "A much longer prompt than the others, to force padding.", "7 + 5 ="]


def test_fast_decode_on_cuda_equals_generate_and_the_cpu(tiny_model, tiny_tokenizer):
    """Greedy answers: Thresher's decode loop equals transformers' generate() on the GPU, and both
    equal the CPU's (float32; the tiny model's logits are far from ties)."""
    prompts = [Prompt(i, t, tuple(tiny_tokenizer(t)["input_ids"])) for i, t in enumerate(TEXTS)]
    cpu = HFGenerator(HFGenerator.Config(max_new_tokens=16), PluginContext(tokenizer=tiny_tokenizer, policy=tiny_model))
    expected = [r.response_ids for r in cpu.generate(prompts, 1, seed=0, greedy=True)]
    model = tiny_model.to("cuda")
    for decode in ("fast", "generate"):
        config = HFGenerator.Config(max_new_tokens=16, decode=decode)
        context = PluginContext(tokenizer=tiny_tokenizer, policy=model, device=torch.device("cuda"))
        got = [r.response_ids for r in HFGenerator(config, context).generate(prompts, 1, seed=0, greedy=True)]
        assert got == expected, decode


def test_sampling_on_cuda_is_reproducible(tiny_model, tiny_tokenizer):
    model = tiny_model.to("cuda")
    prompts = [Prompt(i, t, tuple(tiny_tokenizer(t)["input_ids"])) for i, t in enumerate(TEXTS)]
    config = HFGenerator.Config(max_new_tokens=16)
    generator = HFGenerator(config, PluginContext(tokenizer=tiny_tokenizer, policy=model, device=torch.device("cuda")))
    first = [r.response_ids for r in generator.generate(prompts, 4, seed=3)]
    again = [r.response_ids for r in generator.generate(prompts, 4, seed=3)]
    assert first == again
    assert len({tuple(ids) for ids in first}) > 8


def test_shared_kv_on_cuda_samples_what_the_repeated_cache_samples(tiny_model, tiny_tokenizer):
    model = tiny_model.to("cuda")
    prompts = [Prompt(i, t, tuple(tiny_tokenizer(t)["input_ids"])) for i, t in enumerate(TEXTS)]
    context = PluginContext(tokenizer=tiny_tokenizer, policy=model, device=torch.device("cuda"))
    samples = [
        [
            r.response_ids
            for r in HFGenerator(HFGenerator.Config(max_new_tokens=16, shared_kv=shared), context).generate(
                prompts, 4, seed=5
            )
        ]
        for shared in (True, False)
    ]
    assert samples[0] == samples[1]


def test_tiny_preset_trains_on_cuda(tiny_config, write_config, cli):
    tiny_config["model"]["device"] = "cuda"
    tiny_config["rs"].update(max_steps=12, prompts_per_step=8, num_rollouts_per_prompt=8)
    result = cli("train", write_config(tiny_config), "--quiet")
    assert result.exit_code == 0, result.output
    metrics = Path(tiny_config["output"]["dir"]) / "metrics.jsonl"
    lines = [json.loads(x) for x in metrics.read_text(encoding="utf-8").splitlines()]
    train = [x for x in lines if x.get("kind") == "train"]
    assert len(train) == 12
    assert all(x["loss"] is None or x["loss"] == x["loss"] for x in train)  # finite or skipped
    rewards = [x["reward_mean"] for x in train]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1  # the CPU run gains ~0.4
