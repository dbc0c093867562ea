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

import contextlib
import errno
import json
import logging
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

import numpy as np

from thresher.core.errors import ConfigError, ThresherError

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
        from thresher.core.types import FinishReason, Prompt, Rollout

        count = len(next(iter(rows.values())))
        extras = rows.get(EXTRA) or [{} for _ in range(count)]
        rollouts = []
        for i in range(count):
            extra = {k: v for k, v in extras[i].items() if k != "finish_reason"}
            prompt = Prompt(i, rows[PROMPTS][i] if PROMPTS in rows else "", (), extra)
            response = rows[RESPONSES][i] if RESPONSES in rows else rows[SENTENCES][i]
            reason = cast(FinishReason, extras[i].get("finish_reason") or "eos")  # as the client sent it
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


def check_ports_free(host: str, ports: dict[str, int]) -> None:
    """Refuse, before anything starts, ports that are not valid or that another process holds.

    Triton cannot serve on a port in use: it exits, and PyTriton then waits up to 120 s for it, or
    asks whatever server holds the HTTP port whether it is ready (another Triton answers 403), and
    ends in tracebacks. Binding each port here, as the server will (``SO_REUSEADDR``, so that closed
    connections lingering in TIME_WAIT do not count), names the port instead. ``ports`` maps each
    option to its port. Triton's metrics port is not among them: ``serve`` turns metrics off, so
    Triton never binds it, and refusing it would refuse a server that would have run.
    """
    problems = []
    flags = list(ports)
    for i, flag in enumerate(flags):
        for other in flags[:i]:
            if ports[flag] == ports[other]:
                problems.append(f"{other} and {flag} are both {ports[flag]}; give two different ports")
    for flag, port in ports.items():
        if not 1 <= port <= 65535:
            problems.append(f"{flag} {port}: not a port number (1-65535)")
            continue
        reason = _bind_problem(host, port)
        if reason:
            problems.append(f"{flag} {port}: {reason}")
    if problems:
        raise ConfigError(problems)


def _bind_problem(host: str, port: int) -> str:
    """Why ``host:port`` cannot be served on, or '' when it can."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        return f"cannot resolve --host {host} ({err.strerror})"
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                return f"the port is in use on {host} (another server?); give a free port"
            return f"cannot serve on {host} ({err.strerror or err})"
    return ""


def serve(
    backend: Any,
    options: ServeOptions,
    on_ready: Callable[[str, str], None],
    stop: threading.Event | None = None,
) -> None:
    """Serve ``backend`` until ``stop`` is set (or SIGINT/SIGTERM in the main thread).

    Ports in use are refused before anything starts; a signal during the start-up ends it (see
    :class:`_StopSignals`); a start-up failure is one line. Whatever ends it, tritonserver is stopped
    and the scratch folder (workspace, Triton's log) removed.
    """
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig
    except ImportError:
        raise ThresherError("serve-rm needs PyTriton: pip install 'thresher[triton]'") from None

    ports = {"--http-port": options.http_port, "--grpc-port": options.grpc_port}
    check_ports_free(options.host, ports)
    _fix_stub_library_path()
    stop = stop or threading.Event()
    signals = _StopSignals(stop)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, signals.handle)
    # PyTriton sends the client the formatted exception: with no frames it is one line
    # ("ValueError: …"); the full traceback of a real failure goes to this process's stderr.
    previous_limit = getattr(sys, "tracebacklimit", None)
    sys.tracebacklimit = 0
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
    scratch = Path(tempfile.mkdtemp(prefix="thresher-triton-"))
    config.log_file = options.log_file or str(scratch / "triton.log")  # keep the console quiet
    # PyTriton's own log lines ("Triton Inference Server exited with failure. Please wait.") go to
    # Triton's log too: on the console they would stand beside the one line that says what failed.
    pytriton_log = logging.getLogger("pytriton")
    to_file = logging.FileHandler(config.log_file, delay=True)
    to_file.setFormatter(logging.Formatter("%(levelname).1s pytriton %(name)s] %(message)s"))
    pytriton_log.addHandler(to_file)
    propagate, pytriton_log.propagate = pytriton_log.propagate, False
    triton = None
    try:
        try:
            # PyTriton creates the workspace itself and keeps its files there, not in the home directory.
            triton = Triton(config=config, workspace=scratch / "workspace")
            with triton:  # starts tritonserver; the stop() below also covers an interrupted start
                triton.bind(
                    model_name=options.model_name,
                    infer_func=make_infer_function(backend),
                    inputs=inputs,
                    outputs=outputs,
                    config=model_config,
                    strict=True,
                )
                triton.run()
                signals.started()  # from here on a signal only sets `stop`
                on_ready(f"http://{options.host}:{options.http_port}", f"grpc://{options.host}:{options.grpc_port}")
                while not stop.wait(0.2):
                    pass
        except (KeyboardInterrupt, SystemExit, ThresherError):
            raise
        except Exception as err:
            if signals.received is not None:  # PyTriton turned the interrupt into its own error
                signals.reraise()
            if not signals.is_starting:
                raise
            # tritonserver exited or never answered, or another server answered on its port: a port
            # taken since the check is named as the check names it, once ours has surely let go of it
            # (PyTriton may still be stopping it from another thread)
            _end_processes_under(scratch)
            check_ports_free(options.host, ports)
            reason = _start_failure(err, config.log_file)
            raise ThresherError(f"serve-rm: Triton Inference Server did not start: {reason}") from None
    finally:
        signals.started()
        if triton is not None:
            with contextlib.suppress(Exception):  # a half-started Triton may lack its process
                if not triton.stop():
                    # Already stopping: tritonserver exited by itself and PyTriton's exit callback is
                    # cleaning the workspace on another thread. Removing it under that thread makes
                    # PyTriton warn on the console; let it finish first.
                    _wait_until_gone(scratch / "workspace", timeout=10.0)
        pytriton_log.removeHandler(to_file)
        to_file.close()
        pytriton_log.propagate = propagate
        _remove_scratch(scratch)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if previous_limit is None:
            del sys.tracebacklimit
        else:
            sys.tracebacklimit = previous_limit


class _StopSignals:
    """SIGINT/SIGTERM for ``serve``: while the server starts they end the start-up at once (SIGINT
    as ``KeyboardInterrupt``, SIGTERM as exit 143), because PyTriton's start-up waits (up to 120 s)
    without looking at ``stop``; once it serves, they only set ``stop`` for a clean shutdown."""

    def __init__(self, stop: threading.Event):
        self.stop = stop
        self.is_starting = True
        self.received: int | None = None

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.stop.set()
        if self.is_starting and self.received is None:  # once: never break the clean-up it starts
            self.received = signum
            self.reraise()

    def reraise(self) -> None:
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        raise SystemExit(128 + (self.received or signal.SIGTERM))

    def started(self) -> None:
        self.is_starting = False


def _start_failure(err: BaseException, log_file: str) -> str:
    """Why Triton did not start, in one line: from its own log (a port taken after the check, a
    model that failed to load), else the client's error."""
    errors = []
    with contextlib.suppress(OSError):
        for line in Path(log_file).read_text(errors="replace").splitlines():
            if line.startswith("E") and "] " in line and "CudaDriverHelper" not in line:  # not: no GPU here
                errors.append(line.split("] ", 1)[1].strip().strip('"').strip())
    in_use = [line for line in errors if "already in use" in line]
    if in_use or errors:
        return (in_use or errors)[-1][:300]
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:300]


def _wait_until_gone(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _remove_scratch(scratch: Path) -> None:
    """Remove the scratch folder, and end whatever still runs from it first.

    A tritonserver that PyTriton had to kill (it outwaited its exit timeout for an open connection)
    leaves its Python stub running, orphaned; a tritonserver that exits on its own makes PyTriton
    clean the workspace from another thread, racing this removal. So processes started from the
    folder are ended, and the removal is retried until the folder is gone.
    """
    for attempt in range(50):
        _end_processes_under(scratch, timeout=5.0 if attempt == 0 else 0.1)
        if attempt:
            time.sleep(0.05)
        shutil.rmtree(scratch, ignore_errors=True)
        if not scratch.exists():
            return


def _end_processes_under(folder: Path, timeout: float = 5.0) -> None:
    """SIGKILL the processes started from ``folder`` and wait (up to ``timeout``) until they have
    exited, their ports and files released. They can only be this server's (tritonserver, its Python
    stub): their executables live in this private folder. Linux ``/proc``; elsewhere nothing."""
    marker = str(folder).encode() + b"/"
    deadline = time.monotonic() + timeout
    while True:
        running = []
        for entry in Path("/proc").glob("[0-9]*"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                if int(entry.name) == os.getpid() or marker not in (entry / "cmdline").read_bytes():
                    continue
                if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                    continue  # exited, not yet reaped: nothing of it is held any more
                os.kill(int(entry.name), signal.SIGKILL)
                running.append(entry.name)
        if not running or time.monotonic() > deadline:
            return
        time.sleep(0.05)
