"""Request parsing: one validated Job from the body of each of the nine APIs."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpugate.sim.apis import INVALID_REQUEST, Api, ApiError, new_id
from gpugate.sim.content import count_tokens
from gpugate.sim.golang import decode_object, go_json_type, parse_go_duration, typed_field
from gpugate.sim.messages import chat_material, message_text, prompt_material, responses_input
from gpugate.sim.models import SimModel
from gpugate.sim.names import model_key


@dataclass
class Job:
    """One validated inference request."""

    api: Api
    model: str
    material: str
    prompt_tokens: int
    num_predict: int | None = None
    stream: bool = True
    include_usage: bool = False
    action: str | None = None  # "load" / "unload": an empty prompt only (un)loads the model
    request_id: str = ""
    keep_alive_s: float | None = None  # None: not given; math.inf: keep it loaded
    inputs: list[str] = field(default_factory=list)  # what an embedding request embeds
    dimensions: int = 0
    as_base64: bool = False  # /v1/embeddings' encoding_format
    echo: dict[str, Any] = field(default_factory=dict)  # what a /v1/responses answer repeats
    target: SimModel | None = None


_GO_STRUCTS = {
    Api.GENERATE: "api.GenerateRequest",
    Api.CHAT: "api.ChatRequest",
    Api.EMBED: "api.EmbedRequest",
    Api.EMBEDDINGS: "api.EmbeddingRequest",
    Api.OPENAI_CHAT: "openai.ChatCompletionRequest",
    Api.OPENAI_COMPLETION: "openai.CompletionRequest",
    Api.OPENAI_EMBEDDINGS: "openai.EmbedRequest",
    Api.OPENAI_RESPONSES: "openai.ResponsesRequest",
    Api.ANTHROPIC_MESSAGES: "anthropic.MessagesRequest",
}


def decode_body(api: Api, body: bytes) -> dict[str, Any]:
    """The request object, or the 400 Ollama's (Go) JSON binding would give."""
    eof = "missing request body" if api.native else "EOF"
    return decode_object(body, _GO_STRUCTS[api], eof)


def get_field(api: Api, data: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """`data[name]` if it has the type Go expects, `default` if absent or null, else 400."""
    return typed_field(_GO_STRUCTS[api], data, name, kind, default)


MAX_NUM_PREDICT = 1 << 31
"""Ollama reads num_predict as an int32; anything larger (even infinity) is no limit."""


def _num_predict(options: Mapping[str, Any]) -> int | None:
    value = options.get("num_predict")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value <= 0:  # NaN, zero, negative: no limit
        return None
    return int(min(value, MAX_NUM_PREDICT))


def _keep_alive(data: Mapping[str, Any]) -> float | None:
    """api.Duration's reading of keep_alive: seconds, math.inf for a negative value."""
    value = data.get("keep_alive")
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        try:
            seconds = parse_go_duration(value)
        except ValueError as exc:
            raise ApiError(400, str(exc), INVALID_REQUEST) from None
    else:
        kind = {bool: "bool", list: "[]interface {}"}.get(type(value), "map[string]interface {}")
        raise ApiError(400, f"Unsupported type: '{kind}'", INVALID_REQUEST)
    return math.inf if seconds < 0 else seconds


def parse_generate(data: Mapping[str, Any]) -> Job:
    api = Api.GENERATE
    prompt = get_field(api, data, "prompt", str, "")
    system = get_field(api, data, "system", str, "")
    suffix = get_field(api, data, "suffix", str, "")
    return _native_job(api, data, prompt_material(system, prompt, suffix), bool(prompt))


def parse_chat(data: Mapping[str, Any]) -> Job:
    api = Api.CHAT
    messages = get_field(api, data, "messages", list, [])
    return _native_job(api, data, chat_material(messages), bool(messages))


def _native_job(api: Api, data: Mapping[str, Any], prompt: tuple[str, int], has_input: bool) -> Job:
    """An Ollama-native request; one with no prompt or messages loads or unloads the model."""
    material, prompt_tokens = prompt
    keep_alive_s = _keep_alive(data)
    return Job(
        api=api,
        model=get_field(api, data, "model", str, ""),
        material=material,
        prompt_tokens=prompt_tokens,
        num_predict=_num_predict(get_field(api, data, "options", dict, {})),
        stream=get_field(api, data, "stream", bool, True),
        action=None if has_input else ("unload" if keep_alive_s == 0 else "load"),
        keep_alive_s=keep_alive_s,
    )


def _embed_inputs(value: Any) -> list[str]:
    """/api/embed's `input`: a string (none if empty) or a list of strings."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value else []
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return list(value)
    raise ApiError(400, "invalid input type")


def _embedding_job(api: Api, data: Mapping[str, Any], inputs: list[str], **extra: Any) -> Job:
    return Job(
        api=api,
        model=get_field(api, data, "model", str, ""),
        material="",
        prompt_tokens=sum(max(1, count_tokens(text)) for text in inputs),
        stream=False,
        inputs=inputs,
        action=None if inputs else "load",
        **extra,
    )


def parse_embed(data: Mapping[str, Any]) -> Job:
    api = Api.EMBED
    get_field(api, data, "options", dict, {})
    dimensions = get_field(api, data, "dimensions", int, 0)
    keep_alive_s = _keep_alive(data)
    inputs = _embed_inputs(data.get("input"))
    return _embedding_job(api, data, inputs, dimensions=dimensions, keep_alive_s=keep_alive_s)


def parse_embeddings(data: Mapping[str, Any]) -> Job:
    api = Api.EMBEDDINGS
    get_field(api, data, "options", dict, {})
    prompt = get_field(api, data, "prompt", str, "")
    keep_alive_s = _keep_alive(data)
    return _embedding_job(api, data, [prompt] if prompt else [], keep_alive_s=keep_alive_s)


def parse_openai_embeddings(data: Mapping[str, Any]) -> Job:
    api = Api.OPENAI_EMBEDDINGS
    dimensions = get_field(api, data, "dimensions", int, 0)
    encoding = get_field(api, data, "encoding_format", str, "")
    if encoding and encoding.lower() not in ("float", "base64"):
        message = (
            f"Invalid value for 'encoding_format' = {encoding}. "
            "Supported values: ['float', 'base64']."
        )
        raise ApiError(400, message, INVALID_REQUEST)
    raw = data.get("input")
    if raw == "":
        raw = [""]
    if raw is None or raw == []:
        raise ApiError(400, "invalid input", INVALID_REQUEST)
    as_base64 = encoding.lower() == "base64"
    return _embedding_job(api, data, _embed_inputs(raw), dimensions=dimensions, as_base64=as_base64)


def _include_usage(api: Api, data: Mapping[str, Any]) -> bool:
    stream_options = get_field(api, data, "stream_options", dict, {})
    return stream_options.get("include_usage") is True


def _openai_job(
    api: Api,
    data: Mapping[str, Any],
    material: str,
    prompt_tokens: int,
    id_prefix: str,
    action: str | None = None,
) -> Job:
    """The fields both OpenAI-compatible endpoints read the same way."""
    max_tokens = get_field(api, data, "max_tokens", int, 0)
    return Job(
        api=api,
        model=get_field(api, data, "model", str, ""),
        material=material,
        prompt_tokens=prompt_tokens,
        num_predict=max_tokens if max_tokens > 0 else None,
        stream=get_field(api, data, "stream", bool, False),
        include_usage=_include_usage(api, data),
        action=action,
        request_id=f"{id_prefix}-{random.randrange(999)}",
    )


def parse_openai_chat(data: Mapping[str, Any]) -> Job:
    api = Api.OPENAI_CHAT
    messages = get_field(api, data, "messages", list, [])
    if not messages:
        raise ApiError(400, "[] is too short - 'messages'", INVALID_REQUEST)
    material, prompt_tokens = chat_material(messages)
    return _openai_job(api, data, material, prompt_tokens, "chatcmpl")


def parse_openai_completion(data: Mapping[str, Any]) -> Job:
    api = Api.OPENAI_COMPLETION
    prompt = get_field(api, data, "prompt", str, "")
    material, prompt_tokens = prompt_material("", prompt, get_field(api, data, "suffix", str, ""))
    return _openai_job(
        api, data, material, prompt_tokens, "cmpl", action=None if prompt else "load"
    )


_RESPONSES_ECHO: dict[str, type] = {
    "instructions": str,
    "truncation": str,
    "tools": list,
    "text": dict,
    "reasoning": dict,
    "temperature": float,
    "top_p": float,
    "max_output_tokens": int,
    "background": bool,
}


def parse_openai_responses(data: Mapping[str, Any]) -> Job:
    """/v1/responses, read as openai.FromResponsesRequest turns it into a chat request."""
    api = Api.OPENAI_RESPONSES
    echo = {name: get_field(api, data, name, kind, None) for name, kind in _RESPONSES_ECHO.items()}
    messages = [{"role": "system", "content": echo["instructions"]}] if echo["instructions"] else []
    messages += responses_input(data.get("input"))
    material, prompt_tokens = chat_material(messages)
    max_output = echo["max_output_tokens"]
    return Job(
        api=api,
        model=get_field(api, data, "model", str, ""),
        material=material,
        prompt_tokens=prompt_tokens,
        num_predict=None if max_output is None else _num_predict({"num_predict": max_output}),
        stream=get_field(api, data, "stream", bool, False),
        action=None if messages else "load",
        request_id=f"resp_{random.randrange(999999)}",
        echo=echo,
    )


def parse_anthropic(data: Mapping[str, Any]) -> Job:
    """/v1/messages, validated as Ollama's AnthropicMessagesMiddleware does."""
    api = Api.ANTHROPIC_MESSAGES
    model_name = get_field(api, data, "model", str, "")
    max_tokens = get_field(api, data, "max_tokens", int, 0)
    messages = get_field(api, data, "messages", list, [])
    stream = get_field(api, data, "stream", bool, False)
    if not model_name:
        raise ApiError(400, "model is required")
    if max_tokens <= 0:
        raise ApiError(400, "max_tokens is required and must be positive")
    if not messages:
        raise ApiError(400, "messages is required")
    system = message_text(data.get("system"))
    conversation = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if not isinstance(message, dict):
            kind = go_json_type(message)
            message_type = "anthropic.MessageParam"
            raise ApiError(
                400, f"json: cannot unmarshal {kind} into Go value of type {message_type}"
            )
        role = str(message.get("role", "")).lower()
        conversation.append({"role": role, "content": message_text(message.get("content"))})
    material, prompt_tokens = chat_material(conversation)
    return Job(
        api=api,
        model=model_name,
        material=material,
        prompt_tokens=prompt_tokens,
        num_predict=max_tokens,
        stream=stream,
        request_id=new_id("msg"),
    )


_PARSERS: dict[Api, Callable[[Mapping[str, Any]], Job]] = {
    Api.GENERATE: parse_generate,
    Api.CHAT: parse_chat,
    Api.EMBED: parse_embed,
    Api.EMBEDDINGS: parse_embeddings,
    Api.OPENAI_CHAT: parse_openai_chat,
    Api.OPENAI_COMPLETION: parse_openai_completion,
    Api.OPENAI_EMBEDDINGS: parse_openai_embeddings,
    Api.OPENAI_RESPONSES: parse_openai_responses,
    Api.ANTHROPIC_MESSAGES: parse_anthropic,
}


def parse_request(api: Api, body: bytes, models: Mapping[str, SimModel]) -> Job:
    """A validated Job naming the model it runs on, or the ApiError Ollama would answer."""
    job = _PARSERS[api](decode_body(api, body))
    if not job.model.strip():
        raise ApiError(400, "model is required")
    target = models.get(model_key(job.model))
    if target is None:
        raise ApiError(404, f'model "{job.model}" not found, try pulling it first')
    if target.embedding and api.verb:
        raise ApiError(400, f"{json.dumps(job.model)} does not support {api.verb}")
    job.target = target
    return job


def name_field(struct_name: str, data: Mapping[str, Any]) -> str:
    """`model`, or the deprecated `name` (Go's cmp.Or)."""
    model: str = typed_field(struct_name, data, "model", str, "")
    return model or typed_field(struct_name, data, "name", str, "")
