"""Liveness, readiness, the queue, metrics."""

from __future__ import annotations

import hmac
from typing import Any

import httpx
from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from api.metrics import CONTENT_TYPE
from api.queue import read_backlog, read_snapshot
from api.ratelimit import check_cheap_limit
from api.state import gate
from shared.errors import InvalidApiKey, RedisUnavailable
from shared.store import redis_errors

router = APIRouter(tags=["service"])


@router.get("/health")
async def health(request: Request) -> dict[str, str]:
    await check_cheap_limit(gate(request), request)
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 only when Redis answers, a worker is alive and Ollama answers."""
    g = gate(request)
    checks: dict[str, str] = {}
    missing: list[str] = []
    try:
        workers = len((await read_snapshot(g)).workers)
        checks["redis"] = "ok"
        checks["workers"] = f"{workers} alive"
        if workers == 0:
            missing.append("no live worker")
    except RedisUnavailable:
        checks["redis"] = checks["workers"] = "unreachable"
        missing.append("redis unreachable")
    try:
        (await g.http.get(g.settings.ollama_url + "/api/version", timeout=2.0)).raise_for_status()
        checks["ollama"] = "ok"
    except httpx.HTTPError as exc:
        checks["ollama"] = f"unreachable ({exc.__class__.__name__})"
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
async def queue(request: Request) -> dict[str, Any]:
    g = gate(request)
    backlog = await read_backlog(g)
    return {
        "queue_depth": backlog.depth,
        "running": backlog.running,
        "gpu_concurrency": backlog.cap,
        "max_queue_depth": g.settings.max_queue_depth,
        "estimated_wait_seconds": round(backlog.queue_wait_s(), 3),
    }


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    g = gate(request)
    token = g.settings.metrics_token
    if token is not None:
        scheme, _, presented = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            presented.strip().encode(), token.get_secret_value().encode()
        ):
            raise InvalidApiKey("/metrics needs Authorization: Bearer <GPUGATE_METRICS_TOKEN>.")
    with redis_errors():
        snapshot = await read_snapshot(g)
    return Response(g.metrics.render(snapshot), media_type=CONTENT_TYPE)
