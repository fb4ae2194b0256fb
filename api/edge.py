"""Admission at the ASGI edge: an inference request (or `POST /v1/jobs`) is checked,
identified (a key refused now is 401, a model its `models` exclude is 403) and admitted
or refused before FastAPI routes it.

Admission is what every inference request costs, and a refusal is all that many of them
get under load, so it takes the fewest steps: the body is validated once, straight from
its bytes, by its endpoint's model (api/bodies.py), whatever its Content-Type; the key is
identified; `admit.lua` runs on the pipelined lane (shared/redis/lane.py). Every refusal of
gpugate's own (400/422, 401, 409, 429, 503) is answered right here, so a refused request
never created a job. An admitted synchronous call is relayed right here too (api/relay.py):
FastAPI's routing, its dependencies and its exception middlewares took a fifth of the API
process's CPU per tiny job (py-spy, 2026-12-07) to hand it to a route that only relays.
Its route (api/routes/inference.py) documents it; an admitted `POST /v1/jobs` goes on
to its route, which takes the decision as a dependency (`AdmittedJob`,
api/dependencies.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import orjson
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Receive, Scope, Send

from api.admission import Admitted, JobRequest, admit
from api.bodies import BODIES, Inference, JobBody, parse
from api.body_limit import BODY
from api.errors import error_response
from api.identity import Identity, identify
from api.metrics import EDGE_ROUTE
from api.paths import route_path
from api.relay import JobRelay
from api.sessions import session_of
from api.state import Gate
from shared import logs, telemetry
from shared.endpoints import INFERENCE
from shared.errors import GatewayError, InvalidApiKey, InvalidRequest, ModelNotAllowed
from shared.jobs import new_job_id
from shared.settings import Settings

ADMITTED = "gpugate.admitted"
"""Scope key of the edge's decision for an admitted request."""
MAX_IDEMPOTENCY_KEY = 256

Plan = Callable[[bytes, HTTPConnection, Settings], JobRequest]
"""What to queue for a request body; raises InvalidRequest when the body will not do."""


def _request(
    endpoint: str,
    body: Inference,
    text: str,
    conn: HTTPConnection,
    *,
    sync: bool,
    deadline_s: float | None,
    idempotency_key: str | None = None,
) -> JobRequest:
    return JobRequest(
        session=session_of(endpoint, body, conn.headers),
        endpoint=endpoint,
        model=body.model,
        body=text,
        stream=INFERENCE[endpoint].streams(body.stream) if sync else False,
        sync=sync,
        max_tokens=body.named_max_tokens(),
        deadline_s=deadline_s,
        idempotency_key=idempotency_key,
    )


def _sync_plan(endpoint: str) -> Plan:
    model = BODIES[endpoint]

    def plan(raw: bytes, conn: HTTPConnection, settings: Settings) -> JobRequest:
        body = parse(model, raw)  # relayed as sent
        return _request(
            endpoint, body, raw.decode(), conn, sync=True, deadline_s=settings.sync_timeout
        )

    return plan


def _job_plan(raw: bytes, conn: HTTPConnection, settings: Settings) -> JobRequest:
    idempotency_key = conn.headers.get("idempotency-key")
    if idempotency_key is not None and len(idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise InvalidRequest(f"Idempotency-Key: at most {MAX_IDEMPOTENCY_KEY} characters")
    job: JobBody = parse(JobBody, raw)
    body: Inference = parse(BODIES[job.endpoint], job.body, prefix="body.")
    text = _json_text({**job.body, "stream": False})  # jobs always run unstreamed
    return _request(
        job.endpoint,
        body,
        text,
        conn,
        sync=False,
        deadline_s=job.deadline_s,
        idempotency_key=idempotency_key,
    )


def _json_text(value: dict[str, Any]) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the json module takes it
        return json.dumps(value)


PLANS: dict[str, Plan] = {endpoint: _sync_plan(endpoint) for endpoint in BODIES}
PLANS["/v1/jobs"] = _job_plan


class AdmissionEdge:
    """ASGI middleware; it runs inside `BodyLimit`, which has read the body."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" else ""
        plan = PLANS.get(path)
        if plan is None or scope["method"] != "POST" or BODY not in scope:
            await self.app(scope, receive, send)
            return
        gate: Gate = scope["app"].state.gate
        conn = HTTPConnection(scope)
        try:
            request = plan(scope[BODY], conn, gate.settings)
            who = identify(conn, gate.keyring, gate.trusted, gate.settings.require_api_key)
            if who.models is not None and not who.may_use(request.model):
                raise ModelNotAllowed(request.model)
            job_id = new_job_id()
            scope[ADMITTED] = await _admit(gate, who, request, job_id)
        except GatewayError as error:
            scope[EDGE_ROUTE] = path  # for the request metrics
            if isinstance(error, ModelNotAllowed | InvalidApiKey):
                gate.metrics.admission(error.code)
            await error_response(error)(scope, receive, send)
            return
        except UnicodeDecodeError:
            scope[EDGE_ROUTE] = path
            not_text = InvalidRequest("The body is not valid UTF-8 JSON.", status=400)
            await error_response(not_text)(scope, receive, send)
            return
        if path in BODIES:  # a synchronous call: relayed here (the module's docstring)
            await _relay(gate, scope[ADMITTED], scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _relay(
    gate: Gate, admitted: Admitted, scope: Scope, receive: Receive, send: Send
) -> None:
    """What `sync_inference` (api/routes/inference.py) answers, and the errors it raises
    answered as the app's handler does (api/errors.py)."""
    scope[EDGE_ROUTE] = route_path(scope)  # the route's name in metrics and spans
    try:
        await JobRelay.of(gate, admitted)(scope, receive, send)
    except GatewayError as error:
        await error_response(error)(scope, receive, send)


async def _admit(gate: Gate, who: Identity, request: JobRequest, job_id: str) -> Admitted:
    """Admission; a synchronous call waiting for its end alone waits in the inbox."""
    if logs.JSON:
        logs.bind(job_id=job_id, key=who.name)
    if telemetry.ENABLED:  # `gpugate.admit`; the job record carries the trace to the worker
        from api.tracing import admit_span

        with admit_span(job_id, who.name, request.model, request.endpoint) as traceparent:
            return await _admit_now(gate, who, replace(request, traceparent=traceparent), job_id)
    return await _admit_now(gate, who, request, job_id)


async def _admit_now(gate: Gate, who: Identity, request: JobRequest, job_id: str) -> Admitted:
    if not request.sync or request.stream:
        return await admit(gate, who, request, job_id)
    gate.inbox.expect(job_id)
    try:
        return await admit(gate, who, request, job_id, inbox=gate.inbox.name)
    except BaseException:
        gate.inbox.forget(job_id)
        raise


def admitted_from(conn: HTTPConnection) -> Any:
    """The edge's decision for this request (None if the edge did not admit it)."""
    return conn.scope.get(ADMITTED)
