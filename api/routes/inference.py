"""Synchronous inference, OpenAI-compatible and Ollama-native, and the metadata passthrough.

Inference requests are admitted before they get here (api/edge.py); each route's `body`
parameter is what FastAPI validates, and what the OpenAPI schema shows.
"""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Request
from starlette.responses import Response

from api.bodies import ChatBody, ChatCompletionBody, CompletionBody, GenerateBody
from api.edge import admission
from api.ratelimit import check_cheap_limit
from api.relay import JobRelay
from api.state import gate
from shared.errors import BackendError

router = APIRouter()


def run_sync(request: Request) -> Response:
    """Relay the job of one synchronous call, admitted at the edge (api/edge.py)."""
    admitted = admission(request)
    return JobRelay(gate(request), admitted.owner, admitted.job_id, admitted.rate_limit.headers())


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(request: Request, body: ChatCompletionBody) -> Response:
    return run_sync(request)


@router.post("/v1/completions", tags=["openai"])
async def completions(request: Request, body: CompletionBody) -> Response:
    return run_sync(request)


@router.post("/api/generate", tags=["ollama"])
async def generate(request: Request, body: GenerateBody) -> Response:
    return run_sync(request)


@router.post("/api/chat", tags=["ollama"])
async def chat(request: Request, body: ChatBody) -> Response:
    return run_sync(request)


async def passthrough(request: Request, path: str) -> Response:
    """Metadata straight from Ollama: no GPU slot, no inference token; the /health limit."""
    g = gate(request)
    await check_cheap_limit(g, request)
    try:
        upstream = await g.http.get(g.settings.ollama_url + path)
    except httpx.HTTPError as exc:
        raise BackendError(f"Ollama unreachable: {exc.__class__.__name__}") from exc
    return Response(
        upstream.content,
        upstream.status_code,
        media_type=upstream.headers.get("content-type", "application/json"),
    )


@router.get("/v1/models", tags=["openai"])
async def models(request: Request) -> Response:
    return await passthrough(request, "/v1/models")


@router.get("/api/tags", tags=["ollama"])
async def tags(request: Request) -> Response:
    return await passthrough(request, "/api/tags")


@router.get("/api/version", tags=["ollama"])
async def version(request: Request) -> Response:
    return await passthrough(request, "/api/version")


@router.get("/api/ps", tags=["ollama"])
async def ps(request: Request) -> Response:
    return await passthrough(request, "/api/ps")
