"""Real servers for the tests: a private redis-server, the simulator, the API, workers.

Everything here starts a real process on a free loopback port and stops it by PID.
Waits poll a condition with a deadline and fail with a message naming what was
expected; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], object], *, timeout: float = 10.0, interval: float = 0.01, what: str
) -> object:
    """Poll `condition` until it returns something truthy; fail naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        time.sleep(interval)
    raise AssertionError(
        f"timed out after {timeout}s waiting for {what} (last error: {last_error!r})"
    )


@dataclass
class Process:
    """A child process we started; `stop()` ends it by PID (SIGTERM, then SIGKILL)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        if not self.alive():
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def _spawn(name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Process:
    log_dir = Path(tempfile.mkdtemp(prefix=f"gpugate-{name}-"))
    log_path = log_dir / "output.log"
    with log_path.open("wb") as log:
        popen = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=ROOT,
            start_new_session=True,
        )
    return Process(name=name, popen=popen, log_path=log_path)


def _wait_http(proc: Process, path: str, timeout: float = 20.0) -> None:
    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited early:\n{proc.log()}")
        try:
            return httpx.get(proc.url + path, timeout=1.0).status_code < 500
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=timeout, what=f"{proc.name} to answer {path}")


def start_redis(port: int | None = None, *, data_dir: str | None = None) -> Process:
    """A private redis-server on a free port; persisting nothing unless given `data_dir`,
    then with an append-only file synced on every write (restart it on the same port and
    `data_dir` and it has everything back)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
    port = port or free_port()
    persist = data_dir is not None
    data_dir = data_dir or tempfile.mkdtemp(prefix="gpugate-redis-data-")
    argv = [
        binary,
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "yes" if persist else "no",
        "--appendfsync",
        "always",
        "--dir",
        data_dir,
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        "--databases",
        "256",  # one database per test stack (tests/conftest.py)
    ]
    proc = _spawn("redis", argv)
    proc.port = port
    proc.url = f"redis://127.0.0.1:{port}/0"

    def answers() -> bool:
        if not proc.alive():
            raise AssertionError(f"redis-server exited early:\n{proc.log()}")
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    wait_until(answers, timeout=10, what=f"redis-server on port {port}")
    return proc


def start_sim(*args: str, port: int | None = None) -> Process:
    """The Ollama simulator (`gpugate sim`), e.g. start_sim("--token-delay", "0.2")."""
    port = port or free_port()
    argv = [sys.executable, "-m", "gpugate.sim", "--host", "127.0.0.1", "--port", str(port), *args]
    proc = _spawn("sim", argv)
    proc.port = port
    proc.url = f"http://127.0.0.1:{port}"
    _wait_http(proc, "/api/version")
    return proc


def start_api(env: dict[str, str], port: int | None = None) -> Process:
    port = port or free_port()
    argv = [sys.executable, "-m", "gpugate", "api", "--port", str(port)]
    proc = _spawn("api", argv, env)
    proc.port = port
    proc.url = f"http://127.0.0.1:{port}"
    _wait_http(proc, "/health")
    return proc


def start_worker(env: dict[str, str]) -> Process:
    return _spawn("worker", [sys.executable, "-m", "gpugate", "worker"], env)
