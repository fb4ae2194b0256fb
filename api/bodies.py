"""Request bodies, checked before anything is queued. Only what gpugate relies on is
checked (the model, the stream flag, the messages or prompt); everything else is Ollama's
to judge and is relayed as sent."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, ValidationError

from shared.errors import InvalidRequest

ModelName = Annotated[StrictStr, Field(min_length=1, max_length=512)]


class Inference(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: ModelName
    stream: StrictBool | None = None


class ChatCompletionBody(Inference):
    """OpenAI `POST /v1/chat/completions`."""

    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]


class CompletionBody(Inference):
    """OpenAI `POST /v1/completions`."""

    prompt: StrictStr | list[StrictStr]


class GenerateBody(Inference):
    """Ollama `POST /api/generate`."""

    prompt: StrictStr | None = None


class ChatBody(Inference):
    """Ollama `POST /api/chat`."""

    messages: list[dict[str, Any]] | None = None


BODIES: dict[str, type[Inference]] = {
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/api/generate": GenerateBody,
    "/api/chat": ChatBody,
}

InferenceEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat"]


class JobBody(BaseModel):
    """`POST /v1/jobs`."""

    model_config = ConfigDict(extra="forbid")

    endpoint: InferenceEndpoint
    body: dict[str, Any]
    deadline_s: Annotated[float, Field(gt=0, le=7 * 86400)] | None = None
    """Past this many seconds, a job still queued is cancelled (`deadline_exceeded`)."""


def streams(endpoint: str, stream: bool | None) -> bool:
    """Ollama streams by default on /api/*, OpenAI-compatible endpoints do not."""
    return endpoint.startswith("/api/") if stream is None else stream


def field_errors(exc: ValidationError, prefix: str = "") -> str:
    """`messages: Field required; model: Input should be a valid string`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "body")
        parts.append(f"{prefix}{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(parts)


def check_inference(endpoint: str, body: dict[str, Any], prefix: str = "") -> None:
    try:
        BODIES[endpoint].model_validate(body)
    except ValidationError as exc:
        raise InvalidRequest(field_errors(exc, prefix)) from exc
