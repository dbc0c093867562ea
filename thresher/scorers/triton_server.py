"""``thresher serve-rm``: a reward model on a real Triton Inference Server, through PyTriton.

The served model follows NeMo-Aligner's reward-server contract, so either side can talk to the other:

============================  =======  ==========  =============================================
tensor                        dtype    shape/row   meaning
============================  =======  ==========  =============================================
``sentences`` (optional)      BYTES    [-1]        the full prompt + response text (UTF-8)
``tokens`` (optional)         INT64    [-1]        token ids, right-padded
``sequence_lengths`` (opt.)   INT64    [-1]        real length of each ``tokens`` row
``rewards`` (output)          FP32     [1]         one reward per row
============================  =======  ==========  =============================================

Thresher's client also sends three optional inputs when the server declares them, so that a rule
reward served remotely sees exactly what it sees in-process: ``prompts`` and ``responses`` (BYTES)
and ``extra`` (BYTES, one JSON object per row: the dataset fields and ``finish_reason``). A NeMo
client simply does not send them.

Sources: a transformers reward-model directory (``--model``; a one-label sequence classifier) or a
rule function (``--rule module:function``). The server binds 127.0.0.1 unless ``--host`` says
otherwise, batches dynamically, and stops cleanly on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import sysconfig
import tempfile
import threading
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from thresher.core.errors import ThresherError

SENTENCES, TOKENS, LENGTHS = "sentences", "tokens", "sequence_lengths"
PROMPTS, RESPONSES, EXTRA = "prompts", "responses", "extra"
REWARDS = "rewards"


@dataclass(frozen=True)
class ServeOptions:
    model_name: str = "reward_model"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    max_batch_size: int = 64
    queue_delay_us: int = 1000
    log_file: str | None = None  # Triton's own log (default: a file in the temporary workspace)


class RequestError(ValueError):
    """A request the backend cannot answer: its one line is what the client reads."""


class RuleBackend:
    """Rewards from a ``module:function`` rule, called like the in-process ``rule`` scorer."""

    accepts_tokens = False

    def __init__(self, spec: str):
        from thresher.scorers.rules import load_callable

        self.spec = spec
        self.function = load_callable(spec, "--rule")

    def __call__(self, rows: dict[str, list[Any]]) -> np.ndarray:
        import inspect

        from thresher.scorers.rules import check_rewards, select_kwargs

        count = len(next(iter(rows.values())))
        arguments: dict[str, list[Any]] = {"sentences": rows[SENTENCES]}
        if PROMPTS in rows:
            arguments["prompts"] = rows[PROMPTS]
        if RESPONSES in rows:
            arguments["responses"] = rows[RESPONSES]
        if EXTRA in rows:
            extras = rows[EXTRA]
            arguments["finish_reasons"] = [e.get("finish_reason") for e in extras]
            for key in sorted({k for e in extras for k in e} - {"finish_reason"}):
                arguments.setdefault(key, [e.get(key) for e in extras])
        parameters = inspect.signature(self.function).parameters.values()
        needed = [
            p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        missing = [name for name in needed if name not in arguments]
        if missing:
            raise RequestError(
                f"reward function {self.spec!r} needs {', '.join(map(repr, missing))}, which the client did not "
                f"send (it sent: {', '.join(sorted(rows))}); send it in the {EXTRA!r} input (a JSON object per row)"
            )
        result = self.function(**select_kwargs(self.function, arguments))
        return np.asarray(check_rewards(result, count, f"reward function {self.spec!r}"), dtype=np.float32)

    def close(self) -> None:
        pass


class ScorerBackend:
    """Any registered scorer, serving rollouts rebuilt from the request: prompts, responses and the
    ``extra`` fields when the client sends them (Thresher's client does), else the full sentences."""

    accepts_tokens = False

    def __init__(self, scorer: Any):
        self.scorer = scorer

    def __call__(self, rows: dict[str, list[Any]]) -> np.ndarray:
        from thresher.core.types import Prompt, Rollout

        count = len(next(iter(rows.values())))
        extras = rows.get(EXTRA) or [{} for _ in range(count)]
        rollouts = []
        for i in range(count):
            extra = {k: v for k, v in extras[i].items() if k != "finish_reason"}
            prompt = Prompt(i, rows[PROMPTS][i] if PROMPTS in rows else "", (), extra)
            response = rows[RESPONSES][i] if RESPONSES in rows else rows[SENTENCES][i]
            reason = extras[i].get("finish_reason") or "eos"
            rollouts.append(Rollout(prompt, i, 0, [], response, reason))
        from thresher.core.types import PartRewards

        result = self.scorer.score(rollouts)
        total = result.total if isinstance(result, PartRewards) else result
        return np.asarray(total, dtype=np.float32).reshape(-1)

    def close(self) -> None:
        self.scorer.close()


class RewardModelBackend:
    """Rewards from a one-label sequence classifier; reads text, or token ids in its own vocabulary."""

    accepts_tokens = True

    def __init__(self, path: str, device: str = "cpu", batch_size: int = 16):
        import torch

        from thresher.scorers.local import load_reward_model

        self.torch = torch
        self.model, self.tokenizer = load_reward_model(path)
        self.device = torch.device(device)
        self.model.to(self.device).eval()
        self.batch_size = batch_size

    def __call__(self, rows: dict[str, list[Any]]) -> np.ndarray:
        from thresher.scorers.local import score_texts

        if SENTENCES in rows:
            return score_texts(self.model, self.tokenizer, rows[SENTENCES], self.batch_size, None).numpy()
        return self._score_tokens(rows[TOKENS], rows[LENGTHS])

    def _score_tokens(self, tokens: list[np.ndarray], lengths: list[int]) -> np.ndarray:
        torch = self.torch
        rewards = []
        pad = self.tokenizer.pad_token_id
        with torch.no_grad():
            for start in range(0, len(tokens), self.batch_size):
                chunk, sizes = tokens[start : start + self.batch_size], lengths[start : start + self.batch_size]
                width = max(sizes)
                ids = torch.full((len(chunk), width), pad, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, (seq, size) in enumerate(zip(chunk, sizes, strict=True)):
                    ids[row, :size] = torch.as_tensor(seq[:size])
                    mask[row, :size] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                rewards.append(logits[:, 0].float().cpu())
        return torch.cat(rewards).numpy()

    def close(self) -> None:
        pass


def decode_rows(inputs: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """Batched Triton inputs → per-row Python values (texts, JSON objects, token arrays, lengths)."""
    rows: dict[str, list[Any]] = {}
    for name in (SENTENCES, PROMPTS, RESPONSES):
        if name in inputs:
            rows[name] = [b"".join(bytes(x) for x in row).decode("utf-8") for row in inputs[name]]
    if EXTRA in inputs:
        rows[EXTRA] = [json.loads(b"".join(bytes(x) for x in row) or b"{}") for row in inputs[EXTRA]]
    if TOKENS in inputs:
        if LENGTHS not in inputs:
            raise ValueError(f"input {TOKENS!r} needs {LENGTHS!r}")
        rows[TOKENS] = list(inputs[TOKENS])
        rows[LENGTHS] = [int(np.asarray(x).reshape(-1)[0]) for x in inputs[LENGTHS]]
    if SENTENCES not in rows and TOKENS not in rows:
        raise ValueError(f"send {SENTENCES!r} or {TOKENS!r} + {LENGTHS!r}")
    return rows


def contract_tensors(accepts_tokens: bool) -> tuple[list[Any], list[Any]]:
    from pytriton.model_config import Tensor

    inputs = [Tensor(name=SENTENCES, shape=(-1,), dtype=bytes, optional=True)]
    if accepts_tokens:
        inputs += [
            Tensor(name=TOKENS, shape=(-1,), dtype=np.int64, optional=True),
            Tensor(name=LENGTHS, shape=(-1,), dtype=np.int64, optional=True),
        ]
    inputs += [Tensor(name=n, shape=(-1,), dtype=bytes, optional=True) for n in (PROMPTS, RESPONSES, EXTRA)]
    outputs = [Tensor(name=REWARDS, shape=(1,), dtype=np.float32)]
    return inputs, outputs


def make_infer_function(backend: Callable[[dict[str, list[Any]]], np.ndarray]) -> Callable[..., dict[str, np.ndarray]]:
    from pytriton.decorators import batch

    @batch
    def infer(**inputs: np.ndarray) -> dict[str, np.ndarray]:
        try:
            rewards = np.asarray(backend(decode_rows(inputs)), dtype=np.float32)
        except RequestError:
            raise
        except Exception:  # a bug or a failing reward: the whole traceback in the server's log
            traceback.print_exc(file=sys.stderr)
            raise
        return {REWARDS: rewards.reshape(-1, 1)}

    return infer


def _fix_stub_library_path() -> None:
    # Triton's Python stub links the system libpython but must load this interpreter's stdlib: point
    # the loader at this Python's own library directory (else the stub fails with an RLock error).
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir:
        current = os.environ.get("LD_LIBRARY_PATH", "")
        if libdir not in current.split(":"):
            os.environ["LD_LIBRARY_PATH"] = f"{libdir}:{current}" if current else libdir


def serve(
    backend: Any,
    options: ServeOptions,
    on_ready: Callable[[str, str], None],
    stop: threading.Event | None = None,
) -> None:
    """Serve ``backend`` until ``stop`` is set (or SIGINT/SIGTERM in the main thread)."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise ThresherError("serve-rm needs PyTriton: pip install 'thresher[triton]'") from None

    _fix_stub_library_path()
    # PyTriton sends the client the formatted exception: with no frames it is one line
    # ("ValueError: …"); the full traceback of a real failure goes to this process's stderr.
    previous_limit = getattr(sys, "tracebacklimit", None)
    sys.tracebacklimit = 0
    stop = stop or threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda *_: stop.set())
    inputs, outputs = contract_tensors(backend.accepts_tokens)
    config = TritonConfig(
        http_address=options.host,
        http_port=options.http_port,
        grpc_address=options.host,
        grpc_port=options.grpc_port,
        allow_metrics=False,
        log_verbose=0,
    )
    model_config = ModelConfig(
        max_batch_size=options.max_batch_size,
        batcher=DynamicBatcher(max_queue_delay_microseconds=options.queue_delay_us),
    )
    try:
        with tempfile.TemporaryDirectory(prefix="thresher-triton-") as scratch:
            # PyTriton creates the workspace itself and keeps its files there, not in the home directory.
            config.log_file = options.log_file or os.path.join(scratch, "triton.log")  # keep the console quiet
            with Triton(config=config, workspace=os.path.join(scratch, "workspace")) as triton:
                triton.bind(
                    model_name=options.model_name,
                    infer_func=make_infer_function(backend),
                    inputs=inputs,
                    outputs=outputs,
                    config=model_config,
                    strict=True,
                )
                triton.run()
                on_ready(f"http://{options.host}:{options.http_port}", f"grpc://{options.host}:{options.grpc_port}")
                while not stop.wait(0.2):
                    pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous_limit is None:
            del sys.tracebacklimit
        else:
            sys.tracebacklimit = previous_limit
