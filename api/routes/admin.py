"""Operators: status, usage and the live GPU caps. Off unless GPUGATE_ADMIN_KEY is set."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from api.bodies import parse
from api.dependencies import AdminGate
from api.identity import client_ip
from api.metrics import REJECTIONS
from api.routes.inference import body_schema
from api.snapshot import read_snapshot
from shared.fleet import backend_named, set_cap

router = APIRouter(prefix="/admin", tags=["admin"])


class ConcurrencyBody(BaseModel):
    gpu_concurrency: Annotated[int, Field(ge=1, le=1024)]
    backend: str | None = None
    """Required when there is more than one backend."""


@router.get("/status")
async def status(gate: AdminGate) -> dict[str, Any]:
    snap = await read_snapshot(gate.redis, gate.settings)
    return {
        "gpu_concurrency": snap.backlog.cap,
        "gpu_concurrency_configured": sum(b.gpu_concurrency for b in gate.settings.backends),
        "queue_depth": snap.backlog.depth,
        "max_queue_depth": gate.settings.max_queue_depth,
        "running": snap.backlog.running,
        "estimated_wait_seconds": round(snap.backlog.queue_wait_s(), 3),
        "backends": [b.public() for b in snap.queue.backends],
        "running_jobs": snap.running_jobs,
        "workers": snap.workers,
        "mean_job_seconds": round(snap.backlog.mean_job_s, 3),
        "rejections": {reason: snap.stats.get(f"rejected_{reason}", 0) for reason in REJECTIONS},
        "ollama_breaker": "closed" if any(b.healthy for b in snap.queue.backends) else "open",
        "jobs": {
            k.removeprefix("jobs_"): v for k, v in snap.stats.items() if k.startswith("jobs_")
        },
    }


@router.get("/usage")
async def usage(gate: AdminGate) -> dict[str, Any]:
    snap = await read_snapshot(gate.redis, gate.settings)
    keys_usage = {
        name: {
            "requests": int(u["requests"]),
            "input_tokens": int(u["input_tokens"]),
            "output_tokens": int(u["output_tokens"]),
            "gpu_seconds": round(u["gpu_ms"] / 1000, 3),
        }
        for name, u in snap.usage.items()
    }
    return {"keys": keys_usage}


@router.put("/concurrency", openapi_extra=body_schema(ConcurrencyBody))
async def set_concurrency(gate: AdminGate, request: Request) -> dict[str, Any]:
    # JSON whatever the Content-Type (curl -d sends a form type): parsed here, not by FastAPI
    body: ConcurrencyBody = parse(ConcurrencyBody, await request.body())
    backend = backend_named(gate.settings, body.backend)
    await set_cap(gate.redis, backend, body.gpu_concurrency)
    changes = {"backend": backend, "gpu_concurrency": body.gpu_concurrency}
    await gate.key_store.audit("concurrency", None, client_ip(request, gate.trusted), changes)
    return {"gpu_concurrency": body.gpu_concurrency, "backend": backend}
