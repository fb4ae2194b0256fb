"""Liveness, readiness, the queue, metrics."""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

import httpx
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from api.dependencies import GateDep
from api.health_limit import check_cheap_limit
from api.metrics import CONTENT_TYPE
from api.snapshot import read_queue, read_snapshot
from api.state import Gate
from shared import keys
from shared.errors import InvalidApiKey, RedisUnavailable
from shared.redis.store import redis_errors

router = APIRouter(tags=["service"])

READY_TIMEOUT_S = 2.0


@router.get("/health")
async def health(request: Request, gate: GateDep) -> dict[str, str]:
    await check_cheap_limit(gate, request)
    return {"status": "ok"}


async def _answers(gate: Gate, url: str) -> bool:
    try:
        response = await gate.http.get(url + "/api/version", timeout=READY_TIMEOUT_S)
    except httpx.HTTPError:
        return False
    return response.status_code < 500


READY_PROBE_MS = 5_000


async def _takes_writes(gate: Gate) -> None:
    """Redis answers reads while it refuses writes (out of memory, a replica): admission
    needs writes, so readiness writes a short-lived key."""
    with redis_errors():
        await gate.redis.set(keys.READY_PROBE, 1, px=READY_PROBE_MS)


@router.get("/ready")
async def ready(gate: GateDep) -> JSONResponse:
    """200 only when Redis answers, a worker is alive and at least one backend answers."""
    checks: dict[str, str] = {}
    missing: list[str] = []
    backends = gate.settings.backends
    answers = await asyncio.gather(*(_answers(gate, b.url) for b in backends))
    try:
        workers = len((await read_snapshot(gate.redis, gate.settings)).workers)
        checks["workers"] = f"{workers} alive"
        if workers == 0:
            missing.append("no live worker")
        await _takes_writes(gate)
        checks["redis"] = "ok"
    except RedisUnavailable as exc:
        checks["redis"] = exc.reason
        checks.setdefault("workers", "unknown")
        missing.append(f"redis {exc.reason}")
    up = sum(answers)
    checks["ollama"] = "ok" if up else "unreachable"
    if len(backends) > 1:
        checks["ollama"] = f"{up} of {len(backends)} backends answer"
    if not up:
        missing.append("ollama unreachable")
    if missing:
        body = {
            "error": "unavailable",
            "message": "Not ready: " + ", ".join(missing) + ".",
            "retry_after": 5,
            "checks": checks,
        }
        return JSONResponse(body, 503, headers={"Retry-After": "5"})
    return JSONResponse({"status": "ready", "checks": checks})


@router.get("/v1/queue")
async def queue(gate: GateDep) -> dict[str, Any]:
    q = await read_queue(gate.redis, gate.settings)
    return {
        "queue_depth": q.backlog.depth,
        "running": q.backlog.running,
        "gpu_concurrency": q.backlog.cap,
        "max_queue_depth": gate.settings.max_queue_depth,
        "estimated_wait_seconds": round(q.backlog.queue_wait_s(), 3),
        "batch_queued": q.batch_queued,
        "batch_running": q.batch_running,
        "backends": [b.public() for b in q.backends],
    }


@router.get("/metrics")
async def metrics(request: Request, gate: GateDep) -> Response:
    token = gate.settings.metrics_token
    if token is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), token.get_secret_value().encode()
        ):
            raise InvalidApiKey("/metrics needs Authorization: Bearer <GPUGATE_METRICS_TOKEN>.")
    snapshot = await read_snapshot(gate.redis, gate.settings)
    gate.metrics.budgets.used = await gate.key_store.budget_use()
    return Response(gate.metrics.render(snapshot), media_type=CONTENT_TYPE)
