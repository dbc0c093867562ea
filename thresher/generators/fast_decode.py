"""A decode loop built for best-of-N sampling: the prompt is prefilled once, finished rows leave.

``generate(num_return_sequences=N)`` repeats every prompt N times *before* the prefill, and keeps
every row in the batch until the longest one ends. Here:

- **shared prefill**: each prompt is run once; its KV cache is then repeated for its N samples;
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

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    model: torch.nn.Module,
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
) -> list[tuple[list[int], str]]:
    """``len(prompts) * n`` responses (row ``p * n + s``), each ``(token_ids, finish_reason)``."""
    device = next(model.parameters()).device
    rows = len(prompts) * n
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(device), mask.to(device)
    if not shared_prefill:
        ids, mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache_arg = _cache_argument(model)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    cache, logits = _cache_of(out), out.logits[:, -1, :].float()
    if shared_prefill:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        positions = positions.repeat_interleave(n, 0)
    next_position = positions[:, -1:] + 1

    generator = torch.Generator(device=device).manual_seed(seed)
    responses: list[list[int]] = [[] for _ in range(rows)]
    reasons = ["length"] * rows
    active = torch.arange(rows, device=device)  # original row of each batch row
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    eos = torch.tensor(sorted(eos_ids), device=device)
    for _ in range(sampling.max_new_tokens):
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
        for batch_row, (row, token) in enumerate(zip(active.tolist(), chosen.tolist(), strict=True)):
            if done[row]:
                continue  # a finished row kept in the batch (compaction off): its tokens are padding
            responses[row].append(token)
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
            cache.batch_select_indices(keep)
            active, mask, next_position, step_ids = active[keep], mask[keep], next_position[keep], step_ids[keep]
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        out = model(
            input_ids=step_ids, attention_mask=mask, position_ids=next_position, use_cache=True, **{cache_arg: cache}
        )
        cache, logits = _cache_of(out), out.logits[:, -1, :].float()
        next_position = next_position + 1
    return [(responses[row], reasons[row]) for row in range(rows)]


def _cache_argument(model: torch.nn.Module) -> str:
    """transformers 5 renamed the forward's ``past_key_values`` to ``cache``; accept either."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _cache_of(output: object) -> object:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values
