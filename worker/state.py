"""What a worker process keeps between jobs: its clients, the runs it holds, its signals."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.asyncio import Redis

from shared.outage import Outage
from shared.scripts import Scripts
from shared.settings import Settings

log = logging.getLogger("gpugate.worker")


class Signal:
    """A broadcast: every coroutine waiting at the time of `fire()` wakes up.

    Take `current()` *before* checking the condition, then wait on it, so that a fire
    between the check and the wait is not missed.
    """

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def current(self) -> asyncio.Event:
        return self._event

    def fire(self) -> None:
        self._event.set()
        self._event = asyncio.Event()


@dataclass
class Held:
    """A run this worker holds: waiting for a GPU slot, then running on Ollama."""

    run_id: str
    job_id: str
    call: asyncio.Task[Any] | None = None
    """The Ollama call while it runs; cancelling it closes the request."""
    cancelled: bool = False
    """The job was cancelled (by its owner, a disconnect or a deadline)."""
    lost: bool = False
    """Our lease lapsed and the job moved on: stop without recording anything."""


@dataclass
class WorkerState:
    settings: Settings
    redis: Redis
    pubsub_redis: Redis
    scripts: Scripts
    http: httpx.AsyncClient
    worker_id: str = field(
        default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
    )
    held: dict[str, Held] = field(default_factory=dict)
    slots_changed: Signal = field(default_factory=Signal)
    """Fired when a slot may have freed, the cap changed, or a held job was cancelled."""
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when arq should look at its queue now (a job was enqueued, or one of ours ended)."""
    draining: bool = False
    """SIGTERM: hand back runs not yet started, let running ones finish."""
    redis_outage: Outage = field(default_factory=lambda: Outage(log, "Redis"))
    """Shared by the worker's loops, so an outage is logged once per worker."""

    @property
    def lease_ms(self) -> int:
        return int(self.settings.lease_ttl * 1000)

    def hold(self, run_id: str, job_id: str) -> Held:
        held = Held(run_id, job_id)
        self.held[run_id] = held
        return held

    def release(self, run_id: str) -> None:
        self.held.pop(run_id, None)
        self.wake.set()

    def cancel_job(self, job_id: str) -> None:
        for held in self.held.values():
            if held.job_id == job_id:
                held.cancelled = True
                if held.call is not None:
                    held.call.cancel()
        self.slots_changed.fire()

    def lose(self, run_id: str) -> None:
        held = self.held.get(run_id)
        if held is not None:
            held.lost = True
            if held.call is not None:
                held.call.cancel()
        self.slots_changed.fire()
