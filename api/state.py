"""What the API process opens at start-up and hands to every request (typed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from api.fallback import OUTAGE_NOTE, LocalBuckets
from api.identity import Network
from api.metrics import Metrics
from api.tiers import Keyring
from shared import scripts
from shared.lane import Lane
from shared.outage import Outage
from shared.scripts import Scripts
from shared.settings import Settings
from shared.store import DRIVER_ERRORS

MAX_WAITERS = 256
"""`?wait=` reads that may wait at once in one API process; each holds a Redis connection."""


@dataclass(frozen=True)
class Gate:
    settings: Settings
    redis: Redis
    """Commands with a short timeout: a request never hangs on a dead Redis."""
    blocking_redis: Redis
    """XREAD BLOCK waits for job events; no read timeout."""
    scripts: Scripts
    lane: Lane
    """The pipelined connection of the per-request scripts (admission, /health bucket)."""
    http: httpx.AsyncClient
    """Metadata calls straight to Ollama."""
    keyring: Keyring
    trusted: list[Network]
    metrics: Metrics
    waiters: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_WAITERS))
    """`?wait=` reads waiting at once (api/jobs.py)."""
    local_buckets: LocalBuckets = field(default_factory=LocalBuckets)
    """The rate limit while Redis is unreachable (api/fallback.py)."""
    redis_outage: Outage = field(
        default_factory=lambda: Outage(logging.getLogger("gpugate.api"), "Redis")
    )

    async def request_script(self, name: str, args: Sequence[Any]) -> Any | None:
        """Run a script of the request path (`admit`, `bucket`) on the lane; None while Redis
        is unavailable. An outage is logged once, and while it lasts one caller a second
        tries Redis again (shared/outage.py); the others are answered at once."""
        if not self.redis_outage.should_try():
            return None
        try:
            reply = await self.lane.script(scripts.source(name), args)
        except DRIVER_ERRORS as exc:
            self.redis_outage.failed(exc, OUTAGE_NOTE)
            return None
        self.redis_outage.recovered()
        return reply


def gate(conn: HTTPConnection) -> Gate:
    value: Gate = conn.app.state.gate
    return value
