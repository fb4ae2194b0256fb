"""The API's spans, when tracing is on (shared/telemetry.py): a server span per HTTP
request and `gpugate.admit` around the admission. `create_app` adds `ServerSpans` only when
`telemetry.ENABLED`, and the edge calls `admit_span` only then: off, no request meets them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import orjson
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, StatusCode
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.metrics import EDGE_ROUTE
from shared import telemetry

REFUSAL = "gpugate.refusal"


class ServerSpans:
    """ASGI middleware, outermost: one SERVER span per HTTP request, the child of the
    caller's W3C `traceparent` if it sent one; the gateway's own errors name their code
    in `gpugate.refusal`."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        traceparent = tracestate = ""
        for name, value in scope["headers"]:
            if name == b"traceparent":
                traceparent = value.decode("latin-1")
            elif name == b"tracestate":
                tracestate = value.decode("latin-1")
        parent = telemetry.parent_context(traceparent, tracestate) if traceparent else None
        method = scope["method"]
        span = telemetry.tracer().start_span(
            method,
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": scope["path"]},
        )
        token = context.attach(trace.set_span_in_context(span))
        watch = _Response(span)

        async def send_watched(message: Message) -> None:
            watch.sent(message)
            await send(message)

        try:
            await self.app(scope, receive, send_watched)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(StatusCode.ERROR, exc.__class__.__name__)
            raise
        finally:
            route = _route(scope)
            if route:
                span.update_name(f"{method} {route}")
                span.set_attribute("http.route", route)
            context.detach(token)
            span.end()


class _Response:
    """What the server span learns from the response: its status, and the error code of
    a refusal of the gateway's own (`{"error": CODE, "message": ...}`)."""

    def __init__(self, span: trace.Span) -> None:
        self.span = span
        self.error_body = False

    def sent(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            status = int(message["status"])
            self.span.set_attribute("http.response.status_code", status)
            if status >= 500:
                self.span.set_status(StatusCode.ERROR)
            self.error_body = status >= 400 and any(
                name == b"content-type" and value.startswith(b"application/json")
                for name, value in message.get("headers", ())
            )
        elif message["type"] == "http.response.body" and self.error_body:
            self.error_body = False  # the first chunk of an error body holds all of it
            code = _gateway_error_code(message.get("body", b""))
            if code:
                self.span.set_attribute(REFUSAL, code)


def _gateway_error_code(body: bytes) -> str:
    """The code of the gateway's own error body; "" for anything else (an error Ollama
    returned, relayed as it came, is no refusal of ours)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        return ""
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), str) and "message" in parsed:
        return str(parsed["error"])
    return ""


def _route(scope: Scope) -> str:
    """The route template (`/v1/jobs/{job_id}`), not the path: span names stay few."""
    route = scope.get("route")
    path = getattr(route, "path", None)
    if isinstance(path, str):
        return path
    edge: str | None = scope.get(EDGE_ROUTE)  # refused at the edge, before routing
    return edge or ""


@contextlib.contextmanager
def admit_span(job_id: str, key: str, model: str, endpoint: str) -> Iterator[str]:
    """`gpugate.admit` around an admission; yields the `traceparent` the job record
    carries to the worker (the server span's: the queue and the run are its children)."""
    carried = telemetry.traceparent_of(trace.get_current_span())
    with telemetry.tracer().start_as_current_span(
        "gpugate.admit",
        attributes={
            "gpugate.job_id": job_id,
            "gpugate.key": key,
            "gpugate.endpoint": endpoint,
            "gen_ai.request.model": model,
        },
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield carried
        except Exception as exc:
            code = getattr(exc, "code", "")
            if isinstance(code, str) and code:
                span.set_attribute(REFUSAL, code)
            raise
    trace.get_current_span().set_attribute("gpugate.job_id", job_id)
