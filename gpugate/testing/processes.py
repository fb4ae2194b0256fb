"""Child processes on free loopback ports, started and stopped by PID.

Waits poll a condition with a deadline and fail with a message naming what was expected;
nothing sleeps for a fixed time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, TypeVar, Unpack

import httpx

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]
"""The checkout: the working directory of every child (`python -m bench...` needs it)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    condition: Callable[[], T], *, timeout: float = 10.0, interval: float = 0.01, what: str
) -> T:
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
    log_path: Path | None
    """Its stdout and stderr; None: they are ours (the terminal of `gpugate up`)."""
    url: str = ""
    port: int = 0
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

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


class Spawn(TypedDict, total=False):
    """How a child starts (`spawn` and every `start_*`)."""

    cwd: Path
    """Its working directory (default: the checkout, ROOT)."""
    log: bool
    """True (default): its stdout and stderr go to a log file of its own (`Process.log()`);
    False: to ours."""
    new_session: bool
    """True (default): signals to our process group (Ctrl-C) do not reach it, only
    `stop()` does."""


def spawn(
    name: str, argv: Sequence[str], env: dict[str, str] | None = None, **options: Unpack[Spawn]
) -> Process:
    """Start `argv` with our environment plus `env` (see `Spawn` for the options)."""
    log = options.get("log", True)
    log_path = Path(tempfile.mkdtemp(prefix=f"gpugate-{name}-")) / "output.log" if log else None
    with contextlib.ExitStack() as files:
        out = files.enter_context(log_path.open("wb")) if log_path else None
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT if out else None,
            env={**os.environ, **(env or {})},
            cwd=options.get("cwd", ROOT),
            start_new_session=options.get("new_session", True),
        )
    return Process(name=name, popen=popen, log_path=log_path)


def answers_http(url: str, status: int | None = None) -> bool:
    """Whether `url` answers: with `status`, or else with anything below 500."""
    try:
        got = httpx.get(url, timeout=1.0).status_code
    except httpx.TransportError:
        return False
    return got == status if status is not None else got < 500


def wait_http(
    proc: Process,
    path: str,
    *,
    timeout: float = 20.0,
    interval: float = 0.01,
    status: int | None = None,
) -> None:
    """Wait until `proc` answers `path` (see `answers_http`); fail at once if it exits."""

    def ready() -> bool:
        if not proc.alive():
            raise AssertionError(f"{proc.name} exited early:\n{proc.log()[-3000:]}")
        return answers_http(proc.url + path, status)

    wait_until(ready, timeout=timeout, interval=interval, what=f"{proc.name} to answer {path}")


def start_http(
    name: str,
    argv: Sequence[str],
    port: int,
    ready_path: str,
    env: dict[str, str] | None = None,
    *,
    host: str = "127.0.0.1",
    timeout: float = 20.0,
    interval: float = 0.01,
    status: int | None = None,
    **options: Unpack[Spawn],
) -> Process:
    """An HTTP server on `port`: started, and ready once it answers `ready_path`
    (see `answers_http`); stopped again if it is not."""
    proc = spawn(name, argv, env, **options)
    proc.port, proc.url = port, f"http://{host}:{port}"
    try:
        wait_http(proc, ready_path, timeout=timeout, interval=interval, status=status)
    except BaseException:
        proc.stop()
        raise
    return proc


def stop_all(procs: Iterable[Process], timeout: float = 10.0) -> None:
    """SIGTERM to every one still running, the last started first; then each gets
    `timeout` seconds to end before SIGKILL."""
    procs = list(procs)[::-1]
    for proc in procs:
        if proc.alive():
            with contextlib.suppress(OSError):
                proc.popen.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
