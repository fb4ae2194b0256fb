"""What the API process opens at start-up and hands to every request (typed)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

import httpx
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from api.apikeys import KeyStore
from api.fallback import OUTAGE_NOTE, LocalBuckets
from api.identity import Network
from api.inbox import Inbox
from api.metrics import Metrics
from api.tiers import Keyring
from shared.errors import RedisUnavailable
from shared.outage import Outage
from shared.redis.lane import Lane
from shared.scripts import Scripts, fleet_argv
from shared.settings import Settings

MAX_WAITERS = 256
"""`?wait=` reads that may wait at once in one API process; each holds a Redis connection."""

T = TypeVar("T")


@dataclass(frozen=True)
class Gate:
    settings: Settings
    redis: Redis
    """Commands with a short timeout: a request never hangs on a dead Redis."""
    blocking_redis: Redis
    """XREAD BLOCK waits for job events; no read timeout."""
    scripts: Scripts
    """The scripts on `redis` (cancel)."""
    lane: Lane
    """The pipelined connection of the per-request scripts (admission, /health bucket)."""
    lane_scripts: Scripts
    inbox: Inbox
    """Where the ends of this process's waiting synchronous calls arrive (api/inbox.py)."""
    http: httpx.AsyncClient
    """Metadata and model-management calls straight to Ollama."""
    keyring: Keyring
    key_store: KeyStore
    """The keys of /admin/keys in Redis; it keeps `keyring` up to date (api/apikeys.py)."""
    trusted: list[Network]
    metrics: Metrics
    waiters: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_WAITERS))
    """`?wait=` reads waiting at once (api/jobs.py)."""
    local_buckets: LocalBuckets = field(default_factory=LocalBuckets)
    """The rate limit while Redis is unreachable (api/fallback.py)."""
    redis_outage: Outage = field(
        default_factory=lambda: Outage(logging.getLogger("gpugate.api"), "Redis")
    )

    fleet: tuple[str | int, ...] = ()
    """The backends as the scripts take them (name, configured cap, ...): built once."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fleet", fleet_argv(self.settings.backends))

    async def on_lane(self, call: Callable[[Scripts], Awaitable[T]]) -> T | None:
        """Run a script of the request path on the lane; None while Redis is unavailable.
        An outage is logged once, and while it lasts one caller a second tries Redis again
        (shared/outage.py); the others are answered at once."""
        if not self.redis_outage.should_try():
            return None
        try:
            reply = await call(self.lane_scripts)
        except RedisUnavailable as exc:
            self.redis_outage.failed(exc, OUTAGE_NOTE)
            return None
        self.redis_outage.recovered()
        return reply


def gate(conn: HTTPConnection) -> Gate:
    value: Gate = conn.app.state.gate
    return value
