"""Fixtures: a private redis-server, the simulator, and gpugate stacks (API + workers),
all real processes on free loopback ports, stopped by PID."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Callable, Iterator

import pytest

from gpugate.testing.processes import Process
from gpugate.testing.stack import (
    Stack,
    flush,
    sim_configure,
    sim_stats,
    start_redis,
    start_sim,
    start_stack,
)

__all__ = ["Stack", "StackFactory", "build_stack", "flush", "sim_configure", "sim_stats"]


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
    return start_stack(
        ollama_url or sim_proc.url,
        redis_url,
        workers=workers,
        **{"lease_ttl": 2, "log_level": "warning", **settings},
    )


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


@pytest.fixture
def key() -> str:
    """A fresh API key: a bucket of its own."""
    return "test-" + uuid.uuid4().hex
