"""Operating the fleet: the live cap of each backend (the admin API and `gpugate
concurrency` both go through here)."""

from __future__ import annotations

from redis.asyncio import Redis

from shared import keys
from shared.errors import InvalidRequest
from shared.redis.store import redis_errors
from shared.settings import Settings


def backend_named(settings: Settings, name: str | None) -> str:
    """The backend a cap change is for: named, or the only one."""
    backends = settings.backends
    if name is None:
        if len(backends) == 1:
            return backends[0].name
        names = ", ".join(b.name for b in backends)
        raise InvalidRequest(f"backend: name the backend ({names})")
    if settings.backend(name) is None:
        raise InvalidRequest(f"backend: no backend named {name!r}")
    return name


async def set_cap(redis: Redis, backend: str, cap: int) -> None:
    """Every worker sees the new cap at its next grant; idle workers are woken now."""
    with redis_errors():
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.FLEET, keys.cap_field(backend), str(cap))
            pipe.lpush(keys.WAKE, *([1] * min(cap, keys.WAKE_MAX)))
            pipe.ltrim(keys.WAKE, 0, keys.WAKE_MAX - 1)
            await pipe.execute()
