"""What the API process opens at start-up and hands to every request (typed)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import httpx
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from api.fallback import LocalBuckets
from api.identity import Network
from api.metrics import Metrics
from api.tiers import Keyring
from shared.lane import Lane
from shared.outage import Outage
from shared.scripts import Scripts
from shared.settings import Settings

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


def gate(conn: HTTPConnection) -> Gate:
    value: Gate = conn.app.state.gate
    return value
