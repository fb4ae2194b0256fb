"""Body size: a request body over GPUGATE_MAX_BODY_BYTES is refused with 413 as it streams
in; at most the limit is ever buffered."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.paths import route_path
from shared.errors import RequestTooLarge

UNLIMITED_PREFIX = "/api/blobs/"
"""Model blobs (GBs) stream through to Ollama: only the admin and model managers may."""
BODY = "gpugate.body"
"""Scope key of the whole request body, once read (`api.edge` admits from it)."""


FILES_PATH = "/v1/files"
"""Batch input files have their own limit (GPUGATE_MAX_BATCH_FILE_BYTES, api/files.py)."""
MULTIPART_MARGIN = 64 * 1024
"""Room for the multipart envelope around a file of the largest size."""


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, file_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.file_bytes = max_bytes if file_bytes is None else file_bytes + MULTIPART_MARGIN

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] in ("GET", "HEAD", "OPTIONS")
            or route_path(scope).startswith(UNLIMITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        limit = self.file_bytes if route_path(scope) == FILES_PATH else self.max_bytes
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, limit)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(scope, receive, send, limit)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        scope[BODY] = body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        error = RequestTooLarge(f"The request body is larger than {limit} bytes.")
        response = JSONResponse(
            error.body(), error.status, headers={"Connection": "close", **error.headers}
        )
        await response(scope, receive, send)
