"""The inference paths Ollama serves, as both sides of the gate see them.

Each costs one request token, waits in the queue and runs under a GPU slot; each is also
an `endpoint` of `POST /v1/jobs`. Workers call Ollama only at these paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Api(StrEnum):
    OLLAMA = "ollama"
    OPENAI = "openai"
    ANTHROPIC = "anthropic"


@dataclass(frozen=True)
class Endpoint:
    path: str
    api: Api
    can_stream: bool
    """False for embeddings: never streamed."""

    def streams(self, stream: bool | None) -> bool:
        """Ollama streams by default on /api/*; the OpenAI and Anthropic paths do not."""
        if not self.can_stream:
            return False
        return self.api is Api.OLLAMA if stream is None else stream

    @property
    def sse(self) -> bool:
        """Streams as server-sent events (else NDJSON)."""
        return self.api is not Api.OLLAMA


INFERENCE: dict[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint("/api/generate", Api.OLLAMA, can_stream=True),
        Endpoint("/api/chat", Api.OLLAMA, can_stream=True),
        Endpoint("/api/embed", Api.OLLAMA, can_stream=False),
        Endpoint("/api/embeddings", Api.OLLAMA, can_stream=False),
        Endpoint("/v1/chat/completions", Api.OPENAI, can_stream=True),
        Endpoint("/v1/completions", Api.OPENAI, can_stream=True),
        Endpoint("/v1/embeddings", Api.OPENAI, can_stream=False),
        Endpoint("/v1/responses", Api.OPENAI, can_stream=True),
        Endpoint("/v1/messages", Api.ANTHROPIC, can_stream=True),
    )
}
