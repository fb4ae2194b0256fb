"""A gpugate stack of real processes: redis-server, the Ollama simulator, the API, workers.

`start_stack(ollama_url, **settings)` starts workers and API processes with GPUGATE_*
settings (keyword arguments, upper-cased: `gpu_concurrency=2` is
`GPUGATE_GPU_CONCURRENCY=2`) on a Redis URL, or on a private redis-server of its own, and
returns once every API sees its workers alive. The single processes start on their own too.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Unpack

import httpx
import redis

from gpugate.testing.processes import (
    Process,
    Spawn,
    free_port,
    spawn,
    start_http,
    wait_until,
)

NO_RATE_LIMIT: dict[str, object] = {"rate_limit": "1000000/second", "burst": 1000000}
"""Settings that keep the request buckets out of a benchmark's way."""


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """GPUGATE_* variables for settings given by name (`lease_ttl=2`)."""
    return {f"GPUGATE_{name.upper()}": str(value) for name, value in settings.items()}


def redis_server_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: run `make test`, which installs it")
    return binary


def start_redis(
    port: int | None = None,
    *,
    data_dir: str | None = None,
    under: Sequence[str] = (),
    **options: Unpack[Spawn],
) -> Process:
    """A private redis-server on a free port; persisting nothing unless given `data_dir`,
    then with an append-only file synced on every write (restart it on the same port and
    `data_dir` and it has everything back). `under`: a command it runs under (valgrind's)."""
    binary = redis_server_binary()
    port = port or free_port()
    persist = data_dir is not None
    data_dir = data_dir or tempfile.mkdtemp(prefix="gpugate-redis-data-")
    argv = [
        *under,
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
    proc = spawn("redis", argv, **options)
    proc.port = port
    proc.url = f"redis://127.0.0.1:{port}/0"
    wait_redis(proc)
    return proc


def wait_redis(proc: Process, password: str | None = None, what: str = "redis-server") -> None:
    """Until `proc`, a redis-server or a Sentinel, answers PING; stopped again if it
    does not."""

    def answers() -> bool:
        if not proc.alive():
            raise AssertionError(f"{what} on port {proc.port} exited early:\n{proc.log()}")
        with redis.Redis("127.0.0.1", proc.port, password=password, socket_timeout=0.5) as client:
            return bool(client.ping())

    try:
        wait_until(answers, timeout=30, what=f"{what} on port {proc.port}")
    except BaseException:
        proc.stop()
        raise


def start_sim(*args: str, port: int | None = None, **options: Unpack[Spawn]) -> Process:
    """The Ollama simulator (`gpugate sim`), e.g. start_sim("--token-delay", "0.2")."""
    port = port or free_port()
    argv = [sys.executable, "-m", "gpugate.sim", "--host", "127.0.0.1", "--port", str(port), *args]
    return start_http("sim", argv, port, "/api/version", **options)


def start_api(
    env: dict[str, str],
    port: int | None = None,
    *,
    host: str = "127.0.0.1",
    **options: Unpack[Spawn],
) -> Process:
    """`gpugate api` with `env`, ready once it answers /health."""
    port = port or free_port()
    argv = [sys.executable, "-m", "gpugate", "api", "--host", host, "--port", str(port)]
    return start_http("api", argv, port, "/health", env, host=host, **options)


def start_worker(env: dict[str, str], **options: Unpack[Spawn]) -> Process:
    """`gpugate worker` with `env`; `Stack.wait_for_workers` waits until the API sees it."""
    argv = [sys.executable, "-m", "gpugate", "worker"]
    return spawn("worker", argv, env, **options)


def start_uvicorn(app: str, env: dict[str, str] | None = None) -> Process:
    """`app` (module:attribute) under uvicorn with the flags `gpugate api` passes to it,
    ready once it serves /openapi.json."""
    port = free_port()
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-proxy-headers", "--no-access-log", "--log-level", "warning"]
    argv += ["--timeout-graceful-shutdown", "5"]
    return start_http(app, argv, port, "/openapi.json", env, status=200)


def sim_stats(sim: Process) -> dict[str, Any]:
    """The simulator's counters (`GET /sim/stats`)."""
    r = httpx.get(sim.url + "/sim/stats", timeout=5)
    r.raise_for_status()
    return dict(r.json())


def sim_configure(sim: Process, *, reset: bool = True, **config: object) -> None:
    """Change the simulator's behaviour (`PUT /sim/config`), then, unless `reset=False`,
    zero its counters (`POST /sim/reset`)."""
    httpx.put(sim.url + "/sim/config", json=config, timeout=5).raise_for_status()
    if reset:
        httpx.post(sim.url + "/sim/reset", timeout=5).raise_for_status()


def queue(url: str) -> dict[str, Any]:
    """The gateway's `GET /v1/queue`."""
    r = httpx.get(url + "/v1/queue", timeout=5)
    r.raise_for_status()
    return dict(r.json())


def flush(redis_url: str) -> None:
    """Empty the database of `redis_url`."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


class Stack:
    """One gpugate deployment: API processes and workers on one Redis, started with `env`
    (and the redis-server they use, when the stack started its own)."""

    def __init__(
        self,
        redis_url: str,
        ollama_url: str,
        env: dict[str, str],
        *,
        redis_server: Process | None = None,
        tree: Path | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.ollama_url = ollama_url
        self.env = env
        self.redis_server = redis_server
        self.tree = tree
        """Where its processes run from: another revision's files, or None for these."""
        self.apis: list[Process] = []
        self.workers: list[Process] = []

    @property
    def api(self) -> Process | None:
        """The first API process."""
        return self.apis[0] if self.apis else None

    @api.setter
    def api(self, proc: Process | None) -> None:
        self.apis[:1] = [] if proc is None else [proc]

    @property
    def url(self) -> str:
        assert self.apis, "the stack has no API process"
        return self.apis[0].url

    @property
    def processes(self) -> list[Process]:
        """Every process of the stack in the order they start: its own redis-server,
        workers, APIs (`stop_all` stops them the other way round)."""
        own = [self.redis_server] if self.redis_server else []
        return [*own, *self.workers, *self.apis]

    def redis(self) -> redis.Redis:
        """A client on this stack's own database (close it after use)."""
        return redis.Redis.from_url(self.redis_url)

    def add_worker(self) -> Process:
        proc = start_worker(self.env, **self._where())
        self.workers.append(proc)
        return proc

    def add_api(self) -> Process:
        proc = start_api(self.env, **self._where())
        self.apis.append(proc)
        return proc

    def _where(self) -> Spawn:
        return {"cwd": self.tree} if self.tree is not None else {}

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def wait_for_workers(self, n: int | None = None, timeout: float = 20) -> None:
        """Until every API process counts at least `n` (default: the stack's) live workers
        on /ready."""
        want = len(self.workers) if n is None else n
        for api in self.apis:

            def enough(url: str = api.url) -> bool:
                checks = httpx.get(url + "/ready", timeout=5).json().get("checks", {})
                alive = str(checks.get("workers", "0")).split()[0]
                return alive.isdigit() and int(alive) >= want

            wait_until(enough, timeout=timeout, what=f"at least {want} live workers on /ready")

    def stop(self) -> None:
        """Workers first, then the APIs, then the stack's own redis-server: one by one."""
        own = [self.redis_server] if self.redis_server else []
        for proc in [*self.workers, *self.apis, *own]:
            proc.stop()


def start_stack(
    ollama_url: str | None,
    redis_url: str | None = None,
    *,
    workers: int = 1,
    apis: int = 1,
    ready_timeout: float = 20,
    tree: Path | None = None,
    **settings: object,
) -> Stack:
    """Start `workers` workers and `apis` API processes with GPUGATE_* `settings` (log
    level warning unless given) on `redis_url`, or on a private redis-server started for
    the stack; return once every API sees the workers alive. `ollama_url` None: none set
    (GPUGATE_BACKENDS names them). `tree`: run them from another revision's files
    (revision.py `tree_at`)."""
    redis_server = None
    if redis_url is None:
        redis_server = start_redis()
        redis_url = redis_server.url
    env = {"GPUGATE_REDIS_URL": redis_url}
    if ollama_url is not None:
        env["GPUGATE_OLLAMA_URL"] = ollama_url
    env.update(settings_env({"log_level": "warning", **settings}))
    stack = Stack(redis_url, ollama_url or "", env, redis_server=redis_server, tree=tree)
    try:
        for _ in range(workers):
            stack.add_worker()
        for _ in range(apis):
            stack.add_api()
        if workers:
            stack.wait_for_workers(timeout=ready_timeout)
    except BaseException:
        stack.stop()
        raise
    return stack
