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


def _gqa(tiny_tokenizer, dtype=torch.float32):
    from tests.generators.test_static_decode import gqa_model

    return gqa_model(tiny_tokenizer).to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_decode_graphs_give_the_eager_tokens(tiny_tokenizer, dtype):
    """The captured graphs replay exactly the eager static step: same samples (with compaction into
    smaller buckets as rows finish), same greedy answers."""
    from tests.generators.test_static_decode import finish_early, prompts

    model = _gqa(tiny_tokenizer, dtype)
    finish_early(model, tiny_tokenizer, "xyz")
    context = PluginContext(tokenizer=tiny_tokenizer, policy=model, device=torch.device("cuda"))
    runs = {}
    for graphs in (True, False):
        config = HFGenerator.Config(max_new_tokens=40, decode="static", cuda_graphs=graphs, batch_size=4)
        gen = HFGenerator(config, context)
        sampled = [(r.response_ids, r.finish_reason) for r in gen.generate(prompts(tiny_tokenizer), 8, seed=4)]
        greedy = [r.response_ids for r in gen.generate(prompts(tiny_tokenizer), 1, seed=0, greedy=True)]
        runs[graphs] = (sampled, greedy, gen.metrics()["compile_s"])
    assert runs[True][:2] == runs[False][:2]
    assert runs[True][2] > 0 and runs[False][2] == 0  # graphs were captured (and only with graphs on)
    reasons = {reason for _, reason in runs[True][0]}
    assert reasons == {"eos", "length"}  # rows finished at different steps: compaction happened


def test_a_compiled_step_replayed_as_graphs_gives_the_eager_tokens(tiny_tokenizer):
    """``compile_step``: the torch.compile'd step, captured as graphs per bucket, samples what the
    eager step samples (fp32: fused kernels round differently in bf16, so tokens may then part)."""
    from tests.generators.test_static_decode import finish_early, prompts

    model = _gqa(tiny_tokenizer)
    finish_early(model, tiny_tokenizer, "xyz")
    context = PluginContext(tokenizer=tiny_tokenizer, policy=model, device=torch.device("cuda"))
    runs = {}
    for compiled, graphs in ((True, True), (False, False)):
        config = HFGenerator.Config(
            max_new_tokens=40, decode="static", cuda_graphs=graphs, compile_step=compiled, batch_size=4
        )
        gen = HFGenerator(config, context)
        runs[compiled] = [(r.response_ids, r.finish_reason) for r in gen.generate(prompts(tiny_tokenizer), 8, seed=4)]
    assert runs[True] == runs[False]
    assert {reason for _, reason in runs[True]} == {"eos", "length"}  # compaction: several buckets


def test_static_greedy_on_cuda_equals_generate(tiny_tokenizer):
    from tests.generators.test_static_decode import finish_early, prompts

    model = _gqa(tiny_tokenizer)
    finish_early(model, tiny_tokenizer, "aeiou ")
    context = PluginContext(tokenizer=tiny_tokenizer, policy=model, device=torch.device("cuda"))
    got = {
        decode: [
            r.response_ids
            for r in HFGenerator(HFGenerator.Config(max_new_tokens=20, decode=decode), context).generate(
                prompts(tiny_tokenizer), 1, seed=0, greedy=True
            )
        ]
        for decode in ("static", "generate")
    }
    assert got["static"] == got["generate"]


def test_bf16_master_weights_on_cuda_move_as_fp32(tiny_tokenizer):
    from tests.training.test_loss import make_batch
    from thresher.core.config import OptimConfig
    from thresher.core.model import build_tiny_model
    from thresher.core.training.trainer import Trainer
    from thresher.losses.masked_mean_logprob import MaskedMeanLogprobLoss

    deltas = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = build_tiny_model(tiny_tokenizer, seed=0).to(torch.bfloat16).to("cuda", dtype)
        before = {n: p.detach().float().clone() for n, p in model.named_parameters()}
        loss = MaskedMeanLogprobLoss(MaskedMeanLogprobLoss.Config())
        config = OptimConfig(lr=1e-5, micro_batch_size=2, grad_clip=None)
        trainer = Trainer(model, loss, config, max_steps=3, pad_id=tiny_tokenizer.pad_token_id, device="cuda")
        for step in range(1, 4):
            trainer.train_step(step, make_batch(tiny_tokenizer, seed=3))
        deltas[dtype] = torch.cat([(trainer.weights()[n].float() - b).flatten() for n, b in before.items()])
    reference = deltas[torch.float32]
    assert float((deltas[torch.bfloat16] - reference).abs().mean() / reference.abs().mean()) < 0.1


def test_a_bf16_lora_run_on_cuda_decodes_with_graphs_and_learns(tiny_config, write_config, cli):
    tiny_config["model"].update(device="cuda", dtype="bfloat16", lora={"r": 8})
    tiny_config["optim"]["lr"] = 3e-3
    tiny_config["rs"].update(max_steps=3)
    result = cli("train", write_config(tiny_config), "--quiet")
    assert result.exit_code == 0, result.output
    metrics = Path(tiny_config["output"]["dir"]) / "metrics.jsonl"
    train = [x for x in map(json.loads, metrics.read_text().splitlines()) if x.get("kind") == "train"]
    assert all(x["generator_decode_static"] == 1.0 for x in train)
    assert train[0]["generator_compile_s"] > 0  # graphs captured once, in the first step
    assert train[-1]["generator_compile_s"] == 0
