"""A decode loop built for best-of-N sampling: the prompt is prefilled once, finished rows leave.

``generate(num_return_sequences=N)`` repeats every prompt N times *before* the prefill, and keeps
every row in the batch until the longest one ends. Here:

- **shared prefill**: each prompt is run once (its LM head only on the last position);
- **shared KV**: the N samples then attend to that one copy of the prompt's KV cache
  (:mod:`thresher.generators.shared_prefix`); models it does not support get the cache repeated N times;
- **batch compaction**: a row that emits EOS (or a stop string) leaves the batch, so later decode
  steps only compute rows still generating.

Sampling is exact categorical sampling by the Gumbel-max trick: at every step, noise is drawn for all
rows of the batch (active or not) from a generator seeded once. A row's sample therefore depends only
on the seed, its position and its own logits, not on which other rows are still active, so turning
compaction or shared prefill off gives the very same samples (tested). Greedy decoding equals
``generate``'s greedy output token for token (tested). Temperature, top-k and top-p follow
``generate``'s warpers.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from thresher.core.model import CausalLM
from thresher.core.types import FinishReason
from thresher.generators.shared_prefix import SharedPrefix, shared_prefix_attention, supports_shared_prefix


class Decoded(NamedTuple):
    """One decoded response: its tokens, why it ended, and each token's log-probability."""

    token_ids: list[int]
    finish_reason: FinishReason
    logprobs: list[float]


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False


def filter_logits(logits: torch.Tensor, sampling: Sampling) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus), as transformers' logits warpers apply them."""
    logits = logits / sampling.temperature
    if sampling.top_k > 0:
        k = min(sampling.top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1, None]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= 1 - sampling.top_p
        remove_sorted[..., -1:] = False  # keep at least the likeliest token
        remove = remove_sorted.scatter(-1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


@torch.no_grad()
def decode(
    model: CausalLM,
    prompts: list[tuple[int, ...]],
    n: int,
    sampling: Sampling,
    *,
    eos_ids: set[int],
    pad_id: int,
    seed: int,
    stop_check: Callable[[list[int]], bool] | None = None,
    suppress: list[int] | None = None,
    shared_prefill: bool = True,
    compaction: bool = True,
    shared_kv: bool = True,
) -> list[Decoded]:
    """``len(prompts) * n`` responses (row ``p * n + s``), each ``(token_ids, finish_reason, logprobs)``:
    ``logprobs`` are each token's log-probability under the model's raw distribution (temperature 1,
    nothing filtered or suppressed), the π_old of the importance-weighted losses.

    ``shared_kv`` (with ``shared_prefill``): the N samples of a prompt read one copy of its KV cache
    (:mod:`thresher.generators.shared_prefix`) where the model supports it, instead of N copies.
    """
    device = next(model.parameters()).device
    rows = len(prompts) * n
    ids, mask = left_pad(prompts, pad_id, device)
    if not shared_prefill:
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    cache, logits, mask, next_position, prefix = _prefill(model, ids, mask, n if shared_prefill else 1, shared_kv)
    cache_arg = _cache_argument(model)

    generator = torch.Generator(device=device).manual_seed(seed)
    responses: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    reasons: list[FinishReason] = ["length"] * rows
    active = torch.arange(rows, device=device)  # original row of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    with shared_prefix_attention(model) if prefix is not None else nullcontext():
        for _ in range(sampling.max_new_tokens):
            normalizer = torch.logsumexp(logits, dim=-1)  # before suppression: the model's own distribution
            if suppress:
                logits[:, suppress] = float("-inf")
            # Noise for every original row, so a row's draw never depends on which rows remain.
            noise = torch.rand((rows, logits.shape[-1]), generator=generator, device=device)
            if sampling.greedy:
                chosen = logits.argmax(dim=-1)
            else:
                gumbel = -torch.log(-torch.log(noise[active].clamp_min(1e-20)))
                chosen = (filter_logits(logits, sampling) + gumbel).argmax(dim=-1)
            finished_now = torch.isin(chosen, eos)
            # a suppressed token is never chosen, so its logit here is still the model's own
            chosen_logprobs = (logits.gather(1, chosen[:, None])[:, 0] - normalizer).tolist()
            for batch_row, (row, token) in enumerate(zip(active.tolist(), chosen.tolist(), strict=True)):
                if done[row]:
                    continue  # a finished row kept in the batch (compaction off): its tokens are padding
                responses[row].append(token)
                logprobs[row].append(chosen_logprobs[batch_row])
                if finished_now[batch_row]:
                    reasons[row], done[row] = "eos", True
                elif stop_check is not None and stop_check(responses[row]):
                    reasons[row], done[row] = "stop", True
            still = ~done[active]
            if not bool(still.any()):
                break
            step_ids = chosen[:, None]
            if compaction and not bool(still.all()):
                keep = still.nonzero().flatten()
                if cache.get_seq_length() > 0:  # a fresh per-sample cache has nothing to select yet
                    cache.batch_select_indices(keep)
                active, mask, next_position, step_ids = active[keep], mask[keep], next_position[keep], step_ids[keep]
            inputs = {"input_ids": step_ids, "position_ids": next_position, "use_cache": True, cache_arg: cache}
            if prefix is not None:  # no mask: every cached suffix token is real, the prefix carries its own
                out = model(**inputs, shared_prefix=prefix.for_rows(active))
            else:
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
                out = model(**inputs, attention_mask=mask)
            cache, logits = _cache_of(out), out.logits[:, -1, :].float()
            next_position = next_position + 1
    return [Decoded(responses[row], reasons[row], logprobs[row]) for row in range(rows)]


def left_pad(sequences: list[tuple[int, ...]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token sequences into ``(input_ids, attention_mask)`` for batched generation."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if seq:
            input_ids[row, width - len(seq) :] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _prefill(
    model: CausalLM, ids: torch.Tensor, mask: torch.Tensor, n: int, shared_kv: bool
) -> tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, SharedPrefix | None]:
    """Run the prompts once; return the decode's cache, first logits, mask and next positions, one row
    per sample (each prompt's row repeated ``n`` times), and the shared prefix when one is used."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Only the last position's logits are sampled from: the LM head skips the rest of the prompt.
    last_only = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **last_only)
    cache, logits = _cache_of(out), out.logits[:, -1, :].float()
    prefix = None
    if n > 1 and shared_kv and supports_shared_prefix(model):
        # The prompts' cache stays one copy per prompt; a fresh cache holds each sample's own tokens.
        from transformers import DynamicCache

        prefix, cache = SharedPrefix.from_cache(cache, mask, n), DynamicCache(config=model.config)
    elif n > 1:
        cache.batch_repeat_interleave(n)
    logits, mask, positions = (t.repeat_interleave(n, 0) for t in (logits, mask, positions))
    return cache, logits, mask, positions[:, -1:] + 1, prefix


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache``; accept either."""
    return "cache" if _accepts(model, "cache") else "past_key_values"


def _accepts(model: torch.nn.Module, argument: str) -> bool:
    return argument in inspect.signature(model.forward).parameters


def _cache_of(output: Any) -> Any:  # a transformers model output, and its cache
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
