"""Admission at the ASGI edge: an inference request is admitted or refused before FastAPI
routes it.

Admission is what every inference request costs, and a refusal is all that many of them
get under load, so it takes the fewest steps: pydantic-core validates the body straight
from its bytes, the key is identified, and `admit.lua` runs on the pipelined lane
(`shared/lane.py`). A refusal (401, 409, 429, 503) is answered right here. An admitted
request goes on to its route, which takes the decision with `admission(request)`.

A body the edge cannot use goes on to FastAPI untouched, and FastAPI's validation answers
the SPEC's 400/422 naming the field: error messages come from one place.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from pydantic import ValidationError
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from api.admission import Admitted, JobRequest, admit
from api.bodies import BODIES, JobBody, streams
from api.errors import error_response
from api.identity import identify
from api.limits import BODY
from api.metrics import EDGE_ROUTE
from api.state import Gate
from shared.errors import GatewayError, InvalidRequest
from shared.settings import Settings

ADMITTED = "gpugate.admitted"
"""Scope key of the edge's decision for an admitted request."""
MAX_IDEMPOTENCY_KEY = 256

Plan = Callable[[bytes, HTTPConnection, Settings], JobRequest | None]
"""What to queue for a request body, or None when the body is not valid for it."""


def _sync_plan(endpoint: str) -> Plan:
    model = BODIES[endpoint]

    def plan(raw: bytes, conn: HTTPConnection, settings: Settings) -> JobRequest | None:
        try:
            body = model.model_validate_json(raw)
        except ValidationError:
            return None
        return JobRequest(
            endpoint=endpoint,
            body=raw.decode(),  # relayed to Ollama as sent
            stream=streams(endpoint, body.stream),
            sync=True,
            deadline_s=settings.sync_timeout,
        )

    return plan


def _job_plan(raw: bytes, conn: HTTPConnection, settings: Settings) -> JobRequest | None:
    idempotency_key = conn.headers.get("idempotency-key")
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        return None
    try:
        job = JobBody.model_validate_json(raw)
        BODIES[job.endpoint].model_validate(job.body)
    except ValidationError:
        return None
    return JobRequest(
        endpoint=job.endpoint,
        body=json.dumps({**job.body, "stream": False}),  # jobs always run unstreamed
        stream=False,
        sync=False,
        deadline_s=job.deadline_s,
        idempotency_key=idempotency_key,
    )


PLANS: dict[str, Plan] = {endpoint: _sync_plan(endpoint) for endpoint in BODIES}
PLANS["/v1/jobs"] = _job_plan


class AdmissionEdge:
    """ASGI middleware; it runs inside `BodyLimit`, which has read the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        plan = PLANS.get(_route_path(scope)) if scope["type"] == "http" else None
        if plan is None or scope["method"] != "POST" or BODY not in scope:
            await self.app(scope, receive, send)
            return
        gate: Gate = scope["app"].state.gate
        conn = HTTPConnection(scope)
        request = plan(scope[BODY], conn, gate.settings)
        if request is None:  # FastAPI's validation will say what is wrong
            await self.app(scope, receive, send)
            return
        try:
            who = identify(conn, gate.keyring, gate.trusted, gate.settings.require_api_key)
            scope[ADMITTED] = await admit(gate, who, request)
        except GatewayError as error:
            scope[EDGE_ROUTE] = _route_path(scope)  # for the request metrics
            await error_response(error)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _route_path(scope: Scope) -> str:
    """The path the routes see: without the `root_path` a server may have put in front."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def admission(conn: HTTPConnection) -> Admitted:
    """The edge's decision for an admitted request."""
    admitted: Admitted | None = conn.scope.get(ADMITTED)
    if admitted is None:
        # FastAPI accepted a body that pydantic's JSON parser did not: only JSON that
        # Python's parser tolerates beyond the standard can get here.
        raise InvalidRequest("The body is not valid JSON.", status=400)
    return admitted
