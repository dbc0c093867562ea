"""Real Triton servers for tests: `thresher serve-rm` (or a helper script) in its own process group,
on free loopback ports, always stopped — and checked gone — afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    http_port: int
    grpc_port: int

    @property
    def grpc_url(self) -> str:
        return f"grpc://127.0.0.1:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def kill(self) -> None:
        """SIGKILL the whole process group (the server, tritonserver and the model stub)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        wait_until_gone(self.grpc_port)

    def stop(self) -> int:
        """SIGTERM, as a user's Ctrl-C or a process manager would; returns the exit code. Nothing the
        server started may outlive it: not tritonserver, not the model's Python stub."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        wait_until_gone(self.grpc_port)
        left = stub_pids(self.process.pid)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert not left, f"the model stub(s) {left} of the server outlived it"
        return self.process.returncode


def tritonserver_pids(grpc_port: int) -> list[int]:
    found = subprocess.run(["pgrep", "-f", f"tritonserver.*--grpc-port {grpc_port}"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def stub_pids(server_pid: int) -> list[int]:
    """Triton Python stubs serving a model for the PyTriton process ``server_pid`` (their command line
    carries its shared-memory prefix, ``pytrtion<pid>-``)."""
    found = subprocess.run(
        ["pgrep", "-f", f"triton_python_backend_stub .* pytrtion{server_pid}-"], capture_output=True, text=True
    )
    return [int(pid) for pid in found.stdout.split()]


def wait_until_gone(grpc_port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while tritonserver_pids(grpc_port):
        if time.time() > deadline:
            for pid in tritonserver_pids(grpc_port):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"tritonserver on gRPC port {grpc_port} outlived its server")
        time.sleep(0.1)


def start(
    args: list[str],
    *,
    ports: tuple[int, int] | None = None,
    env: dict | None = None,
    script: Path | None = None,
    timeout: float = 120,
) -> Server:
    http_port, grpc_port = ports or (free_port(), free_port())
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "thresher", "serve-rm"]
    command += [*args, "--http-port", str(http_port), "--grpc-port", str(grpc_port)]
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, **(env or {})},
    )
    server = Server(process, http_port, grpc_port)
    deadline = time.time() + timeout
    line = ""
    while time.time() < deadline:
        line = process.stdout.readline()
        if line.startswith("ready"):
            return server
        if not line and process.poll() is not None:
            break
    server.kill()
    raise AssertionError(f"server did not start: {line!r} {process.stderr.read()[-2000:]}")


@contextlib.contextmanager
def serving(args: list[str], **kwargs) -> Iterator[Server]:
    server = start(args, **kwargs)
    try:
        yield server
    finally:
        server.stop()


class SilentServer:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: what a hung
    Triton server (or any wrong process on the port) looks like to a client."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = threading.Event()  # set once a client has connected
        self.connections: list[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # the listener was closed
                return
            self.connections.append(connection)  # held open, never read, never answered
            self.accepted.set()

    def close(self) -> None:
        self.listener.close()
        for connection in self.connections:
            connection.close()


@contextlib.contextmanager
def silent_server() -> Iterator[SilentServer]:
    server = SilentServer()
    try:
        yield server
    finally:
        server.close()


@contextlib.contextmanager
def held_ports(count: int, *, listen: bool = True) -> Iterator[list[int]]:
    """``count`` loopback ports bound by plain sockets (listening unless ``listen`` is false), as
    another server would hold them."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            if listen:
                sock.listen()
            sockets.append(sock)
        yield [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def interrupt_and_time(process: subprocess.Popen, timeout: float = 120) -> tuple[float, str]:
    """SIGINT ``process``; the seconds until it exited and its stderr."""
    signalled = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=timeout)
    return time.monotonic() - signalled, stderr
