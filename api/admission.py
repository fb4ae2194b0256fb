"""Admission: the key's token bucket and the GPU backlog, decided by one atomic script
that also enqueues the job (`shared/lua/admit.lua`)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass

from api.identity import Identity
from api.state import Gate
from shared import keys
from shared.errors import (
    Conflict,
    GatewayError,
    QueueFull,
    RateLimited,
    RedisUnavailable,
    Unavailable,
)
from shared.estimates import Backlog
from shared.jobs import new_job_id, record_ttl_ms

BREAKER_RETRY_AFTER_S = 5
"""Workers probe Ollama every second while the breaker is open; it closes on an answer."""


@dataclass(frozen=True)
class RateLimit:
    limit: int
    remaining: int
    reset_epoch_s: int

    def headers(self) -> dict[str, str]:
        return {
            "X-RateLimit-Limit": str(self.limit),
            "X-RateLimit-Remaining": str(self.remaining),
            "X-RateLimit-Reset": str(self.reset_epoch_s),
        }


@dataclass(frozen=True)
class Admitted:
    owner: str
    job_id: str
    replayed: bool
    """An Idempotency-Key named a job admitted before: this is that job."""
    queue_position: int | None
    backlog: Backlog
    rate_limit: RateLimit

    @property
    def estimated_start_s(self) -> float | None:
        if self.queue_position is None:
            return None
        return round(self.backlog.start_in_s(self.queue_position), 3)


@dataclass(frozen=True)
class JobRequest:
    endpoint: str
    body: str
    """The request body as JSON text, relayed to Ollama as it is."""
    stream: bool
    sync: bool
    deadline_s: float | None = None
    idempotency_key: str | None = None


def body_digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _with_limits(error: GatewayError, rate_limit: RateLimit) -> GatewayError:
    error.headers.update(rate_limit.headers())
    return error


async def admit(gate: Gate, who: Identity, request: JobRequest) -> Admitted:
    """Admit `request` for `who` and enqueue it, or raise the SPEC's 429/409/503."""
    settings, tier = gate.settings, who.tier
    idem = digest = ""
    if request.idempotency_key:  # the request is compared only when a key may replay it
        idem = keys.idempotency(who.owner, body_digest(request.idempotency_key))
        canonical = json.dumps([request.endpoint, json.loads(request.body)], sort_keys=True)
        digest = body_digest(canonical)
    reply = await gate.request_script(
        "admit",
        [
            who.owner,
            tier.rate.per_second / 1000,
            tier.burst,
            settings.max_queue_depth,
            tier.max_queued,
            tier.priority_boost_ms,
            new_job_id(),
            request.endpoint,
            request.body,
            int(request.stream),
            int(request.sync),
            int((request.deadline_s or 0) * 1000),
            who.name,
            idem,
            digest,
            settings.result_ttl * 1000,
            int(settings.lease_ttl * 3000),
            settings.gpu_concurrency,
            record_ttl_ms(settings.result_ttl),
        ],
    )
    if reply is None:
        raise refuse_during_outage(gate, who)
    outcome, job_id = reply[0].decode(), reply[1].decode()
    tokens = float(reply[2])
    rate_limit = RateLimit(
        limit=tier.burst,
        remaining=max(0, math.floor(tokens)),
        reset_epoch_s=math.ceil(time.time() + int(reply[3]) / 1000),
    )
    next_token_s = int(reply[4]) / 1000
    backlog = Backlog(
        depth=int(reply[5]),
        running=int(reply[6]),
        cap=int(reply[7]),
        mean_job_ms=float(reply[8]) if reply[8] else None,
    )
    rank = int(reply[9])
    gate.metrics.admission(outcome)
    if outcome in ("admitted", "existing"):
        return Admitted(
            who.owner,
            job_id,
            outcome == "existing",
            rank if rank >= 0 else None,
            backlog,
            rate_limit,
        )
    error: GatewayError
    if outcome == "rate_limited":
        error = RateLimited(next_token_s)
    elif outcome == "queue_full":
        error = QueueFull(backlog.room_in_s(settings.max_queue_depth), backlog.depth)
    elif outcome == "queue_full_key":
        error = QueueFull(backlog.start_in_s(max(rank, 0)), backlog.depth, scope="key")
    elif outcome == "conflict":
        error = Conflict("This Idempotency-Key was used with a different request body.")
    elif outcome == "backend_down":
        error = Unavailable(
            "Ollama is not answering (circuit breaker open); try again shortly.",
            retry_after_s=BREAKER_RETRY_AFTER_S,
        )
    else:  # no_worker
        error = Unavailable("No gpugate worker is alive to run the job.", retry_after_s=5)
    raise _with_limits(error, rate_limit)


def refuse_during_outage(gate: Gate, who: Identity) -> GatewayError:
    """Nothing can be queued without Redis: `503`, or `429` from this process's own
    bucket for a key that is over its rate (api/fallback.py)."""
    tier = who.tier
    decision = gate.local_buckets.take(who.owner, tier.rate.per_second, tier.burst)
    rate_limit = RateLimit(
        limit=tier.burst,
        remaining=decision.remaining,
        reset_epoch_s=math.ceil(time.time() + decision.full_in_s),
    )
    error: GatewayError = (
        RateLimited(decision.next_token_s) if not decision.allowed else RedisUnavailable()
    )
    return _with_limits(error, rate_limit)
