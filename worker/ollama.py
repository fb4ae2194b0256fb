"""One call to Ollama for one run: the request relayed as it came, the answer recorded.

Streamed answers go to the job's event stream (`head`, then `chunk`s with a sequence
number) as they arrive: a writer task appends what has piled up since its last write as
one event, at most one every MIN_WRITE_INTERVAL_S, so a lone chunk goes out at once and
a fast stream costs one XADD per batch, not per chunk (Redis is the whole fleet's).
Chunks stay byte for byte as Ollama sent them, in order.

Connection failures and 5xx answers, while nothing has been relayed yet, are retried on
the same backend with backoff when it is the only one, and handed back for another
backend otherwise (`retry`). After a byte was relayed, a failure ends the stream the way
Ollama ends one, with an error object.

An `openai` backend (llama.cpp's llama-server, vLLM, ...) gets the OpenAI paths with its
api_key; a stream there is asked for its usage (`stream_options.include_usage`) and, when
the client did not ask for it, that last usage chunk is read and not relayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from redis.asyncio import Redis
from redis.typing import EncodableT, FieldT

from shared import keys
from shared.endpoints import INFERENCE, Api
from shared.jobs import ErrorCode
from shared.outage import end_if_cancelled
from shared.scripts import FinishStatus
from worker.usage import TAIL_BYTES, Usage, model_load_ms, usage_of

log = logging.getLogger("gpugate.worker")

STREAM_MAX_EVENTS = 100_000
"""A job's event stream is trimmed beyond this many events (the API detects a gap)."""
BACKOFF_S = 0.25
MIN_WRITE_INTERVAL_S = 0.002
"""A stream appends at most one event per this interval while chunks keep coming; what
arrives meanwhile joins the next event. A chunk after a pause goes out at once."""
MAX_PENDING_BYTES = 4 << 20
"""A stream whose writer lags by this much waits for it (Redis is slower than Ollama)."""


@dataclass(frozen=True)
class Work:
    job_id: str
    endpoint: str
    body: str
    stream: bool
    url: str
    """The backend's base URL."""
    alone: bool = True
    """No other backend could take the job: retry failures here."""
    openai: bool = False
    """The backend is of kind `openai`: only OpenAI's paths, streams asked for usage."""
    headers: tuple[tuple[str, str], ...] = ()
    """What the backend needs besides the body's type (its api_key)."""


@dataclass(frozen=True)
class Outcome:
    status: FinishStatus
    http_status: int | None = None
    content_type: str = ""
    result: str = ""
    error: dict[str, Any] | None = None
    usage: Usage = field(default_factory=Usage)
    model_load_ms: float = 0.0


def backend_failure(message: str, code: str = ErrorCode.BACKEND_ERROR) -> Outcome:
    return Outcome(FinishStatus.FAILED, error={"code": code, "message": message})


def _ollama_error_message(text: str) -> str:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return text[:500]
    if isinstance(err, dict):
        return str(err.get("message", err))
    return str(err)


def _success(status: int) -> bool:
    return 200 <= status < 300


def _answered(status: int, ctype: str, raw: bytes) -> Outcome:
    """Ollama answered in full: a result, or its own error relayed unchanged."""
    text = raw.decode(errors="replace")
    usage, load_ms = usage_of(raw), model_load_ms(raw)
    if _success(status):
        return Outcome(FinishStatus.SUCCEEDED, status, ctype, text, None, usage, load_ms)
    error = {
        "code": ErrorCode.OLLAMA_ERROR,
        "message": _ollama_error_message(text),
        "status": status,
    }
    return Outcome(FinishStatus.FAILED, status, ctype, text, error, usage, load_ms)


def stream_error_chunk(endpoint: str, message: str) -> bytes:
    """How Ollama ends a stream that failed: an error object in the stream's own framing."""
    if endpoint.startswith("/v1/"):
        payload = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return b"data: " + json.dumps(payload).encode() + b"\n\n"
    return json.dumps({"error": message}).encode() + b"\n"


class EventWriter:
    """Appends a job's events to its Redis stream, coalescing chunks that arrive while a
    write is in flight; the API reads them as they come."""

    def __init__(self, redis: Redis, job_id: str, ttl_ms: int) -> None:
        self._redis = redis
        self._key = keys.events(job_id)
        self._ttl_ms = ttl_ms
        self._seq = 0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._head: dict[FieldT, EncodableT] | None = None
        self._last_write = -MIN_WRITE_INTERVAL_S
        self.started = False
        self.tail = b""
        """The last TAIL_BYTES of the stream (its usage is there)."""
        self.events = 0

    async def head(self, status: int, content_type: str) -> None:
        """Ollama answered a streamed call. The head is written with the first chunk (or
        by `flush`): the caller's headers leave with it, one round trip sooner."""
        self._head = {"type": "head", "status": status, "ctype": content_type}
        self.started = True

    async def chunk(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        self.events += data.count(b"\n\n") or data.count(b"\n") or 1
        self.tail = (self.tail + data)[-TAIL_BYTES:]
        if self._writer is None or self._writer.done():
            if self._writer is not None:
                self._writer.result()  # a failed write fails the stream
            self._writer = asyncio.create_task(self._write())
        elif self._pending_bytes > MAX_PENDING_BYTES:
            await self.flush()

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        if self._head is not None:
            await self._write_head()
        while self._pending:
            wait_s = self._last_write + MIN_WRITE_INTERVAL_S - loop.time()
            if wait_s > 0 and self._pending_bytes < MAX_PENDING_BYTES:
                await asyncio.sleep(wait_s)
            self._last_write = loop.time()
            await self._redis.xadd(
                self._key, self._next_chunk(), maxlen=STREAM_MAX_EVENTS, approximate=True
            )

    def _next_chunk(self) -> dict[FieldT, EncodableT]:
        batch, self._pending, self._pending_bytes = self._pending, [], 0
        self._seq += 1
        return {"type": "chunk", "seq": self._seq, "data": b"".join(batch)}

    async def _write_head(self) -> None:
        """The head, the chunks so far with it, in one round trip."""
        head, self._head = self._head, None
        assert head is not None
        self._last_write = asyncio.get_running_loop().time()
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xadd(self._key, head)
            if self._pending:
                pipe.xadd(self._key, self._next_chunk())
            pipe.pexpire(self._key, self._ttl_ms)
            await pipe.execute()

    async def flush(self) -> None:
        """Wait until every chunk so far is in Redis. The one place a backend call awaits
        Redis itself: a cancel (the job cancelled, the worker stopping) that a redis-py
        write lost ends the call here, not after the backend's whole answer."""
        if self._writer is not None:
            await self._writer
        if self._pending or self._head is not None:
            await self._write()
        end_if_cancelled()

    def abandon(self) -> None:
        if self._writer is not None:
            self._writer.cancel()


async def call(
    http: aiohttp.ClientSession, work: Work, events: EventWriter, retries: int
) -> Outcome:
    """Run `work` on Ollama, retrying refused connections and 5xx before anything is relayed."""
    if work.endpoint not in INFERENCE:  # only a writer of Redis could put it there
        message = f"Refused to call Ollama at {work.endpoint!r}: not an inference endpoint."
        return Outcome(FinishStatus.FAILED, error={"code": "invalid_request", "message": message})
    if work.openai and INFERENCE[work.endpoint].api is not Api.OPENAI:
        return unknown_model(work)  # dispatch found no Ollama backend that could answer it
    attempt = 0
    while True:
        try:
            outcome = await _call_once(http, work, events)
        except aiohttp.ClientError as exc:  # refused, reset, cut mid-body, connect timeout
            if events.started:
                message = f"Ollama stream broke: {exc.__class__.__name__}"
                await events.chunk(stream_error_chunk(work.endpoint, message))
                await events.flush()
                return backend_failure(message)
            outcome = backend_failure(f"Ollama unreachable: {exc.__class__.__name__}: {exc}")
            retryable = True
        else:
            retryable = outcome.http_status is not None and outcome.http_status >= 500
            if retryable:
                detail = _ollama_error_message(outcome.result)
                outcome = backend_failure(f"Ollama failed with {outcome.http_status}: {detail}")
        if retryable and not work.alone:
            return Outcome(FinishStatus.RETRY, error=outcome.error)
        if not retryable or attempt >= retries:
            return outcome
        attempt += 1
        log.info("job %s: %s; retry %d of %d", work.job_id, outcome.error, attempt, retries)
        await asyncio.sleep(BACKOFF_S * 2 ** (attempt - 1))


async def _call_once(http: aiohttp.ClientSession, work: Work, events: EventWriter) -> Outcome:
    body, usage_chunk = work.body, None
    if work.openai and work.stream and work.endpoint in USAGE_ON_REQUEST:
        body, asked = _with_stream_usage(body)
        usage_chunk = None if asked else UsageChunk()
    async with http.post(
        work.url + work.endpoint,
        data=body.encode(),
        headers={"content-type": "application/json", **dict(work.headers)},
    ) as response:
        status, ctype = response.status, response.headers.get("content-type", "")
        if not (work.stream and _success(status)):
            return _answered(status, ctype or "application/json", await response.read())
        await events.head(status, ctype)
        async for data in response.content.iter_any():
            if usage_chunk is not None:
                data = usage_chunk.relayed(data)
                if not data:
                    continue
            await events.chunk(data)
        if usage_chunk is not None and usage_chunk.rest:
            await events.chunk(usage_chunk.rest)
        await events.flush()
        tail = usage_chunk.usage if usage_chunk is not None and usage_chunk.usage else events.tail
        return Outcome(
            FinishStatus.SUCCEEDED,
            status,
            ctype,
            usage=usage_of(tail, events.events),
            model_load_ms=model_load_ms(events.tail),
        )


USAGE_ON_REQUEST = frozenset({"/v1/chat/completions", "/v1/completions"})
"""The OpenAI paths whose streams report usage only when asked (`stream_options`)."""


def _with_stream_usage(body: str) -> tuple[str, bool]:
    """`body` asking for the stream's usage, and whether the client asked for it itself."""
    try:
        request = json.loads(body)
    except ValueError:
        return body, True  # relayed as it came: the backend answers it
    if not isinstance(request, dict):
        return body, True
    options = request.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage"):
        return body, True
    request["stream_options"] = {**(options if isinstance(options, dict) else {})}
    request["stream_options"]["include_usage"] = True
    return json.dumps(request), False


class UsageChunk:
    """Takes the usage-only chunk (`"choices": []` and a `usage`) out of an OpenAI SSE
    stream whose client did not ask for it, and keeps it to read the usage from. Whole
    events are relayed as they complete; a partial one waits for its end."""

    def __init__(self) -> None:
        self._partial = b""
        self.usage = b""

    def relayed(self, data: bytes) -> bytes:
        data = self._partial + data
        end = data.rfind(b"\n\n")
        if end < 0:
            self._partial = data
            return b""
        complete, self._partial = data[: end + 2], data[end + 2 :]
        if b'"usage"' not in complete:
            return complete
        kept = []
        for event in complete.split(b"\n\n")[:-1]:
            if _usage_only(event):
                self.usage = event
            else:
                kept.append(event + b"\n\n")
        return b"".join(kept)

    @property
    def rest(self) -> bytes:
        """What came after the last complete event (nothing, from a well-formed stream)."""
        return self._partial


def _usage_only(event: bytes) -> bool:
    line = event.strip()
    if not line.startswith(b"data:"):
        return False
    try:
        chunk = json.loads(line[5:])
    except ValueError:
        return False
    return isinstance(chunk, dict) and chunk.get("choices") == [] and bool(chunk.get("usage"))


def unknown_model(work: Work) -> Outcome:
    """Ollama's answer for a model it does not have, for an Ollama-native call that only
    `openai` backends could take (they have no native API)."""
    try:
        model = str(json.loads(work.body).get("model", ""))
    except (ValueError, AttributeError):
        model = ""
    message = f"model {json.dumps(model)} not found, try pulling it first"
    if INFERENCE[work.endpoint].api is Api.ANTHROPIC:
        body: dict[str, Any] = {
            "type": "error",
            "error": {"type": "not_found_error", "message": message},
        }
    else:
        body = {"error": message}
    return _answered(404, "application/json; charset=utf-8", json.dumps(body).encode())
