"""A static-shape decode loop for best-of-N sampling, replayed as CUDA graphs on a GPU.

On a GPU the eager decode loop spends its time launching kernels and waiting for the host, not
computing: a 1B model at 512 rows needs ~2 ms of arithmetic per token, and the eager loop takes many
times that. Here every decode step has the same shapes, so it can be captured once as a CUDA graph
and replayed for ~the cost of its kernels:

- **static KV cache**: each prompt's prefill KV is copied once into a preallocated prefix buffer
  ``(prompts, kv_heads, width, head_dim)`` shared by its N samples (cascade attention, as
  :mod:`thresher.generators.shared_prefix`), and each sample's own tokens go into a preallocated
  suffix buffer ``(rows, kv_heads, max_new_tokens, head_dim)`` at slot ``t``; masks, positions and
  ``t`` are device tensors, never Python numbers baked into a graph;
- **buckets**: a graph per batch size (all rows, then halves); when enough rows have finished, the
  live rows' suffix caches move to the front and the next step replays the smaller bucket's graph;
- **sampling on the device**: Gumbel-max over noise drawn for *every* row of the call, every step,
  so a row's sample depends only on the seed, its index and its own logits, never on which rows are
  still in the batch (compaction changes nothing), and the host reads the finished flags only every
  ``sync_every`` steps (stop strings are checked then too, and a response is cut where its stop
  string completed, exactly as a per-token check would cut it).

The decode step calls the model's own modules (norms, projections, MLP), its rotary embedding and
its ``apply_rotary_pos_emb``; only attention is computed here. A LoRA-adapted linear decodes from a
merged copy of its weight (``W + B·A·scale``, recomputed at the start of every call), not through
peft's three matmuls. Supported:
the model types of :func:`~thresher.generators.shared_prefix.supports_shared_prefix` (Llama,
Mistral without a sliding window, Qwen2, Qwen3). The same code runs on the CPU without graphs, which
is how CI tests it; graphs are captured per bucket once per decoder (once per run: the ``hf``
generator keeps its decoder while the shapes fit) and their capture time is reported.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from thresher.core.model import CausalLM
from thresher.generators.fast_decode import Decoded, Sampling, filter_logits, left_pad
from thresher.generators.shared_prefix import supports_shared_prefix

MIN_BUCKET = 8


def supports_static_decode(model: CausalLM) -> bool:
    """Whether :class:`StaticDecoder` computes exactly this model's decode step."""
    inner = getattr(model, "model", None)
    return (
        supports_shared_prefix(model)
        and inner is not None
        and hasattr(inner, "layers")
        and hasattr(inner, "rotary_emb")
        and model.get_output_embeddings() is not None
    )


@dataclass(frozen=True)
class DecoderShape:
    """What a decoder's buffers and graphs are sized for; a call that fits reuses them."""

    prompts: int  # prompts per call (the generator's batch_size)
    n: int  # samples per prompt
    width: int  # longest prompt, in tokens
    max_new_tokens: int
    greedy: bool
    top_k: int
    top_p: float

    def fits(self, other: DecoderShape) -> bool:
        """Can a decoder of this shape run a call of shape ``other``?"""
        return (
            other.prompts <= self.prompts
            and other.width <= self.width
            and (other.n, other.max_new_tokens, other.greedy, other.top_k, other.top_p)
            == (self.n, self.max_new_tokens, self.greedy, self.top_k, self.top_p)
        )


def buckets_for(rows: int) -> list[int]:
    """Batch sizes with a graph each: all rows, then halves down to :data:`MIN_BUCKET`."""
    sizes = [rows]
    while sizes[-1] > MIN_BUCKET:
        sizes.append(max(MIN_BUCKET, (sizes[-1] + 1) // 2))
    return sizes


class StaticDecoder:
    """Preallocated buffers and (on CUDA) captured graphs for one :class:`DecoderShape`."""

    def __init__(
        self,
        model: CausalLM,
        shape: DecoderShape,
        *,
        eos_ids: set[int],
        pad_id: int,
        suppress: list[int] | None,
        use_graphs: bool,
        sync_every: int = 8,
        compaction: bool = True,
        merged: dict[Any, torch.Tensor] | None = None,
        compile: bool = False,
    ):
        self.model, self.shape, self.pad_id = model, shape, pad_id
        self.device = next(model.parameters()).device
        self.use_graphs = use_graphs and self.device.type == "cuda"
        self.sync_every = sync_every
        self.compaction = compaction
        config = model.config
        self.layers = model.model.layers
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.vocab = model.get_output_embeddings().weight.shape[0]
        self.apply_rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb
        dtype = next(model.parameters()).dtype
        rows, dev = shape.prompts * shape.n, self.device
        self.rows = rows
        kv = (self.kv_heads, self.head_dim)
        self.prefix_k = [torch.zeros((shape.prompts, kv[0], shape.width, kv[1]), dtype=dtype, device=dev)
                         for _ in self.layers]  # fmt: skip
        self.prefix_v = [torch.zeros_like(t) for t in self.prefix_k]
        self.prefix_bias = torch.zeros((shape.prompts, 1, 1, shape.width), dtype=dtype, device=dev)
        self.suffix_k = [torch.zeros((rows, kv[0], shape.max_new_tokens, kv[1]), dtype=dtype, device=dev)
                         for _ in self.layers]  # fmt: skip
        self.suffix_v = [torch.zeros_like(t) for t in self.suffix_k]
        self.slots = torch.arange(shape.max_new_tokens, device=dev)
        self.tokens = torch.zeros((rows, shape.max_new_tokens), dtype=torch.long, device=dev)  # by original row
        self.logprobs = torch.zeros((rows, shape.max_new_tokens), dtype=torch.float32, device=dev)  # of each token
        self.finished = torch.zeros(rows, dtype=torch.bool, device=dev)
        self.next_position = torch.zeros(rows, dtype=torch.long, device=dev)  # position of token slot 0
        self.active = torch.zeros(rows, dtype=torch.long, device=dev)  # original row of batch row i
        self.step_index = torch.zeros((), dtype=torch.long, device=dev)  # t: the slot being written
        self.temperature = torch.ones((), dtype=torch.float32, device=dev)
        self.eos = torch.tensor(sorted(eos_ids), device=dev)
        self.suppress = torch.tensor(suppress or [], dtype=torch.long, device=dev)
        self.sampling = Sampling(shape.max_new_tokens, 1.0, shape.top_p, shape.top_k, shape.greedy)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool: Any = None  # the CUDA graphs' memory pool (torch.cuda.graph_pool_handle), shared by all
        self.capture_seconds = 0.0
        # LoRA-adapted linears decode from a merged copy of their weight (refreshed every call): the
        # unmerged adapter adds two small matmuls per linear, which cost more than the big one here.
        self.merged = merged if merged is not None else {}
        # torch.compile fuses the step's many small kernels (norms, rotary, the attention's reshapes and
        # softmax) into a few. Only the batch dimension is dynamic (marked in _step), so one compilation
        # serves every bucket and the buffers' fixed shapes stay constants in the generated code.
        self.compiled = compile
        self._forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(self._model_step) if compile else self._model_step
        )

    # --- one decode step, over the first ``batch`` rows ------------------------------------------

    def _step(self, batch: int) -> None:
        """Feed token slot t of the first ``batch`` rows, then sample slot t + 1 into ``tokens``."""
        rows = self.active[:batch]
        t = self.step_index
        if self.compiled:  # the batch size varies by bucket; every buffer's shape is fixed
            torch._dynamo.maybe_mark_dynamic(rows, 0)
        logits = self._forward(rows)
        chosen = self._sample(logits, rows)
        self.tokens.index_put_((rows, t + 1), chosen)
        self.logprobs.index_put_((rows, t + 1), _logprob_of(logits, chosen))
        self.finished.index_put_((rows,), self.finished.index_select(0, rows) | torch.isin(chosen, self.eos))
        self.step_index.add_(1)

    def _model_step(self, rows: torch.Tensor) -> torch.Tensor:
        """The model's part of a step: token slot t of ``rows`` through every layer (writing its keys
        and values into slot t of the suffix caches), to float32 logits ``(batch, vocab)``. This is
        what ``compile=True`` hands to torch.compile; sampling stays eager, so its random draws are
        torch's own and a seed gives the same noise either way."""
        batch = rows.shape[0]
        t = self.step_index
        token = self.tokens.index_select(0, rows).index_select(1, t.view(1)).view(batch)
        position = (self.next_position.index_select(0, rows) + t).view(batch, 1)
        inner = self.model.model
        hidden = inner.embed_tokens(token).view(batch, 1, -1)
        cos, sin = inner.rotary_emb(hidden, position)
        suffix_bias = torch.zeros(self.slots.shape, dtype=hidden.dtype, device=self.device)
        suffix_bias = suffix_bias.masked_fill(self.slots > t, float("-inf"))
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            q = self._linear(attn.q_proj, x).view(batch, 1, self.heads, self.head_dim)
            k = self._linear(attn.k_proj, x).view(batch, 1, self.kv_heads, self.head_dim)
            v = self._linear(attn.v_proj, x).view(batch, 1, self.kv_heads, self.head_dim)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # (batch, heads, 1, dim)
            self.suffix_k[index][:batch].index_copy_(2, t.view(1), k)
            self.suffix_v[index][:batch].index_copy_(2, t.view(1), v.transpose(1, 2))
            out = self._attention(index, q, rows, batch, suffix_bias, attn.scaling)
            hidden = hidden + self._linear(attn.o_proj, out.reshape(batch, 1, self.heads * self.head_dim))
            hidden = hidden + self._mlp(layer.mlp, layer.post_attention_layernorm(hidden))
        return self.model.get_output_embeddings()(inner.norm(hidden)).view(batch, -1).float()

    def _linear(self, module: Any, x: torch.Tensor) -> torch.Tensor:
        """The module, or for a LoRA-adapted one its merged weight (one matmul instead of three)."""
        merged = self.merged.get(module)
        if merged is None:
            return module(x)
        return torch.nn.functional.linear(x, merged, module.base_layer.bias)

    def _mlp(self, mlp: Any, x: torch.Tensor) -> torch.Tensor:
        if not self.merged:
            return mlp(x)
        return self._linear(mlp.down_proj, mlp.act_fn(self._linear(mlp.gate_proj, x)) * self._linear(mlp.up_proj, x))

    @torch.no_grad()
    def refresh_merged(self) -> None:
        """Recompute every merged weight from the current base weight and adapters (W + B·A·scale)."""
        for module, merged in self.merged.items():
            delta = module.get_delta_weight(module.active_adapters[0])
            merged.copy_(module.base_layer.weight.float() + delta.float())

    def _attention(
        self, index: int, q: torch.Tensor, rows: torch.Tensor, batch: int, suffix_bias: torch.Tensor, scale: float
    ) -> torch.Tensor:
        """Cascade attention: the prompt's shared prefix (read once per prompt) and the row's own
        suffix, one softmax over both. ``q`` is ``(batch, heads, 1, dim)``; returns ``(batch, heads, dim)``."""
        kv_heads, dim, n = self.kv_heads, self.head_dim, self.shape.n
        groups, prompts = self.heads // kv_heads, self.shape.prompts
        q = q.reshape(batch, kv_heads, groups, dim)
        # queries in the full (prompt, sample) layout; rows that left the batch are zeros
        full = q.new_zeros((prompts * n, kv_heads, groups, dim)).index_copy_(0, rows, q)
        by_prompt = full.view(prompts, n, kv_heads, groups, dim).transpose(1, 2).reshape(prompts, kv_heads, -1, dim)
        prefix_scores = torch.matmul(by_prompt, self.prefix_k[index].transpose(-1, -2)) * scale + self.prefix_bias
        prefix_scores = _per_row(prefix_scores, n).index_select(0, rows)  # (batch, kv_heads, groups, width)
        suffix_k, suffix_v = self.suffix_k[index][:batch], self.suffix_v[index][:batch]
        suffix_scores = torch.matmul(q, suffix_k.transpose(-1, -2)) * scale + suffix_bias
        probs = torch.cat([prefix_scores, suffix_scores], dim=-1).float().softmax(dim=-1).to(q.dtype)
        prefix_probs, suffix_probs = probs.split([self.shape.width, self.shape.max_new_tokens], dim=-1)
        full_probs = prefix_probs.new_zeros((prompts * n, kv_heads, groups, self.shape.width))
        full_probs.index_copy_(0, rows, prefix_probs)
        by_prompt = (
            full_probs.view(prompts, n, kv_heads, groups, -1)
            .transpose(1, 2)
            .reshape(prompts, kv_heads, -1, self.shape.width)
        )
        prefix_out = _per_row(torch.matmul(by_prompt, self.prefix_v[index]), n).index_select(0, rows)
        out = prefix_out + torch.matmul(suffix_probs, suffix_v)
        return out.reshape(batch, self.heads, dim)

    def _sample(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The next token of each row: Gumbel-max over noise drawn for all rows of the call."""
        if self.suppress.numel():
            logits = logits.index_fill(1, self.suppress, float("-inf"))
        if self.shape.greedy:
            return logits.argmax(dim=-1)
        # Drawn for every row, whatever the batch holds, so a row's noise never depends on the others.
        noise = torch.rand((self.rows, self.vocab), device=self.device)
        gumbel = -torch.log(-torch.log(noise.index_select(0, rows).clamp_min(1e-20)))
        return (filter_logits(logits / self.temperature, self._unit_temperature) + gumbel).argmax(dim=-1)

    @property
    def _unit_temperature(self) -> Sampling:
        return Sampling(self.shape.max_new_tokens, 1.0, self.shape.top_p, self.shape.top_k)

    # --- a call -------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(
        self,
        prompts: list[tuple[int, ...]],
        temperature: float,
        seed: int,
        stop_check: Callable[[list[int]], int | None] | None = None,
    ) -> list[Decoded]:
        """``len(prompts) * n`` responses (row ``p * n + s``), each ``(token_ids, finish_reason, logprobs)``.

        ``stop_check(tokens)`` returns the index of the token that completed a stop string, or None.
        """
        # Noise comes from the device's default generator, seeded here (graphs can only replay draws
        # from it), in a forked RNG state so the caller's is left as it was. Graphs and eager steps
        # draw the same noise.
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self._decode(prompts, temperature, stop_check)

    def _decode(
        self, prompts: list[tuple[int, ...]], temperature: float, stop_check: Callable[[list[int]], int | None] | None
    ) -> list[Decoded]:
        n, shape = self.shape.n, self.shape
        live = len(prompts) * n
        self.temperature.fill_(temperature)
        self.refresh_merged()
        self._prefill(prompts)
        done = [row >= live for row in range(self.rows)]
        cut: dict[int, int] = {}  # row → index of the token that completed a stop string
        batch = self._bucket(live)
        self.active[:batch].copy_(torch.arange(batch, device=self.device))
        for t in range(shape.max_new_tokens - 1):
            if t % self.sync_every == 0:
                batch = self._synchronize(t, done, cut, stop_check, batch)
                if batch == 0:
                    break
            self._run(batch)
        else:
            self._synchronize(shape.max_new_tokens - 1, done, cut, stop_check, batch, final=True)
        return self._results(live, cut)

    def _prefill(self, prompts: list[tuple[int, ...]]) -> None:
        """Run the prompts once (dynamic shapes, eager), copy their KV into the prefix buffers and
        sample every row's first token."""
        n, model = self.shape.n, self.model
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = getattr(out, "cache", None) or out.past_key_values
        width = ids.shape[1]
        for index, layer in enumerate(cache.layers):  # past ``width`` the bias masks what is there
            self.prefix_k[index][: len(prompts), :, :width].copy_(layer.keys)
            self.prefix_v[index][: len(prompts), :, :width].copy_(layer.values)
        self.prefix_bias.fill_(float("-inf"))
        self.prefix_bias[: len(prompts), 0, 0, :width].masked_fill_(mask.bool(), 0.0)
        lengths = mask.sum(-1).repeat_interleave(n)
        self.next_position.zero_()[: len(lengths)].copy_(lengths)
        self.finished.zero_()
        self.tokens.zero_()
        self.step_index.zero_()
        logits = out.logits[:, -1, :].float().repeat_interleave(n, 0)
        rows = torch.arange(len(lengths), device=self.device)
        self.tokens[: len(lengths), 0] = self._sample(logits, rows)
        self.logprobs[: len(lengths), 0] = _logprob_of(logits, self.tokens[: len(lengths), 0])
        self.finished[: len(lengths)] = torch.isin(self.tokens[: len(lengths), 0], self.eos)

    def _synchronize(
        self,
        t: int,
        done: list[bool],
        cut: dict[int, int],
        stop_check: Callable[[list[int]], int | None] | None,
        batch: int,
        final: bool = False,
    ) -> int:
        """The one host sync every ``sync_every`` steps: finished rows, stop strings, compaction.
        Slots 0..t hold tokens. Returns the batch size for the next steps (0: every row is done)."""
        finished = self.finished.tolist()
        tokens = self.tokens[:, : t + 1].tolist() if stop_check is not None else None
        eos = set(self.eos.tolist())
        for row in self.active[:batch].tolist():
            if done[row]:
                continue
            if tokens is not None:  # a stop string that completed before the row's EOS ends it there
                ids = tokens[row]
                end = next((i for i, token in enumerate(ids) if token in eos), len(ids))
                at = stop_check(ids[:end]) if stop_check is not None else None
                if at is not None:
                    done[row], cut[row] = True, at
                    continue
            done[row] = finished[row]
        live = [row for row in range(self.rows) if not done[row]]
        if not live or final:
            return 0
        target = self._bucket(len(live))
        if target < batch:
            self._compact(live, batch, target)
            return target
        return batch

    def _compact(self, live: list[int], batch: int, target: int) -> None:
        """Move the live rows (and their suffix caches) to the front of a smaller bucket. Spare slots
        repeat a finished row; its extra tokens are past its end and never read."""
        current = self.active[:batch].tolist()
        spare = next(row for row in current if row not in set(live))
        rows = live + [spare] * (target - len(live))
        where = {row: i for i, row in enumerate(current)}
        source = torch.tensor([where[row] for row in rows], device=self.device)
        for caches in (self.suffix_k, self.suffix_v):
            for cache in caches:
                cache[:target].copy_(cache.index_select(0, source))
        self.active[:target].copy_(torch.tensor(rows, device=self.device))

    def _run(self, batch: int) -> None:
        if not self.use_graphs:
            self._step(batch)
            return
        if not self.graphs:  # every bucket at once: the capture cost is paid in one call, not later
            for size in buckets_for(self.rows) if self.compaction else [self.rows]:
                self._capture(size)
        self.graphs[batch].replay()

    def _capture(self, batch: int) -> torch.cuda.CUDAGraph:
        """Capture the step for ``batch`` rows. The step mutates the decode state (it writes slot
        t + 1, advances t), so the state is saved first and restored after the warm-up and capture."""
        start = time.perf_counter()
        rng = torch.cuda.get_rng_state(self.device)
        saved = [t.clone() for t in self._state()]
        self.step_index.zero_()  # warm-up and capture write slots 1..3, wherever the call is
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up on a side stream (cuBLAS workspaces, lazy initialisation)
                self._step(batch)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self._step(batch)
        torch.cuda.set_rng_state(rng, self.device)
        for target, value in zip(self._state(), saved, strict=True):
            target.copy_(value)
        torch.cuda.synchronize(self.device)
        self.graphs[batch] = graph
        self.capture_seconds += time.perf_counter() - start
        return graph

    def _state(self) -> list[torch.Tensor]:
        """Every buffer a step writes."""
        return [self.tokens, self.logprobs, self.finished, self.step_index, *self.suffix_k, *self.suffix_v]

    def _bucket(self, rows: int) -> int:
        if not self.compaction:
            return self.rows
        return min(b for b in buckets_for(self.rows) if b >= rows)

    def _results(self, live: int, cut: dict[int, int]) -> list[Decoded]:
        tokens, logprobs = self.tokens[:live].tolist(), self.logprobs[:live].tolist()
        eos = set(self.eos.tolist())
        results: list[Decoded] = []
        for row, ids in enumerate(tokens):
            end = next((i for i, token in enumerate(ids) if token in eos), None)
            stop = cut.get(row)
            if stop is not None and (end is None or stop < end):
                results.append(Decoded(ids[: stop + 1], "stop", logprobs[row][: stop + 1]))
            elif end is not None:
                results.append(Decoded(ids[: end + 1], "eos", logprobs[row][: end + 1]))
            else:
                results.append(Decoded(ids, "length", logprobs[row]))
        return results


def _logprob_of(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """log-probability of each chosen token under the raw logits (temperature 1, nothing suppressed):
    the π_old that importance-weighted losses divide by."""
    return logits.gather(1, chosen[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def merged_weight_buffers(model: CausalLM) -> dict[Any, torch.Tensor]:
    """One buffer per LoRA-adapted linear of the decoder layers (peft ``lora.Linear``), for its merged
    weight; empty for a model without adapters. Decoders of one generator share them."""
    try:
        from peft.tuners.lora import Linear
    except ImportError:
        return {}
    adapted: list[Any] = [m for m in model.model.layers.modules() if isinstance(m, Linear)]
    return {m: torch.empty_like(m.base_layer.weight) for m in adapted}


def _per_row(per_prompt: torch.Tensor, n: int) -> torch.Tensor:
    """``(prompts, kv_heads, n * groups, x)`` → ``(prompts * n, kv_heads, groups, x)``."""
    prompts, kv_heads, _, last = per_prompt.shape
    return per_prompt.view(prompts, kv_heads, n, -1, last).transpose(1, 2).reshape(prompts * n, kv_heads, -1, last)
