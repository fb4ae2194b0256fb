"""Fixtures: a private redis-server, the simulator, and gpugate stacks (API + workers),
all real processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import redis

from tests.processes import Process, start_api, start_redis, start_sim, start_worker, wait_until


@pytest.fixture(scope="session")
def redis_proc() -> Iterator[Process]:
    proc = start_redis()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def sim_proc() -> Iterator[Process]:
    """A fast simulator: 5 tokens, no delay, many parallel slots."""
    proc = start_sim("--tokens", "5", "--token-delay", "0", "--parallel", "64")
    yield proc
    proc.stop()


def slow_sim_fixture(token_delay_s: float) -> Callable[[], Iterator[Process]]:
    """A module's `slow_sim` fixture: a simulator of its own, 5 tokens at `token_delay_s`
    each, so that tests can act while a job holds its slot (`slow_sim = slow_sim_fixture(0.2)`)."""

    @pytest.fixture
    def slow_sim() -> Iterator[Process]:
        proc = start_sim("--tokens", "5", "--token-delay", str(token_delay_s), "--parallel", "64")
        yield proc
        proc.stop()

    return slow_sim


def sim_stats(sim: Process) -> dict[str, object]:
    return dict(httpx.get(sim.url + "/sim/stats", timeout=5).json())


def sim_configure(sim: Process, **config: object) -> None:
    httpx.put(sim.url + "/sim/config", json=config, timeout=5).raise_for_status()
    httpx.post(sim.url + "/sim/reset", timeout=5).raise_for_status()


@dataclass
class Stack:
    """One gpugate deployment under test: an API and some workers on one Redis."""

    redis_url: str
    ollama_url: str
    env: dict[str, str]
    api: Process | None = None
    workers: list[Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        assert self.api is not None
        return self.api.url

    def redis(self) -> redis.Redis:
        """A client on this stack's own database (close it after use)."""
        return redis.Redis.from_url(self.redis_url)

    def add_worker(self) -> Process:
        proc = start_worker(self.env)
        self.workers.append(proc)
        return proc

    def client(self, key: str | None = None, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def wait_for_workers(self, n: int | None = None) -> None:
        want = len(self.workers) if n is None else n

        def enough() -> bool:
            checks = httpx.get(self.url + "/ready", timeout=5).json().get("checks", {})
            alive = str(checks.get("workers", "0")).split()[0]
            return alive.isdigit() and int(alive) >= want

        wait_until(enough, timeout=20, what=f"at least {want} live workers on /ready")

    def stop(self) -> None:
        for proc in [*self.workers, *([self.api] if self.api else [])]:
            proc.stop()


StackFactory = Callable[..., Stack]


def build_stack(
    redis_proc: Process,
    sim_proc: Process,
    *,
    workers: int = 1,
    ollama_url: str | None = None,
    **settings: object,
) -> Stack:
    """Start an API and `workers` workers with GPUGATE_* overrides, on a Redis database of
    their own (flushed), so that stacks alive at the same time never share state."""
    redis_url = f"redis://127.0.0.1:{redis_proc.port}/{next(_databases)}"
    flush(redis_url)
    env = {
        "GPUGATE_REDIS_URL": redis_url,
        "GPUGATE_OLLAMA_URL": ollama_url or sim_proc.url,
        "GPUGATE_LEASE_TTL": "2",
        "GPUGATE_LOG_LEVEL": "warning",
    }
    env.update({f"GPUGATE_{k.upper()}": str(v) for k, v in settings.items()})
    stack = Stack(redis_url, env["GPUGATE_OLLAMA_URL"], env)
    try:
        for _ in range(workers):
            stack.add_worker()
        stack.api = start_api(env)
        if workers:
            stack.wait_for_workers()
    except BaseException:
        stack.stop()
        raise
    return stack


@pytest.fixture
def make_stack(redis_proc: Process, sim_proc: Process) -> Iterator[StackFactory]:
    """Start a stack with GPUGATE_* overrides, on a flushed Redis; stopped after the test."""
    stacks: list[Stack] = []

    def make(**kwargs: object) -> Stack:
        stack = build_stack(redis_proc, sim_proc, **kwargs)  # type: ignore[arg-type]
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.stop()


@pytest.fixture(scope="module")
def stack(redis_proc: Process, sim_proc: Process) -> Iterator[Stack]:
    """A default stack shared by a module's tests (each test uses a fresh key)."""
    stack = build_stack(redis_proc, sim_proc)
    yield stack
    stack.stop()


_databases = itertools.cycle(range(1, 256))


def flush(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def key() -> str:
    """A fresh API key: a bucket of its own."""
    return "test-" + uuid.uuid4().hex
