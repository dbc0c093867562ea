"""The fast decode path (shared prefill, batch compaction): speed never changes the answer."""

from __future__ import annotations

import pytest
import torch

from thresher.core.types import PluginContext, Prompt
from thresher.generators.fast_decode import Sampling, decode, filter_logits
from thresher.generators.hf import HFGenerator

TEXTS = ["What is 1 + 2?", "Hi", "A much longer prompt than the others, to force padding.", "7 + 5 ="]


def prompts(tokenizer) -> list[Prompt]:
    return [Prompt(i, t, tuple(tokenizer(t)["input_ids"])) for i, t in enumerate(TEXTS)]


def generator(model, tokenizer, **options) -> HFGenerator:
    return HFGenerator(HFGenerator.Config(**options), PluginContext(tokenizer=tokenizer, policy=model))


def test_greedy_fast_decode_equals_transformers_generate(tiny_model, tiny_tokenizer):
    # make EOS likely so rows finish at different steps and compaction really happens
    eos_like = [tiny_tokenizer.convert_tokens_to_ids(c) for c in "aeiou "]
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, *eos_like]
    fast = generator(tiny_model, tiny_tokenizer, max_new_tokens=20, batch_size=3).generate(
        prompts(tiny_tokenizer), 1, seed=0, greedy=True
    )
    slow = generator(tiny_model, tiny_tokenizer, max_new_tokens=20, batch_size=3, decode="generate").generate(
        prompts(tiny_tokenizer), 1, seed=0, greedy=True
    )
    assert [(r.response_ids, r.finish_reason) for r in fast] == [(r.response_ids, r.finish_reason) for r in slow]
    assert {r.finish_reason for r in fast} == {"eos", "length"} or len({len(r.response_ids) for r in fast}) > 1


@pytest.mark.parametrize("options", [{"temperature": 1.0}, {"temperature": 0.7, "top_p": 0.9, "top_k": 20}])
def test_shared_prefill_and_compaction_do_not_change_the_samples(tiny_model, tiny_tokenizer, options):
    eos_like = [tiny_tokenizer.convert_tokens_to_ids(c) for c in "xyz"]
    tiny_model.generation_config.eos_token_id = [tiny_tokenizer.eos_token_id, *eos_like]
    results = {}
    for shared in (True, False):
        for compact in (True, False):
            gen = generator(
                tiny_model, tiny_tokenizer, max_new_tokens=24, shared_prefill=shared, compaction=compact, **options
            )
            results[shared, compact] = [
                (r.response_ids, r.finish_reason) for r in gen.generate(prompts(tiny_tokenizer), 6, seed=11)
            ]
    first = results[True, True]
    assert all(other == first for other in results.values())
    assert len({tuple(ids) for ids, *_ in first}) > 12  # real samples, not copies
    assert any(reason == "eos" for _, reason in first) and any(reason == "length" for _, reason in first)


def test_warpers_match_transformers(tiny_tokenizer):
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    torch.manual_seed(0)
    logits = torch.randn(5, 101) * 3
    sampling = Sampling(1, temperature=0.7, top_p=0.8, top_k=30)
    expected = TemperatureLogitsWarper(0.7)(None, logits.clone())
    expected = TopKLogitsWarper(30)(None, expected)
    expected = TopPLogitsWarper(0.8)(None, expected)
    got = filter_logits(logits, sampling)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    torch.testing.assert_close(got[~torch.isinf(got)], expected[~torch.isinf(expected)])


def test_samples_follow_the_model_distribution(tiny_model, tiny_tokenizer):
    """First tokens of 4000 samples of one prompt vs the model's own softmax (top-k 8)."""
    prompt = tuple(tiny_tokenizer("What is 1 + 2?")["input_ids"])
    results = decode(
        tiny_model,
        [prompt],
        4000,
        Sampling(1, top_k=8),
        eos_ids={tiny_tokenizer.eos_token_id},
        pad_id=tiny_tokenizer.pad_token_id,
        seed=3,
    )
    counts = torch.bincount(torch.tensor([ids[0] for ids, *_ in results]), minlength=len(tiny_tokenizer)).float()
    with torch.no_grad():
        logits = tiny_model(input_ids=torch.tensor([prompt])).logits[0, -1]
    expected = filter_logits(logits[None], Sampling(1, top_k=8)).softmax(-1)[0]
    total_variation = 0.5 * (counts / counts.sum() - expected).abs().sum().item()
    assert total_variation < 0.04, total_variation  # sampling noise at 4000 draws over 8 tokens: ~0.02
    assert counts[expected == 0].sum() == 0  # never outside the top-k
