"""Operators: status and the live GPU cap. Off unless GPUGATE_ADMIN_KEY is set."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.metrics import REJECTIONS
from api.queue import read_snapshot
from api.state import Gate, gate
from shared import keys
from shared.errors import Forbidden, NotFound
from shared.store import redis_errors

router = APIRouter(prefix="/admin", tags=["admin"])


class ConcurrencyBody(BaseModel):
    gpu_concurrency: Annotated[int, Field(ge=1, le=1024)]


def _admin(request: Request) -> Gate:
    g = gate(request)
    admin_key = g.settings.admin_key
    if admin_key is None:
        raise NotFound("Not Found")
    presented = request.headers.get("x-admin-key", "")
    if not hmac.compare_digest(presented.encode(), admin_key.get_secret_value().encode()):
        raise Forbidden("This endpoint needs a valid X-Admin-Key.")
    return g


@router.get("/status")
async def status(request: Request) -> dict[str, Any]:
    g = _admin(request)
    snap = await read_snapshot(g)
    return {
        "gpu_concurrency": snap.backlog.cap,
        "gpu_concurrency_configured": g.settings.gpu_concurrency,
        "queue_depth": snap.backlog.depth,
        "running": snap.backlog.running,
        "running_jobs": snap.running_jobs,
        "workers": snap.workers,
        "mean_job_seconds": round(snap.backlog.mean_job_s, 3),
        "rejections": {reason: snap.stats.get(f"rejected_{reason}", 0) for reason in REJECTIONS},
        "ollama_breaker": "open" if snap.breaker_open else "closed",
        "jobs": {
            k.removeprefix("jobs_"): v for k, v in snap.stats.items() if k.startswith("jobs_")
        },
    }


@router.put("/concurrency")
async def set_concurrency(request: Request, body: ConcurrencyBody) -> dict[str, int]:
    g = _admin(request)
    await set_cap(g, body.gpu_concurrency)
    return {"gpu_concurrency": body.gpu_concurrency}


async def set_cap(g: Gate, cap: int) -> None:
    """Every worker sees the new cap at its next slot decision; waiting runs are woken now."""
    with redis_errors():
        async with g.redis.pipeline(transaction=True) as pipe:
            pipe.set(keys.CAP, cap)
            pipe.publish(keys.SLOTS_CHANNEL, "cap")
            await pipe.execute()
