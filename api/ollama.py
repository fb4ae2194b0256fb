"""What the API asks Ollama itself, without a job: metadata (no GPU slot, the /health
limit) and model management (for those allowed). With several backends, metadata is the
fleet's: the union of what they list, the lowest version, a model's details from a backend
that has it. `openai` backends (llama-server, vLLM, ...) answer only OpenAI's `/v1/models`;
the Ollama-native metadata is the Ollama backends'.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from api.state import Gate
from shared.errors import BackendError
from shared.settings import Backend

HOP_HEADERS = {"content-length", "transfer-encoding", "connection", "keep-alive", "date", "server"}


def _relayed(upstream: httpx.Response, head: bool = False) -> Response:
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    if head and "content-length" in upstream.headers:
        headers["content-length"] = upstream.headers["content-length"]
    return Response(b"" if head else upstream.content, upstream.status_code, headers)


async def _ask(gate: Gate, backend: Backend, method: str, path: str, body: bytes) -> httpx.Response:
    headers = {**_json_headers(body), **backend.auth_headers()}
    return await gate.http.request(
        method, backend.url + path, content=body or None, headers=headers
    )


def _json_headers(body: bytes) -> dict[str, str]:
    return {"content-type": "application/json"} if body else {}


async def _ask_all(
    gate: Gate, backends: tuple[Backend, ...], method: str, path: str, body: bytes = b""
) -> list[tuple[Backend, httpx.Response]]:
    answers = await asyncio.gather(
        *(_ask(gate, b, method, path, body) for b in backends), return_exceptions=True
    )
    answered = [
        (b, a) for b, a in zip(backends, answers, strict=True) if isinstance(a, httpx.Response)
    ]
    if not answered:
        failure = next(a for a in answers if isinstance(a, BaseException))
        raise BackendError(f"Ollama unreachable: {failure.__class__.__name__}")
    return answered


async def metadata(gate: Gate, request: Request, path: str) -> Response:
    """Relay a metadata call; with several backends, merge their answers."""
    method = request.method
    body = await request.body() if method == "POST" else b""
    backends = _answering(gate.settings.backends, path)
    if not backends:
        return _no_ollama(path, body)
    answered = await _ask_all(gate, backends, "GET" if method == "HEAD" else method, path, body)
    if len(backends) == 1 or method == "HEAD":
        return _relayed(answered[0][1], head=method == "HEAD")
    ok = [a for _, a in answered if a.is_success]
    if path in ("/api/tags", "/api/ps") and ok:
        return JSONResponse({"models": _union([a.json().get("models", []) for a in ok], "name")})
    if path == "/v1/models" and ok:
        return JSONResponse(
            {"object": "list", "data": _union([a.json().get("data", []) for a in ok], "id")}
        )
    if path == "/api/version" and ok:
        versions = [str(a.json().get("version", "")) for a in ok]
        return JSONResponse({"version": min(versions, key=_version_key)})
    # a model's details (POST /api/show, GET /v1/models/{model}): from one that has it
    return _relayed(ok[0] if ok else answered[0][1])


def _answering(backends: tuple[Backend, ...], path: str) -> tuple[Backend, ...]:
    """The backends to ask: all for OpenAI's model list, else the Ollama ones."""
    if path == "/v1/models" or path.startswith("/v1/models/"):
        return backends
    return tuple(b for b in backends if not b.openai)


def _no_ollama(path: str, body: bytes) -> Response:
    """Ollama's metadata from a fleet without Ollama: it has no models, and none to show."""
    if path in ("/api/tags", "/api/ps"):
        return JSONResponse({"models": []})
    if path == "/api/show":
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        model = request.get("model") or request.get("name") if isinstance(request, dict) else ""
        return JSONResponse({"error": f"model '{model or ''}' not found"}, status_code=404)
    return JSONResponse(
        {"error": "no Ollama backend behind this gateway (only OpenAI-compatible ones)"},
        status_code=404,
    )


def _union(lists: list[list[dict[str, Any]]], key: str) -> list[dict[str, Any]]:
    seen: dict[str, dict[str, Any]] = {}
    for items in lists:
        for item in items:
            seen.setdefault(str(item.get(key)), item)
    return list(seen.values())


def _version_key(version: str) -> tuple[int, ...]:
    parts = []
    for part in version.split("-")[0].split("."):
        parts.append(int(part) if part.isdigit() else 0)
    return tuple(parts)


async def manage(gate: Gate, request: Request, backend: Backend, path: str) -> Response:
    """Relay a model-management call to `backend`, its progress streamed as it comes."""
    body = request.stream() if request.method in ("POST", "PUT", "DELETE") else None
    try:
        upstream_request = gate.http.build_request(
            request.method,
            backend.url + path,
            content=body,
            headers={"content-type": request.headers.get("content-type", "application/json")},
            timeout=httpx.Timeout(None, connect=5.0),
        )
        upstream = await gate.http.send(upstream_request, stream=True)
    except httpx.HTTPError as exc:
        raise BackendError(f"Ollama unreachable: {exc.__class__.__name__}") from exc
    headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_HEADERS}
    if request.method == "HEAD":
        await upstream.aclose()
        return Response(b"", upstream.status_code, headers)
    return StreamingResponse(
        _chunks(upstream), upstream.status_code, headers, background=BackgroundTask(upstream.aclose)
    )


async def _chunks(upstream: httpx.Response) -> AsyncIterator[bytes]:
    async for chunk in upstream.aiter_raw():
        yield chunk
