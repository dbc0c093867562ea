"""The ``hf`` generator: transformers ``generate`` on the policy itself, on CPU or GPU.

It samples from the very model being trained (no copy, so no weight refresh is needed when the
engine hands it the same module). Prompts are left-padded and batched across prompts, each repeated N
times; the token ids the model produced are kept as they are, and each rollout records why it
stopped: ``eos``, ``stop`` (a stop string appeared) or ``length``.

Example config section::

    generator: {type: hf, max_new_tokens: 64, temperature: 1.0, top_p: 0.95, stop: ["\\n\\n"]}
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from transformers import StoppingCriteria, StoppingCriteriaList

from thresher.core.errors import ConfigError
from thresher.core.training.memory import GenerationPlan, PlanItem
from thresher.core.types import FinishReason, PluginContext, Prompt, Rollout
from thresher.generators.fast_decode import Decoded, Sampling, decode, left_pad
from thresher.generators.sampling import SamplingConfig, eos_token_ids, require_policy
from thresher.generators.shared_prefix import SUPPORTED_MODEL_TYPES
from thresher.generators.static_decode import (
    DecoderShape,
    StaticDecoder,
    merged_weight_buffers,
    supports_static_decode,
)


class HFGenerator:
    name: ClassVar[str] = "hf"

    class Config(SamplingConfig):
        batch_size: int = Field(8, ge=1, description="Prompts per generate call (each repeated N times).")
        decode: Literal["auto", "static", "fast", "generate"] = Field(
            "auto",
            description="static: preallocated KV cache, decode steps replayed as CUDA graphs on a GPU; fast: "
            "Thresher's eager decode loop (each prompt prefilled once for its N samples, finished rows leave "
            "the batch); generate: transformers' generate(); auto: static on CUDA (for the model types it "
            "supports), fast elsewhere — the fastest measured on each device.",
        )
        cuda_graphs: bool = Field(True, description="static decode on CUDA: replay captured graphs (false: eager).")
        compile_step: bool = Field(
            False,
            description="static decode: compile the model's part of a decode step with torch.compile before the "
            "graphs are captured (fewer, fused kernels; costs one compilation per decoder, about 2 minutes for "
            "a 135M model on a 2-core CPU). Off by default until a GPU measurement says it pays; see docs/gpu.md.",
        )
        merge_lora: bool = Field(
            True,
            description="static decode of a LoRA policy: sample from merged copies of the adapted weights "
            "(W + B·A·scale, refreshed every call; one more copy of them in memory) instead of the adapters.",
        )
        shared_prefill: bool = Field(True, description="fast decode: prefill each prompt once for its N samples.")
        compaction: bool = Field(True, description="fast decode: drop finished rows from the decode batch.")
        shared_kv: bool = Field(
            True,
            description="fast decode with shared_prefill: the N samples of a prompt attend to one copy of its KV "
            "cache instead of N copies (Llama, Mistral, Qwen2/3 model types; others keep the copies).",
        )

    def __init__(self, config: Config, context: PluginContext):
        self.model, self.tokenizer = require_policy(context, "hf")
        self.config = config
        self.device = context.device
        self.should_stop = context.should_stop
        self.eos_ids = eos_token_ids(self.model, self.tokenizer, config.ignore_eos)
        self.pad_id = self.tokenizer.pad_token_id
        self.decoders: dict[tuple, StaticDecoder] = {}
        self.merged: dict[torch.nn.Module, torch.Tensor] | None = None  # LoRA weights merged for decoding
        self.compile_seconds = 0.0  # graph capture time not yet reported

    def generate(self, prompts: list[Prompt], n: int, *, seed: int, greedy: bool = False) -> list[Rollout]:
        """Sample ``n`` responses for each prompt; rollouts come grouped by prompt, in order."""
        return [r for chunk in self.generate_chunks(prompts, n, seed=seed, greedy=greedy) for r in chunk]

    def generate_chunks(
        self, prompts: list[Prompt], n: int, *, seed: int, greedy: bool = False
    ) -> Iterator[list[Rollout]]:
        """The same rollouts as :meth:`generate`, one ``batch_size`` chunk of prompts at a time, so the
        engine can score a chunk while the next one is generated. Same seed, same samples."""
        was_training = self.model.training
        self.model.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for start in range(0, len(prompts), self.config.batch_size):
                    chunk = prompts[start : start + self.config.batch_size]
                    yield self._generate_chunk(chunk, start, n, greedy)
                    if self.should_stop():
                        return
        finally:
            self.model.train(was_training)

    def _generate_chunk(self, chunk: list[Prompt], first_group: int, n: int, greedy: bool) -> list[Rollout]:
        mode = self.decode_mode()
        if mode == "static":
            return self._static_chunk(chunk, first_group, n, greedy)
        if mode == "fast":
            return self._decode_chunk(chunk, first_group, n, greedy)
        return self._generate_chunk_hf(chunk, first_group, n, greedy)

    @classmethod
    def memory_items(cls, config: Config, run: GenerationPlan) -> list[PlanItem]:
        """The memory plan's generation items: the KV cache of one decode batch and the sampling
        buffers. The static decoder keeps both between steps (its graphs point at them), so they are
        held while training too; the eager loops free them."""
        prompts = min(config.batch_size, run.prompts_per_step)
        rows, new = prompts * run.n, config.max_new_tokens
        shape = run.shape
        per_token = shape.layers * 2 * shape.kv_heads * shape.head_dim * run.dtype_bytes
        static = config.decode == "static" or (
            config.decode == "auto" and run.device.type == "cuda" and run.model_type in SUPPORTED_MODEL_TYPES
        )
        shared = config.shared_prefill and (config.shared_kv or static)
        shrink = (
            "rs.num_rollouts_per_prompt, generator.batch_size (prompts per decode batch) or generator.max_new_tokens"
        )
        if static:
            width = -(-run.prompt_tokens // 64) * 64  # the decoder's buffers are rounded up
            cached = prompts * width + rows * new
            detail = f"{prompts} prompts × {width} + {rows} samples × {new} tokens, preallocated, kept between steps"
            if run.validation:  # a second decoder (N = 1, greedy) for validation
                cached += prompts * width + prompts * new
                detail += ", + validation's"
            merged = []
            if config.merge_lora and shape.adapted_weights:
                merged = [
                    PlanItem(
                        "merged LoRA weights",
                        shape.adapted_weights * run.dtype_bytes,
                        "static decode samples from merged copies of the adapted weights",
                        "generator.merge_lora=false (slower decoding)",
                        True,
                    )
                ]
            return [
                *merged,
                PlanItem(
                    "generation KV cache", per_token * cached, detail, shrink + " (or generator.decode=fast)", True
                ),
                PlanItem(
                    "sampling buffers",
                    4 * rows * shape.vocab * 4,
                    f"{rows} rows × {shape.vocab} vocabulary: logits, noise and temporaries, kept in the graphs' pool",
                    "generator.batch_size (prompts per decode batch) or rs.num_rollouts_per_prompt",
                    True,
                ),
            ]
        prompt = run.prompt_tokens
        cached = prompts * prompt + rows * new if shared else rows * (prompt + new)
        how = "each prompt's KV once" if shared else "the prompt's KV repeated per sample"
        recorded = []
        if config.decode == "generate":  # generate() hands back every step's logits (for the log-probs)
            recorded = [
                PlanItem(
                    "generate()'s logits",
                    4 * rows * new * shape.vocab,
                    f"{rows} rows × {new} tokens × {shape.vocab} vocabulary, fp32, to record each token's log-prob",
                    "generator.decode=fast (records them without keeping the logits)",
                )
            ]
        return [
            *recorded,
            PlanItem(
                "generation KV cache",
                per_token * cached,
                f"{prompts} prompts × {prompt} + {rows} samples × {new} tokens ({how})",
                shrink,
            ),
            PlanItem(
                "sampling buffers",
                4 * rows * shape.vocab * 4,
                f"{rows} rows × {shape.vocab} vocabulary: fp32 logits, noise and their temporaries",
                "generator.batch_size (prompts per decode batch) or rs.num_rollouts_per_prompt",
            ),
        ]

    def decode_mode(self) -> str:
        """The decode path this generator uses: ``auto`` resolved for the device and model."""
        mode = self.config.decode
        if mode == "auto":
            return "static" if self.device.type == "cuda" and supports_static_decode(self.model) else "fast"
        if mode == "static" and not supports_static_decode(self.model):
            model_type = getattr(self.model.config, "model_type", "?")
            raise ConfigError(
                [f"generator.decode: static decoding does not support model type {model_type!r}; use fast"]
            )
        return mode

    def _static_chunk(self, chunk: list[Prompt], first_group: int, n: int, greedy: bool) -> list[Rollout]:
        """The static-shape decoder, built once per (N, sampling) and kept while the prompts fit."""
        cfg = self.config
        greedy = greedy or cfg.temperature == 0
        top_k, top_p = (0, 1.0) if greedy else (cfg.top_k, cfg.top_p)
        width = max(len(p.token_ids) for p in chunk)
        key = (n, greedy, top_k, top_p, cfg.max_new_tokens)
        decoder = self.decoders.get(key)
        wanted = DecoderShape(max(cfg.batch_size, len(chunk)), n, width, cfg.max_new_tokens, greedy, top_k, top_p)
        if decoder is None or not decoder.shape.fits(wanted):
            # Room for longer prompts than this chunk's (rounded up), so a later step rarely rebuilds.
            grown = max(width, decoder.shape.width if decoder else 0)
            shape = DecoderShape(wanted.prompts, n, -(-grown // 64) * 64, cfg.max_new_tokens, greedy, top_k, top_p)
            self.decoders.pop(key, None)
            decoder = self.decoders[key] = StaticDecoder(
                self.model,
                shape,
                eos_ids=self.eos_ids,
                pad_id=self.pad_id,
                suppress=[self.pad_id] if self.pad_id not in self.eos_ids else None,
                use_graphs=cfg.cuda_graphs,
                compaction=cfg.compaction,
                merged=self._merged_buffers() if cfg.merge_lora else None,
                compile=cfg.compile_step,
            )
        before = decoder.capture_seconds
        results = decoder.decode(
            [p.token_ids for p in chunk],
            cfg.temperature or 1.0,
            seed=int(torch.randint(0, 2**62, (1,)).item()),
            stop_check=self._stop_position if cfg.stop else None,
        )
        self.compile_seconds += decoder.capture_seconds - before
        return self._rollouts(chunk, first_group, n, results)

    def _decode_chunk(self, chunk: list[Prompt], first_group: int, n: int, greedy: bool) -> list[Rollout]:
        """Thresher's decode loop; its seed is drawn from torch's RNG, which ``generate_chunks`` seeded."""
        cfg = self.config
        sampling = Sampling(
            cfg.max_new_tokens, cfg.temperature or 1.0, cfg.top_p, cfg.top_k, greedy=greedy or cfg.temperature == 0
        )
        results = decode(
            self.model,
            [p.token_ids for p in chunk],
            n,
            sampling,
            eos_ids=self.eos_ids,
            pad_id=self.pad_id,
            seed=int(torch.randint(0, 2**62, (1,)).item()),
            stop_check=(lambda ids: self._stop_position(ids) is not None) if cfg.stop else None,
            suppress=[self.pad_id] if self.pad_id not in self.eos_ids else None,
            shared_prefill=cfg.shared_prefill,
            compaction=cfg.compaction,
            shared_kv=cfg.shared_kv,
        )
        return self._rollouts(chunk, first_group, n, results)

    def _merged_buffers(self) -> dict[torch.nn.Module, torch.Tensor]:
        if self.merged is None:
            self.merged = merged_weight_buffers(self.model)
        return self.merged

    def _rollouts(self, chunk: list[Prompt], first_group: int, n: int, results: list[Decoded]) -> list[Rollout]:
        rollouts = []
        for row, (ids, reason, logprobs) in enumerate(results):
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            rollouts.append(Rollout(chunk[row // n], first_group + row // n, row % n, ids, text, reason, logprobs))
        return rollouts

    def _generate_chunk_hf(self, chunk: list[Prompt], first_group: int, n: int, greedy: bool) -> list[Rollout]:
        input_ids, attention_mask = left_pad([p.token_ids for p in chunk], self.pad_id, self.device)
        input_ids = input_ids.repeat_interleave(n, dim=0)
        attention_mask = attention_mask.repeat_interleave(n, dim=0)
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            generation_config=self._generation_config(greedy),
            tokenizer=self.tokenizer if self.config.stop else None,
            stopping_criteria=StoppingCriteriaList([StopWhenAsked(self.should_stop)]),
        )
        generated = output.sequences[:, input_ids.shape[1] :]
        # generate() hands back each step's raw logits (before suppression, temperature, top-k/p):
        # the log-probability of the token it chose is the π_old importance-weighted losses need.
        picked = [step.float().log_softmax(-1).gather(1, generated[:, i, None]) for i, step in enumerate(output.logits)]
        logprobs = torch.cat(picked, dim=1).tolist()
        rollouts = []
        for row, tokens in enumerate(generated.tolist()):
            ids, reason = self._trim(tokens)
            group, sample = first_group + row // n, row % n
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            rollouts.append(Rollout(chunk[row // n], group, sample, ids, text, reason, logprobs[row][: len(ids)]))
        return rollouts

    def _generation_config(self, greedy: bool) -> Any:
        from transformers import GenerationConfig

        sampling = not greedy and self.config.temperature > 0
        params: dict[str, Any] = {
            "max_new_tokens": self.config.max_new_tokens,
            "do_sample": sampling,
            "pad_token_id": self.pad_id,
            "eos_token_id": sorted(self.eos_ids) or None,
            "stop_strings": self.config.stop or None,
            "return_dict_in_generate": True,
            "output_logits": True,
        }
        if self.config.ignore_eos:
            params["min_new_tokens"] = self.config.max_new_tokens  # generate() would fall back to the model's EOS
        if self.pad_id not in self.eos_ids:
            # Padding is never a meaningful output; forbidding it also makes trailing pad ids in a
            # generated row unambiguous (they are padding, not tokens the model chose).
            params["suppress_tokens"] = [self.pad_id]
        if sampling:
            params.update(temperature=self.config.temperature, top_p=self.config.top_p, top_k=self.config.top_k)
        return GenerationConfig(**params)

    def _trim(self, tokens: list[int]) -> tuple[list[int], FinishReason]:
        """Cut a generated row where it really ended and say why.

        The first EOS ends a response (and is kept: training teaches the model to stop). A stop
        string ends it at the token that completed the string. After either, ``generate`` fills the
        row with padding, which may be the EOS id itself — hence the earliest event wins.
        """
        eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        limit = len(tokens) if eos_at is None else eos_at
        stop_at = self._stop_position(tokens[:limit]) if self.config.stop else None
        if stop_at is not None:
            return tokens[: stop_at + 1], "stop"
        if eos_at is not None:
            return tokens[: eos_at + 1], "eos"
        if len(tokens) >= self.config.max_new_tokens:
            return tokens, "length"
        # Shorter than the budget with no EOS: generate stopped it (a stop string matched across a
        # token boundary we could not see); drop the trailing padding.
        while tokens and tokens[-1] == self.pad_id:
            tokens = tokens[:-1]
        return tokens, "stop"

    def _stop_position(self, tokens: list[int]) -> int | None:
        """Index of the token whose decoding first contains a stop string (binary search: the
        decoded prefix only grows, so "contains a stop string" is monotone in the prefix length)."""

        def has_stop(length: int) -> bool:
            text = self.tokenizer.decode(tokens[:length], skip_special_tokens=True)
            return any(s in text for s in self.config.stop)

        if not tokens or not has_stop(len(tokens)):
            return None
        low, high = 1, len(tokens)
        while low < high:
            mid = (low + high) // 2
            if has_stop(mid):
                high = mid
            else:
                low = mid + 1
        return low - 1

    def metrics(self) -> dict[str, float]:
        """Graph capture time paid since the last report (the first steps pay it, later ones 0)."""
        spent, self.compile_seconds = self.compile_seconds, 0.0
        return {"compile_s": spent, "decode_static": float(self.decode_mode() == "static")}

    def load_weights(self, policy: torch.nn.Module) -> None:
        """Sample from ``policy`` next: free when it is the module we already hold."""
        if policy is not self.model:
            self.model.load_state_dict(policy.state_dict())

    def close(self) -> None:
        """Nothing to release: the model belongs to the trainer."""


class StopWhenAsked(StoppingCriteria):
    """A ``generate`` stopping criterion that ends every row once the run is asked to stop (Ctrl-C),
    so an interrupt does not wait for a long generation to finish."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.should_stop(), dtype=torch.bool, device=input_ids.device)
