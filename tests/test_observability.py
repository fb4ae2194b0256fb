"""Observability (SPEC "Observability", issue 26): OpenTelemetry traces exported over
OTLP/HTTP to a real receiver on loopback (it decodes the protobuf the way a collector
does), one trace from the caller through the API, Redis and the worker to the backend;
and JSON log lines.

The processes inherit the test's environment: the standard OTEL_* variables point them
at the receiver, with a short batch delay so spans arrive quickly.
"""

from __future__ import annotations

import gzip
import json
import logging
import secrets
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan

from gpugate.testing.processes import wait_until
from shared.logs import JsonFormatter
from tests.conftest import StackFactory

MODEL = "llama3.2"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": False}
SERVER = ProtoSpan.SpanKind.SPAN_KIND_SERVER
CLIENT = ProtoSpan.SpanKind.SPAN_KIND_CLIENT
WORKER_SPANS = {"gpugate.queue", "gpugate.run", f"chat {MODEL}"}


@dataclass(frozen=True)
class Span:
    name: str
    service: str
    trace_id: str
    span_id: str
    parent_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]

    @property
    def ms(self) -> float:
        return (self.end_ns - self.start_ns) / 1e6


def _value(value: AnyValue) -> Any:
    which = value.WhichOneof("value")
    return getattr(value, which) if which else None


class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, a protobuf ExportTraceServiceRequest."""

    def __init__(self, port: int = 0) -> None:
        self.spans: list[Span] = []
        self.requests = 0
        lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with lock:
                    receiver.requests += 1
                    receiver.spans.extend(_spans(request))
                reply = ExportTraceServiceResponse().SerializeToString()
                self.send_response(200 if self.path == "/v1/traces" else 404)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def trace(self, trace_id: str) -> list[Span]:
        return [s for s in list(self.spans) if s.trace_id == trace_id]

    def wait_trace(self, trace_id: str, names: set[str]) -> dict[str, Span]:
        """The spans of `trace_id` by name, once all of `names` arrived."""

        def complete() -> dict[str, Span] | None:
            found = {s.name: s for s in self.trace(trace_id)}
            return found if names <= found.keys() else None

        got = wait_until(complete, timeout=20, what=f"spans {sorted(names)} of trace {trace_id}")
        assert isinstance(got, dict)
        return got

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _spans(request: ExportTraceServiceRequest) -> Iterator[Span]:
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                yield Span(
                    name=span.name,
                    service=str(resource.get("service.name", "")),
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_id=span.parent_span_id.hex(),
                    kind=span.kind,
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes={a.key: _value(a.value) for a in span.attributes},
                )


@pytest.fixture
def otlp(monkeypatch: pytest.MonkeyPatch) -> Iterator[Receiver]:
    """A receiver, and the OTEL_* variables that send the stack's spans to it."""
    receiver = Receiver()
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    yield receiver
    receiver.close()


def caller_traceparent() -> tuple[str, str, str]:
    """A caller's own trace: (trace id, span id, W3C traceparent)."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return trace_id, span_id, f"00-{trace_id}-{span_id}-01"


def assert_worker_spans(spans: dict[str, Span], server: Span, job_id: str) -> None:
    """gpugate.queue and gpugate.run children of the server span, from the worker; the
    client span to the backend a child of the run, with the GenAI conventions."""
    queue, run, call = spans["gpugate.queue"], spans["gpugate.run"], spans[f"chat {MODEL}"]
    for span in (queue, run, call):
        assert span.service == "gpugate-worker"
        assert span.attributes["gpugate.job_id"] == job_id
    assert queue.parent_id == server.span_id
    assert run.parent_id == server.span_id
    assert call.parent_id == run.span_id
    assert call.kind == CLIENT
    assert queue.end_ns <= run.start_ns + 5_000_000  # dispatch, then the run (ms clocks)
    assert call.attributes["gen_ai.operation.name"] == "chat"
    assert call.attributes["gen_ai.request.model"] == MODEL
    assert call.attributes["gen_ai.usage.input_tokens"] > 0
    assert call.attributes["gen_ai.usage.output_tokens"] == 5  # the simulator's 5 tokens
    assert call.attributes["gpugate.backend"] == "default"
    assert call.attributes["gpugate.queue_wait_ms"] >= 0
    assert call.attributes["gpugate.queue_wait_ms"] == queue.attributes["gpugate.queue_wait_ms"]


def test_a_synchronous_call_is_one_trace_from_caller_to_backend(
    otlp: Receiver, make_stack: StackFactory
) -> None:
    stack = make_stack()
    trace_id, caller_span, traceparent = caller_traceparent()
    with stack.client() as client:
        r = client.post("/api/chat", json=CHAT, headers={"traceparent": traceparent})
    assert r.status_code == 200, r.text
    job_id = r.headers["x-gpugate-job-id"]

    spans = otlp.wait_trace(trace_id, {"POST /api/chat", "gpugate.admit", *WORKER_SPANS})
    server, admit = spans["POST /api/chat"], spans["gpugate.admit"]
    assert server.parent_id == caller_span  # the caller's trace continues
    assert server.kind == SERVER
    assert server.service == admit.service == "gpugate-api"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["http.route"] == "/api/chat"
    assert server.attributes["gpugate.job_id"] == job_id
    assert "gpugate.refusal" not in server.attributes
    assert admit.parent_id == server.span_id
    assert admit.attributes["gpugate.job_id"] == job_id
    assert admit.attributes["gen_ai.request.model"] == MODEL
    assert_worker_spans(spans, server, job_id)
    assert server.start_ns <= admit.start_ns and admit.end_ns <= server.end_ns


def test_a_stream_is_traced_to_its_last_chunk(otlp: Receiver, make_stack: StackFactory) -> None:
    stack = make_stack()
    trace_id, _, traceparent = caller_traceparent()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    with (
        stack.client() as client,
        client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"traceparent": traceparent}
        ) as r,
    ):
        assert r.status_code == 200
        chunks = [line for line in r.iter_lines() if line.startswith("data:")]
        job_id = r.headers["x-gpugate-job-id"]
    assert chunks[-1] == "data: [DONE]"

    name = "POST /v1/chat/completions"
    spans = otlp.wait_trace(trace_id, {name, "gpugate.admit", *WORKER_SPANS})
    server = spans[name]
    assert_worker_spans(spans, server, job_id)
    call = spans[f"chat {MODEL}"]
    assert call.attributes["gpugate.stream"] is True
    assert server.end_ns >= call.end_ns - 5_000_000  # the response ends after the stream


def test_an_async_job_joins_the_trace_of_its_submission(
    otlp: Receiver, make_stack: StackFactory
) -> None:
    stack = make_stack()
    trace_id, _, traceparent = caller_traceparent()
    job = {"endpoint": "/api/chat", "body": CHAT}
    with stack.client() as client:
        r = client.post("/v1/jobs", json=job, headers={"traceparent": traceparent})
        assert r.status_code == 202, r.text
        job_id = r.json()["id"]
        done = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
    assert done["status"] == "succeeded"

    spans = otlp.wait_trace(trace_id, {"POST /v1/jobs", "gpugate.admit", *WORKER_SPANS})
    server = spans["POST /v1/jobs"]
    assert server.attributes["http.response.status_code"] == 202
    assert_worker_spans(spans, server, job_id)
    # the GET that waited is a trace of its own (it sent no traceparent)
    gets = wait_until(
        lambda: [s for s in otlp.spans if s.name == "GET /v1/jobs/{job_id}"],
        what="the span of the GET that waited",
    )
    assert isinstance(gets, list) and all(s.trace_id != trace_id for s in gets)


def test_a_refusal_is_a_server_span_naming_its_code(
    otlp: Receiver, make_stack: StackFactory
) -> None:
    stack = make_stack(burst=1, rate_limit="1/hour")
    first_trace, _, first = caller_traceparent()
    trace_id, caller_span, traceparent = caller_traceparent()
    with stack.client(key="test-" + secrets.token_hex(8)) as client:
        assert (
            client.post("/api/chat", json=CHAT, headers={"traceparent": first}).status_code == 200
        )
        otlp.wait_trace(first_trace, WORKER_SPANS)  # an admitted call's worker spans arrive
        r = client.post("/api/chat", json=CHAT, headers={"traceparent": traceparent})
    assert r.status_code == 429

    spans = otlp.wait_trace(trace_id, {"POST /api/chat", "gpugate.admit"})
    server, admit = spans["POST /api/chat"], spans["gpugate.admit"]
    assert server.parent_id == caller_span
    assert server.attributes["gpugate.refusal"] == "rate_limit_exceeded"
    assert server.attributes["http.response.status_code"] == 429
    assert admit.attributes["gpugate.refusal"] == "rate_limit_exceeded"
    # nothing was queued: no worker spans in this trace
    assert not {s.name for s in otlp.trace(trace_id)} & WORKER_SPANS


def test_nothing_is_exported_and_no_record_carries_a_trace_when_off(
    monkeypatch: pytest.MonkeyPatch, make_stack: StackFactory
) -> None:
    """Off (no GPUGATE_OTEL, no OTLP endpoint): a receiver on the default OTLP/HTTP port
    hears nothing, and the job record has no `traceparent` field."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    receiver = Receiver(4318)  # where an SDK left at its defaults would send
    try:
        stack = make_stack()
        _, _, traceparent = caller_traceparent()
        with stack.client() as client:
            r = client.post("/api/chat", json=CHAT, headers={"traceparent": traceparent})
            assert r.status_code == 200
            job = client.post("/v1/jobs", json={"endpoint": "/api/chat", "body": CHAT}).json()
            assert client.get(f"/v1/jobs/{job['id']}", params={"wait": 20}).json()["status"] == (
                "succeeded"
            )
        redis = stack.redis()
        try:
            for job_id in (r.headers["x-gpugate-job-id"], job["id"]):
                assert redis.hexists(f"gpugate:job:{job_id}", "id")
                assert not redis.hexists(f"gpugate:job:{job_id}", "traceparent")
        finally:
            redis.close()
        for proc in [*stack.workers, stack.api]:
            proc.stop()  # a provider would flush at exit
        assert receiver.requests == 0
    finally:
        receiver.close()


def test_json_logs_every_line_of_api_and_worker_is_an_object(
    otlp: Receiver, make_stack: StackFactory
) -> None:
    stack = make_stack(log_format="json", log_level="info", burst=2, rate_limit="1/hour")
    with stack.client(key="test-" + secrets.token_hex(8)) as client:
        assert client.post("/api/chat", json=CHAT).status_code == 200
        job = client.post("/v1/jobs", json={"endpoint": "/api/chat", "body": CHAT}).json()
        assert client.post("/api/chat", json=CHAT).status_code == 429
    for proc in [*stack.workers, stack.api]:
        proc.stop()  # their shutdown lines too

    for proc in [*stack.workers, stack.api]:
        lines = [line for line in proc.log().splitlines() if line.strip()]
        assert lines, f"{proc.name} logged nothing at info"
        for line in lines:
            record = json.loads(line)  # every line, third-party ones included
            assert isinstance(record, dict), line
            assert {"ts", "level", "msg"} <= record.keys(), line
    api_lines = [json.loads(line) for line in stack.api.log().splitlines() if line.strip()]
    assert any(r["logger"].startswith("uvicorn") for r in api_lines)
    worker_lines = [json.loads(line) for line in stack.workers[0].log().splitlines()]
    assert any(r["logger"].startswith("arq") for r in worker_lines)
    assert job["id"]


def test_json_lines_of_a_job_name_it_its_key_backend_and_trace(
    otlp: Receiver, make_stack: StackFactory
) -> None:
    """A run against a backend that is down logs its retry and the breaker opening, in
    the job's task: those lines carry the job, the key's name, the backend, the trace."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    stack = make_stack(
        ollama_url=dead, log_format="json", log_level="info", ollama_retries=1, breaker_threshold=1
    )
    trace_id, _, traceparent = caller_traceparent()
    with stack.client(key="test-" + secrets.token_hex(8)) as client:
        r = client.post("/api/chat", json=CHAT, headers={"traceparent": traceparent})
    assert r.status_code == 502, r.text
    job_id = r.headers["x-gpugate-job-id"]

    def job_lines() -> list[dict[str, Any]]:
        lines = [json.loads(line) for line in stack.workers[0].log().splitlines() if line]
        return [line for line in lines if line.get("job_id") == job_id]

    lines = wait_until(lambda: len(job_lines()) >= 2, what="the retry and breaker lines") and (
        job_lines()
    )
    for line in lines:
        assert line["backend"] == "default"
        assert line["key"].startswith("key:")  # a fingerprint, never the key itself
        assert line["trace_id"] == trace_id
    assert {line["level"] for line in lines} >= {"info", "warning"}


def test_json_formatter_names_uvicorn_access_fields_and_keeps_tracebacks_on_one_line() -> None:
    """uvicorn's access record (when a server enables its access log) and a logged
    exception each make one JSON line."""
    formatter = JsonFormatter()
    access = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5000", "POST", "/api/chat", "1.1", 429),
        None,
    )
    line = formatter.format(access)
    assert "\n" not in line
    assert json.loads(line) | {"ts": ""} == {
        "ts": "",
        "level": "info",
        "logger": "uvicorn.access",
        "msg": '127.0.0.1:5000 - "POST /api/chat HTTP/1.1" 429',
        "client": "127.0.0.1:5000",
        "method": "POST",
        "path": "/api/chat",
        "status": 429,
    }
    try:
        raise ValueError("boom")
    except ValueError:
        failed = logging.LogRecord(
            "gpugate", logging.ERROR, __file__, 1, "job %s", ("job_1",), sys.exc_info()
        )
    failed.job_id = "job_1"
    line = formatter.format(failed)
    assert "\n" not in line
    record = json.loads(line)
    assert record["msg"] == "job job_1" and record["job_id"] == "job_1"
    assert "ValueError: boom" in record["exc"]
