"""What a worker process keeps between jobs: its clients, the runs it holds, its signals.
This is the typed context every job function and loop of the worker receives."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis

from shared import keys
from shared.outage import Outage
from shared.redis.lane import Lane
from shared.redis.store import REDIS_ERRORS
from shared.scripts import Ask, Grant, HeldRun, Scripts, fleet_argv
from shared.settings import Backend, Settings
from worker.meter import Meter
from worker.tally import Tally

log = logging.getLogger("gpugate.worker")


def heartbeat_interval_s(settings: Settings) -> float:
    """Renew well before the lease lapses; reap promptly."""
    return min(1.0, settings.lease_ttl / 4)


def fence_ms(settings: Settings) -> int:
    """How long no slot is granted after a failover: two heartbeats of every worker (they
    re-assert the runs they hold), and a margin for their clients to find the new master."""
    return int(2 * heartbeat_interval_s(settings) * 1000) + 1000


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
    """The runs this worker holds (granted, running, not yet recorded)."""
    quiet: set[str] = field(default_factory=set)
    """Ended runs whose finish saw nothing waiting: the loop need not ask the scheduler for
    their places (an admission wakes an idle worker through the wake list)."""
    room: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when a held run is let go: a full worker may have a free place again."""
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
    _cost: tuple[float, float] = field(default=(0.0, 1.0), init=False)
    """The fleet's mean job cost, and when it was read (monotonic s): `_mean_cost`."""
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
        """The run is over here (its place is free once arq's task for it has ended)."""
        self.held.pop(run_id, None)
        self.room.set()

    async def ask(self, want: int) -> Ask:
        """What this worker asks the scheduler for: up to `want` runs."""
        settings = self.settings
        return Ask(
            worker=self.worker_id,
            want=want,
            lease_ms=settings.lease_ms,
            affinity_wait_ms=int(settings.affinity_wait * 1000),
            session_ttl_ms=int(settings.session_ttl * 1000),
            session_wait_ms=int(settings.session_wait * 1000),
            provisional_cost=await self._mean_cost(),
            result_ttl_ms=settings.result_ttl * 1000,
            fence_ms=fence_ms(settings),
            backends=fleet_argv(settings.backends),
        )

    async def _mean_cost(self) -> float:
        """The fleet's mean job cost (fair-share units), re-read at most once a second."""
        at, cost = self._cost
        if time.monotonic() - at > 1.0:
            with contextlib.suppress(*REDIS_ERRORS):
                raw = await self.redis.hget(keys.MODEL_STATS, keys.MEAN_COST)  # type: ignore[misc]
                cost = float(raw) if raw else 1.0
            self._cost = (time.monotonic(), cost)
        return cost

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
