"""Shared prefix (cascade) attention: one copy of a prompt's KV cache for its N samples, same answer."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

from tests.helpers import small_llama_config
from thresher.generators import shared_prefix
from thresher.generators.fast_decode import Sampling, decode
from thresher.generators.shared_prefix import SharedPrefix, attention, supports_shared_prefix

TEXTS = ["What is 1 + 2?", "Hi", "A much longer prompt than the others, to force padding.", "7 + 5 ="]


class _Layer(torch.nn.Module):
    layer_idx = 0


def test_attention_equals_attention_over_each_samples_whole_cache():
    """Against SDPA over the prompt's keys (padding masked) concatenated with the sample's own keys,
    one row at a time, with grouped-query heads and rows that have left the batch."""
    torch.manual_seed(0)
    prompts, n, kv_heads, groups, dim, width, generated = 3, 4, 2, 3, 8, 7, 5
    prefix_keys, prefix_values = torch.randn(2, prompts, kv_heads, width, dim).unbind(0)
    padding = torch.tensor([3, 0, 5])  # left padding per prompt
    mask = (torch.arange(width)[None, :] >= padding[:, None]).long()
    active = torch.tensor([0, 1, 3, 5, 6, 9, 11])
    rows = len(active)
    query = torch.randn(rows, kv_heads * groups, 1, dim)
    keys, values = torch.randn(2, rows, kv_heads, generated, dim).unbind(0)
    cache = type("Cache", (), {"layers": [type("L", (), {"keys": prefix_keys, "values": prefix_values})]})
    prefix = SharedPrefix.from_cache(cache, mask, n).for_rows(active)
    got, _ = attention(_Layer(), query, keys, values, None, scaling=0.3, shared_prefix=prefix)
    assert got.shape == (rows, 1, kv_heads * groups, dim)
    for batch_row, row in enumerate(active.tolist()):
        p = row // n
        k = torch.cat([prefix_keys[p], keys[batch_row]], dim=1).repeat_interleave(groups, dim=0)
        v = torch.cat([prefix_values[p], values[batch_row]], dim=1).repeat_interleave(groups, dim=0)
        allowed = torch.cat([mask[p].bool(), torch.ones(generated, dtype=torch.bool)])
        expected = torch.nn.functional.scaled_dot_product_attention(
            query[batch_row], k, v, attn_mask=allowed[None, None, :].expand(kv_heads * groups, 1, -1), scale=0.3
        )
        torch.testing.assert_close(got[batch_row, 0], expected[:, 0], atol=1e-5, rtol=1e-5)


def test_attention_needs_its_prefix_and_one_query_token():
    query, kv = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
    with pytest.raises(RuntimeError, match="shared_prefix keyword"):
        attention(_Layer(), query, kv, kv, None)
    cache = type("Cache", (), {"layers": [type("L", (), {"keys": kv[:1], "values": kv[:1]})]})
    prefix = SharedPrefix.from_cache(cache, torch.ones(1, 1, dtype=torch.long), 2)
    with pytest.raises(RuntimeError, match="one token at a time, got 3"):
        attention(_Layer(), torch.randn(2, 2, 3, 4), kv, kv, None, shared_prefix=prefix)


@pytest.fixture
def gqa_model(tiny_tokenizer):
    """A small Llama with grouped-query attention (4 query heads share 2 KV heads)."""
    config = small_llama_config(tiny_tokenizer, hidden=64, kv_heads=2, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(1)
    return LlamaForCausalLM(config).eval()


def _decode(model, tokenizer, *, greedy: bool = False, **options) -> list[tuple[list[int], str]]:
    """The responses and finish reasons; the recorded log-probs agree (float noise aside) whatever
    the options, and are checked here once per call against the default path's."""
    prompts = [tuple(tokenizer(t)["input_ids"]) for t in TEXTS]
    eos = {tokenizer.eos_token_id, *(tokenizer.convert_tokens_to_ids(c) for c in "xyz")}
    sampling = Sampling(24, temperature=0.8, top_k=40, greedy=greedy)
    results = decode(model, prompts, 6, sampling, eos_ids=eos, pad_id=tokenizer.pad_token_id, seed=5, **options)
    assert all(len(r.logprobs) == len(r.token_ids) for r in results)
    if options:
        default = decode(model, prompts, 6, sampling, eos_ids=eos, pad_id=tokenizer.pad_token_id, seed=5)
        for got, expected in zip(results, default, strict=True):
            if got.token_ids == expected.token_ids:
                assert got.logprobs == pytest.approx(expected.logprobs, abs=1e-5)
    return [(r.token_ids, r.finish_reason) for r in results]


@pytest.mark.parametrize("greedy", [False, True])
def test_shared_kv_decodes_the_same_samples_as_repeated_caches(gqa_model, tiny_tokenizer, monkeypatch, greedy):
    calls = []
    real = shared_prefix.attention
    monkeypatch.setattr(shared_prefix, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    shared = _decode(gqa_model, tiny_tokenizer, greedy=greedy)
    assert len(calls) >= 2 * 20  # both layers, on (nearly) every decode step: the shared path really ran
    assert shared == _decode(gqa_model, tiny_tokenizer, greedy=greedy, shared_kv=False)
    assert shared == _decode(gqa_model, tiny_tokenizer, greedy=greedy, shared_prefill=False)
    assert shared == _decode(gqa_model, tiny_tokenizer, greedy=greedy, compaction=False)
    reasons = [reason for _, reason in shared]
    assert "eos" in reasons and "length" in reasons  # rows left the batch at different steps
    if not greedy:
        assert len({tuple(ids) for ids, *_ in shared}) > 12  # real samples, not copies


def test_the_models_attention_implementation_is_restored(gqa_model, tiny_tokenizer):
    before = gqa_model.config._attn_implementation

    def fail(ids: list[int]) -> bool:
        raise KeyError("stop check failed")

    with pytest.raises(KeyError, match="stop check failed"):
        prompts = [tuple(tiny_tokenizer(t)["input_ids"]) for t in TEXTS]
        decode(
            gqa_model, prompts, 3, Sampling(5), eos_ids={0}, pad_id=tiny_tokenizer.pad_token_id, seed=0, stop_check=fail
        )
    assert gqa_model.config._attn_implementation == before
    _decode(gqa_model, tiny_tokenizer)
    assert gqa_model.config._attn_implementation == before


def test_unsupported_models_keep_the_repeated_cache(tiny_tokenizer):
    config = GPT2Config(vocab_size=len(tiny_tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=128)
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(config).eval()
    assert not supports_shared_prefix(gpt2)
    assert _decode(gpt2, tiny_tokenizer) == _decode(gpt2, tiny_tokenizer, shared_kv=False)


def test_support_is_decided_by_the_attention_the_model_computes(gqa_model):
    assert supports_shared_prefix(gqa_model)
    windowed = LlamaForCausalLM.__new__(LlamaForCausalLM)
    windowed.config = type("C", (), {"model_type": "mistral", "sliding_window": 4096})()
    assert not supports_shared_prefix(windowed)
    windowed.config.sliding_window = None
    assert supports_shared_prefix(windowed)
