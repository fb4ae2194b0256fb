"""An Ollama simulator: Ollama's HTTP API without a GPU, for tests, demos and benchmarks.

It serves what a client of Ollama 0.6 sees, so the official `ollama` and `openai` SDKs work
against it unchanged:

- native API: `POST /api/generate`, `POST /api/chat` (NDJSON stream by default, one JSON
  object with `"stream": false`), `GET /api/tags`, `GET /api/ps`, `GET /api/version`,
  `POST /api/show`, `GET /` ("Ollama is running");
- OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions` (JSON, or SSE
  with `"stream": true`, `stream_options.include_usage`), `GET /v1/models`,
  `GET /v1/models/{model}`;
- Ollama's error bodies: `{"error": "..."}` on the native API, `{"error": {"message", "type",
  "param", "code"}}` on /v1 (type `invalid_request_error` for what the OpenAI layer rejects
  itself, `api_error` for errors passed on from the native handlers, as Ollama 0.6 does).

Like Ollama, at most `parallel` requests generate at once (OLLAMA_NUM_PARALLEL); the others
wait in FIFO order for a slot without an answer (not even headers), and a client that goes
away stops its request at once, whether it waits for a slot, streams, or waits for a whole
reply.

Its own control API lives under `/sim/`: `GET /sim/stats` (counters and config),
`POST /sim/reset` (zero the counters), `PUT /sim/config` (change `tokens`, `token_delay_s`,
`parallel`, `fail_mode` live).

Where it differs from Ollama:

- the reply is not a model's: `tokens` words (fewer if `num_predict`/`max_tokens` caps it)
  chosen by a hash of (model, prompt or messages), so the same request always gets the same
  text; each token takes `token_delay_s`; token counts are words, not a tokenizer's;
- no model is ever loaded from disk: `load_duration` is the time spent waiting for a slot,
  a model shows in `/api/ps` once used (for 5 minutes), and sizes and digests are made up;
- an unknown model gets `model "x" not found, try pulling it first` (404) on both
  `/api/chat` and `/api/generate` (Ollama's /api/generate says `model 'x' not found`), and a
  missing model gets `model is required` (400) on both (Ollama's /api/generate answers 404);
- JSON syntax error texts only imitate Go's; images, tools, `format`, `think`, `keep_alive`
  durations, embeddings and model management (pull, push, create, copy, delete) are absent;
- `fail_mode` "error500" answers 500 `{"error": "simulated failure"}` (on /v1 in the OpenAI
  error shape), "hang" never answers; both only after the request was validated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DESCRIPTION = "An Ollama simulator: Ollama's HTTP API without a GPU."
OLLAMA_VERSION = "0.6.0"
FAIL_MODES = ("none", "error500", "hang")
KEEP_LOADED = timedelta(minutes=5)
JSON_TYPE = "application/json; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"
SSE_TYPE = "text/event-stream"
INVALID_REQUEST = "invalid_request_error"
API_ERROR = "api_error"

_WORDS = (
    "the sky is blue because light from sun scatters in air and short waves bend more "
    "so we see color across day while night sky turns dark with stars that shine far "
    "away beyond moon over sea where wind moves clouds past hills into cold quiet rain"
).split()


# --- configuration and counters ---------------------------------------------------------


@dataclass
class SimConfig:
    """What the simulator serves and how fast; all but `models` can change live."""

    models: list[str] = field(default_factory=lambda: ["llama3.2", "qwen2.5:0.5b"])
    tokens: int = 8
    token_delay_s: float = 0.02
    parallel: int = 4
    fail_mode: str = "none"


_LIVE_FIELDS: dict[str, tuple[type, ...]] = {
    "tokens": (int,),
    "token_delay_s": (int, float),
    "parallel": (int,),
    "fail_mode": (str,),
}


def updated_config(config: SimConfig, changes: Mapping[str, Any]) -> SimConfig:
    """`config` with `changes` applied; ValueError naming the first bad key or value."""
    values = asdict(config)
    for key, value in changes.items():
        kinds = _LIVE_FIELDS.get(key)
        if kinds is None:
            raise ValueError(f"unknown or read-only setting {key!r}")
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"{key} has the wrong type")
        values[key] = value
    new = SimConfig(**values)
    validate_config(new)
    return new


def validate_config(config: SimConfig) -> None:
    if config.tokens < 0:
        raise ValueError("tokens must be >= 0")
    if config.token_delay_s < 0:
        raise ValueError("token_delay_s must be >= 0")
    if config.parallel < 1:
        raise ValueError("parallel must be >= 1")
    if config.fail_mode not in FAIL_MODES:
        raise ValueError(f"fail_mode must be one of {', '.join(FAIL_MODES)}")
    if not config.models:
        raise ValueError("at least one model is needed")


@dataclass
class Stats:
    """Counters of inference requests (the four generation endpoints).

    A request is in flight from the moment its body is received until its answer is sent or
    its client goes away; it ends as exactly one of completed (whole answer sent), cancelled
    (client gone first) or failed (answered with an error status), so
    requests == in_flight + completed + cancelled + failed.
    """

    in_flight: int = 0
    max_in_flight: int = 0
    running: int = 0
    max_running: int = 0
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0

    def enter(self) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, outcome: str) -> None:
        self.in_flight -= 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def reset(self) -> None:
        """Zero the totals; the maxima restart from the current gauges (0 when idle)."""
        self.requests = self.completed = self.cancelled = self.failed = 0
        self.max_in_flight = self.in_flight
        self.max_running = self.running


class SlotGate:
    """OLLAMA_NUM_PARALLEL: at most `capacity()` holders, the others wait in FIFO order."""

    def __init__(self, capacity: Callable[[], int], stats: Stats) -> None:
        self._capacity = capacity
        self._stats = stats
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()  # a cancelled waiter whose task has not run yet
        if not self._waiters and self._stats.running < self._capacity():
            self._take()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self.wake()  # someone may have queued behind us while a slot was free
            raise

    def release(self) -> None:
        self._stats.running -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to waiters (after a release, or when `parallel` grew)."""
        while self._waiters and self._stats.running < self._capacity():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)

    def _take(self) -> None:
        self._stats.running += 1
        self._stats.max_running = max(self._stats.max_running, self._stats.running)


# --- models -----------------------------------------------------------------------------


def model_key(name: str) -> str:
    """How Ollama matches names: case-insensitive, the tag defaulting to `latest`."""
    return display_name(name).lower()


def display_name(name: str) -> str:
    name = name.strip()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


@dataclass(frozen=True)
class SimModel:
    name: str
    family: str
    parameter_size: str
    size: int
    digest: str
    modified_at: datetime

    @classmethod
    def describe(cls, name: str, modified_at: datetime) -> SimModel:
        name = display_name(name)
        digest = hashlib.sha256(name.encode()).hexdigest()
        base, _, tag = name.rsplit("/", 1)[-1].partition(":")
        family_match = re.match(r"[a-z]+", base.lower())
        size_match = re.search(r"(\d+(?:\.\d+)?)b", tag.lower())
        billions = float(size_match.group(1)) if size_match else 3.2
        return cls(
            name=name,
            family=family_match.group(0) if family_match else "llama",
            parameter_size=f"{billions:g}B",
            size=int(billions * 6e8) + int(digest[:6], 16),
            digest=digest,
            modified_at=modified_at,
        )

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": "",
            "format": "gguf",
            "family": self.family,
            "families": [self.family],
            "parameter_size": self.parameter_size,
            "quantization_level": "Q4_K_M",
        }

    def tag_entry(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "modified_at": rfc3339(self.modified_at),
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
        }

    def ps_entry(self, expires_at: datetime) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.name,
            "size": self.size,
            "digest": self.digest,
            "details": self.details(),
            "expires_at": rfc3339(expires_at),
            "size_vram": self.size,
        }

    def show(self) -> dict[str, Any]:
        return {
            "license": "",
            "modelfile": f"# Modelfile generated by the gpugate simulator\nFROM {self.name}\n",
            "parameters": 'stop                           "<|eot_id|>"',
            "template": "{{ .Prompt }}",
            "details": self.details(),
            "model_info": {
                "general.architecture": self.family,
                "general.parameter_count": int(float(self.parameter_size[:-1]) * 1e9),
                f"{self.family}.context_length": 131072,
            },
            "capabilities": ["completion"],
            "modified_at": rfc3339(self.modified_at),
        }


def rfc3339(moment: datetime) -> str:
    """Go's RFC3339Nano in UTC: trailing zeros of the fraction dropped, `Z` suffix."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


# --- deterministic replies --------------------------------------------------------------


def reply_tokens(model: str, material: str, count: int) -> list[str]:
    """The reply's tokens: a function of (model, request material) only."""
    text = f"{model_key(model)}\x00{material}"
    seed = hashlib.sha256(text.encode(errors="surrogatepass")).digest()
    tokens = []
    for index in range(count):
        digest = hashlib.sha256(seed + index.to_bytes(4, "big")).digest()
        word = _WORDS[int.from_bytes(digest[:4], "big") % len(_WORDS)]
        tokens.append(word if index == 0 else f" {word}")
    return tokens


def count_tokens(text: str) -> int:
    return len(text.split())


def fake_context(material: str, length: int) -> list[int]:
    seed = hashlib.sha256(material.encode(errors="surrogatepass")).digest()
    return [(seed[i % 32] * 521 + i * 7919) % 128000 for i in range(length)]


# --- requests ---------------------------------------------------------------------------


class Api(Enum):
    GENERATE = "generate"
    CHAT = "chat"
    OPENAI_CHAT = "openai_chat"
    OPENAI_COMPLETION = "openai_completion"

    @property
    def openai(self) -> bool:
        return self in (Api.OPENAI_CHAT, Api.OPENAI_COMPLETION)


class ApiError(Exception):
    """An error answer; `openai_type` is the `type` it gets in the OpenAI error shape."""

    def __init__(self, status: int, message: str, openai_type: str = API_ERROR) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.openai_type = openai_type

    def body(self, api: Api) -> dict[str, Any]:
        if api.openai:
            error = {"message": self.message, "type": self.openai_type, "param": None}
            return {"error": {**error, "code": None}}
        return {"error": self.message}


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


_GO_STRUCTS = {
    Api.GENERATE: "api.GenerateRequest",
    Api.CHAT: "api.ChatRequest",
    Api.OPENAI_CHAT: "openai.ChatCompletionRequest",
    Api.OPENAI_COMPLETION: "openai.CompletionRequest",
}


def _go_json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def decode_body(api: Api, body: bytes) -> dict[str, Any]:
    """The request object, or the 400 Ollama's (Go) JSON binding would give."""
    if not body.strip():
        raise ApiError(400, "EOF" if api.openai else "missing request body", INVALID_REQUEST)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, _go_syntax_error(body, exc), INVALID_REQUEST) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = _go_json_type(data)
        message = f"json: cannot unmarshal {kind} into Go value of type {_GO_STRUCTS[api]}"
        raise ApiError(400, message, INVALID_REQUEST)
    return data


def _go_syntax_error(body: bytes, exc: ValueError) -> str:
    position = exc.pos if isinstance(exc, json.JSONDecodeError) else 0
    text = body.decode(errors="replace")
    if position >= len(text.rstrip()):
        return "unexpected EOF"
    return f"invalid character '{text[position]}' looking for beginning of value"


_GO_TYPES: dict[type, str] = {
    str: "string",
    bool: "bool",
    int: "int",
    list: "[]interface {}",
    dict: "map[string]interface {}",
}


def get_field(api: Api, data: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """`data[name]` if it has the type Go expects, `default` if absent or null, else 400."""
    value = data.get(name)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    struct = _GO_STRUCTS[api].split(".", 1)[1]
    message = (
        f"json: cannot unmarshal {_go_json_type(value)} into Go struct field "
        f"{struct}.{name} of type {_GO_TYPES[kind]}"
    )
    raise ApiError(400, message, INVALID_REQUEST)


MAX_NUM_PREDICT = 1 << 31
"""Ollama reads num_predict as an int32; anything larger (even infinity) is no limit."""


def _num_predict(options: Mapping[str, Any]) -> int | None:
    value = options.get("num_predict")
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value != value or value <= 0:  # NaN, zero, negative: no limit
        return None
    return int(min(value, MAX_NUM_PREDICT))


def _message_text(content: Any) -> str:
    """Text of a message's content: a string, or OpenAI content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _conversation(messages: list[Any]) -> tuple[str, int]:
    """Hash material and prompt token count of a list of chat messages."""
    pairs = []
    for message in messages:
        if not isinstance(message, dict):
            raise ApiError(400, "invalid message format", INVALID_REQUEST)
        pairs.append((str(message.get("role", "")), _message_text(message.get("content"))))
    material = json.dumps(pairs, ensure_ascii=False)
    return material, sum(count_tokens(text) + 4 for _, text in pairs)


def _prompt_material(system: str, prompt: str, suffix: str) -> tuple[str, int]:
    material = json.dumps(["prompt", system, prompt, suffix], ensure_ascii=False)
    return material, count_tokens(system) + count_tokens(prompt) + count_tokens(suffix) + 1


def _native_action(data: Mapping[str, Any]) -> str:
    keep_alive = data.get("keep_alive")
    return "unload" if keep_alive in (0, "0", "0s", "0m") else "load"


def parse_generate(data: Mapping[str, Any]) -> Job:
    api = Api.GENERATE
    prompt = get_field(api, data, "prompt", str, "")
    system = get_field(api, data, "system", str, "")
    suffix = get_field(api, data, "suffix", str, "")
    return _native_job(api, data, _prompt_material(system, prompt, suffix), bool(prompt))


def parse_chat(data: Mapping[str, Any]) -> Job:
    api = Api.CHAT
    messages = get_field(api, data, "messages", list, [])
    return _native_job(api, data, _conversation(messages), bool(messages))


def _native_job(api: Api, data: Mapping[str, Any], prompt: tuple[str, int], has_input: bool) -> Job:
    """An Ollama-native request; one with no prompt or messages loads or unloads the model."""
    material, prompt_tokens = prompt
    return Job(
        api=api,
        model=get_field(api, data, "model", str, ""),
        material=material,
        prompt_tokens=prompt_tokens,
        num_predict=_num_predict(get_field(api, data, "options", dict, {})),
        stream=get_field(api, data, "stream", bool, True),
        action=None if has_input else _native_action(data),
    )


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
    material, prompt_tokens = _conversation(messages)
    return _openai_job(api, data, material, prompt_tokens, "chatcmpl")


def parse_openai_completion(data: Mapping[str, Any]) -> Job:
    api = Api.OPENAI_COMPLETION
    prompt = get_field(api, data, "prompt", str, "")
    material, prompt_tokens = _prompt_material("", prompt, get_field(api, data, "suffix", str, ""))
    return _openai_job(
        api, data, material, prompt_tokens, "cmpl", action=None if prompt else "load"
    )


_PARSERS: dict[Api, Callable[[Mapping[str, Any]], Job]] = {
    Api.GENERATE: parse_generate,
    Api.CHAT: parse_chat,
    Api.OPENAI_CHAT: parse_openai_chat,
    Api.OPENAI_COMPLETION: parse_openai_completion,
}


def parse_request(api: Api, body: bytes, models: Mapping[str, SimModel]) -> Job:
    """A validated Job, or the ApiError Ollama would answer."""
    job = _PARSERS[api](decode_body(api, body))
    if not job.model.strip():
        raise ApiError(400, "model is required")
    if model_key(job.model) not in models:
        raise ApiError(404, f'model "{job.model}" not found, try pulling it first')
    return job


# --- answers ----------------------------------------------------------------------------


@dataclass
class Result:
    """How a generation ended, for the final chunk or the whole answer."""

    text: str
    eval_count: int
    done_reason: str
    total_ns: int = 0
    load_ns: int = 0
    prompt_eval_ns: int = 0
    eval_ns: int = 0


def _metrics(job: Job, result: Result) -> dict[str, int]:
    return {
        "total_duration": max(1, result.total_ns),
        "load_duration": max(1, result.load_ns),
        "prompt_eval_count": job.prompt_tokens,
        "prompt_eval_duration": max(1, result.prompt_eval_ns),
        "eval_count": result.eval_count,
        "eval_duration": max(1, result.eval_ns),
    }


def native_piece(job: Job, token: str) -> dict[str, Any]:
    head = {"model": job.model, "created_at": now_rfc3339()}
    if job.api is Api.CHAT:
        return {**head, "message": {"role": "assistant", "content": token}, "done": False}
    return {**head, "response": token, "done": False}


def native_final(job: Job, result: Result, text: str) -> dict[str, Any]:
    """The last NDJSON object (`text` ""), or the whole non-streamed answer."""
    head: dict[str, Any] = {"model": job.model, "created_at": now_rfc3339()}
    metrics = {} if job.action else _metrics(job, result)
    if job.api is Api.CHAT:
        message = {"role": "assistant", "content": text}
        done = {"done_reason": result.done_reason, "done": True}
        return {**head, "message": message, **done, **metrics}
    done = {"done": True, "done_reason": result.done_reason}
    context = {} if job.action else {"context": _context(job, result)}
    return {**head, "response": text, **done, **context, **metrics}


def _context(job: Job, result: Result) -> list[int]:
    return fake_context(job.material + result.text, job.prompt_tokens + result.eval_count)


def _usage(job: Job, result: Result) -> dict[str, int]:
    prompt_tokens = 0 if job.action else job.prompt_tokens
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": result.eval_count,
        "total_tokens": prompt_tokens + result.eval_count,
    }


def openai_head(job: Job, chunk: bool) -> dict[str, Any]:
    if job.api is Api.OPENAI_CHAT:
        kind = "chat.completion.chunk" if chunk else "chat.completion"
    else:
        kind = "text_completion"
    return {"id": job.request_id, "object": kind, "created": int(time.time())}


def openai_choice(job: Job, text: str, finish_reason: str | None, chunk: bool) -> dict[str, Any]:
    if job.api is Api.OPENAI_COMPLETION:
        return {"text": text, "index": 0, "finish_reason": finish_reason}
    message = {"role": "assistant", "content": text}
    return {"index": 0, ("delta" if chunk else "message"): message, "finish_reason": finish_reason}


def openai_object(
    job: Job, choices: list[dict[str, Any]], chunk: bool, usage: dict[str, int] | None = None
) -> dict[str, Any]:
    tail = {"model": job.model, "system_fingerprint": "fp_ollama"}
    body = {**openai_head(job, chunk), **tail, "choices": choices}
    if job.api is Api.OPENAI_COMPLETION:  # Ollama's field order: choices before model
        body = {**openai_head(job, chunk), "choices": choices, **tail}
    return body if usage is None else {**body, "usage": usage}


def openai_piece(job: Job, token: str) -> dict[str, Any]:
    return openai_object(job, [openai_choice(job, token, None, chunk=True)], chunk=True)


def openai_final_events(job: Job, result: Result) -> list[dict[str, Any]]:
    """The last SSE objects: the finish_reason chunk, then the usage chunk if asked."""
    choice = openai_choice(job, "", result.done_reason, chunk=True)
    events = [openai_object(job, [choice], chunk=True)]
    if job.include_usage:
        events.append(openai_object(job, [], chunk=True, usage=_usage(job, result)))
    return events


def openai_whole(job: Job, result: Result) -> dict[str, Any]:
    choice = openai_choice(job, result.text, result.done_reason, chunk=False)
    return openai_object(job, [choice], chunk=False, usage=_usage(job, result))


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_piece(job: Job, value: Mapping[str, Any]) -> bytes:
    if job.api.openai:
        return b"data: " + encode_json(value) + b"\n\n"
    return encode_json(value) + b"\n"


# --- ASGI plumbing ----------------------------------------------------------------------


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


# --- the simulator ----------------------------------------------------------------------


@dataclass
class Clock:
    """Monotonic checkpoints of one request, in nanoseconds."""

    start: int = field(default_factory=time.monotonic_ns)
    loaded: int = 0
    first: int = 0

    def result(self, tokens: list[str], done_reason: str) -> Result:
        end = time.monotonic_ns()
        loaded = self.loaded or self.start
        first = self.first or loaded
        return Result(
            text="".join(tokens),
            eval_count=len(tokens),
            done_reason=done_reason,
            total_ns=end - self.start,
            load_ns=loaded - self.start,
            prompt_eval_ns=first - loaded,
            eval_ns=end - first,
        )


class Simulator:
    """The state behind the app: config, counters, slots, models, loaded models."""

    def __init__(self, config: SimConfig) -> None:
        validate_config(config)
        self.config = config
        self.stats = Stats()
        self.slots = SlotGate(lambda: self.config.parallel, self.stats)
        started = datetime.now(UTC)
        described = (SimModel.describe(name, started) for name in config.models)
        self.models = {model_key(model.name): model for model in described}
        self.loaded: dict[str, datetime] = {}

    # inference

    async def handle(self, api: Api, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        if body is None:
            return
        self.stats.enter()
        outcome = "failed"
        status = 200
        left = False

        async def send_counted(message: Message) -> None:
            # Generation is over before the last byte is written (as on a GPU): the
            # request stops counting then, so a client that has the whole answer can
            # never see it still counted.
            nonlocal status, left
            if message["type"] == "http.response.start":
                status = message["status"]
            elif not left and not message.get("more_body", False):
                left = True
                self.stats.leave("completed" if status < 400 else "failed")
            await send(message)

        try:
            outcome = await self._serve(api, body, receive, send_counted)
        except asyncio.CancelledError:  # the server is shutting down
            outcome = "cancelled"
            raise
        finally:
            if not left:
                self.stats.leave(outcome)

    async def _serve(self, api: Api, body: bytes, receive: Receive, send: Send) -> str:
        try:
            job = parse_request(api, body, self.models)
            if self.config.fail_mode == "error500":
                raise ApiError(500, "simulated failure")
        except ApiError as error:
            content_type = "application/json" if api.openai else JSON_TYPE
            await send_whole(send, error.status, content_type, encode_json(error.body(api)))
            return "failed"
        if self.config.fail_mode == "hang":
            return await until_disconnect(asyncio.Event().wait(), receive)
        return await until_disconnect(self._answer(job, send), receive)

    async def _answer(self, job: Job, send: Send) -> None:
        clock = Clock()
        if job.action:
            await self._answer_action(job, send, clock)
            return
        await self.slots.acquire()
        released = False

        async def send_releasing(message: Message) -> None:
            nonlocal released
            if not released and message["type"] == "http.response.body":
                if not message.get("more_body", False):
                    released = True
                    self.slots.release()
            await send(message)

        try:
            clock.loaded = time.monotonic_ns()
            self._touch(job.model)
            if job.stream:
                await self._stream(job, send_releasing, clock)
            else:
                await self._whole(job, send_releasing, clock)
        finally:
            if not released:
                self.slots.release()

    async def _answer_action(self, job: Job, send: Send, clock: Clock) -> None:
        """An empty prompt (un)loads the model: one object, no slot, no tokens."""
        if job.action == "unload":
            self.loaded.pop(model_key(job.model), None)
        else:
            self._touch(job.model)
        result = clock.result([], job.action or "load")
        if job.api.openai and job.stream:
            await self._stream_end(job, StreamWriter(send, SSE_TYPE), result)
        else:
            await self._send_whole(job, send, result)

    def _plan(self, job: Job) -> tuple[list[str], str]:
        """The reply's tokens and done_reason: "length" when num_predict cut it short."""
        count, reason = self.config.tokens, "stop"
        if job.num_predict is not None and job.num_predict <= count:
            count, reason = job.num_predict, "length"
        return reply_tokens(job.model, job.material, count), reason

    async def _generate(self, tokens: list[str], clock: Clock) -> AsyncIterator[str]:
        delay = self.config.token_delay_s
        clock.first = time.monotonic_ns()
        for token in tokens:
            await asyncio.sleep(delay)  # sleep(0) only yields to the loop
            yield token

    async def _stream(self, job: Job, send: Send, clock: Clock) -> None:
        writer = StreamWriter(send, SSE_TYPE if job.api.openai else NDJSON_TYPE)
        piece = openai_piece if job.api.openai else native_piece
        planned, reason = self._plan(job)
        tokens = []
        async for token in self._generate(planned, clock):
            tokens.append(token)
            await writer.write(encode_piece(job, piece(job, token)))
        await self._stream_end(job, writer, clock.result(tokens, reason))

    async def _stream_end(self, job: Job, writer: StreamWriter, result: Result) -> None:
        if not job.api.openai:
            await writer.write(encode_piece(job, native_final(job, result, "")), last=True)
            return
        for event in openai_final_events(job, result):
            await writer.write(encode_piece(job, event))
        await writer.write(b"data: [DONE]\n\n", last=True)

    async def _whole(self, job: Job, send: Send, clock: Clock) -> None:
        planned, reason = self._plan(job)
        tokens = [token async for token in self._generate(planned, clock)]
        await self._send_whole(job, send, clock.result(tokens, reason))

    async def _send_whole(self, job: Job, send: Send, result: Result) -> None:
        if job.api.openai:
            body = encode_json(openai_whole(job, result)) + b"\n"
            await send_whole(send, 200, "application/json", body)
        else:
            body = encode_json(native_final(job, result, result.text))
            await send_whole(send, 200, JSON_TYPE, body)

    def _touch(self, model: str) -> None:
        self.loaded[model_key(model)] = datetime.now(UTC) + KEEP_LOADED

    # metadata

    def running_models(self) -> list[dict[str, Any]]:
        now = datetime.now(UTC)
        alive = {key: at for key, at in self.loaded.items() if at > now}
        self.loaded = alive
        ordered = sorted(alive.items(), key=lambda item: item[1], reverse=True)
        return [self.models[key].ps_entry(expires_at) for key, expires_at in ordered]

    def find_model(self, name: str) -> SimModel | None:
        return self.models.get(model_key(name)) if name.strip() else None

    def snapshot(self) -> dict[str, Any]:
        return {**asdict(self.stats), "waiting": self.slots.waiting, "config": asdict(self.config)}

    def reconfigure(self, changes: Mapping[str, Any]) -> None:
        self.config = updated_config(self.config, changes)
        self.slots.wake()


class InferenceEndpoint:
    """A raw ASGI endpoint, so that it can watch for the client's disconnect itself."""

    def __init__(self, sim: Simulator, api: Api) -> None:
        self.sim = sim
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.sim.handle(self.api, receive, send)


# --- metadata and control endpoints -----------------------------------------------------


def json_response(value: Any, status: int = 200, media_type: str = JSON_TYPE) -> Response:
    return Response(encode_json(value), status_code=status, media_type=media_type)


def openai_model(model: SimModel) -> dict[str, Any]:
    owner = model.name.split("/")[-2] if "/" in model.name else "library"
    created = int(model.modified_at.timestamp())
    return {"id": model.name, "object": "model", "created": created, "owned_by": owner}


async def _request_json(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def metadata_routes(sim: Simulator) -> list[Route]:
    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return json_response({"version": OLLAMA_VERSION})

    async def tags(request: Request) -> Response:
        return json_response({"models": [m.tag_entry() for m in sim.models.values()]})

    async def ps(request: Request) -> Response:
        return json_response({"models": sim.running_models()})

    async def show(request: Request) -> Response:
        data = await _request_json(request)
        name = (data.get("model") or data.get("name")) if isinstance(data, dict) else None
        if not isinstance(name, str) or not name:
            return json_response({"error": "model is required"}, 400)
        model = sim.find_model(name)
        if model is None:
            return json_response({"error": f"model '{name}' not found"}, 404)
        return json_response(model.show())

    async def v1_models(request: Request) -> Response:
        data = [openai_model(model) for model in sim.models.values()]
        return json_response({"object": "list", "data": data}, media_type="application/json")

    async def v1_model(request: Request) -> Response:
        name = request.path_params["model"]
        model = sim.find_model(name)
        if model is None:
            error = ApiError(404, f"model '{name}' not found").body(Api.OPENAI_CHAT)
            return json_response(error, 404, media_type="application/json")
        return json_response(openai_model(model), media_type="application/json")

    return [
        Route("/", root, methods=["GET"]),
        Route("/api/version", version, methods=["GET"]),
        Route("/api/tags", tags, methods=["GET"]),
        Route("/api/ps", ps, methods=["GET"]),
        Route("/api/show", show, methods=["POST"]),
        Route("/v1/models", v1_models, methods=["GET"]),
        Route("/v1/models/{model:path}", v1_model, methods=["GET"]),
    ]


def control_routes(sim: Simulator) -> list[Route]:
    async def stats(request: Request) -> Response:
        return json_response(sim.snapshot(), media_type="application/json")

    async def reset(request: Request) -> Response:
        sim.stats.reset()
        return json_response(sim.snapshot(), media_type="application/json")

    async def config(request: Request) -> Response:
        changes = await _request_json(request)
        if not isinstance(changes, dict):
            return json_response({"error": "expected a JSON object"}, 400, "application/json")
        try:
            sim.reconfigure(changes)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400, "application/json")
        return json_response(asdict(sim.config), media_type="application/json")

    return [
        Route("/sim/stats", stats, methods=["GET"]),
        Route("/sim/reset", reset, methods=["POST"]),
        Route("/sim/config", config, methods=["PUT"]),
    ]


async def _not_found(request: Request, exc: Exception) -> Response:
    """Gin's answer to an unknown path or method."""
    return PlainTextResponse("404 page not found", status_code=404)


def create_app(config: SimConfig) -> ASGIApp:
    """The simulator as an ASGI app; its Simulator is at `app.state.sim`."""
    sim = Simulator(config)
    inference = [
        Route("/api/generate", InferenceEndpoint(sim, Api.GENERATE), methods=["POST"]),
        Route("/api/chat", InferenceEndpoint(sim, Api.CHAT), methods=["POST"]),
        Route("/v1/chat/completions", InferenceEndpoint(sim, Api.OPENAI_CHAT), methods=["POST"]),
        Route("/v1/completions", InferenceEndpoint(sim, Api.OPENAI_COMPLETION), methods=["POST"]),
    ]
    app = Starlette(
        routes=[*inference, *metadata_routes(sim), *control_routes(sim)],
        exception_handlers={HTTPException: _not_found},
    )
    app.state.sim = sim
    return app


# --- command line -----------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(prog="python -m gpugate.sim", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="tokens per reply")
    parser.add_argument(
        "--token-delay", type=float, default=defaults.token_delay_s, help="seconds per token"
    )
    parser.add_argument(
        "--parallel", type=int, default=defaults.parallel, help="like OLLAMA_NUM_PARALLEL"
    )
    parser.add_argument("--fail-mode", choices=FAIL_MODES, default=defaults.fail_mode)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = SimConfig(
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        tokens=args.tokens,
        token_delay_s=args.token_delay,
        parallel=args.parallel,
        fail_mode=args.fail_mode,
    )
    try:
        validate_config(config)
    except ValueError as exc:
        raise SystemExit(f"gpugate.sim: {exc}") from None
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )


if __name__ == "__main__":
    main()
