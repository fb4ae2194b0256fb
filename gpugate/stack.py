"""`gpugate up` (what `make run` runs): the whole stack in the foreground.

Redis: the one at GPUGATE_REDIS_URL if it answers, else a private redis-server on a free
port. Ollama: the one at GPUGATE_OLLAMA_URL if it answers, else the bundled simulator.
Then one worker and the API. Ctrl-C stops everything this command started.
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
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from shared.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _http_answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code < 500
    except httpx.HTTPError:
        return False


def _wait(
    what: str, ready: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 30
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"gpugate up: {what} exited with status {proc.returncode}")
        if ready():
            return
        time.sleep(0.05)
    raise SystemExit(f"gpugate up: {what} did not become ready within {timeout:g}s")


@dataclass
class Stack:
    children: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)

    def start(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(argv, env=env)
        self.children.append((name, proc))
        return proc

    def stop(self) -> None:
        for _name, proc in reversed(self.children):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for _name, proc in reversed(self.children):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_stack(settings: Settings) -> None:
    stack = Stack()
    env = dict(os.environ)
    me = [sys.executable, "-m", "gpugate"]
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        redis_url = settings.redis_url
        if _redis_answers(redis_url):
            print(f"gpugate up: using Redis at {settings.masked()['GPUGATE_REDIS_URL']}")
        else:
            binary = shutil.which("redis-server")
            if binary is None:
                raise SystemExit("gpugate up: no Redis answers and redis-server is not installed")
            port = _free_port()
            redis_url = f"redis://127.0.0.1:{port}/0"
            data_dir = tempfile.mkdtemp(prefix="gpugate-redis-")
            proc = stack.start(
                "redis",
                [
                    binary,
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--dir",
                    data_dir,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ],
                env,
            )
            _wait("redis-server", lambda: _redis_answers(redis_url), proc)
            print(f"gpugate up: started a private redis-server on port {port}")
        env["GPUGATE_REDIS_URL"] = redis_url

        ollama_url = settings.ollama_url
        if _http_answers(ollama_url + "/api/version"):
            print(f"gpugate up: using Ollama at {ollama_url}")
        else:
            port = _free_port()
            ollama_url = f"http://127.0.0.1:{port}"
            proc = stack.start("sim", [*me, "sim", "--port", str(port)], env)
            _wait("the Ollama simulator", lambda: _http_answers(ollama_url + "/api/version"), proc)
            print(f"gpugate up: no Ollama answered; started the simulator at {ollama_url}")
        env["GPUGATE_OLLAMA_URL"] = ollama_url

        stack.start("worker", [*me, "worker"], env)
        api_url = f"http://{settings.host}:{settings.port}"
        proc = stack.start("api", [*me, "api"], env)
        _wait("the API", lambda: _http_answers(api_url + "/health"), proc)
        print(_banner(api_url, ollama_url))
        while all(p.poll() is None for _, p in stack.children):
            time.sleep(0.5)
        dead = [name for name, p in stack.children if p.poll() is not None]
        print(f"gpugate up: {', '.join(dead)} exited; stopping the rest", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ngpugate up: stopping")
    finally:
        stack.stop()


def _banner(api_url: str, ollama_url: str) -> str:
    return f"""
gpugate is up.
  API                 {api_url}   (OpenAI: {api_url}/v1, Ollama: {api_url})
  queue               {api_url}/v1/queue
  metrics             {api_url}/metrics
  console             {api_url}/admin/ui   (with GPUGATE_ADMIN_KEY set)
  Ollama              {ollama_url}

Try:
  curl -s {api_url}/v1/chat/completions -H 'Authorization: Bearer my-key' \\
       -d '{{"model": "llama3.2", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Ctrl-C stops everything started here.
"""
