"""Operators see a key's webhook deliveries that are not delivered (`/admin/webhooks`);
the work is api/webhooks.py's."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query

from api.dependencies import AdminGate
from api.webhooks import deliveries

router = APIRouter(tags=["webhooks"])


@router.get("/admin/webhooks")
async def list_webhooks(
    gate: AdminGate, key: Annotated[str, Query(min_length=1, max_length=64)]
) -> dict[str, Any]:
    """The pending and failed deliveries of key `key`, newest first."""
    return {"webhooks": await deliveries(gate.redis, gate.keyring, key)}
