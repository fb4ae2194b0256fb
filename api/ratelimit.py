"""The cheap per-client limit of /health and the metadata endpoints."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from api.fallback import OUTAGE_NOTE
from api.identity import client_id
from api.state import Gate
from shared import keys, scripts
from shared.errors import RateLimited, RedisUnavailable
from shared.store import redis_errors


async def check_cheap_limit(gate: Gate, conn: HTTPConnection) -> None:
    """Spend one token of the client's /health bucket, or raise 429.

    Liveness must not depend on Redis: while it is down, the bucket is this process's own.
    """
    rate = gate.settings.health_rate
    name, burst = "health:" + client_id(conn, gate.trusted), max(1, int(rate.amount))
    if gate.redis_outage.should_try():
        try:
            with redis_errors():
                allowed, _left, _full_ms, next_ms = await gate.lane.script(
                    scripts.source("bucket"), [keys.bucket(name), rate.per_second / 1000, burst]
                )
        except RedisUnavailable as exc:
            gate.redis_outage.failed(exc.__cause__ or exc, OUTAGE_NOTE)
        else:
            gate.redis_outage.recovered()
            if not allowed:
                raise RateLimited(int(next_ms) / 1000)
            return
    decision = gate.local_buckets.take(name, rate.per_second, burst)
    if not decision.allowed:
        raise RateLimited(decision.next_token_s)
