"""The worker's spans of a traced job (shared/telemetry.py): `gpugate.queue` (admission to
dispatch, in Redis's clock), `gpugate.run` (the run on this worker, its end recorded) and
its child, the CLIENT span of the call to the backend with the GenAI semantic
conventions. worker/jobs.py builds a `RunSpans` only for a grant that carries a
`traceparent` while this worker traces: an untraced job meets none of this.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, StatusCode

from shared import telemetry
from shared.scripts import FinishStatus, Grant
from worker.ollama import Outcome

_NS_PER_MS = 1_000_000


class RunSpans:
    """Opened when the run starts; `called` ends the backend call, `end` the run."""

    def __init__(self, grant: Grant, backend_url: str, worker_id: str) -> None:
        tracer = telemetry.tracer()
        parent = telemetry.parent_context(grant.traceparent)
        queue_wait_ms = max(0, grant.started_at_ms - grant.queued_at_ms)
        common: dict[str, str | int] = {
            "gpugate.job_id": grant.job_id,
            "gpugate.attempt": grant.attempt,
        }
        queued = tracer.start_span(
            "gpugate.queue",
            context=parent,
            start_time=grant.queued_at_ms * _NS_PER_MS,
            attributes={**common, "gpugate.queue_wait_ms": queue_wait_ms},
        )
        queued.end(end_time=grant.started_at_ms * _NS_PER_MS)
        self.run = tracer.start_span(
            "gpugate.run",
            context=parent,
            attributes={**common, "gpugate.backend": grant.backend, "gpugate.worker": worker_id},
        )
        in_run = trace.set_span_in_context(self.run)
        self._token = context.attach(in_run)  # the run's log lines carry its trace id
        operation = telemetry.OPERATIONS.get(grant.endpoint, grant.endpoint)
        url = urlsplit(backend_url)
        self.call = tracer.start_span(
            f"{operation} {grant.model}",
            context=in_run,
            kind=SpanKind.CLIENT,
            attributes={
                "gen_ai.operation.name": operation,
                "gen_ai.provider.name": "ollama",
                "gen_ai.request.model": grant.model,
                "server.address": url.hostname or "",
                "server.port": url.port or (443 if url.scheme == "https" else 80),
                "url.path": grant.endpoint,
                "gpugate.job_id": grant.job_id,
                "gpugate.backend": grant.backend,
                "gpugate.queue_wait_ms": queue_wait_ms,
                "gpugate.stream": grant.stream,
            },
        )
        self._called = False

    def called(self, outcome: Outcome) -> None:
        """The backend call ended with `outcome`."""
        if self._called:
            return
        self._called = True
        span = self.call
        span.set_attribute("gen_ai.usage.input_tokens", outcome.usage.input_tokens)
        span.set_attribute("gen_ai.usage.output_tokens", outcome.usage.output_tokens)
        if outcome.http_status is not None:
            span.set_attribute("http.response.status_code", outcome.http_status)
        if outcome.model_load_ms:
            span.set_attribute("gpugate.model_load_ms", outcome.model_load_ms)
        span.set_attribute("gpugate.outcome", outcome.status.value)
        if outcome.status not in (FinishStatus.SUCCEEDED, FinishStatus.CANCELLED):
            code = str((outcome.error or {}).get("code", "") or outcome.http_status or "error")
            span.set_attribute("error.type", code)
            span.set_status(StatusCode.ERROR, code)
            self.run.set_status(StatusCode.ERROR, code)
        span.end()

    def end(self) -> None:
        if not self._called:  # cancelled, or the worker stops: no outcome
            self._called = True
            self.call.set_attribute("gpugate.outcome", "interrupted")
            self.call.end()
        context.detach(self._token)
        self.run.end()
