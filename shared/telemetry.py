"""OpenTelemetry traces, off unless asked for (SPEC "Observability", issue 26).

`setup(settings, service)` runs once per process (gpugate/cli.py). With GPUGATE_OTEL=true,
or OTEL_EXPORTER_OTLP_ENDPOINT (or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) set, it installs a
tracer provider with a batch processor and the OTLP/HTTP exporter, which read the standard
OTEL_* variables themselves (endpoint, headers, OTEL_SERVICE_NAME, OTEL_BSP_SCHEDULE_DELAY
...), and sets `ENABLED`. Off, nothing of OpenTelemetry is even imported: every caller
tests the module global `ENABLED` (or a job's `traceparent`) before it builds anything,
so the request path pays one attribute read.

The spans of one request, one trace across the API and the worker processes:

    POST /v1/chat/completions   server span (API; continues the caller's `traceparent`)
    ├── gpugate.admit            the admission script (API)
    ├── gpugate.queue            admission → dispatch, timed by Redis's clock (worker)
    └── gpugate.run              the run on a worker: the backend call, its end recorded
        └── chat <model>         client span to the backend (GenAI semantic conventions)

The context crosses Redis in the job record's `traceparent` field (W3C format), which
admit.lua writes only when the API traces; the scheduler hands it to the worker with the
grant (shared/scripts.py `Grant`). Instrumented by hand (api/tracing.py,
worker/tracing.py): a generic ASGI or HTTP-client instrumentation would sit on the path of
every request, on or off.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from shared.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.trace import Span, Tracer

ENABLED = False
"""True once `setup` installed a tracer provider in this process."""

_tracer: Tracer | None = None
_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def wanted(settings: Settings, environ: Mapping[str, str] = os.environ) -> bool:
    """Tracing is on with GPUGATE_OTEL=true or an OTLP endpoint in the environment."""
    return settings.otel or any(environ.get(name) for name in _ENDPOINT_VARIABLES)


def setup(settings: Settings, service: str) -> bool:
    """Install the tracer provider if tracing is wanted; True if it is on.
    `service` is the default `service.name` (OTEL_SERVICE_NAME wins)."""
    global ENABLED, _tracer
    if ENABLED or not wanted(settings):
        return ENABLED
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    attributes = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service}
    provider = TracerProvider(resource=Resource.create(attributes))  # flushed at exit
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("gpugate")
    ENABLED = True
    return True


def shutdown() -> None:
    """Export what is still buffered (the provider also does it at interpreter exit)."""
    if not ENABLED:
        return
    from opentelemetry import trace

    provider = trace.get_tracer_provider()
    shutdown_provider = getattr(provider, "shutdown", None)
    if shutdown_provider is not None:
        shutdown_provider()


def tracer() -> Tracer:
    if _tracer is None:
        raise RuntimeError("tracing is off: test telemetry.ENABLED first")
    return _tracer


def parent_context(traceparent: str, tracestate: str = "") -> Context:
    """The context a W3C `traceparent` names (an empty context if it is malformed)."""
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    return TraceContextTextMapPropagator().extract(carrier)


def traceparent_of(span: Span) -> str:
    """The W3C `traceparent` of `span` (what the job record carries to the worker)."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def current_trace_id() -> str:
    """The trace id of the current span, in hex; empty when tracing is off or no span is."""
    if not ENABLED:
        return ""
    from opentelemetry import trace

    ctx = trace.get_current_span().get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


OPERATIONS: dict[str, str] = {
    "/api/generate": "text_completion",
    "/api/chat": "chat",
    "/api/embed": "embeddings",
    "/api/embeddings": "embeddings",
    "/v1/chat/completions": "chat",
    "/v1/completions": "text_completion",
    "/v1/embeddings": "embeddings",
    "/v1/responses": "chat",
    "/v1/messages": "chat",
}
"""`gen_ai.operation.name` of each inference path (the GenAI semantic conventions' values)."""
