"""The static-shape decoder (CUDA graphs on a GPU; the same code eagerly here): same answers as
transformers, samples that never depend on the batch, stop strings cut where they complete."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import small_llama_config
from thresher.core.types import PluginContext, Prompt
from thresher.generators.fast_decode import Sampling, filter_logits
from thresher.generators.hf import HFGenerator
from thresher.generators.static_decode import DecoderShape, StaticDecoder, buckets_for

TEXTS = ["What is 1 + 2?", "Hi", "A much longer prompt than the others, to force padding.", "7 + 5 ="]


def prompts(tokenizer, texts=TEXTS) -> list[Prompt]:
    return [Prompt(i, t, tuple(tokenizer(t)["input_ids"])) for i, t in enumerate(texts)]


def generator(model, tokenizer, **options) -> HFGenerator:
    return HFGenerator(HFGenerator.Config(**options), PluginContext(tokenizer=tokenizer, policy=model))


def gqa_model(tokenizer, model_type: str = "llama"):
    """A 2-layer model with grouped-query attention (4 heads, 2 KV heads) of the given family."""
    torch.manual_seed(0)
    if model_type == "llama":
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(small_llama_config(tokenizer, hidden=64, heads=4, kv_heads=2))
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.for_model(
            model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
        )  # fmt: skip
        model = AutoModelForCausalLM.from_config(config)
    return model.eval()


def trained_lora_model(tokenizer):
    """:func:`gqa_model` with LoRA adapters (r 4) whose B is not zero, as after some training."""
    from thresher.core.config import LoraOptions
    from thresher.core.training.lora import apply_lora

    model = gqa_model(tokenizer)
    apply_lora(model, LoraOptions(r=4, alpha=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_B." in name:
                param.normal_(0, 0.05)
    return model


def finish_early(model, tokenizer, characters: str) -> None:
    """Make these characters end a response, so rows finish at different steps (compaction)."""
    extra = [tokenizer.convert_tokens_to_ids(c) for c in characters]
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, *extra]


def outputs(rollouts) -> list[tuple[list[int], str]]:
    return [(r.response_ids, r.finish_reason) for r in rollouts]


def test_buckets_halve_down_to_eight():
    assert buckets_for(512) == [512, 256, 128, 64, 32, 16, 8]
    assert buckets_for(24) == [24, 12, 8]
    assert buckets_for(4) == [4]


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_greedy_static_decode_equals_transformers_generate(tiny_tokenizer, model_type):
    model = gqa_model(tiny_tokenizer, model_type)
    finish_early(model, tiny_tokenizer, "aeiou ")
    static = generator(model, tiny_tokenizer, max_new_tokens=20, batch_size=4, decode="static")
    slow = generator(model, tiny_tokenizer, max_new_tokens=20, batch_size=4, decode="generate")
    got = outputs(static.generate(prompts(tiny_tokenizer), 1, seed=0, greedy=True))
    assert got == outputs(slow.generate(prompts(tiny_tokenizer), 1, seed=0, greedy=True))
    assert len({len(ids) for ids, *_ in got}) > 1  # rows really finished at different steps


@pytest.mark.parametrize("options", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20}])
def test_samples_do_not_depend_on_the_batch(tiny_tokenizer, options):
    """Compaction on or off, host syncs every step or every 8, a call with fewer prompts: the same
    samples for the same (seed, prompt, sample)."""
    model = gqa_model(tiny_tokenizer)
    finish_early(model, tiny_tokenizer, "xyz")
    eos = set(model.generation_config.eos_token_id)
    pad = tiny_tokenizer.pad_token_id
    ids = [p.token_ids for p in prompts(tiny_tokenizer)]
    shape = DecoderShape(4, 6, 64, 24, False, options.get("top_k", 0), options.get("top_p", 1.0))
    results = {}
    for compaction in (True, False):
        for sync_every in (1, 8):
            decoder = StaticDecoder(
                model, shape, eos_ids=eos, pad_id=pad, suppress=[pad], use_graphs=False,
                sync_every=sync_every, compaction=compaction,
            )  # fmt: skip
            results[compaction, sync_every] = decoder.decode(ids, options["temperature"], seed=11)
    first = results[True, 8]
    assert all(responses(other) == responses(first) for other in results.values())
    for other in results.values():  # the recorded log-probs too, to float noise (other batch shapes)
        for got, expected in zip(other, first, strict=True):
            assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    assert len({tuple(t) for t, *_ in first}) > 12  # real samples, not copies
    assert {reason for _, reason, _ in first} == {"eos", "length"}
    fewer = StaticDecoder(model, shape, eos_ids=eos, pad_id=pad, suppress=[pad], use_graphs=False)
    assert responses(fewer.decode(ids[:2], options["temperature"], seed=11)) == responses(first[: 2 * 6])


def responses(decoded) -> list[tuple[list[int], str]]:
    return [(d.token_ids, d.finish_reason) for d in decoded]


def test_stop_strings_cut_where_they_complete_whatever_the_sync_interval(tiny_tokenizer):
    model = gqa_model(tiny_tokenizer)
    gen = generator(model, tiny_tokenizer, max_new_tokens=30, decode="static", stop=["e", "1"])
    every_8 = outputs(gen.generate(prompts(tiny_tokenizer), 4, seed=5))  # the host looks every 8 steps
    (decoder,) = gen.decoders.values()
    decoder.sync_every = 1
    assert outputs(gen.generate(prompts(tiny_tokenizer), 4, seed=5)) == every_8
    stopped = [ids for ids, reason in every_8 if reason == "stop"]
    assert stopped, every_8
    for ids in stopped:  # the stop string completes at the last token, not before
        text = tiny_tokenizer.decode(ids, skip_special_tokens=True)
        before = tiny_tokenizer.decode(ids[:-1], skip_special_tokens=True)
        assert ("e" in text or "1" in text) and not ("e" in before or "1" in before)


def test_samples_follow_the_model_distribution(tiny_tokenizer):
    """First tokens of 4000 samples of one prompt vs the model's own softmax (top-k 8)."""
    model = gqa_model(tiny_tokenizer)
    prompt = tuple(tiny_tokenizer("What is 1 + 2?")["input_ids"])
    shape = DecoderShape(1, 4000, 64, 2, False, 8, 1.0)
    decoder = StaticDecoder(
        model, shape, eos_ids={tiny_tokenizer.eos_token_id}, pad_id=tiny_tokenizer.pad_token_id, suppress=None,
        use_graphs=False,
    )  # fmt: skip
    results = decoder.decode([prompt], 1.0, seed=3)
    counts = torch.bincount(torch.tensor([ids[0] for ids, *_ in results]), minlength=len(tiny_tokenizer)).float()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = filter_logits(logits[None], Sampling(1, top_k=8)).softmax(-1)[0]
    total_variation = 0.5 * (counts / counts.sum() - expected).abs().sum().item()
    assert total_variation < 0.04, total_variation  # sampling noise at 4000 draws over 8 tokens: ~0.02
    assert counts[expected == 0].sum() == 0


def test_the_decoder_is_kept_across_calls_and_grows_for_longer_prompts(tiny_tokenizer):
    model = gqa_model(tiny_tokenizer)
    gen = generator(model, tiny_tokenizer, max_new_tokens=8, decode="static", batch_size=4)
    gen.generate(prompts(tiny_tokenizer)[:2], 2, seed=0)
    (decoder,) = gen.decoders.values()
    gen.generate(prompts(tiny_tokenizer)[1:], 2, seed=1)
    assert list(gen.decoders.values()) == [decoder]  # same shapes: nothing rebuilt
    long = [Prompt(0, "x", tuple(4 + i % 90 for i in range(100)))]
    gen.generate(long, 2, seed=2)
    (grown,) = gen.decoders.values()
    assert grown is not decoder and grown.shape.width == 128  # 100 tokens, rounded up to 64s
    assert gen.metrics()["compile_s"] == 0.0  # no graphs on the CPU


def test_auto_is_the_fast_eager_loop_on_cpu_and_static_needs_a_supported_model(tiny_model, tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from thresher.core.errors import ConfigError

    assert generator(tiny_model, tiny_tokenizer).decode_mode() == "fast"
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="static decoding does not support model type 'gpt2'"):
        generator(gpt2, tiny_tokenizer, decode="static").decode_mode()


def test_a_lora_policy_decodes_the_same_from_merged_weights(tiny_tokenizer):
    """Trained adapters (B ≠ 0): greedy answers from the merged weights equal peft's unmerged
    forward (transformers' generate() on the adapted model) token for token."""
    model = trained_lora_model(tiny_tokenizer)
    finish_early(model, tiny_tokenizer, "aeiou ")
    got = {}
    for label, options in {
        "merged": {"decode": "static"},
        "unmerged": {"decode": "static", "merge_lora": False},
        "generate": {"decode": "generate"},
    }.items():
        gen = generator(model, tiny_tokenizer, max_new_tokens=20, batch_size=4, **options)
        got[label] = outputs(gen.generate(prompts(tiny_tokenizer), 1, seed=0, greedy=True))
        if label == "merged":
            (decoder,) = gen.decoders.values()
            assert len(decoder.merged) == 2 * 7  # every adapted linear of both layers
    assert got["merged"] == got["unmerged"] == got["generate"]
    base = gqa_model(tiny_tokenizer)
    finish_early(base, tiny_tokenizer, "aeiou ")
    plain = generator(base, tiny_tokenizer, max_new_tokens=20, batch_size=4, decode="static")
    assert outputs(plain.generate(prompts(tiny_tokenizer), 1, seed=0, greedy=True)) != got["merged"]


def test_a_compiled_step_samples_what_the_eager_step_samples(tiny_tokenizer):
    """``compile_step``: torch.compile'd model step (LoRA merged weights included), rows finishing at
    different steps so the batch moves through buckets 24 → 12 → 8: the same samples, and log-probs to
    float noise, as the eager step; and it really was compiled (dynamo built graphs for it)."""
    from torch._dynamo.utils import counters

    model = trained_lora_model(tiny_tokenizer)
    finish_early(model, tiny_tokenizer, "xyz")
    got = {}
    for compiled in (False, True):
        graphs_before = counters["stats"]["unique_graphs"]
        gen = generator(model, tiny_tokenizer, max_new_tokens=24, batch_size=4, decode="static", compile_step=compiled)
        got[compiled] = gen.generate(prompts(tiny_tokenizer), 6, seed=4)
        built = counters["stats"]["unique_graphs"] - graphs_before
        assert (built > 0) == compiled, built
    eager, compiled_rollouts = got[False], got[True]
    assert outputs(compiled_rollouts) == outputs(eager)
    assert {r.finish_reason for r in eager} == {"eos", "length"}  # compaction really moved buckets
    for a, b in zip(compiled_rollouts, eager, strict=True):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-5)
