"""The cheap per-client limit of /health and the metadata endpoints."""

from __future__ import annotations

from starlette.requests import HTTPConnection

from api.identity import client_id
from api.state import Gate
from shared.errors import RateLimited


async def check_cheap_limit(gate: Gate, conn: HTTPConnection) -> None:
    """Spend one token of the client's /health bucket, or raise 429.

    Liveness must not depend on Redis: while it is down, the bucket is this process's own.
    """
    rate = gate.settings.health_rate
    name, burst = "health:" + client_id(conn, gate.trusted), max(1, int(rate.amount))
    reply = await gate.on_lane(
        lambda scripts: scripts.take_token(
            name=name, rate_per_ms=rate.per_second / 1000, burst=burst
        )
    )
    if reply is None:
        decision = gate.local_buckets.take(name, rate.per_second, burst)
        allowed, next_token_s = decision.allowed, decision.next_token_s
    else:
        allowed, next_token_s = reply.allowed, reply.next_token_ms / 1000
    if not allowed:
        raise RateLimited(next_token_s)
