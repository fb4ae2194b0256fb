"""Operators manage API keys live (`/admin/keys`, `/admin/audit`); a caller reads its own
limits (`/v1/me`). The work is api/apikeys.py's."""

from __future__ import annotations

import math
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from starlette.responses import JSONResponse

from api.apikeys import KeyChanges, NewKey, Rotation
from api.bodies import parse
from api.dependencies import AdminGate, GateDep
from api.health_limit import check_cheap_limit
from api.identity import ANONYMOUS, client_ip, identify
from api.routes.inference import body_schema
from api.state import Gate
from shared import keys
from shared.budget import iso
from shared.redis.store import redis_errors

router = APIRouter(tags=["keys"])


def _by(gate: Gate, request: Request) -> str:
    """The admin client's address, for the audit trail."""
    return client_ip(request, gate.trusted)


@router.post("/admin/keys", status_code=201, openapi_extra=body_schema(NewKey))
async def create_key(gate: AdminGate, request: Request) -> JSONResponse:
    # JSON whatever the Content-Type (curl -d sends a form type): parsed here, not by FastAPI
    body: NewKey = parse(NewKey, await request.body())
    record = await gate.key_store.create(body, _by(gate, request))
    return JSONResponse(record, status_code=201)


@router.get("/admin/keys")
async def list_keys(gate: AdminGate) -> dict[str, Any]:
    return {"keys": await gate.key_store.listing()}


@router.get("/admin/keys/{name}")
async def show_key(name: str, gate: AdminGate) -> dict[str, Any]:
    return await gate.key_store.show(name)


@router.patch("/admin/keys/{name}", openapi_extra=body_schema(KeyChanges))
async def update_key(name: str, gate: AdminGate, request: Request) -> dict[str, Any]:
    changes: KeyChanges = parse(KeyChanges, await request.body())
    return await gate.key_store.update(name, changes, _by(gate, request))


@router.post("/admin/keys/{name}/rotate", openapi_extra=body_schema(Rotation))
async def rotate_key(name: str, gate: AdminGate, request: Request) -> dict[str, Any]:
    raw = await request.body()
    rotation: Rotation = parse(Rotation, raw) if raw.strip() else Rotation()
    return await gate.key_store.rotate(name, rotation, _by(gate, request))


@router.delete("/admin/keys/{name}")
async def delete_key(name: str, gate: AdminGate, request: Request) -> dict[str, Any]:
    return await gate.key_store.delete(name, _by(gate, request))


@router.get("/admin/audit")
async def audit(
    gate: AdminGate, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> dict[str, Any]:
    return {"events": await gate.key_store.events(limit)}


@router.get("/v1/me")
async def me(request: Request, gate: GateDep) -> dict[str, Any]:
    """The calling key's limits and budget (no inference token; the /health limit)."""
    await check_cheap_limit(gate, request)
    who = identify(request, gate.keyring, gate.trusted, gate.settings.require_api_key)
    tier, now = who.tier, time.time()
    window = who.budget.window(now) if who.budget else None
    with redis_errors():
        pipe = gate.redis.pipeline(transaction=False)
        pipe.get(keys.bucket(who.owner))
        if window is not None:
            pipe.get(keys.budget(who.owner, window[0]))
        replies = await pipe.execute()
    per_ms = tier.rate.per_second / 1000
    tokens = float(tier.burst)
    if replies[0] is not None:  # "<tokens> <ms>" (lua/lib/buckets.lua)
        level, ts = replies[0].split()
        tokens = min(tier.burst, float(level) + max(0.0, now * 1000 - float(ts)) * per_ms)
    budget = None
    if who.budget is not None and window is not None:
        used = max(0, math.ceil(float(replies[1] or 0)))
        budget = {
            **who.budget.public(),
            "used": used,
            "remaining": max(0, who.budget.tokens - used),
            "resets_at": iso(window[1]),
        }
    return {
        "name": who.name if who.named else ANONYMOUS,
        "tier": tier.name,
        "models": list(who.models) if who.models is not None else None,
        "max_running": who.max_running,
        "budget": budget,
        "rate_limit": {
            "limit": tier.burst,
            "remaining": max(0, math.floor(tokens)),
            "reset": math.ceil(now + (tier.burst - tokens) / per_ms / 1000),
        },
    }
