"""What the API process opens at start-up and hands to every request (typed)."""

from __future__ import annotations

from dataclasses import dataclass

import httpx
from redis.asyncio import Redis
from starlette.requests import HTTPConnection

from api.identity import Network
from api.metrics import Metrics
from api.tiers import Keyring
from shared.scripts import Scripts
from shared.settings import Settings


@dataclass(frozen=True)
class Gate:
    settings: Settings
    redis: Redis
    """Commands with a short timeout: a request never hangs on a dead Redis."""
    blocking_redis: Redis
    """XREAD BLOCK waits for job events; no read timeout."""
    scripts: Scripts
    http: httpx.AsyncClient
    """Metadata calls straight to Ollama."""
    keyring: Keyring
    trusted: list[Network]
    metrics: Metrics


def gate(conn: HTTPConnection) -> Gate:
    value: Gate = conn.app.state.gate
    return value
