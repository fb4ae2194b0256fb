"""What routes declare they need: the gate, the caller, the edge's admission decision, the
admin check. Each is a FastAPI dependency, visible in the route's signature."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from api.admission import Admitted
from api.edge import admitted_from
from api.identity import Identity, identify
from api.state import Gate, gate
from shared.errors import Forbidden, InvalidRequest, NotFound


async def current_gate(request: Request) -> Gate:
    return gate(request)


GateDep = Annotated[Gate, Depends(current_gate)]
"""Dependencies here are `async def`: FastAPI runs a plain `def` dependency in its thread
pool, two thread hand-offs per request for a dictionary lookup."""


async def current_identity(request: Request) -> Identity:
    """The caller (api/identity.py): its key, else its IP; 401 where a key is required."""
    g = gate(request)
    return identify(request, g.keyring, g.trusted, g.settings.require_api_key)


CurrentIdentity = Annotated[Identity, Depends(current_identity)]


async def admitted_job(request: Request) -> Admitted:
    """The edge's decision for an admitted inference request (api/edge.py)."""
    admitted = admitted_from(request)
    if not isinstance(admitted, Admitted):  # only a body the edge never saw gets here
        raise InvalidRequest("body: Field required")
    return admitted


AdmittedJob = Annotated[Admitted, Depends(admitted_job)]


def presents_admin_key(g: Gate, request: Request) -> bool:
    """The request carries GPUGATE_ADMIN_KEY in `X-Admin-Key` (compared in constant time):
    the one place the admin key is checked."""
    admin_key = g.settings.admin_key
    presented = request.headers.get("x-admin-key")
    if admin_key is None or presented is None:
        return False
    return hmac.compare_digest(presented.encode(), admin_key.get_secret_value().encode())


async def require_admin(request: Request) -> Gate:
    """The admin API: 404 while GPUGATE_ADMIN_KEY is unset, 403 without the right key."""
    g = gate(request)
    if g.settings.admin_key is None:
        raise NotFound("Not Found")
    if not presents_admin_key(g, request):
        raise Forbidden("This endpoint needs a valid X-Admin-Key.")
    return g


AdminGate = Annotated[Gate, Depends(require_admin)]
