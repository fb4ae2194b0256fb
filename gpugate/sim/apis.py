"""The nine inference APIs, their content types, and the error body each one answers."""

from __future__ import annotations

import secrets
from enum import Enum
from typing import Any

JSON_TYPE = "application/json; charset=utf-8"
PLAIN_JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
SSE_TYPE = "text/event-stream"
INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
API_ERROR = "api_error"


class Api(Enum):
    """The API a request came in on: Ollama's native, OpenAI's or Anthropic's."""

    GENERATE = "generate"
    CHAT = "chat"
    EMBED = "embed"
    EMBEDDINGS = "embeddings"
    OPENAI_CHAT = "openai_chat"
    OPENAI_COMPLETION = "openai_completion"
    OPENAI_EMBEDDINGS = "openai_embeddings"
    OPENAI_RESPONSES = "openai_responses"
    ANTHROPIC_MESSAGES = "anthropic_messages"

    @property
    def native(self) -> bool:
        return self in (Api.GENERATE, Api.CHAT, Api.EMBED, Api.EMBEDDINGS)

    @property
    def openai(self) -> bool:
        return self in (
            Api.OPENAI_CHAT,
            Api.OPENAI_COMPLETION,
            Api.OPENAI_EMBEDDINGS,
            Api.OPENAI_RESPONSES,
        )

    @property
    def embeds(self) -> bool:
        return self in (Api.EMBED, Api.EMBEDDINGS, Api.OPENAI_EMBEDDINGS)

    @property
    def verb(self) -> str:
        """What Ollama says an embedding model does not support ("" for embedding APIs)."""
        if self.embeds:
            return ""
        return "generate" if self in (Api.GENERATE, Api.OPENAI_COMPLETION) else "chat"


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def openai_error(message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


class ApiError(Exception):
    """An error answer; `openai_type` is the `type` it gets in Ollama 0.6's OpenAI shape."""

    def __init__(self, status: int, message: str, openai_type: str = API_ERROR) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.openai_type = openai_type

    def body(self, api: Api) -> dict[str, Any]:
        if api is Api.ANTHROPIC_MESSAGES:
            error = {"type": _ANTHROPIC_TYPES.get(self.status, API_ERROR), "message": self.message}
            return {"type": "error", "error": error, "request_id": new_id("req")}
        if api is Api.OPENAI_RESPONSES:
            kind = {400: INVALID_REQUEST, 404: NOT_FOUND}.get(self.status, API_ERROR)
            return openai_error(self.message, kind)
        if api.openai:
            return openai_error(self.message, self.openai_type)
        return {"error": self.message}

    def content_type(self, api: Api) -> str:
        return JSON_TYPE if api.native else PLAIN_JSON_TYPE
