"""Request bodies, checked once, before anything is queued (api/edge.py). Only what gpugate
relies on is checked (the model, the stream flag, what the endpoint cannot do without);
everything else is Ollama's to judge and is relayed as sent.

Bodies are JSON whatever the Content-Type (absent, form-encoded, text/plain: what
`curl -d`, LiteLLM and `hey` send), as Ollama reads them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

from shared.errors import InvalidRequest

ModelName = Annotated[StrictStr, Field(min_length=1, max_length=512)]
TokenCount = Annotated[StrictInt, Field(ge=0)]


class Inference(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: ModelName
    stream: StrictBool | None = None

    def named_max_tokens(self) -> int:
        """The most tokens the request may generate, when it names a limit (0: none)."""
        fields = {**(self.model_extra or {}), **self.__dict__}
        options = fields.get("options")
        candidates = [fields.get(name) for name in _MAX_TOKENS]
        if isinstance(options, dict):
            candidates.append(options.get("num_predict"))
        for value in candidates:
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
        return 0


_MAX_TOKENS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


class ChatCompletionBody(Inference):
    """OpenAI `POST /v1/chat/completions`."""

    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]


class CompletionBody(Inference):
    """OpenAI `POST /v1/completions`."""

    prompt: StrictStr | list[StrictStr]


class EmbeddingsBody(Inference):
    """OpenAI `POST /v1/embeddings` and Ollama `POST /api/embed`: never streamed."""

    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


class ResponsesBody(Inference):
    """OpenAI Responses `POST /v1/responses`, as Ollama serves it."""

    input: StrictStr | list[Any]


class MessagesBody(Inference):
    """Anthropic Messages `POST /v1/messages`, as Ollama serves it."""

    messages: Annotated[list[dict[str, Any]], Field(min_length=1)]
    max_tokens: TokenCount | None = None


class GenerateBody(Inference):
    """Ollama `POST /api/generate`."""

    prompt: StrictStr | None = None


class ChatBody(Inference):
    """Ollama `POST /api/chat`."""

    messages: list[dict[str, Any]] | None = None


class LegacyEmbeddingsBody(Inference):
    """Ollama `POST /api/embeddings` (its older embedding form)."""

    prompt: StrictStr


BODIES: dict[str, type[Inference]] = {
    "/api/generate": GenerateBody,
    "/api/chat": ChatBody,
    "/api/embed": EmbeddingsBody,
    "/api/embeddings": LegacyEmbeddingsBody,
    "/v1/chat/completions": ChatCompletionBody,
    "/v1/completions": CompletionBody,
    "/v1/embeddings": EmbeddingsBody,
    "/v1/responses": ResponsesBody,
    "/v1/messages": MessagesBody,
}

InferenceEndpoint = Literal[
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
]


class JobBody(BaseModel):
    """`POST /v1/jobs`."""

    model_config = ConfigDict(extra="forbid")

    endpoint: InferenceEndpoint
    body: dict[str, Any]
    deadline_s: Annotated[float, Field(gt=0, le=7 * 86400)] | None = None
    """Past this many seconds, a job still queued is cancelled (`deadline_exceeded`)."""


def field_errors(exc: ValidationError, prefix: str = "") -> str:
    """`messages: Field required; model: Input should be a valid string`."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(
            f"{prefix}{loc}: {err['msg']}" if loc else f"{prefix.rstrip('.')}: {err['msg']}"
        )
    return "; ".join(parts)


def parse(model: type[BaseModel], raw: bytes | dict[str, Any], prefix: str = "") -> Any:
    """`raw` validated by `model`, or the SPEC's 400 (not JSON) / 422 (naming the field)."""
    if not raw and not isinstance(raw, dict):
        raise InvalidRequest("body: Field required")
    try:
        if isinstance(raw, dict):
            return model.model_validate(raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise InvalidRequest("The body is not valid JSON.", status=400) from exc
        raise InvalidRequest(field_errors(exc, prefix)) from exc
