"""The HTTP plumbing: request bodies, disconnects, streamed answers and JSON answers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive, Send

from gpugate.sim.apis import JSON_TYPE, ApiError
from gpugate.sim.golang import encode_json


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def wait_for_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def send_whole(send: Send, status: int, content_type: str, body: bytes) -> None:
    headers = [(b"content-type", content_type.encode()), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class StreamWriter:
    """A chunked 200 answer whose headers go out with the first piece, as in Ollama."""

    def __init__(self, send: Send, content_type: str) -> None:
        self._send = send
        self._content_type = content_type
        self._started = False

    async def write(self, data: bytes, *, last: bool = False) -> None:
        if not self._started:
            self._started = True
            headers = [(b"content-type", self._content_type.encode())]
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._send({"type": "http.response.body", "body": data, "more_body": not last})

    async def write_all(self, chunks: list[bytes]) -> None:
        """The last chunks of the answer, the final one ending it."""
        for index, chunk in enumerate(chunks):
            await self.write(chunk, last=index == len(chunks) - 1)


async def until_disconnect(work: Coroutine[Any, Any, object], receive: Receive) -> str:
    """Run `work` unless the client goes away first: "completed" or "cancelled"."""
    work_task = asyncio.ensure_future(work)
    watch_task = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({work_task, watch_task}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancelled = not work_task.done()
        for task in (work_task, watch_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if cancelled:
        return "cancelled"
    work_task.result()
    return "completed"


class Holds:
    """What a request holds (its model, its slot), given back once, latest first."""

    def __init__(self) -> None:
        self._releases: list[Callable[[], None]] = []

    def add(self, release: Callable[[], None]) -> None:
        self._releases.append(release)

    def release(self) -> None:
        while self._releases:
            self._releases.pop()()

    def releasing(self, send: Send) -> Send:
        """`send`, giving everything back just before the answer's last byte: generation is
        over then (as on a GPU), so a client that has the whole answer never sees it held."""

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.release()
            await send(message)

        return wrapped


def json_response(value: Any, status: int = 200, media_type: str = JSON_TYPE) -> Response:
    return Response(encode_json(value), status_code=status, media_type=media_type)


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


def native_errors(endpoint: Endpoint) -> Endpoint:
    """An endpoint whose ApiError becomes Ollama's native `{"error": ...}` answer."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as error:
            return error_response(error.status, error.message)

    return wrapped
