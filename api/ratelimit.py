"""The cheap per-client limit of /health and the metadata endpoints."""

from __future__ import annotations

import logging

from starlette.requests import HTTPConnection

from api.identity import client_id
from api.state import Gate
from shared import keys
from shared.errors import RateLimited, RedisUnavailable
from shared.store import redis_errors

log = logging.getLogger("gpugate.api")


async def check_cheap_limit(gate: Gate, conn: HTTPConnection) -> None:
    """Spend one token of the client's /health bucket, or raise 429.

    Liveness must not depend on Redis: when it is down, the limit is not enforced here.
    """
    rate = gate.settings.health_rate
    try:
        with redis_errors():
            allowed, _left, _full_ms, next_ms = await gate.scripts.bucket(
                args=[
                    keys.bucket("health:" + client_id(conn, gate.trusted)),
                    rate.per_second / 1000,
                    max(1, int(rate.amount)),
                ]
            )
    except RedisUnavailable:
        return
    if not allowed:
        raise RateLimited(int(next_ms) / 1000)
