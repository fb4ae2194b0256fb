"""What a worker process keeps between jobs: its clients, the runs it holds, its signals.
This is the typed context every job function and loop of the worker receives."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis

from shared.outage import Outage
from shared.redis.lane import Lane
from shared.scripts import Grant, HeldRun, Scripts
from shared.settings import Backend, Settings
from worker.meter import Meter
from worker.tally import Tally

log = logging.getLogger("gpugate.worker")


@dataclass
class Held:
    """A run this worker holds: granted a GPU slot on `backend`, running on Ollama."""

    grant: Grant
    call: asyncio.Task[Any] | None = None
    """The Ollama call while it runs; cancelling it closes the request."""
    cancelled: bool = False
    """The job was cancelled (by its owner, a disconnect or a deadline)."""
    lost: bool = False
    """Our lease lapsed and the job moved on: stop without recording anything."""
    started: float = field(default_factory=time.monotonic)

    @property
    def duration_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000

    def stop(self) -> None:
        if self.call is not None:
            self.call.cancel()


@dataclass
class WorkerContext:
    settings: Settings
    redis: Redis = field(init=False)
    """Commands with a short timeout (events, fleet facts). Opened in `on_startup`."""
    blocking_redis: Redis = field(init=False)
    """BLPOP on the wake list, pub/sub: no read timeout."""
    lane: Lane = field(init=False)
    """The pipelined connection of the scripts (shared/redis/lane.py): the runs that end in one
    turn of the event loop send their finish in one write."""
    scripts: Scripts = field(init=False)
    http: aiohttp.ClientSession = field(init=False)
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    )
    held: dict[str, Held] = field(default_factory=dict)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when the worker should ask for work now (a token on the wake list, a run of
    ours ended, a lease was reaped)."""
    draining: bool = False
    """SIGTERM: ask for no more work, let running runs finish."""
    redis_outage: Outage = field(default_factory=lambda: Outage(log, "Redis"))
    """Shared by the worker's loops, so an outage is logged once per worker."""
    meter: Meter = field(default_factory=Meter)
    """What this worker's runs did per backend, until its next flush (worker/meter.py)."""
    tally: Tally = field(default_factory=Tally)
    """The fleet's counters this worker's runs add to, until its next flush (worker/tally.py)."""
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    """The worker's background loops (worker/loops.py)."""

    def backend(self, name: str) -> Backend:
        backend = self.settings.backend(name)
        if backend is None:  # only a Redis written by another configuration says so
            raise LookupError(f"backend {name!r} is not configured on this worker")
        return backend

    def hold(self, grant: Grant) -> Held:
        held = Held(grant)
        self.held[grant.run_id] = held
        return held

    def release(self, run_id: str) -> None:
        self.held.pop(run_id, None)
        self.wake.set()

    def held_runs(self) -> list[HeldRun]:
        return [HeldRun(h.grant.run_id, h.grant.backend) for h in self.held.values()]

    def cancel_job(self, job_id: str) -> None:
        for held in self.held.values():
            if held.grant.job_id == job_id:
                held.cancelled = True
                held.stop()

    def lose(self, run_id: str) -> None:
        held = self.held.get(run_id)
        if held is not None:
            held.lost = True
            held.stop()
