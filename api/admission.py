"""Admission: the key's request and token buckets and the GPU backlog, decided by one
atomic script that also enqueues the job (`shared/lua/admit.lua`).

What it answers, success or not, carries the key's limits as headers: `X-RateLimit-*`
(and `-Tokens` with a tpm tier) and the IETF draft-10 `RateLimit-Policy` / `RateLimit`
structured fields, one item per policy in force.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass

from api.identity import Identity
from api.jobs import cancel_job
from api.state import Gate
from shared import keys
from shared.budget import KEEP_AFTER_S
from shared.errors import (
    BudgetExhausted,
    Conflict,
    GatewayError,
    QueueFull,
    RateLimited,
    RedisUnavailable,
    Unavailable,
)
from shared.estimates import Backlog
from shared.jobs import ErrorCode, JobStatus, job_object, record_ttl_ms
from shared.redis.store import REDIS_ERRORS
from shared.scripts import AdmitOutcome, AdmitReply

BREAKER_RETRY_AFTER_S = 5
"""Workers probe a backend every second while its breaker is open; it closes on an answer."""


@dataclass(frozen=True)
class Limit:
    """One policy's state: a bucket of `capacity` refilled in `window_s` from empty."""

    name: str
    capacity: int
    window_s: float
    remaining: float
    full_in_s: float


@dataclass(frozen=True)
class RateLimit:
    requests: Limit
    tokens: Limit | None = None

    def headers(self) -> dict[str, str]:
        requests = self.requests
        out = {
            "X-RateLimit-Limit": str(requests.capacity),
            "X-RateLimit-Remaining": str(_whole(requests.remaining)),
            "X-RateLimit-Reset": str(math.ceil(time.time() + requests.full_in_s)),
        }
        limits = [requests]
        if self.tokens is not None:
            out["X-RateLimit-Limit-Tokens"] = str(self.tokens.capacity)
            out["X-RateLimit-Remaining-Tokens"] = str(_whole(self.tokens.remaining))
            limits.append(self.tokens)
        out["RateLimit-Policy"] = ", ".join(
            f'"{lim.name}";q={lim.capacity};w={math.ceil(lim.window_s)}' for lim in limits
        )
        out["RateLimit"] = ", ".join(
            f'"{lim.name}";r={_whole(lim.remaining)};t={math.ceil(lim.full_in_s)}' for lim in limits
        )
        return out


def _whole(value: float) -> int:
    return max(0, math.floor(value))


@dataclass(frozen=True)
class JobRequest:
    endpoint: str
    model: str
    body: str
    """The request body as JSON text, relayed to Ollama as it is."""
    stream: bool
    sync: bool
    max_tokens: int = 0
    """What the request names as its most output tokens (0: it names none)."""
    deadline_s: float | None = None
    idempotency_key: str | None = None
    traceparent: str = ""
    """The trace the job's spans join, when the API traces (api/tracing.py)."""
    session: str = ""
    """Its session's digest (api/sessions.py); dispatch keeps a session on its backend."""


@dataclass(frozen=True)
class Admitted:
    """An admitted request: its job is queued (or, replayed, the job admitted before)."""

    owner: str
    job_id: str
    endpoint: str
    status: JobStatus
    created_at_ms: int
    queue_position: int | None
    backlog: Backlog
    rate_limit: RateLimit

    def job(self) -> dict[str, object]:
        """The job object of the 202, without reading the job back."""
        estimate = None
        if self.queue_position is not None:
            estimate = round(self.backlog.start_in_s(self.queue_position), 3)
        return job_object(
            self.job_id,
            self.status,
            self.endpoint,
            self.created_at_ms,
            queue_position=self.queue_position,
            estimated_start_s=estimate,
        )


def body_digest(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def _with_limits(error: GatewayError, rate_limit: RateLimit) -> GatewayError:
    error.headers.update(rate_limit.headers())
    return error


async def admit(
    gate: Gate, who: Identity, request: JobRequest, job_id: str, *, inbox: str = ""
) -> Admitted:
    """Admit `request` for `who` and enqueue it as `job_id`, or raise the SPEC's 429/409/503.
    `inbox`: the API process's inbox that waits for the job's end (api/inbox.py)."""
    settings, tier = gate.settings, who.tier
    idem = digest = ""
    if request.idempotency_key:  # the request is compared only when a key may replay it
        idem = keys.idempotency(who.owner, body_digest(request.idempotency_key))
        canonical = json.dumps([request.endpoint, json.loads(request.body)], sort_keys=True)
        digest = body_digest(canonical)
    tpm = tier.tpm
    budget, window = who.budget, (0, 0)
    if budget is not None:
        window = budget.window(time.time())
    reply = await gate.on_lane(
        lambda scripts: scripts.admit(
            owner=who.owner,
            owner_name=who.name,
            usage_name=who.usage_name,
            rate_per_ms=tier.rate.per_second / 1000,
            burst=tier.burst,
            tpm_per_ms=tpm.per_second / 1000 if tpm else 0,
            tpm_burst=int(tpm.amount) if tpm else 0,
            reserve_tokens=request.max_tokens if tpm else 0,
            max_depth=settings.max_queue_depth,
            max_queued=tier.max_queued,
            priority=tier.priority,
            boost_ms=tier.priority_boost_ms,
            weight=tier.weight,
            job_id=job_id,
            endpoint=request.endpoint,
            model=request.model,
            body=request.body,
            stream=request.stream,
            sync=request.sync,
            deadline_ms=int((request.deadline_s or 0) * 1000),
            idempotency_key=idem,
            digest=digest,
            result_ttl_ms=settings.result_ttl * 1000,
            record_ttl_ms=record_ttl_ms(settings.result_ttl),
            worker_stale_ms=settings.worker_stale_ms,
            backends=gate.fleet,
            hold_ms=settings.redis_wait_ms + HOLD_MARGIN_MS if settings.redis_min_replicas else 0,
            inbox=inbox,
            traceparent=request.traceparent,
            session=request.session,
            key_record=who.record,
            hook="" if request.sync else who.hook,
            max_running=tier.max_running or 0,
            budget_tokens=budget.tokens if budget else 0,
            budget_period=window[0],
            budget_reserve=request.max_tokens,
            budget_ttl_ms=int((window[1] - time.time() + KEEP_AFTER_S) * 1000),
        )
    )
    if reply is None:
        raise refuse_during_outage(gate, who)
    rate_limit = _rate_limit(who, reply)
    backlog = Backlog(
        depth=reply.depth,
        running=reply.running,
        cap=reply.serving_cap or reply.cap,
        mean_job_ms=reply.mean_job_ms,
    )
    gate.metrics.admission(reply.outcome)
    if reply.outcome in (AdmitOutcome.ADMITTED, AdmitOutcome.EXISTING):
        await _replicated(gate, who, reply.job_id, rate_limit)
        return Admitted(
            owner=who.owner,
            job_id=reply.job_id,
            endpoint=request.endpoint,
            status=JobStatus(reply.status),
            created_at_ms=reply.created_at_ms,
            queue_position=reply.rank if reply.rank >= 0 else None,
            backlog=backlog,
            rate_limit=rate_limit,
        )
    refusal = _refusal(reply, backlog, settings.max_queue_depth, window[1])
    raise _with_limits(refusal, rate_limit)


REPLICAS_RETRY_AFTER_S = 2
HOLD_MARGIN_MS = 5_000
"""A job held at admission that nobody released (its API died) is cancelled this long
after its replicas' deadline."""


async def _replicated(gate: Gate, who: Identity, job_id: str, rate_limit: RateLimit) -> None:
    """With GPUGATE_REDIS_MIN_REPLICAS, an admission is answered only once that many
    replicas have it (Redis WAIT): a failover then cannot lose a job a client was told
    of. If they do not acknowledge in time, the job is cancelled and the caller told 503."""
    settings = gate.settings
    if settings.redis_min_replicas <= 0:
        return
    try:
        acked = await gate.lane.wait_replicas(settings.redis_min_replicas, settings.redis_wait_ms)
    except REDIS_ERRORS:
        acked = -1  # the master went away: nobody can tell whether the job survived
    if acked >= settings.redis_min_replicas:
        with contextlib.suppress(GatewayError):
            if await gate.scripts.release(job_id=job_id):
                return
    # not on the replicas, or the release failed: the job must not run
    with contextlib.suppress(GatewayError):
        await cancel_job(
            gate,
            who.owner,
            job_id,
            code=ErrorCode.NOT_REPLICATED,
            message="Redis replicas did not acknowledge the admission in time.",
        )
    error = Unavailable(
        f"Redis replicas did not acknowledge the admission within "
        f"{settings.redis_wait_ms} ms (GPUGATE_REDIS_MIN_REPLICAS="
        f"{settings.redis_min_replicas}); nothing was queued.",
        retry_after_s=REPLICAS_RETRY_AFTER_S,
    )
    raise _with_limits(error, rate_limit)


def _rate_limit(who: Identity, reply: AdmitReply) -> RateLimit:
    tier = who.tier
    requests = Limit(
        "requests",
        tier.burst,
        tier.burst / tier.rate.per_second,
        reply.tokens,
        reply.full_in_ms / 1000,
    )
    tokens = None
    if tier.tpm is not None and reply.budget is not None:
        tokens = Limit(
            "tokens",
            int(tier.tpm.amount),
            tier.tpm.period_s,
            reply.budget,
            reply.budget_full_in_ms / 1000,
        )
    return RateLimit(requests, tokens)


def _refusal(
    reply: AdmitReply, backlog: Backlog, max_depth: int, budget_reset_s: int = 0
) -> GatewayError:
    outcome = reply.outcome
    if outcome is AdmitOutcome.RATE_LIMITED:
        return RateLimited(reply.next_token_ms / 1000)
    if outcome is AdmitOutcome.TOKEN_LIMITED:
        return RateLimited(reply.budget_ready_in_ms / 1000, limit="tokens")
    if outcome is AdmitOutcome.QUEUE_FULL:
        return QueueFull(backlog.room_in_s(max_depth), backlog.depth)
    if outcome is AdmitOutcome.QUEUE_FULL_KEY:
        return QueueFull(backlog.start_in_s(max(reply.rank, 0)), backlog.depth, scope="key")
    if outcome is AdmitOutcome.BUDGET_EXHAUSTED:
        # the reset of the period the script saw (its start is the window's)
        return BudgetExhausted(budget_reset_s, time.time())
    if outcome is AdmitOutcome.CONFLICT:
        return Conflict("This Idempotency-Key was used with a different request body.")
    if outcome is AdmitOutcome.BACKEND_DOWN:
        return Unavailable(
            "No Ollama backend is answering (circuit breakers open); try again shortly.",
            retry_after_s=BREAKER_RETRY_AFTER_S,
        )
    return Unavailable("No gpugate worker is alive to run the job.", retry_after_s=5)


def refuse_during_outage(gate: Gate, who: Identity) -> GatewayError:
    """Nothing can be queued without Redis: `503`, or `429` from this process's own
    bucket for a key that is over its rate (api/fallback.py)."""
    tier = who.tier
    decision = gate.local_buckets.take(who.owner, tier.rate.per_second, tier.burst)
    requests = Limit(
        "requests",
        tier.burst,
        tier.burst / tier.rate.per_second,
        decision.remaining,
        decision.full_in_s,
    )
    error: GatewayError = RateLimited(decision.next_token_s)
    if decision.allowed:
        down = gate.redis_outage.error
        error = RedisUnavailable(
            down.reason if isinstance(down, RedisUnavailable) else "unreachable"
        )
    return _with_limits(error, RateLimit(requests))
