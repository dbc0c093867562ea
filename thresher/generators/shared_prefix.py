"""Cascade attention for best-of-N decoding: the N samples of a prompt read one copy of its KV cache.

Shared prefill runs each prompt once, but repeating its KV cache N times for the decode still makes
every decode step copy and read N copies of the prompt's keys and values: at 200-token prompts and
N = 8 that is most of the attention's memory traffic, and every compaction copies it all again.
Here the prompt's cache stays at one copy per prompt (the *prefix*), and only the tokens each sample
generated are cached per sample (the *suffix*, an ordinary transformers cache). A decode step's
attention scores the N samples' queries against their prompt's keys in one product per prompt,
scores each sample's query against its own suffix, and takes one softmax over both, so the result
is the same attention as over the concatenated cache, up to float rounding.

It plugs into transformers as an attention implementation (``AttentionInterface``) that is active
only while :func:`shared_prefix_attention` is; the prefix travels to it as a forward keyword
argument. Only model types whose attention is plain full causal attention after
``cache.update(...)`` are supported (:func:`supports_shared_prefix`); others keep the repeated cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import torch

from thresher.core.model import CausalLM

ATTENTION_NAME = "thresher_shared_prefix"
# Model types whose attention modules call ``past_key_values.update`` and then the attention
# interface with the keys and values unchanged, with no sliding window, soft-capping or sinks.
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


@dataclass(frozen=True)
class SharedPrefix:
    """Each prompt's cached keys and values, one copy per prompt, plus which samples are decoding.

    ``keys[layer]`` and ``values[layer]`` are ``(prompts, kv_heads, width, head_dim)``; ``bias`` is
    ``(prompts, 1, 1, width)``: 0 on prompt tokens, -inf on left padding. Sample ``s`` of prompt ``p``
    is original row ``p * n + s``; ``active`` lists the original rows still in the decode batch, in
    order (``None``: all of them).
    """

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    bias: torch.Tensor
    n: int
    active: torch.Tensor | None = None

    @classmethod
    def from_cache(cls, cache: Any, attention_mask: torch.Tensor, n: int) -> SharedPrefix:
        """Take the prefill's cache (one row per prompt) and its 2-D attention mask."""
        layers = cache.layers
        bias = torch.zeros(attention_mask.shape, dtype=layers[0].keys.dtype, device=attention_mask.device)
        bias = bias.masked_fill(attention_mask == 0, float("-inf"))[:, None, None, :]
        return cls([layer.keys for layer in layers], [layer.values for layer in layers], bias, n)

    def for_rows(self, active: torch.Tensor) -> SharedPrefix:
        """The same prefix, with only the original rows in ``active`` still decoding."""
        return replace(self, active=None if active.numel() == self.bias.shape[0] * self.n else active)


def supports_shared_prefix(model: CausalLM) -> bool:
    """Whether :func:`attention` computes exactly this model's attention."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    return not windowed and getattr(config, "attn_logit_softcapping", None) is None


@contextmanager
def shared_prefix_attention(model: CausalLM) -> Iterator[None]:
    """Route ``model``'s attention through :func:`attention` for the duration of the block."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, attention)
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTENTION_NAME)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def attention(
    module: Any,  # an attention layer of the model (its layer_idx)
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    shared_prefix: SharedPrefix | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """One decode step's attention over the prompt's shared prefix and the sample's own suffix.

    ``query`` is ``(rows, heads, 1, head_dim)``; ``key``/``value`` are the suffix cache after this
    step's update, ``(rows, kv_heads, generated, head_dim)``. Returns ``(rows, 1, heads, head_dim)``,
    the layout transformers' attention functions return.
    """
    if shared_prefix is None:
        raise RuntimeError(f"the {ATTENTION_NAME} attention needs the shared_prefix keyword argument")
    rows, heads, q_len, dim = query.shape
    if q_len != 1:
        raise RuntimeError(f"{ATTENTION_NAME} attention decodes one token at a time, got {q_len}")
    prefix_keys, prefix_values = shared_prefix.keys[module.layer_idx], shared_prefix.values[module.layer_idx]
    prompts, kv_heads, width, _ = prefix_keys.shape
    groups, n = heads // kv_heads, shared_prefix.n
    scale = scaling if scaling is not None else dim**-0.5
    # Head h reads KV head h // groups (as transformers' repeat_kv lays them out).
    q = query.reshape(rows, kv_heads, groups, dim)
    by_prompt = _to_prompts(q, shared_prefix.active, prompts, n)  # (prompts, kv_heads, n * groups, dim)
    prefix_scores = torch.matmul(by_prompt, prefix_keys.transpose(-1, -2)) * scale + shared_prefix.bias
    prefix_scores = _to_rows(prefix_scores, shared_prefix.active, n)  # (rows, kv_heads, groups, width)
    suffix_scores = torch.matmul(q, key.transpose(-1, -2)) * scale  # (rows, kv_heads, groups, generated)
    scores = torch.cat([prefix_scores, suffix_scores], dim=-1)
    probs = scores.float().softmax(dim=-1).to(value.dtype)
    prefix_probs, suffix_probs = probs.split([width, key.shape[2]], dim=-1)
    prefix_out = torch.matmul(_to_prompts(prefix_probs, shared_prefix.active, prompts, n), prefix_values)
    out = _to_rows(prefix_out, shared_prefix.active, n) + torch.matmul(suffix_probs, value)
    return out.reshape(rows, 1, heads, dim), None


def _to_prompts(per_row: torch.Tensor, active: torch.Tensor | None, prompts: int, n: int) -> torch.Tensor:
    """``(rows, kv_heads, groups, x)`` → ``(prompts, kv_heads, n * groups, x)``; rows that left the
    batch are zeros."""
    _, kv_heads, groups, last = per_row.shape
    if active is not None:
        full = per_row.new_zeros((prompts * n, kv_heads, groups, last))
        full[active] = per_row
        per_row = full
    return per_row.view(prompts, n, kv_heads, groups, last).transpose(1, 2).reshape(prompts, kv_heads, n * groups, last)


def _to_rows(per_prompt: torch.Tensor, active: torch.Tensor | None, n: int) -> torch.Tensor:
    """The inverse of :func:`_to_prompts`, keeping only the active rows."""
    prompts, kv_heads, _, last = per_prompt.shape
    per_row = per_prompt.view(prompts, kv_heads, n, -1, last).transpose(1, 2).reshape(prompts * n, kv_heads, -1, last)
    return per_row if active is None else per_row[active]
