"""The ``triton`` scorer: rewards from a model served on Triton Inference Server (gRPC or HTTP).

The served model must follow the reward contract of :mod:`thresher.scorers.triton_server` (the same
as NeMo-Aligner's reward server): inputs ``sentences`` (BYTES) and/or ``tokens`` + ``sequence_lengths``
(INT64), output ``rewards`` (FP32, one per row). At start-up the scorer checks that the server is
live, the model ready and its metadata match the contract, and reads the model's max batch size.
Rollouts go out in batches no larger than that, several requests in flight at once; each request
has a timeout and transient failures are retried with exponential backoff. When the retry budget is
spent the step fails with a one-line error — after the engine has written the step's rollouts — and
the run can be resumed once the server is back.

Example config section::

    scorer: {type: triton, url: grpc://127.0.0.1:8001, model_name: reward_model, concurrency: 4}

Start a server with ``thresher serve-rm --rule my_rewards:exact`` or ``--model rm_dir``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import Future, wait
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator

from thresher.core.config import Section
from thresher.core.errors import ConfigError, ScorerError, ScoringInterrupted
from thresher.core.types import PluginContext, Rollout

SENTENCES, TOKENS, LENGTHS = "sentences", "tokens", "sequence_lengths"
PROMPTS, RESPONSES, EXTRA = "prompts", "responses", "extra"
REWARDS = "rewards"
STOP_POLL_S = 0.2  # how often a waiting score() looks for a stop request
# gRPC codes (and HTTP statuses) worth retrying: the server is restarting, overloaded or slow.
TRANSIENT = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "502", "503", "504")


class TritonScorer:
    name: ClassVar[str] = "triton"
    # Computes elsewhere: the engine overlaps its requests with generation (rs.overlap_scoring: auto).
    remote: ClassVar[bool] = True

    class Config(Section):
        url: str = Field("grpc://127.0.0.1:8001", description="grpc://HOST:PORT or http://HOST:PORT.")
        model_name: str = Field("reward_model", description="Model name on the server.")
        model_version: str = Field("", description="Model version ('' for the server's choice).")
        input: Literal["auto", "sentences", "tokens"] = Field(
            "auto",
            description="Send text (sentences) or the policy's token ids (tokens: only for a reward model "
            "sharing the policy's tokenizer); auto prefers sentences.",
        )
        max_batch_size: int | None = Field(None, ge=1, description="Rows per request (default: the server's max).")
        concurrency: int = Field(4, ge=1, description="Requests in flight at once.")
        timeout_s: float = Field(60.0, gt=0, description="Per-request timeout.")
        max_retries: int = Field(3, ge=0, description="Retries of a request after a transient failure.")
        backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles at each retry.")
        auth_header: str = Field("authorization", description="Header that carries the access token.")
        auth_token_env: str | None = Field(
            None, description="Environment variable holding an access token, sent as 'Bearer TOKEN'."
        )

        @field_validator("url")
        @classmethod
        def _scheme(cls, value: str) -> str:
            if not re.match(r"^(grpc|http|https)://[^/\s]+$", value):
                raise ValueError("expected grpc://HOST:PORT or http://HOST:PORT")
            return value

    def __init__(self, config: Config, context: PluginContext | None = None):
        self.config = config
        self.protocol, self.address = config.url.split("://", 1)
        self.headers = self._headers()
        self._local = threading.local()
        self._clients: list[Any] = []  # every thread's client, closed by close()
        self._clients_lock = threading.Lock()
        self._pool = DaemonPool(config.concurrency, "triton-scorer")
        self._abort = threading.Event()  # set on a stop request: no more retries, requests cut
        self.should_stop = getattr(context, "should_stop", None) or (lambda: False)
        try:
            with _ctrl_c_raises():
                check = self._pool.submit(self._check_server)
                (self.inputs,) = self._wait_stoppable([check], "start-up check stopped on request")
        except BaseException:
            # No caller will ever close a scorer that failed to start: stop its threads and connections
            # here, or a request thread still waiting on a silent server would hold the process.
            self._abandon()
            raise
        self.pad_id = getattr(getattr(context, "tokenizer", None), "pad_token_id", None) or 0

    # --- start-up checks -----------------------------------------------------------------------

    def _headers(self) -> dict[str, str]:
        variable = self.config.auth_token_env
        if variable is None:
            return {}
        token = os.environ.get(variable)
        if not token:
            raise ConfigError([f"scorer.auth_token_env: environment variable {variable!r} is not set"])
        # gRPC metadata keys must be lowercase; HTTP headers are case-insensitive, so lowercase serves both.
        return {self.config.auth_header.lower(): f"Bearer {token}"}

    def _check_server(self) -> set[str]:
        """Runs on a request thread (see ``__init__``): a server that accepts the connection and never
        answers blocks the client inside C code or gevent's loop, where Ctrl-C cannot reach it."""
        url, name = self.config.url, self.config.model_name
        client = self._client()
        # A gRPC call has no deadline unless given one; the HTTP client has its network timeout.
        timeout = {"client_timeout": self.config.timeout_s} if self.protocol == "grpc" else {}
        try:
            live = client.is_server_live(headers=self.headers, **timeout)
        except Exception as err:  # connection refused, DNS, TLS: all mean "no server there"
            raise ScorerError(
                f"scorer.url: no Triton server answers at {url} ({_short(err)}); start one with "
                "`thresher serve-rm --rule module:function` (or --model DIR), or fix scorer.url"
            ) from None
        if not live:
            raise ScorerError(f"scorer.url: the Triton server at {url} is not live")
        try:
            ready = client.is_model_ready(name, self.config.model_version, headers=self.headers, **timeout)
        except Exception as err:
            raise ScorerError(f"scorer.model_name: cannot query model {name!r} at {url} ({_short(err)})") from None
        if not ready:
            available = self._available_models(client, timeout)
            listing = f"; models there: {available}" if available else ""
            raise ScorerError(
                f"scorer.model_name: model {name!r} is not ready on {url} (`thresher serve-rm --name` sets the "
                f"name){listing}"
            )
        version = self.config.model_version
        metadata = self._as_dict(client.get_model_metadata(name, version, headers=self.headers, **timeout))
        inputs = contract_problems_and_inputs(metadata, name, self.config.input)
        if self.config.max_batch_size is None:
            model_config = self._as_dict(client.get_model_config(name, version, headers=self.headers, **timeout))
            model_config = model_config.get("config", model_config)
            self.max_batch_size = int(model_config.get("max_batch_size") or 0) or 64
        else:
            self.max_batch_size = self.config.max_batch_size
        return inputs

    def _available_models(self, client: Any, timeout: dict[str, float]) -> str:
        """Model names on the server, or '' where the listing is restricted (PyTriton restricts it)."""
        try:
            index = self._as_dict(client.get_model_repository_index(headers=self.headers, **timeout))
        except Exception:
            return ""
        models = index.get("models", index) if isinstance(index, dict) else index
        return ", ".join(sorted(m.get("name", "?") for m in models if isinstance(m, dict)))

    def _as_dict(self, value: Any) -> Any:
        if self.protocol == "grpc" and not isinstance(value, (dict, list)):
            from google.protobuf.json_format import MessageToDict

            return MessageToDict(value, preserving_proto_field_name=True)
        return value

    def _client(self) -> Any:
        """One client per thread: requests run concurrently from the scorer's thread pool."""
        client = getattr(self._local, "client", None)
        if client is None:
            if self.protocol == "grpc":
                import tritonclient.grpc as grpcclient

                client = grpcclient.InferenceServerClient(self.address)
            else:
                import tritonclient.http as httpclient

                timeout = self.config.timeout_s
                client = httpclient.InferenceServerClient(
                    self.address, ssl=self.protocol == "https", connection_timeout=timeout, network_timeout=timeout
                )
            self._local.client = client
            with self._clients_lock:
                self._clients.append(client)
        return client

    # --- scoring -------------------------------------------------------------------------------

    def score(self, rollouts: list[Rollout]) -> torch.Tensor:
        """Rewards in order. A stop request (Ctrl-C) ends the wait within ~0.2 s: queued batches are
        cancelled, retries stop, and open connections are closed to cut requests in flight."""
        size = self.max_batch_size
        batches = [rollouts[i : i + size] for i in range(0, len(rollouts), size)]
        futures = [self._pool.submit(self._score_batch, batch) for batch in batches]
        results = self._wait_stoppable(futures, "scoring stopped on request")
        return torch.from_numpy(np.concatenate(results) if results else np.zeros(0, np.float32)).float()

    def _wait_stoppable(self, futures: list[Future], what: str) -> list[Any]:
        """The futures' results, waited for where a stop can end the wait.

        The caller's thread only waits on a condition with a short timeout: a run's stop request is
        seen within STOP_POLL_S, and a plain Ctrl-C (no run's handler installed, as while the scorer
        is being built) raises ``KeyboardInterrupt`` here at once. Either way the requests still
        running are cut (:meth:`_stop_requests`) instead of waited for.
        """
        try:
            while True:
                _, pending = wait(futures, timeout=STOP_POLL_S)
                if not pending:
                    break
                if self.should_stop():
                    raise ScoringInterrupted(f"Triton {self.config.url}: {what}")
        except BaseException:
            if not all(future.done() for future in futures):
                self._stop_requests(futures)
            raise
        return [future.result() for future in futures]

    def _score_batch(self, batch: list[Rollout]) -> np.ndarray:
        attempts = self.config.max_retries + 1
        for attempt in range(attempts):
            if self._abort.is_set():
                raise ScoringInterrupted(f"Triton {self.config.url}: scoring stopped on request")
            try:
                rewards = self._infer(batch)
            except Exception as err:
                if self._abort.is_set():  # its connection was closed to stop it
                    raise ScoringInterrupted(f"Triton {self.config.url}: scoring stopped on request") from None
                message = _short(err)
                if not _is_transient(err) or attempt == attempts - 1:
                    tried = f" after {attempt + 1} attempts" if attempt else ""
                    raise ScorerError(
                        f"Triton {self.config.url} model {self.config.model_name!r}: a batch of {len(batch)} "
                        f"failed{tried}: {message}"
                    ) from None
                self._abort.wait(self.config.backoff_s * 2**attempt)  # wakes at once on a stop request
                continue
            if rewards.shape != (len(batch),):
                raise ScorerError(
                    f"Triton model {self.config.model_name!r} returned rewards of shape {list(rewards.shape)} "
                    f"for {len(batch)} rows (expected one per row)"
                )
            return rewards
        raise AssertionError("unreachable")

    def _infer(self, batch: list[Rollout]) -> np.ndarray:
        module = _client_module(self.protocol)
        arrays = self._request_arrays(batch)
        inputs = []
        for name, array in arrays.items():
            tensor = module.InferInput(name, list(array.shape), "BYTES" if array.dtype == object else "INT64")
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        outputs = [module.InferRequestedOutput(REWARDS)]
        kwargs: dict[str, Any] = {"headers": self.headers, "model_version": self.config.model_version}
        if self.protocol == "grpc":
            kwargs["client_timeout"] = self.config.timeout_s
        result = self._client().infer(self.config.model_name, inputs, outputs=outputs, **kwargs)
        return np.asarray(result.as_numpy(REWARDS), dtype=np.float32).reshape(-1)

    def _request_arrays(self, batch: list[Rollout]) -> dict[str, np.ndarray]:
        def column(values: list[str]) -> np.ndarray:
            return np.array([[v.encode("utf-8")] for v in values], dtype=object)

        arrays: dict[str, np.ndarray] = {}
        if SENTENCES in self.inputs:
            arrays[SENTENCES] = column([r.prompt.text + r.text for r in batch])
        else:
            ids = [list(r.prompt.token_ids) + list(r.response_ids) for r in batch]
            width = max(len(x) for x in ids)
            arrays[TOKENS] = np.array([x + [self.pad_id] * (width - len(x)) for x in ids], dtype=np.int64)
            arrays[LENGTHS] = np.array([[len(x)] for x in ids], dtype=np.int64)
        if PROMPTS in self.inputs:
            arrays[PROMPTS] = column([r.prompt.text for r in batch])
        if RESPONSES in self.inputs:
            arrays[RESPONSES] = column([r.text for r in batch])
        if EXTRA in self.inputs:
            arrays[EXTRA] = column([json.dumps({**r.prompt.extra, "finish_reason": r.finish_reason}) for r in batch])
        return arrays

    def _stop_requests(self, futures: list[Future]) -> None:
        """No more retries, queued requests cancelled, requests in flight cut."""
        self._abort.set()
        for future in futures:
            future.cancel()
        # Closing cuts gRPC requests in flight; an HTTP client's close can block until its request
        # ends, so it is closed off the caller's thread.
        threading.Thread(target=self._close_clients, daemon=True).start()

    def _abandon(self) -> None:
        """Release a scorer whose construction failed or was interrupted, without waiting on anything
        (a request still in flight was cut by :meth:`_stop_requests`, which set ``_abort``)."""
        if not self._abort.is_set():
            self._abort.set()
            self._close_clients()
        self._pool.shutdown(wait=False)

    def close(self) -> None:
        """Stop the request threads and close every connection (an open keep-alive connection makes a
        stopping Triton server wait for its exit timeout)."""
        self._pool.shutdown(wait=not self._abort.is_set())
        if not self._abort.is_set():  # after a stop request the clients are being closed already
            self._close_clients()

    def _close_clients(self) -> None:
        with self._clients_lock:
            for client in self._clients:
                with contextlib.suppress(Exception):
                    client.close()
            self._clients.clear()


@contextlib.contextmanager
def _ctrl_c_raises() -> Iterator[None]:
    """While the scorer is built, Ctrl-C (SIGINT) raises ``KeyboardInterrupt`` even in a process that
    started with SIGINT ignored, as a shell leaves every job started with ``&``.

    The run's own handler (:class:`thresher.core.interrupt.Interrupts`) takes SIGINT whatever its
    inherited setting, but it is installed only when training starts; without this, the start-up
    check against a server that never answers ignored Ctrl-C until its timeout. A handler set in
    Python (the default one, a run's, a caller's) is left as it is. Main thread only: signal
    handlers cannot be set elsewhere.
    """
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.SIG_IGN
    ):
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class DaemonPool:
    """A few request threads that never keep the process alive.

    After a stop request, a request in flight may still be blocked reading its socket (the HTTP
    client cannot be interrupted from another thread; the gRPC one is cut by closing it); the
    process must exit without waiting for its timeout, which ``ThreadPoolExecutor``'s threads,
    joined at exit, would make it do.
    """

    def __init__(self, workers: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit(self, function: Any, *args: Any) -> Future:
        future: Future = Future()
        self._queue.put((future, function, args))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, function, args = item
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while queued
            try:
                future.set_result(function(*args))
            except BaseException as err:  # the caller gets it from future.result()
                future.set_exception(err)

    def shutdown(self, wait: bool = True) -> None:
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


def contract_problems_and_inputs(metadata: dict[str, Any], name: str, preference: str) -> set[str]:
    """Check a model's metadata against the reward contract; return the inputs the client will send."""
    inputs = {t["name"]: t["datatype"] for t in metadata.get("inputs", [])}
    outputs = {t["name"]: t["datatype"] for t in metadata.get("outputs", [])}
    problems = []
    if REWARDS not in outputs:
        problems.append(f"no output {REWARDS!r} (has: {', '.join(sorted(outputs)) or 'none'})")
    elif outputs[REWARDS] != "FP32":
        problems.append(f"output {REWARDS!r} is {outputs[REWARDS]}, expected FP32")
    has_text = inputs.get(SENTENCES) == "BYTES"
    has_tokens = inputs.get(TOKENS) == "INT64" and inputs.get(LENGTHS) == "INT64"
    if preference == "sentences" and not has_text:
        problems.append(f"input {SENTENCES!r} (BYTES) is missing but scorer.input is 'sentences'")
    elif preference == "tokens" and not has_tokens:
        problems.append(f"inputs {TOKENS!r} and {LENGTHS!r} (INT64) are missing but scorer.input is 'tokens'")
    elif not (has_text or has_tokens):
        found = ", ".join(f"{k} ({v})" for k, v in sorted(inputs.items())) or "none"
        problems.append(f"needs input {SENTENCES!r} (BYTES) or {TOKENS!r} + {LENGTHS!r} (INT64); has: {found}")
    if problems:
        raise ScorerError(
            f"scorer.model_name: model {name!r} does not follow the reward contract: {'; '.join(problems)}"
        )
    chosen = {SENTENCES} if has_text and preference != "tokens" else {TOKENS, LENGTHS}
    chosen |= {n for n in (PROMPTS, RESPONSES, EXTRA) if inputs.get(n) == "BYTES"}
    return chosen


def _client_module(protocol: str) -> Any:
    if protocol == "grpc":
        import tritonclient.grpc as module
    else:
        import tritonclient.http as module
    return module


def _is_transient(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError, OSError)):
        return True
    status = str(getattr(err, "status", lambda: "")() or "")
    text = f"{status} {err}"
    return any(code in text for code in TRANSIENT) or "Connection refused" in text or "timed out" in text.lower()


def _short(err: BaseException) -> str:
    """One line from a client or server error: the server's own exception line when there is one."""
    text = str(err)
    for line in reversed(text.splitlines()):
        # "TritonModelException: pkg.RequestError: message": the innermost exception is the server's own
        found = list(re.finditer(r"(?<![\w.])([A-Za-z_][\w.]*(?:Error|Exception)): ", line))
        if not found:
            continue
        kind, message = found[-1].group(1), line[found[-1].end() :]
        if "TritonModelException" not in kind and "InferenceServerException" not in kind:
            return f"server raised {kind.rsplit('.', 1)[-1]}: {message.strip()}"
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first[:300]
