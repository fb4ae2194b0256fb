"""The answer to a synchronous call: wait for the job, relay what Ollama said.

`JobRelay` is an ASGI response. It waits on the job's event stream; a streamed answer is
relayed chunk by chunk as the worker publishes it (headers go out once Ollama has
answered), anything else once the job ends. Meanwhile it listens for the client leaving:
a disconnect cancels the job, queued or running. A call that outlives
GPUGATE_SYNC_TIMEOUT before Ollama answers gets 504; a job still queued is cancelled, a
running one finishes and stays readable by its id. If Redis goes away while it waits, the
caller gets 503 with the job's id: the job itself is safe in Redis and runs when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from api.admission import Admitted
from api.events import Event, JobEvents, StreamGap
from api.jobs import cancel_job, read_job
from api.state import Gate
from shared.errors import (
    BackendError,
    Conflict,
    GatewayError,
    GatewayTimeout,
    RedisUnavailable,
)
from shared.jobs import ErrorCode, JobStatus

log = logging.getLogger("gpugate.api")


def _error_response(error: GatewayError, headers: dict[str, str]) -> Response:
    return JSONResponse(error.body(), error.status, headers={**headers, **error.headers})


def outcome_response(
    job_id: str,
    status: JobStatus,
    http_status: int | None,
    content_type: str,
    result: str,
    error: dict[str, Any] | None,
    headers: dict[str, str],
) -> Response:
    """A finished job as the synchronous caller's answer."""
    if http_status is not None and status in (JobStatus.SUCCEEDED, JobStatus.FAILED):
        # Ollama answered: its status and body, unchanged (also its own errors).
        return Response(result.encode(), http_status, headers, media_type=content_type or None)
    error = error or {}
    if status is JobStatus.CANCELLED:
        if error.get("code") == "deadline_exceeded":
            return _error_response(
                GatewayTimeout(
                    "The job was still queued when GPUGATE_SYNC_TIMEOUT passed.",
                    job_id=job_id,
                    status=status.value,
                ),
                headers,
            )
        return _error_response(Conflict("The job was cancelled.", job_id=job_id), headers)
    message = str(error.get("message", "Ollama failed."))
    return _error_response(BackendError(message, job_id=job_id), headers)


def _end_response(event: Event, job_id: str, headers: dict[str, str]) -> Response:
    """The answer carried by a synchronous job's `end` event (finish.lua puts it there)."""
    error = event.text("error")
    http_status = event.text("http_status")
    return outcome_response(
        job_id,
        JobStatus(event.text("status")),
        int(http_status) if http_status else None,
        event.text("content_type"),
        event.text("result"),
        json.loads(error) if error else None,
        headers,
    )


class JobRelay(Response):
    """A Response to FastAPI; what it sends is decided while it runs."""

    def __init__(self, gate: Gate, owner: str, job_id: str, headers: dict[str, str]) -> None:
        self.background = None
        self.status_code = 200
        self.gate = gate
        self.owner = owner
        self.job_id = job_id
        self.relay_headers = {**headers, "X-Gpugate-Job-Id": job_id}
        self.raw_headers = _raw_headers(self.relay_headers)
        """What a middleware reading `.headers` sees: the headers known before the job
        answers (its id, the rate limits); the rest is decided while it relays."""
        self.deadline = time.monotonic() + gate.settings.sync_timeout
        self.finished = False

    @classmethod
    def of(cls, gate: Gate, admitted: Admitted) -> JobRelay:
        """The answer of an admitted synchronous call (api/edge.py relays it)."""
        return cls(gate, admitted.owner, admitted.job_id, admitted.rate_limit.headers())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._relay_until_left(receive, send)
        finally:
            self.gate.inbox.forget(self.job_id)

    async def _relay_until_left(self, receive: Receive, send: Send) -> None:
        ended = self.gate.inbox.ended(self.job_id)
        relay = asyncio.create_task(
            self._relay(send) if ended is None else self._answer(ended, send)
        )
        left = asyncio.create_task(_client_left(receive))
        done, _ = await asyncio.wait({relay, left}, return_when=asyncio.FIRST_COMPLETED)
        if relay in done:
            left.cancel()
            await asyncio.gather(left, return_exceptions=True)
            relay.result()
            return
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        if not self.finished:
            await asyncio.shield(self._cancel("client_disconnected", "The client disconnected."))

    async def _cancel(self, code: str, message: str) -> None:
        with contextlib.suppress(GatewayError):
            await cancel_job(self.gate, self.owner, self.job_id, code=code, message=message)

    async def _answer(self, ended: asyncio.Future[Event], send: Send) -> None:
        """A call that is not streamed: its end arrives in the process's inbox."""
        end: Event | None = None
        try:
            async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                end = await ended
            self.finished = True
        except TimeoutError:
            pass
        except RedisUnavailable as exc:
            self.finished = True  # nothing to cancel without Redis; the job lives on
            await self._unavailable(exc, send)
            return
        response = await self._final_response(end)
        await response({"type": "http"}, _no_receive, send)

    async def _unavailable(self, exc: RedisUnavailable, send: Send) -> None:
        unavailable = JSONResponse(
            {**exc.body(), "job_id": self.job_id},
            exc.status,
            headers={**self.relay_headers, **exc.headers},
        )
        await unavailable({"type": "http"}, _no_receive, send)

    async def _relay(self, send: Send) -> None:
        started = False
        end: Event | None = None
        events = JobEvents(self.gate.blocking_redis, self.job_id, self.deadline)
        try:
            async for batch in events:
                chunks: list[bytes] = []
                for event in batch:
                    if event.kind == "head":
                        started = True
                        events.deadline = None  # a stream that began is not cut short
                        await send(
                            {
                                "type": "http.response.start",
                                "status": int(event.text("status")),
                                "headers": _raw_headers(
                                    {**self.relay_headers, "content-type": event.text("ctype")}
                                ),
                            }
                        )
                    elif event.kind == "chunk":
                        chunks.append(event.fields[b"data"])
                    elif event.kind == "end":
                        self.finished = True
                        end = event
                if chunks:  # what piled up since the last read goes out together
                    await send(
                        {"type": "http.response.body", "body": b"".join(chunks), "more_body": True}
                    )
        except StreamGap as exc:
            log.error("job %s: stream relay incomplete: %s", self.job_id, exc)
            if not started:
                raise
            self.finished = True
        except RedisUnavailable as exc:
            if not started:
                self.finished = True  # nothing to cancel without Redis; the job lives on
                await self._unavailable(exc, send)
                return
            log.warning("job %s: Redis went away mid-stream; the stream ends early", self.job_id)
            self.finished = True
        if started:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        response = await self._final_response(end)
        await response({"type": "http"}, _no_receive, send)

    async def _final_response(self, end: Event | None) -> Response:
        if end is not None and (b"http_status" in end.fields or b"error" in end.fields):
            return _end_response(end, self.job_id, self.relay_headers)
        if not self.finished:
            status = await self._timeout()
            error = GatewayTimeout(
                "The job did not finish within GPUGATE_SYNC_TIMEOUT.",
                job_id=self.job_id,
                status=status,
            )
            return _error_response(error, self.relay_headers)
        job = (await read_job(self.gate, self.owner, self.job_id)).job
        return outcome_response(
            job.id,
            job.status,
            job.http_status,
            job.content_type,
            job.result,
            job.error,
            self.relay_headers,
        )

    async def _timeout(self) -> str:
        """The sync deadline passed: cancel the job if still queued; say what it is now."""
        try:
            previous = await cancel_job(
                self.gate,
                self.owner,
                self.job_id,
                code=ErrorCode.DEADLINE_EXCEEDED,
                message="The job was still queued when GPUGATE_SYNC_TIMEOUT passed.",
                only_if_queued=True,
            )
        except Conflict:
            return (await read_job(self.gate, self.owner, self.job_id)).job.status.value
        self.finished = True
        return JobStatus.RUNNING if previous == JobStatus.RUNNING else JobStatus.CANCELLED


def _raw_headers(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in headers.items()]


async def _client_left(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _no_receive() -> dict[str, object]:
    return {"type": "http.disconnect"}
