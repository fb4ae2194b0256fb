"""One call to Ollama for one run: the request relayed as it came, the answer recorded.

Streamed answers are published chunk by chunk to the job's event stream (`head`, then
`chunk`s with a sequence number) as they arrive; the API relays them unchanged.
Connection failures and 5xx answers are retried with backoff while nothing has been
relayed yet; after that a failure ends the stream the way Ollama ends one, with an error
object.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

import httpx
from redis.asyncio import Redis

from shared import keys
from shared.jobs import INFERENCE_ENDPOINTS, JobStatus

log = logging.getLogger("gpugate.worker")

STREAM_MAX_EVENTS = 100_000
"""A job's event stream is trimmed beyond this many events (the API detects a gap)."""
BACKOFF_S = 0.25


@dataclass(frozen=True)
class Work:
    job_id: str
    endpoint: str
    body: str
    stream: bool


@dataclass(frozen=True)
class Outcome:
    status: JobStatus
    http_status: int | None = None
    content_type: str = ""
    result: str = ""
    error: dict[str, Any] | None = None


def backend_failure(message: str, code: str = "backend_error") -> Outcome:
    return Outcome(JobStatus.FAILED, error={"code": code, "message": message})


def _ollama_error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:500]
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def _answered(response: httpx.Response, text: str) -> Outcome:
    """Ollama answered in full: a result, or its own error relayed unchanged."""
    ctype = response.headers.get("content-type", "application/json")
    if response.is_success:
        return Outcome(JobStatus.SUCCEEDED, response.status_code, ctype, text)
    return Outcome(
        JobStatus.FAILED,
        response.status_code,
        ctype,
        text,
        {
            "code": "ollama_error",
            "message": _ollama_error_message(text),
            "status": response.status_code,
        },
    )


def stream_error_chunk(endpoint: str, message: str) -> bytes:
    """How Ollama ends a stream that failed: an error object in the stream's own framing."""
    if endpoint.startswith("/v1/"):
        payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


class EventWriter:
    """Appends a job's events to its Redis stream; the API reads them as they come."""

    def __init__(self, redis: Redis, job_id: str, ttl_ms: int) -> None:
        self._redis = redis
        self._key = keys.events(job_id)
        self._ttl_ms = ttl_ms
        self._seq = 0
        self.started = False

    async def head(self, status: int, content_type: str) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._key, {"type": "head", "status": status, "ctype": content_type})
            pipe.pexpire(self._key, self._ttl_ms)
            await pipe.execute()
        self.started = True

    async def chunk(self, data: bytes) -> None:
        self._seq += 1
        await self._redis.xadd(
            self._key,
            {"type": "chunk", "seq": self._seq, "data": data},
            maxlen=STREAM_MAX_EVENTS,
            approximate=True,
        )


async def call(
    http: httpx.AsyncClient,
    base_url: str,
    work: Work,
    events: EventWriter,
    retries: int,
) -> Outcome:
    """Run `work` on Ollama, retrying refused connections and 5xx before anything is relayed."""
    if work.endpoint not in INFERENCE_ENDPOINTS:  # only a writer of Redis could put it there
        message = f"Refused to call Ollama at {work.endpoint!r}: not an inference endpoint."
        return Outcome(JobStatus.FAILED, error={"code": "invalid_request", "message": message})
    attempt = 0
    while True:
        try:
            outcome = await _call_once(http, base_url, work, events)
        except httpx.TransportError as exc:
            if events.started:
                message = f"Ollama stream broke: {exc.__class__.__name__}"
                await events.chunk(stream_error_chunk(work.endpoint, message))
                return backend_failure(message)
            outcome = backend_failure(f"Ollama unreachable: {exc.__class__.__name__}: {exc}")
            retryable = True
        else:
            retryable = outcome.http_status is not None and outcome.http_status >= 500
            if retryable:
                detail = _ollama_error_message(outcome.result)
                outcome = backend_failure(f"Ollama failed with {outcome.http_status}: {detail}")
        if not retryable or attempt >= retries:
            return outcome
        attempt += 1
        log.info("job %s: %s; retry %d of %d", work.job_id, outcome.error, attempt, retries)
        await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))


async def _call_once(
    http: httpx.AsyncClient, base_url: str, work: Work, events: EventWriter
) -> Outcome:
    request = http.build_request(
        "POST",
        base_url + work.endpoint,
        content=work.body.encode(),
        headers={"content-type": "application/json"},
    )
    response = await http.send(request, stream=True)
    try:
        if not (work.stream and response.is_success):
            return _answered(response, (await response.aread()).decode(errors="replace"))
        await events.head(response.status_code, response.headers.get("content-type", ""))
        async for data in response.aiter_raw():
            if data:
                await events.chunk(data)
        return Outcome(JobStatus.SUCCEEDED, response.status_code, response.headers["content-type"])
    finally:
        await response.aclose()
