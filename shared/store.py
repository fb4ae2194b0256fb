"""Redis connections, and the one place where driver errors become `RedisUnavailable`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from redis import exceptions as redis_exceptions
from redis.asyncio import Redis

from shared.errors import RedisUnavailable

SOCKET_TIMEOUT_S = 2.0
"""A request that needs Redis fails within this bound instead of hanging while it is down."""

DRIVER_ERRORS = (
    redis_exceptions.ConnectionError,
    redis_exceptions.TimeoutError,
    redis_exceptions.BusyLoadingError,
    OSError,
)


def connect(url: str, *, blocking: bool = False) -> Redis:
    """A client for `url`; `blocking` clients have no read timeout (XREAD BLOCK, pub/sub)."""
    client: Redis = Redis.from_url(
        url,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        socket_timeout=None if blocking else SOCKET_TIMEOUT_S,
        health_check_interval=0 if blocking else 30,
        retry_on_timeout=False,
    )
    return client


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn a Redis driver failure into `RedisUnavailable` (503 for a client)."""
    try:
        yield
    except DRIVER_ERRORS as exc:
        raise RedisUnavailable() from exc
