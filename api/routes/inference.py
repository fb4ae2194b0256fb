"""Synchronous inference, OpenAI-compatible and Ollama-native, and the metadata passthrough."""

from __future__ import annotations

import httpx
from fastapi import APIRouter, Request
from starlette.responses import Response

from api.admission import JobRequest, admit
from api.bodies import (
    ChatBody,
    ChatCompletionBody,
    CompletionBody,
    GenerateBody,
    Inference,
    streams,
)
from api.identity import identify
from api.ratelimit import check_cheap_limit
from api.relay import JobRelay
from api.state import gate
from shared.errors import BackendError

router = APIRouter()


async def run_sync(request: Request, endpoint: str, body: Inference) -> Response:
    """Admit, queue and relay one synchronous call (the body goes to Ollama as sent)."""
    g = gate(request)
    who = identify(request, g.keyring, g.trusted, g.settings.require_api_key)
    raw = await request.body()
    job = JobRequest(
        endpoint=endpoint,
        body=raw.decode(),
        stream=streams(endpoint, body.stream),
        sync=True,
        deadline_s=g.settings.sync_timeout,
    )
    admitted = await admit(g, who, job)
    return JobRelay(g, who.owner, admitted.job_id, admitted.rate_limit.headers())


@router.post("/v1/chat/completions", tags=["openai"])
async def chat_completions(request: Request, body: ChatCompletionBody) -> Response:
    return await run_sync(request, "/v1/chat/completions", body)


@router.post("/v1/completions", tags=["openai"])
async def completions(request: Request, body: CompletionBody) -> Response:
    return await run_sync(request, "/v1/completions", body)


@router.post("/api/generate", tags=["ollama"])
async def generate(request: Request, body: GenerateBody) -> Response:
    return await run_sync(request, "/api/generate", body)


@router.post("/api/chat", tags=["ollama"])
async def chat(request: Request, body: ChatBody) -> Response:
    return await run_sync(request, "/api/chat", body)


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
