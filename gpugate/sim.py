"""An Ollama simulator: Ollama's HTTP API without a GPU, for tests, demos and benchmarks.

It serves what a client of Ollama sees, so the official `ollama`, `openai` and `anthropic`
SDKs, LiteLLM's `ollama/` and `ollama_chat/` providers and langchain-ollama work against it
unchanged. It says it is Ollama 0.6.0 and answers as 0.6 does where 0.6 had the endpoint;
what came later (`/v1/responses`, `/v1/messages`, base64 embeddings on `/v1/embeddings`)
answers as Ollama's current source does (server/routes.go, openai/, middleware/,
anthropic/):

- native API: `POST /api/generate`, `POST /api/chat` (NDJSON stream by default, one JSON
  object with `"stream": false`), `POST /api/embed`, `POST /api/embeddings` (never streamed),
  `GET|HEAD /api/tags`, `GET /api/ps`, `GET|HEAD /api/version`, `POST /api/show`,
  `GET|HEAD /` ("Ollama is running");
- model management: `POST /api/pull`, `POST /api/push`, `POST /api/create` (NDJSON progress
  by default, only the last status with `"stream": false`), `POST /api/copy`,
  `DELETE /api/delete`, `HEAD|POST /api/blobs/{digest}`; they change this instance's model
  list (a pulled or created model is listed and can be used at once);
- OpenAI-compatible API: `POST /v1/chat/completions`, `POST /v1/completions`,
  `POST /v1/responses` (JSON, or SSE with `"stream": true`; chat and completions honour
  `stream_options.include_usage`), `POST /v1/embeddings` (`encoding_format` float or base64),
  `GET /v1/models`, `GET /v1/models/{model}`;
- Anthropic-compatible API: `POST /v1/messages` (JSON, or the SSE events `message_start`,
  `content_block_start`, `content_block_delta`, `content_block_stop`, `message_delta`,
  `message_stop` with `"stream": true`);
- Ollama's error bodies: `{"error": "..."}` on the native API; `{"error": {"message", "type",
  "param", "code"}}` on /v1, with type `invalid_request_error` for what the OpenAI layer
  rejects itself and `api_error` for errors passed on from the native handlers (as 0.6 does)
  on chat, completions, embeddings and models, and a type that follows the status on
  /v1/responses (as Ollama's current source does); Anthropic's `{"type": "error", "error":
  {"type", "message"}, "request_id"}` on /v1/messages; Gin's `404 page not found` for an
  unknown path and `405 method not allowed` for a known path with another method.

Like Ollama, at most `parallel` requests generate or embed at once (OLLAMA_NUM_PARALLEL); the
others wait in FIFO order for a slot without an answer (not even headers), and a client that
goes away stops its request at once, whether it waits for its model, for a slot, streams, or
waits for a whole reply.

Models load as Ollama's scheduler (server/sched.go) loads them: a request for a loaded model
goes straight on to wait for a slot; the others queue, in order, for the one loader, which
loads one model at a time (`load_time_s` x the model's size / the size of a 3.2B model, so
0 by default) after making room: when `max_loaded` models are loaded it unloads an idle one
(no request on it), and when none is idle it waits until one is, while requests for the
loaded models go on. Every request for a model that is waiting or loading joins that load.
A model stays loaded until `keep_alive` (5 minutes unless the request names one; 0 unloads it
once idle, a negative value keeps it) after its last request ended; `/api/ps` lists exactly
the loaded models and, as Ollama's does, the one loading. `load_duration` is the time a
request spent waiting for its model to be loaded (the wait for a slot, as in Ollama, is in
`total_duration` only).

Its own control API lives under `/sim/`: `GET /sim/stats` (counters and config: inference
requests by outcome, `max_in_flight`, `loads` and `loads_by_model`, `evictions`; metadata and
model management are not counted), `POST /sim/reset` (zero the counters), `PUT /sim/config`
(change `tokens`, `token_delay_s`, `parallel`, `fail_mode`, `load_time_s`, `max_loaded`
live).

Where it differs from Ollama:

- the reply is not a model's: `tokens` words (fewer if `num_predict`/`max_tokens`/
  `max_output_tokens` caps it) chosen by a hash of (model, prompt or messages), so the same
  prompt or conversation always gets the same text, whichever API carries it; each token
  takes `token_delay_s`; token counts are words, not a tokenizer's;
- embeddings are not a model's either: a hash of (model, input) seeds 384 float32s,
  L2-normalised, on every embedding endpoint (Ollama's /api/embeddings returns the model's
  vector unnormalised); each input takes `token_delay_s` and counts its words (at least 1);
- nothing is read from disk or from a registry: sizes, digests, layers and load times are
  made up; every valid name can be pulled, at once; pushing a model it has always succeeds;
  `create` takes `from` (pulled first if unknown, as Ollama does) or `files` naming blobs
  uploaded here, and ignores `quantize` and `adapters`; models whose name says `embed`,
  `minilm` or `bge-` are embedding models (they cannot generate or chat);
- `parallel` caps the whole instance, not each loaded model; `max_loaded` 0 means no limit
  (Ollama's 0 means 3 per GPU); the idle model unloaded to make room is the least recently
  used (Ollama's scheduler picks by keep-alive, then by path, and when none is idle waits
  for the first in that order, not for any); the next load begins once the last one is done
  (Ollama's may start making room meanwhile); a load that has started finishes even if
  every request for it went away;
- the `message_start` event of /v1/messages carries the real input token count (Ollama's
  carries an estimate, a quarter of the characters);
- an unknown model gets `model "x" not found, try pulling it first` (404) on every inference
  endpoint (Ollama's /api/generate says `model 'x' not found`), and a missing model gets
  `model is required` (400) on every one (Ollama's /api/generate and current /api/embed
  answer 404);
- JSON syntax error texts only imitate Go's; images, tools, `format`, `think` and options
  other than `num_predict` are accepted and ignored;
- `fail_mode` "error500" answers 500 `{"error": "simulated failure"}` (in each API's error
  shape), "hang" never answers; both only after the request was validated, and only on the
  inference endpoints.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import functools
import hashlib
import json
import math
import random
import re
import secrets
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime, timedelta
from enum import Enum
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

DESCRIPTION = "An Ollama simulator: Ollama's HTTP API without a GPU."
OLLAMA_VERSION = "0.6.0"
FAIL_MODES = ("none", "error500", "hang")
DEFAULT_KEEP_ALIVE_S = 300.0
JSON_TYPE = "application/json; charset=utf-8"
PLAIN_JSON_TYPE = "application/json"
NDJSON_TYPE = "application/x-ndjson"
SSE_TYPE = "text/event-stream"
INVALID_REQUEST = "invalid_request_error"
NOT_FOUND = "not_found_error"
API_ERROR = "api_error"
EMBEDDING_LENGTH = 384
CONTEXT_LENGTH = 4096
REFERENCE_SIZE = 1_920_000_000
"""Bytes of a 3.2B model (llama3.2): the size that loads in `load_time_s`."""

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
    load_time_s: float = 0.0
    max_loaded: int = 0


_LIVE_FIELDS: dict[str, tuple[type, ...]] = {
    "tokens": (int,),
    "token_delay_s": (int, float),
    "parallel": (int,),
    "fail_mode": (str,),
    "load_time_s": (int, float),
    "max_loaded": (int,),
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
    if not (config.load_time_s >= 0 and math.isfinite(config.load_time_s)):
        raise ValueError("load_time_s must be a finite number >= 0")
    if config.max_loaded < 0:
        raise ValueError("max_loaded must be >= 0 (0: no limit)")


@dataclass
class Stats:
    """Counters of inference requests (generation and embeddings) and of model loads.

    A request is in flight from the moment its body is received until its answer is sent or
    its client goes away; it ends as exactly one of completed (whole answer sent), cancelled
    (client gone first) or failed (answered with an error status), so
    requests == in_flight + completed + cancelled + failed. `load_waiting` counts the requests
    waiting for their model to be loaded; `loads` the loads begun (`loads_by_model` by
    model), `evictions` the idle models unloaded to make room for another.
    """

    in_flight: int = 0
    max_in_flight: int = 0
    running: int = 0
    max_running: int = 0
    requests: int = 0
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    load_waiting: int = 0
    loads: int = 0
    evictions: int = 0
    loads_by_model: dict[str, int] = field(default_factory=dict)

    def enter(self) -> None:
        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, outcome: str) -> None:
        self.in_flight -= 1
        setattr(self, outcome, getattr(self, outcome) + 1)

    def count_load(self, name: str) -> None:
        self.loads += 1
        self.loads_by_model[name] = self.loads_by_model.get(name, 0) + 1

    def reset(self) -> None:
        """Zero the totals; the maxima restart from the current gauges (0 when idle)."""
        self.requests = self.completed = self.cancelled = self.failed = 0
        self.loads = self.evictions = 0
        self.loads_by_model = {}
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


_NAME_CHARS = {"host": "_-.:", "namespace": "_-", "model": "_-.", "tag": "_-."}


def name_parts(name: str) -> dict[str, str] | None:
    """Host, namespace, model and tag of a name, Ollama's defaults filled in; None if it has
    more parts than host/namespace/model:tag."""
    rest, colon, tag = name.split("@", 1)[0].rpartition(":")
    if not colon or "/" in tag:  # no tag, or the colon was a host's port
        rest, tag = name.split("@", 1)[0], "latest"
    parts = rest.split("/")
    if len(parts) > 3:
        return None
    defaults = ["registry.ollama.ai", "library"][: 3 - len(parts)]
    host, namespace, model = [*defaults, *parts]
    return {"host": host, "namespace": namespace, "model": model, "tag": tag}


def valid_model_name(name: Any) -> bool:
    """Ollama's model.ParseName(name).IsValid(): at most host/namespace/model:tag, each part
    starting with a letter, digit or `_` and made of those and a few marks."""
    parts = name_parts(name) if isinstance(name, str) and name else None
    if parts is None:
        return False
    for kind, marks in _NAME_CHARS.items():
        part = parts[kind]
        if not 1 <= len(part) <= (350 if kind == "host" else 80):
            return False
        if not (part[0].isascii() and (part[0].isalnum() or part[0] == "_")):
            return False
        if any(not (c.isascii() and (c.isalnum() or c in marks)) for c in part):
            return False
    return True


def manifest_path(name: str) -> str:
    parts = name_parts(name) or {"host": "", "namespace": "", "model": name, "tag": ""}
    return "/root/.ollama/models/manifests/{host}/{namespace}/{model}/{tag}".format(**parts)


def blob_path(digest: str) -> str:
    return f"/root/.ollama/models/blobs/{digest.replace(':', '-')}"


def blob_digest(content: bytes) -> str:
    return "sha256:" + hashlib.sha256(content).hexdigest()


MODEL_LAYER = "application/vnd.ollama.image.model"
TEMPLATE_LAYER = "application/vnd.ollama.image.template"
SYSTEM_LAYER = "application/vnd.ollama.image.system"
PARAMS_LAYER = "application/vnd.ollama.image.params"
LICENSE_LAYER = "application/vnd.ollama.image.license"
MESSAGES_LAYER = "application/vnd.ollama.image.messages"
CONFIG_LAYER = "application/vnd.docker.container.image.v1+json"
DEFAULT_TEMPLATE = "{{ .Prompt }}"
DEFAULT_PARAMETERS: tuple[tuple[str, Any], ...] = (("stop", "<|eot_id|>"),)
_EMBEDDING_NAMES = ("embed", "minilm", "bge-")


@dataclass(frozen=True)
class Layer:
    media_type: str
    digest: str
    size: int

    @classmethod
    def of(cls, media_type: str, content: str) -> Layer:
        data = content.encode()
        return cls(media_type, blob_digest(data), len(data))


def _config_layer(layers: tuple[Layer, ...]) -> Layer:
    return Layer.of(CONFIG_LAYER, json.dumps([layer.digest for layer in layers]))


@dataclass(frozen=True)
class SimModel:
    name: str
    family: str
    parameter_size: str
    parameter_count: int
    digest: str
    modified_at: datetime
    layers: tuple[Layer, ...]
    embedding: bool = False
    parent_model: str = ""
    template: str = DEFAULT_TEMPLATE
    system: str = ""
    parameters: tuple[tuple[str, Any], ...] = DEFAULT_PARAMETERS
    license: str = ""

    @classmethod
    def describe(cls, name: str, modified_at: datetime) -> SimModel:
        """A model as pulled: its size made up from the tag (`:1b`, `:135m`), 3.2B if none."""
        name = display_name(name)
        digest = hashlib.sha256(name.encode()).hexdigest()
        base, _, tag = name.rsplit("/", 1)[-1].partition(":")
        embedding = any(mark in base.lower() for mark in _EMBEDDING_NAMES)
        family_match = re.match(r"[a-z]+", base.lower())
        count = _parameter_count(tag, 0.137e9 if embedding else 3.2e9)
        small = (
            Layer.of(TEMPLATE_LAYER, DEFAULT_TEMPLATE),
            Layer.of(PARAMS_LAYER, json.dumps(dict(DEFAULT_PARAMETERS))),
        )
        size = int(count * 0.6) + int(digest[:6], 16) - sum(layer.size for layer in small)
        layers = (Layer(MODEL_LAYER, blob_digest(f"model {name}".encode()), size), *small)
        return cls(
            name=name,
            family=family_match.group(0) if family_match else "llama",
            parameter_size=f"{count / 1e9:g}B" if count >= 1e9 else f"{count / 1e6:g}M",
            parameter_count=int(count),
            digest=digest,
            modified_at=modified_at,
            layers=(*layers, _config_layer(layers)),
            embedding=embedding,
        )

    @property
    def size(self) -> int:
        return sum(layer.size for layer in self.layers)

    def details(self) -> dict[str, Any]:
        return {
            "parent_model": self.parent_model,
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
            "context_length": CONTEXT_LENGTH,
        }

    def show(self) -> dict[str, Any]:
        texts = {
            "license": self.license,
            "modelfile": self.modelfile(),
            "parameters": self.parameter_text(),
            "template": self.template,
            "system": self.system,
        }
        return {
            **{key: text for key, text in texts.items() if text},  # Go's omitempty
            "details": self.details(),
            "model_info": {
                "general.architecture": self.family,
                "general.parameter_count": self.parameter_count,
                f"{self.family}.context_length": 131072,
                f"{self.family}.embedding_length": EMBEDDING_LENGTH,
            },
            "capabilities": ["embedding"] if self.embedding else ["completion"],
            "modified_at": rfc3339(self.modified_at),
        }

    def parameter_values(self) -> list[tuple[str, Any]]:
        """(name, value) pairs, one a value of a list (like `stop`)."""
        pairs = []
        for key, value in self.parameters:
            pairs += [(key, item) for item in (value if isinstance(value, list) else [value])]
        return pairs

    def parameter_text(self) -> str:
        """/api/show's `parameters`: Ollama's `%-30s %#v` lines."""
        values = self.parameter_values()
        return "\n".join(
            f"{k:<30} {json.dumps(_go_number(v), ensure_ascii=False)}" for k, v in values
        )

    def modelfile(self) -> str:
        model_blob = next(layer for layer in self.layers if layer.media_type == MODEL_LAYER)
        lines = [
            '# Modelfile generated by "ollama show"',
            "# To build a new Modelfile based on this, replace FROM with:",
            f"# FROM {self.name}",
            "",
            f"FROM {blob_path(model_blob.digest)}",
            f'TEMPLATE """{self.template}"""',
        ]
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f"PARAMETER {key} {value}" for key, value in self.parameter_values()]
        if self.license:
            lines.append(f'LICENSE """{self.license}"""')
        return "\n".join(lines) + "\n"


def _parameter_count(tag: str, default: float) -> float:
    match = re.search(r"(\d+(?:\.\d+)?)([bm])\b", tag.lower())
    if match is None:
        return default
    return float(match.group(1)) * (1e9 if match.group(2) == "b" else 1e6)


def rfc3339(moment: datetime) -> str:
    """Go's RFC3339Nano in UTC: trailing zeros of the fraction dropped, `Z` suffix."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def _go_number(value: Any) -> Any:
    """A float as Go prints a float64: integral values without `.0`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


# --- model loading ----------------------------------------------------------------------

_FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
"""Go's time.Duration(math.MaxInt64): what a negative keep_alive becomes."""


def keep_alive_delta(seconds: float) -> timedelta:
    return _FOREVER if seconds == math.inf else timedelta(seconds=seconds)


@dataclass
class Resident:
    """A loaded model: how many requests hold it, and when it unloads once idle."""

    model: SimModel
    keep_alive_s: float
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    idle_until: datetime | None = None

    def expires_at(self, now: datetime) -> datetime:
        if self.refs or self.idle_until is None:
            return now + keep_alive_delta(self.keep_alive_s)
        return self.idle_until


@dataclass
class PendingLoad:
    """A model waiting for the loader, and the requests waiting for it."""

    model: SimModel
    keep_alive_s: float | None
    done: asyncio.Future[None]
    waiters: int = 0


class Residency:
    """Which models are loaded, and the one loader that loads them (Ollama's scheduler)."""

    def __init__(self, config: Callable[[], SimConfig], stats: Stats) -> None:
        self._config = config
        self._stats = stats
        self.resident: dict[str, Resident] = {}
        self._pending: dict[str, PendingLoad] = {}
        self._queue: deque[str] = deque()
        self._changed = asyncio.Event()
        self._loader: asyncio.Task[None] | None = None
        self.loading: PendingLoad | None = None  # in memory, not ready yet

    async def acquire(self, model: SimModel, keep_alive_s: float | None) -> None:
        """Hold `model` loaded for one request, loading it first if it is not."""
        key = model_key(model.name)
        self.expire()
        resident = self.resident.get(key)
        if resident is not None:
            self._attach(resident, keep_alive_s)
            return
        pending = self._pending.get(key)
        if pending is None:
            done = asyncio.get_running_loop().create_future()
            pending = self._pending[key] = PendingLoad(model, keep_alive_s, done)
            self._queue.append(key)
            self._start_loader()
        await self._join(key, pending, keep_alive_s)

    async def _join(self, key: str, pending: PendingLoad, keep_alive_s: float | None) -> None:
        pending.waiters += 1
        self._stats.load_waiting += 1
        try:
            await asyncio.shield(pending.done)
        except asyncio.CancelledError:
            if pending.done.done() and not pending.done.cancelled():
                self.release(pending.model)  # loaded, and counted us, just as we left
            else:
                pending.waiters -= 1
                self._changed.set()
            raise
        finally:
            self._stats.load_waiting -= 1
        if keep_alive_s is not None:
            self.resident[key].keep_alive_s = keep_alive_s

    def _attach(self, resident: Resident, keep_alive_s: float | None) -> None:
        resident.refs += 1
        resident.last_used = time.monotonic()
        resident.idle_until = None
        if keep_alive_s is not None:  # as in Ollama, a request's keep_alive sticks
            resident.keep_alive_s = keep_alive_s

    def release(self, model: SimModel) -> None:
        """One request is done with `model`: once idle it unloads after its keep-alive."""
        key = model_key(model.name)
        resident = self.resident.get(key)
        if resident is None:
            return
        resident.refs -= 1
        resident.last_used = time.monotonic()
        if resident.refs == 0:
            self._idle(key, resident)

    def _idle(self, key: str, resident: Resident) -> None:
        if resident.keep_alive_s <= 0:
            del self.resident[key]
        else:
            resident.idle_until = datetime.now(UTC) + keep_alive_delta(resident.keep_alive_s)
        self._changed.set()

    def unload(self, model: SimModel) -> None:
        """keep_alive 0 and no prompt: unload now if idle, else once idle (expireRunner)."""
        key = model_key(model.name)
        resident = self.resident.get(key)
        if resident is not None:
            resident.keep_alive_s = 0
            if resident.refs == 0:
                self._idle(key, resident)

    def expire(self) -> None:
        """Unload the idle models whose keep-alive has run out."""
        now = datetime.now(UTC)
        for key, resident in list(self.resident.items()):
            if not resident.refs and resident.idle_until is not None and resident.idle_until <= now:
                del self.resident[key]
                self._changed.set()

    def listed(self) -> list[tuple[datetime, SimModel]]:
        """What /api/ps shows, with when each unloads: the loaded models and, as in Ollama,
        the one loading (its runner is in the scheduler's list while it loads)."""
        self.expire()
        now = datetime.now(UTC)
        entries = [
            (resident.expires_at(now), resident.model) for resident in self.resident.values()
        ]
        if self.loading is not None:
            keep = self.loading.keep_alive_s
            expires_at = now + keep_alive_delta(DEFAULT_KEEP_ALIVE_S if keep is None else keep)
            entries.append((expires_at, self.loading.model))
        return entries

    def trim(self) -> None:
        """After `max_loaded` shrank: unload idle models down to it, and wake the loader."""
        while not self._has_room(spare=0) and (victim := self._idle_lru()) is not None:
            self._evict(victim)
        self._changed.set()

    def _has_room(self, spare: int = 1) -> bool:
        limit = self._config().max_loaded
        return limit == 0 or len(self.resident) + spare <= limit

    def _idle_lru(self) -> str | None:
        idle = [(r.last_used, key) for key, r in self.resident.items() if r.refs == 0]
        return min(idle)[1] if idle else None

    def _evict(self, key: str) -> None:
        del self.resident[key]
        self._stats.evictions += 1

    def _start_loader(self) -> None:
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        """Ollama's processPending: one pending model at a time, in order of arrival."""
        while self._queue:
            key = self._queue[0]
            pending = self._pending[key]
            loaded = await self._load(key, pending)
            self._queue.popleft()
            del self._pending[key]
            if loaded:
                pending.done.set_result(None)
            else:
                pending.done.cancel()

    async def _load(self, key: str, pending: PendingLoad) -> bool:
        """Make room, then load; False if every request for the model went away first."""
        while True:
            self.expire()
            if pending.waiters == 0:
                return False
            if self._has_room():
                break
            victim = self._idle_lru()
            if victim is not None:
                self._evict(victim)
                continue
            self._changed.clear()
            await self._changed.wait()  # until a model goes idle or a waiter leaves
        self._stats.count_load(pending.model.name)
        self.loading = pending
        try:
            await asyncio.sleep(self._config().load_time_s * pending.model.size / REFERENCE_SIZE)
        finally:
            self.loading = None
        keep = DEFAULT_KEEP_ALIVE_S if pending.keep_alive_s is None else pending.keep_alive_s
        resident = self.resident[key] = Resident(pending.model, keep, refs=pending.waiters)
        if resident.refs == 0:  # everyone left during the load: it finished anyway
            self._idle(key, resident)
        return True


# --- deterministic replies and embeddings -----------------------------------------------


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


def _float32(values: list[float]) -> tuple[float, ...]:
    return struct.unpack(f"<{len(values)}f", struct.pack(f"<{len(values)}f", *values))


def _unit(values: list[float]) -> tuple[float, ...]:
    norm = max(math.sqrt(sum(value * value for value in values)), 1e-12)
    return _float32([value / norm for value in values])


@functools.lru_cache(maxsize=1024)
def embedding(model: str, text: str, dimensions: int = 0) -> tuple[float, ...]:
    """The unit vector of (model, text) as float32 values; `dimensions` (0 < d < 384) cuts
    it to its first d values and normalises it again, as Ollama does."""
    seed = hashlib.sha256(f"{model_key(model)}\x00{text}".encode(errors="surrogatepass")).digest()
    raw: list[float] = []
    for block in range(EMBEDDING_LENGTH // 8):
        words = struct.unpack(">8I", hashlib.sha256(seed + block.to_bytes(4, "big")).digest())
        raw.extend(word / 2**31 - 1.0 for word in words)
    vector = _unit(raw)
    if 0 < dimensions < len(vector):
        vector = _unit(list(vector[:dimensions]))
    return vector


def _shortest_float32(values: tuple[float, ...]) -> tuple[float, ...]:
    """Floats whose reprs are the shortest texts naming these float32 values, as Go prints
    a []float32 (each value gets the fewest digits, from 6 to 9, that still name it)."""
    result = list(values)
    todo = list(range(len(values)))
    for digits in range(6, 10):
        candidates = [float(f"{values[i]:.{digits}g}") for i in todo]
        exact = _float32(candidates)
        missed = []
        for i, candidate, rounded in zip(todo, candidates, exact, strict=True):
            if rounded == values[i]:
                result[i] = candidate
            else:
                missed.append(i)
        todo = missed
    return tuple(result)


@functools.lru_cache(maxsize=1024)
def embedding_json(model: str, text: str, dimensions: int = 0) -> tuple[float, ...]:
    """`embedding()` as Ollama's JSON writes a []float32."""
    return _shortest_float32(embedding(model, text, dimensions))


def embedding_base64(vector: tuple[float, ...]) -> str:
    """OpenAI's `encoding_format: base64`: the little-endian float32 bytes."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# --- requests ---------------------------------------------------------------------------


class Api(Enum):
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
    eof = "missing request body" if api.native else "EOF"
    return decode_object(body, _GO_STRUCTS[api], eof)


def decode_object(body: bytes, struct_name: str, eof: str) -> dict[str, Any]:
    if not body.strip():
        raise ApiError(400, eof, INVALID_REQUEST)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, _go_syntax_error(body, exc), INVALID_REQUEST) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        kind = _go_json_type(data)
        message = f"json: cannot unmarshal {kind} into Go value of type {struct_name}"
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
    float: "float64",
    list: "[]interface {}",
    dict: "map[string]interface {}",
}


def get_field(api: Api, data: Mapping[str, Any], name: str, kind: type, default: Any) -> Any:
    """`data[name]` if it has the type Go expects, `default` if absent or null, else 400."""
    return typed_field(_GO_STRUCTS[api], data, name, kind, default)


def typed_field(
    struct_name: str, data: Mapping[str, Any], name: str, kind: type, default: Any
) -> Any:
    value = data.get(name)
    if value is None:
        return default
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(value, kind) and not (kind in (int, float) and isinstance(value, bool)):
        return value
    struct = struct_name.split(".", 1)[1]
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


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0}
_DURATION_UNITS |= {"m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)([^\d.]*)")


def parse_go_duration(text: str) -> float:
    """Seconds in a Go duration ("1h30m", "-1s", "0"); ValueError with Go's message."""
    quoted = f'"{text}"'
    body = text[1:] if text[:1] in "+-" else text
    if body == "0":
        return 0.0
    if not body:
        raise ValueError(f"time: invalid duration {quoted}")
    total, position = 0.0, 0
    while position < len(body):
        match = _DURATION_PART.match(body, position)
        if match is None:
            raise ValueError(f"time: invalid duration {quoted}")
        number, unit = match.groups()
        if not unit:
            raise ValueError(f"time: missing unit in duration {quoted}")
        if unit not in _DURATION_UNITS:
            raise ValueError(f'time: unknown unit "{unit}" in duration {quoted}')
        total += float(number) * _DURATION_UNITS[unit]
        position = match.end()
    return -total if text.startswith("-") else total


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


def _message_text(content: Any) -> str:
    """Text of a message's content: a string, or OpenAI/Anthropic content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_part_text(part) for part in content if isinstance(part, dict))
    return ""


def _part_text(part: Mapping[str, Any]) -> str:
    if part.get("type") == "tool_use":
        return f"{part.get('name', '')}{json.dumps(part.get('input'), sort_keys=True)}"
    if part.get("type") == "tool_result":
        return _message_text(part.get("content"))
    text = part.get("text", "")
    return text if isinstance(text, str) else ""


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
    material, prompt_tokens = _conversation(messages)
    return _openai_job(api, data, material, prompt_tokens, "chatcmpl")


def parse_openai_completion(data: Mapping[str, Any]) -> Job:
    api = Api.OPENAI_COMPLETION
    prompt = get_field(api, data, "prompt", str, "")
    material, prompt_tokens = _prompt_material("", prompt, get_field(api, data, "suffix", str, ""))
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
    messages += _responses_input(data.get("input"))
    material, prompt_tokens = _conversation(messages)
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


def _responses_input(value: Any) -> list[dict[str, Any]]:
    """The chat messages of a Responses `input`: a string, or a list of input items."""
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "user", "content": value}] if value else []
    if not isinstance(value, list):
        raise ApiError(
            400,
            "input must be a string or array: json: cannot unmarshal "
            f"{_go_json_type(value)} into Go value of type []json.RawMessage",
            INVALID_REQUEST,
        )
    messages = []
    for index, item in enumerate(value):
        message = _responses_item(index, item)
        if message is not None:
            messages.append(message)
    return messages


def _responses_item(index: int, item: Any) -> dict[str, Any] | None:
    if not isinstance(item, dict):
        message = f"json: cannot unmarshal {_go_json_type(item)} into Go value of type struct"
        raise ApiError(400, f"input[{index}]: {message}", INVALID_REQUEST)
    kind = item.get("type") or ("message" if item.get("role") else "")
    if kind == "message":
        text = _responses_content(index, item.get("content"))
        return {"role": str(item.get("role", "")), "content": text}
    if kind == "function_call":
        call = f"{item.get('name', '')}{item.get('arguments', '')}"
        return {"role": "assistant", "content": call}
    if kind == "function_call_output":
        return {"role": "tool", "content": _message_text(item.get("output"))}
    if kind in ("reasoning", "web_search_call"):
        return None
    if not kind:
        message = f"input[{index}]: input item missing required 'type' field"
        raise ApiError(400, message, INVALID_REQUEST)
    raise ApiError(
        400, f"input[{index}]: unknown input item type: {json.dumps(kind)}", INVALID_REQUEST
    )


def _responses_content(index: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        message = f"input[{index}]: content must be a string or array"
        raise ApiError(400, message, INVALID_REQUEST)
    texts = []
    for number, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in ("input_text", "output_text"):
            texts.append(_part_text(part))
        elif kind == "input_file":
            raise ApiError(400, "file inputs are not currently supported", INVALID_REQUEST)
        elif kind != "input_image":
            message = f"input[{index}]: content[{number}]: unknown content type: {kind or ''}"
            raise ApiError(400, message, INVALID_REQUEST)
    return "".join(texts)


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
    system = _message_text(data.get("system"))
    conversation = [{"role": "system", "content": system}] if system else []
    for message in messages:
        if not isinstance(message, dict):
            kind = _go_json_type(message)
            message_type = "anthropic.MessageParam"
            raise ApiError(
                400, f"json: cannot unmarshal {kind} into Go value of type {message_type}"
            )
        role = str(message.get("role", "")).lower()
        conversation.append({"role": role, "content": _message_text(message.get("content"))})
    material, prompt_tokens = _conversation(conversation)
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


def _input_tokens(job: Job) -> int:
    return 0 if job.action else job.prompt_tokens


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
    prompt_tokens = _input_tokens(job)
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


def embedding_answer(job: Job, result: Result) -> dict[str, Any]:
    """/api/embed, /api/embeddings or /v1/embeddings (api.EmbedResponse, openai.ToEmbeddingList)."""
    if job.api is Api.EMBEDDINGS:  # []float64 of the float32 values
        return {"embedding": list(embedding(job.model, job.inputs[0])) if job.inputs else []}
    vectors = [embedding_json(job.model, text, job.dimensions) for text in job.inputs]
    if job.api is Api.EMBED:
        body: dict[str, Any] = {"model": job.model, "embeddings": [list(v) for v in vectors]}
        if job.action:  # nothing to embed: the model was only loaded, no metrics
            return body
        durations = {
            "total_duration": max(1, result.total_ns),
            "load_duration": max(1, result.load_ns),
        }
        return {**body, **durations, "prompt_eval_count": job.prompt_tokens}
    data = [
        {
            "object": "embedding",
            "embedding": embedding_base64(v) if job.as_base64 else list(v),
            "index": i,
        }
        for i, v in enumerate(vectors)
    ]
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return {"object": "list", "data": data, "model": job.model, "usage": usage}


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict[str, Any]:
    content = [] if text is None else [_output_text(text)]
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _responses_usage(job: Job, result: Result) -> dict[str, Any]:
    prompt_tokens = _input_tokens(job)
    return {
        "input_tokens": prompt_tokens,
        "output_tokens": result.eval_count,
        "total_tokens": prompt_tokens + result.eval_count,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens_details": {"reasoning_tokens": 0},
    }


def _responses_text(text: dict[str, Any] | None) -> dict[str, Any]:
    given = (text or {}).get("format")
    if not isinstance(given, dict):
        return {"format": {"type": "text"}}
    keys = ("type", "name", "schema", "strict")
    return {
        "format": {"type": given.get("type", ""), **{k: given[k] for k in keys[1:] if given.get(k)}}
    }


def _responses_reasoning(reasoning: dict[str, Any] | None, stream: bool) -> Any:
    effort = (reasoning or {}).get("effort") or ""
    summary = (reasoning or {}).get("summary") or ""
    if not effort and not summary:
        return None
    if stream:
        return {"effort": effort or None, "summary": summary or None}
    return {key: value for key, value in (("effort", effort), ("summary", summary)) if value}


def _responses_tools(tools: list[Any] | None) -> list[dict[str, Any]]:
    keys = ("type", "name", "description", "strict", "parameters")
    return [{key: tool.get(key) for key in keys} for tool in tools or [] if isinstance(tool, dict)]


def responses_object(
    job: Job, status: str, output: list[Any], usage: Any, stream: bool
) -> dict[str, Any]:
    """openai.ResponsesResponse (or the map its stream events carry), echoing the request."""
    echo = job.echo
    truncation = echo.get("truncation")
    temperature, top_p = echo.get("temperature"), echo.get("top_p")
    return {
        "id": job.request_id,
        "object": "response",
        "created_at": int(time.time()),
        "completed_at": None,
        "status": status,
        "incomplete_details": None,
        "model": job.model,
        "previous_response_id": None,
        "instructions": echo.get("instructions") or None,
        "output": output,
        "error": None,
        "tools": _responses_tools(echo.get("tools")),
        "tool_choice": "auto",
        "truncation": "disabled" if truncation is None else truncation,
        "parallel_tool_calls": True,
        "text": _responses_text(echo.get("text")),
        "top_p": _go_number(1.0 if top_p is None else top_p),
        "presence_penalty": 0,
        "frequency_penalty": 0,
        "top_logprobs": 0,
        "temperature": _go_number(1.0 if temperature is None else temperature),
        "reasoning": _responses_reasoning(echo.get("reasoning"), stream),
        "usage": usage,
        "max_output_tokens": echo.get("max_output_tokens"),
        "max_tool_calls": None,
        "store": False,
        "background": bool(echo.get("background")),
        "service_tier": "default",
        "metadata": {},
        "safety_identifier": None,
        "prompt_cache_key": None,
    }


def responses_whole(job: Job, result: Result) -> dict[str, Any]:
    output = [_message_item(f"msg_{random.randrange(999999)}", result.text, "completed")]
    body = responses_object(job, "completed", output, _responses_usage(job, result), stream=False)
    return {**body, "completed_at": int(time.time())}


def _stop_reason(done_reason: str) -> str:
    """anthropic.mapStopReason."""
    return {"stop": "end_turn", "length": "max_tokens"}.get(
        done_reason, done_reason and "stop_sequence"
    )


def _anthropic_usage(job: Job, result: Result) -> dict[str, int]:
    return {"input_tokens": _input_tokens(job), "output_tokens": result.eval_count}


def anthropic_whole(job: Job, result: Result) -> dict[str, Any]:
    """anthropic.MessagesResponse (a nil content slice is null, stop_reason omitempty)."""
    content = [{"type": "text", "text": result.text}] if result.text else None
    body = {"id": job.request_id, "type": "message", "role": "assistant", "model": job.model}
    stop = {"stop_reason": reason} if (reason := _stop_reason(result.done_reason)) else {}
    return {**body, "content": content, **stop, "usage": _anthropic_usage(job, result)}


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_sorted(value: Any) -> bytes:
    """A Go map[string]any marshalled: keys in order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()


def sse_data(value: Any) -> bytes:
    return b"data: " + encode_json(value) + b"\n\n"


def sse_event(kind: str, data: bytes) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


def whole_answer(job: Job, result: Result) -> tuple[str, bytes]:
    """The content type and body of a non-streamed answer."""
    if job.api.embeds:
        body = encode_json(embedding_answer(job, result))
        return (JSON_TYPE, body) if job.api.native else (PLAIN_JSON_TYPE, body + b"\n")
    if job.api is Api.OPENAI_RESPONSES:
        return PLAIN_JSON_TYPE, encode_json(responses_whole(job, result)) + b"\n"
    if job.api is Api.ANTHROPIC_MESSAGES:
        return PLAIN_JSON_TYPE, encode_json(anthropic_whole(job, result)) + b"\n"
    if job.api.openai:
        return PLAIN_JSON_TYPE, encode_json(openai_whole(job, result)) + b"\n"
    return JSON_TYPE, encode_json(native_final(job, result, result.text))


class StreamFormat:
    """How a streamed answer is framed: its content type, each token's bytes, the last
    chunks. This one is Ollama's NDJSON."""

    content_type = NDJSON_TYPE

    def __init__(self, job: Job) -> None:
        self.job = job

    def piece(self, token: str) -> bytes:
        return encode_json(native_piece(self.job, token)) + b"\n"

    def end(self, result: Result) -> list[bytes]:
        return [encode_json(native_final(self.job, result, "")) + b"\n"]


class OpenAIStream(StreamFormat):
    """Chat completion or completion chunks, then `[DONE]`."""

    content_type = SSE_TYPE

    def piece(self, token: str) -> bytes:
        return sse_data(openai_piece(self.job, token))

    def end(self, result: Result) -> list[bytes]:
        return [*map(sse_data, openai_final_events(self.job, result)), b"data: [DONE]\n\n"]


class ResponsesStream(StreamFormat):
    """openai.ResponsesStreamConverter: named events, each with its `sequence_number`."""

    content_type = SSE_TYPE

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self._sequence = 0
        self._started = False
        self._text: str | None = None  # None until the first text
        self._item = f"msg_{random.randrange(999999)}"

    def _event(self, kind: str, data: dict[str, Any]) -> bytes:
        data = {**data, "type": kind, "sequence_number": self._sequence}
        self._sequence += 1
        return sse_event(kind, encode_sorted(data))

    def _opening(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        response = responses_object(self.job, "in_progress", [], None, stream=True)
        kinds = ("response.created", "response.in_progress")
        return [self._event(kind, {"response": response}) for kind in kinds]

    def _where(self) -> dict[str, Any]:
        return {"item_id": self._item, "output_index": 0, "content_index": 0}

    def piece(self, token: str) -> bytes:
        events = self._opening()
        if self._text is None:
            self._text = ""
            item = {"output_index": 0, "item": _message_item(self._item, None, "in_progress")}
            events.append(self._event("response.output_item.added", item))
            part = {**self._where(), "part": _output_text("")}
            events.append(self._event("response.content_part.added", part))
        self._text += token
        delta = {**self._where(), "delta": token, "logprobs": []}
        events.append(self._event("response.output_text.delta", delta))
        return b"".join(events)

    def end(self, result: Result) -> list[bytes]:
        events = self._opening()
        output = []
        if self._text is not None:
            text = {**self._where(), "text": self._text, "logprobs": []}
            events.append(self._event("response.output_text.done", text))
            part = {**self._where(), "part": _output_text(self._text)}
            events.append(self._event("response.content_part.done", part))
            item = _message_item(self._item, self._text, "completed")
            events.append(
                self._event("response.output_item.done", {"output_index": 0, "item": item})
            )
            output = [item]
        usage = _responses_usage(self.job, result)
        response = responses_object(self.job, "completed", output, usage, stream=True)
        response["completed_at"] = int(time.time())
        events.append(self._event("response.completed", {"response": response}))
        return events


class AnthropicStream(StreamFormat):
    """anthropic.StreamConverter: message_start, one text block, message_delta, message_stop."""

    content_type = SSE_TYPE

    def __init__(self, job: Job) -> None:
        super().__init__(job)
        self._started = False
        self._text_started = False

    @staticmethod
    def _event(value: dict[str, Any]) -> bytes:
        return sse_event(value["type"], encode_json(value))

    def _opening(self) -> list[bytes]:
        if self._started:
            return []
        self._started = True
        message = {
            "id": self.job.request_id,
            "type": "message",
            "role": "assistant",
            "model": self.job.model,
            "content": [],
            "usage": {"input_tokens": self.job.prompt_tokens, "output_tokens": 0},
        }
        return [self._event({"type": "message_start", "message": message})]

    def piece(self, token: str) -> bytes:
        events = self._opening()
        if not self._text_started:
            self._text_started = True
            block = {"type": "text", "text": ""}
            events.append(
                self._event({"type": "content_block_start", "index": 0, "content_block": block})
            )
        delta = {"type": "text_delta", "text": token}
        events.append(self._event({"type": "content_block_delta", "index": 0, "delta": delta}))
        return b"".join(events)

    def end(self, result: Result) -> list[bytes]:
        events = self._opening()
        if self._text_started:
            events.append(self._event({"type": "content_block_stop", "index": 0}))
        reason = _stop_reason(result.done_reason)
        delta = {"stop_reason": reason} if reason else {}
        usage = _anthropic_usage(self.job, result)
        events.append(self._event({"type": "message_delta", "delta": delta, "usage": usage}))
        events.append(self._event({"type": "message_stop"}))
        return events


_STREAM_FORMATS: dict[Api, type[StreamFormat]] = {
    Api.OPENAI_CHAT: OpenAIStream,
    Api.OPENAI_COMPLETION: OpenAIStream,
    Api.OPENAI_RESPONSES: ResponsesStream,
    Api.ANTHROPIC_MESSAGES: AnthropicStream,
}


def stream_format(job: Job) -> StreamFormat:
    return _STREAM_FORMATS.get(job.api, StreamFormat)(job)


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

    async def write_all(self, chunks: list[bytes]) -> None:
        """The last chunks of the answer, the final one ending it."""
        for index, chunk in enumerate(chunks):
            await self.write(chunk, last=index == len(chunks) - 1)


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


class Holds:
    """What a request holds (its model, its slot), given back once, latest first."""

    def __init__(self) -> None:
        self._releases: list[Callable[[], None]] = []

    def add(self, release: Callable[[], None]) -> None:
        self._releases.append(release)

    def release(self) -> None:
        while self._releases:
            self._releases.pop()()

    def releasing(self, send: Send) -> Send:
        """`send`, giving everything back just before the answer's last byte: generation is
        over then (as on a GPU), so a client that has the whole answer never sees it held."""

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                self.release()
            await send(message)

        return wrapped


# --- the simulator ----------------------------------------------------------------------


@dataclass
class Clock:
    """Monotonic checkpoints of one request, in nanoseconds."""

    start: int = field(default_factory=time.monotonic_ns)
    loaded: int = 0  # the model is loaded
    started: int = 0  # it holds a slot
    first: int = 0  # the first token

    def result(self, tokens: list[str], done_reason: str) -> Result:
        end = time.monotonic_ns()
        loaded = self.loaded or self.start
        started = self.started or loaded
        first = self.first or started
        return Result(
            text="".join(tokens),
            eval_count=len(tokens),
            done_reason=done_reason,
            total_ns=end - self.start,
            load_ns=loaded - self.start,
            prompt_eval_ns=first - started,
            eval_ns=end - first,
        )


class Simulator:
    """The state behind the app: config, counters, slots, models, loaded models, blobs."""

    def __init__(self, config: SimConfig) -> None:
        validate_config(config)
        self.config = config
        self.stats = Stats()
        self.slots = SlotGate(lambda: self.config.parallel, self.stats)
        started = datetime.now(UTC)
        described = (SimModel.describe(name, started) for name in config.models)
        self.models = {model_key(model.name): model for model in described}
        self.residency = Residency(lambda: self.config, self.stats)
        self.blobs: dict[str, int] = {}

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
            await send_whole(
                send, error.status, error.content_type(api), encode_json(error.body(api))
            )
            return "failed"
        if self.config.fail_mode == "hang":
            return await until_disconnect(asyncio.Event().wait(), receive)
        return await until_disconnect(self._answer(job, send), receive)

    async def _answer(self, job: Job, send: Send) -> None:
        """Load the model (or join its load), take a slot, answer; give both back."""
        assert job.target is not None
        target = job.target
        clock = Clock()
        holds = Holds()
        send = holds.releasing(send)
        try:
            if job.action == "unload":
                self.residency.unload(target)
                await self._send_action(job, send, clock)
                return
            await self.residency.acquire(target, job.keep_alive_s)
            holds.add(lambda: self.residency.release(target))
            clock.loaded = time.monotonic_ns()
            if job.action:  # "load": an empty prompt only loads the model, without a slot
                await self._send_action(job, send, clock)
                return
            await self.slots.acquire()
            holds.add(self.slots.release)
            clock.started = time.monotonic_ns()
            await self._run(job, send, clock)
        finally:
            holds.release()

    async def _run(self, job: Job, send: Send, clock: Clock) -> None:
        if job.api.embeds:
            await self._embed(job, send, clock)
        elif job.stream:
            await self._stream(job, send, clock)
        else:
            await self._whole(job, send, clock)

    async def _send_action(self, job: Job, send: Send, clock: Clock) -> None:
        """The answer to an empty prompt: one object (or stream end), no tokens."""
        result = clock.result([], job.action or "load")
        if job.stream and not job.api.native:
            fmt = stream_format(job)
            await StreamWriter(send, fmt.content_type).write_all(fmt.end(result))
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
        fmt = stream_format(job)
        writer = StreamWriter(send, fmt.content_type)
        planned, reason = self._plan(job)
        tokens = []
        async for token in self._generate(planned, clock):
            tokens.append(token)
            await writer.write(fmt.piece(token))
        await writer.write_all(fmt.end(clock.result(tokens, reason)))

    async def _whole(self, job: Job, send: Send, clock: Clock) -> None:
        planned, reason = self._plan(job)
        tokens = [token async for token in self._generate(planned, clock)]
        await self._send_whole(job, send, clock.result(tokens, reason))

    async def _embed(self, job: Job, send: Send, clock: Clock) -> None:
        clock.first = time.monotonic_ns()
        for _ in job.inputs:
            await asyncio.sleep(self.config.token_delay_s)
        await self._send_whole(job, send, clock.result([], ""))

    async def _send_whole(self, job: Job, send: Send, result: Result) -> None:
        content_type, body = whole_answer(job, result)
        await send_whole(send, 200, content_type, body)

    # metadata

    def running_models(self) -> list[dict[str, Any]]:
        """/api/ps: the loaded models, the longest left to live first."""
        entries = self.residency.listed()
        entries.sort(key=lambda entry: entry[0], reverse=True)
        return [model.ps_entry(expires_at) for expires_at, model in entries]

    def find_model(self, name: str) -> SimModel | None:
        return self.models.get(model_key(name)) if name.strip() else None

    def has_blob(self, digest: str) -> bool:
        digest = digest.replace("-", ":", 1)
        if digest in self.blobs:
            return True
        return any(layer.digest == digest for m in self.models.values() for layer in m.layers)

    def snapshot(self) -> dict[str, Any]:
        return {**asdict(self.stats), "waiting": self.slots.waiting, "config": asdict(self.config)}

    def reconfigure(self, changes: Mapping[str, Any]) -> None:
        self.config = updated_config(self.config, changes)
        self.slots.wake()
        self.residency.trim()


class InferenceEndpoint:
    """A raw ASGI endpoint, so that it can watch for the client's disconnect itself."""

    def __init__(self, sim: Simulator, api: Api) -> None:
        self.sim = sim
        self.api = api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.sim.handle(self.api, receive, send)


# --- model management -------------------------------------------------------------------

Progress = AsyncIterator[dict[str, Any]]
"""api.ProgressResponse objects; an `error` (with an HTTP `status`, else 500) ends it."""


async def pull_progress(sim: Simulator, name: str) -> Progress:
    """server.PullModel: manifest, each layer (with total/completed), verify, write."""
    yield {"status": "pulling manifest"}
    have = sim.find_model(name)
    model = have or SimModel.describe(name, datetime.now(UTC))
    for layer in model.layers:
        status = {
            "status": f"pulling {layer.digest[7:19]}",
            "digest": layer.digest,
            "total": layer.size,
        }
        if have is None:  # a new blob starts at 0 (omitted); one on disk is complete at once
            yield status
        yield {**status, "completed": layer.size}
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    sim.models[model_key(name)] = replace(model, modified_at=datetime.now(UTC))
    yield {"status": "success"}


async def push_progress(sim: Simulator, name: str) -> Progress:
    """server.PushModel: every layer is already on the registry."""
    yield {"status": "retrieving manifest"}
    model = sim.find_model(name)
    if model is None:
        yield {"status": "couldn't retrieve manifest"}
        yield {"error": f"open {manifest_path(name)}: no such file or directory"}
        return
    for layer in model.layers:
        yield {
            "status": f"pushing {layer.digest[7:19]}",
            "digest": layer.digest,
            "total": layer.size,
            "completed": layer.size,
        }
    yield {"status": "pushing manifest"}
    yield {"status": "success"}


async def create_progress(sim: Simulator, name: str, data: Mapping[str, Any]) -> Progress:
    """server.CreateHandler: from a model (pulled first if unknown) or from uploaded blobs."""
    source = data.get("from")
    files = data.get("files")
    if isinstance(source, str) and source:
        if not valid_model_name(source):
            yield {"error": "invalid model name", "status": 400}
            return
        if sim.find_model(source) is None:
            async for item in pull_progress(sim, source):
                yield item
        base, parent = sim.models[model_key(source)], display_name(source)
    elif isinstance(files, dict) and files:
        missing = [str(d) for d in files.values() if not sim.has_blob(str(d))]
        if missing:
            yield {"error": f"open {blob_path(missing[0])}: no such file or directory"}
            return
        yield {"status": "parsing GGUF"}
        base, parent = _model_from_blobs(sim, name, [str(d) for d in files.values()]), ""
    else:
        yield {"error": "neither 'from' or 'files' was specified", "status": 400}
        return
    model, statuses = derive_model(base, name, data, parent)
    for status in statuses:
        yield {"status": status}
    yield {"status": "writing manifest"}
    sim.models[model_key(name)] = model
    yield {"status": "success"}


def _model_from_blobs(sim: Simulator, name: str, digests: list[str]) -> SimModel:
    described = SimModel.describe(name, datetime.now(UTC))
    keys = [digest.replace("-", ":", 1) for digest in digests]
    blobs = [Layer(MODEL_LAYER, key, sim.blobs.get(key, 0)) for key in keys]
    others = [layer for layer in described.layers if layer.media_type != MODEL_LAYER]
    return replace(described, layers=(*blobs, *others))


def derive_model(
    base: SimModel, name: str, data: Mapping[str, Any], parent: str
) -> tuple[SimModel, list[str]]:
    """The model `create` makes of `base`, and its layers' statuses (server.createModel)."""
    layers = [layer for layer in base.layers if layer.media_type != CONFIG_LAYER]
    changes: dict[str, Any] = {}

    def put(media_type: str, content: str) -> None:
        layers[:] = [layer for layer in layers if layer.media_type != media_type]
        layers.append(Layer.of(media_type, content))

    for key, media_type in (("template", TEMPLATE_LAYER), ("system", SYSTEM_LAYER)):
        if isinstance(data.get(key), str) and data[key]:
            put(media_type, data[key])
            changes[key] = data[key]
    license_text = _license_text(data.get("license"))
    if license_text:
        put(LICENSE_LAYER, license_text)
        changes["license"] = license_text
    if isinstance(data.get("parameters"), dict) and data["parameters"]:
        merged = {**dict(base.parameters), **data["parameters"]}
        put(PARAMS_LAYER, json.dumps(merged))
        changes["parameters"] = tuple(merged.items())
    if isinstance(data.get("messages"), list) and data["messages"]:
        put(MESSAGES_LAYER, json.dumps(data["messages"]))
    known = {layer.digest for layer in base.layers}
    statuses = [
        f"{'using existing' if layer.digest in known else 'creating new'} layer {layer.digest}"
        for layer in layers
    ]
    final = (*layers, _config_layer(tuple(layers)))
    digest = hashlib.sha256(json.dumps([layer.digest for layer in final]).encode()).hexdigest()
    model = replace(
        base,
        name=display_name(name),
        digest=digest,
        layers=final,
        parent_model=parent,
        modified_at=datetime.now(UTC),
        **changes,
    )
    return model, statuses


def _license_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(item for item in value if isinstance(item, str))
    return value if isinstance(value, str) else ""


async def progress_response(items: Progress, stream: bool) -> Response:
    """server.streamResponse (NDJSON; an error before any line is a JSON answer with its
    status) or, with `"stream": false`, server.waitForStream (only the last status)."""
    if not stream:
        latest: dict[str, Any] = {}
        async for item in items:
            if "error" in item:
                return _error_response(item)
            latest = item
        return json_response(latest, media_type=PLAIN_JSON_TYPE)
    first = await anext(items, None)
    if first is not None and "error" in first:
        return _error_response(first)

    async def lines() -> AsyncIterator[bytes]:
        if first is not None:
            yield encode_json(first) + b"\n"
        async for item in items:
            yield encode_json({"error": item["error"]} if "error" in item else item) + b"\n"
            if "error" in item:
                return

    return StreamingResponse(lines(), media_type=NDJSON_TYPE)


def _error_response(item: Mapping[str, Any]) -> Response:
    return json_response({"error": item["error"]}, item.get("status", 500), PLAIN_JSON_TYPE)


class ModelManagement:
    """Pull, push, create, copy, delete and blobs, as server/routes.go and create.go answer."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[Route]:
        return [
            Route("/api/pull", _native_errors(self.pull), methods=["POST"]),
            Route("/api/push", _native_errors(self.push), methods=["POST"]),
            Route("/api/create", _native_errors(self.create), methods=["POST"]),
            Route("/api/copy", _native_errors(self.copy), methods=["POST"]),
            Route("/api/delete", _native_errors(self.delete), methods=["DELETE"]),
            Route("/api/blobs/{digest}", self.blob, methods=["HEAD", "POST"]),
        ]

    @staticmethod
    async def _body(request: Request, struct_name: str) -> dict[str, Any]:
        return decode_object(await request.body(), struct_name, "missing request body")

    async def pull(self, request: Request) -> Response:
        data = await self._body(request, "api.PullRequest")
        name = _name_field("api.PullRequest", data).strip()
        if not valid_model_name(name):
            return error_response(400, "invalid model name")
        stream = typed_field("api.PullRequest", data, "stream", bool, True)
        return await progress_response(pull_progress(self.sim, name), stream)

    async def push(self, request: Request) -> Response:
        data = await self._body(request, "api.PushRequest")
        name = _name_field("api.PushRequest", data)
        if not name:
            return error_response(400, "model is required")
        stream = typed_field("api.PushRequest", data, "stream", bool, True)
        return await progress_response(push_progress(self.sim, name), stream)

    async def create(self, request: Request) -> Response:
        data = await self._body(request, "api.CreateRequest")
        name = _name_field("api.CreateRequest", data)
        if not valid_model_name(name):
            return error_response(400, "invalid model name")
        stream = typed_field("api.CreateRequest", data, "stream", bool, True)
        return await progress_response(create_progress(self.sim, name, data), stream)

    async def copy(self, request: Request) -> Response:
        data = await self._body(request, "api.CopyRequest")
        source = typed_field("api.CopyRequest", data, "source", str, "")
        destination = typed_field("api.CopyRequest", data, "destination", str, "")
        if not valid_model_name(source):
            return error_response(400, f"source {json.dumps(source)} is invalid")
        if not valid_model_name(destination):
            return error_response(400, f"destination {json.dumps(destination)} is invalid")
        model = self.sim.find_model(source)
        if model is None:
            return error_response(404, f"model {json.dumps(source)} not found")
        copied = replace(model, name=display_name(destination), modified_at=datetime.now(UTC))
        self.sim.models[model_key(destination)] = copied
        return Response(status_code=200)

    async def delete(self, request: Request) -> Response:
        data = await self._body(request, "api.DeleteRequest")
        name = _name_field("api.DeleteRequest", data).strip()
        if not name:
            return error_response(400, "model is required")
        if not valid_model_name(name):
            return error_response(400, f"name {json.dumps(name)} is invalid")
        if self.sim.models.pop(model_key(name), None) is None:  # a loaded one stays loaded
            return error_response(404, f"model '{name}' not found")
        return Response(status_code=200)

    async def blob(self, request: Request) -> Response:
        """HEAD: is the blob here; POST: upload it (201), checking its digest."""
        digest = request.path_params["digest"]
        if not re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", digest):
            return error_response(400, "invalid digest format")
        if self.sim.has_blob(digest):
            return Response(status_code=200)
        if request.method == "HEAD":
            return error_response(404, f"blob {json.dumps(digest)} not found")
        content = await request.body()
        actual = blob_digest(content)
        if actual != digest:
            expected = f"expected {json.dumps(digest)}, got {json.dumps(actual)}"
            return error_response(400, f"digest mismatch, {expected}")
        self.sim.blobs[digest] = len(content)
        return Response(status_code=201)


def _name_field(struct_name: str, data: Mapping[str, Any]) -> str:
    """`model`, or the deprecated `name` (Go's cmp.Or)."""
    model: str = typed_field(struct_name, data, "model", str, "")
    return model or typed_field(struct_name, data, "name", str, "")


Endpoint = Callable[[Request], Coroutine[Any, Any, Response]]


def _native_errors(endpoint: Endpoint) -> Endpoint:
    """An endpoint whose ApiError becomes Ollama's native `{"error": ...}` answer."""

    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as error:
            return error_response(error.status, error.message)

    return wrapped


# --- metadata and control endpoints -----------------------------------------------------


def json_response(value: Any, status: int = 200, media_type: str = JSON_TYPE) -> Response:
    return Response(encode_json(value), status_code=status, media_type=media_type)


def error_response(status: int, message: str) -> Response:
    return json_response({"error": message}, status)


def openai_model(model: SimModel, name: str) -> dict[str, Any]:
    """openai.ToModel / ToListCompletion: `id` as asked, owned by the name's namespace."""
    created = int(model.modified_at.timestamp())
    owner = (name_parts(name) or {}).get("namespace", "library")
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


async def _request_json(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def exact_route(path: str, endpoint: Callable[..., Any], methods: list[str]) -> Route:
    """A route answering exactly `methods` (Starlette adds HEAD to a GET route; Gin does not)."""
    route = Route(path, endpoint, methods=methods)
    route.methods = set(methods)
    return route


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
        data = decode_object(await request.body(), "api.ShowRequest", "missing request body")
        name = _name_field("api.ShowRequest", data)
        if not name:
            return error_response(400, "model is required")
        model = sim.find_model(name)
        if model is None:
            return error_response(404, f"model '{display_name(name)}' not found")
        return json_response(model.show())

    async def v1_models(request: Request) -> Response:
        data = [openai_model(model, model.name) for model in sim.models.values()]
        return json_response({"object": "list", "data": data}, media_type=PLAIN_JSON_TYPE)

    async def v1_model(request: Request) -> Response:
        name = request.path_params["model"]
        model = sim.find_model(name)
        if model is None:
            error = ApiError(404, f"model '{display_name(name)}' not found").body(Api.OPENAI_CHAT)
            return json_response(error, 404, media_type=PLAIN_JSON_TYPE)
        return json_response(openai_model(model, name), media_type=PLAIN_JSON_TYPE)

    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        exact_route("/api/ps", ps, ["GET"]),
        Route("/api/show", _native_errors(show), methods=["POST"]),
        exact_route("/v1/models", v1_models, ["GET"]),
        exact_route("/v1/models/{model:path}", v1_model, ["GET"]),
    ]


def control_routes(sim: Simulator) -> list[Route]:
    async def stats(request: Request) -> Response:
        return json_response(sim.snapshot(), media_type=PLAIN_JSON_TYPE)

    async def reset(request: Request) -> Response:
        sim.stats.reset()
        return json_response(sim.snapshot(), media_type=PLAIN_JSON_TYPE)

    async def config(request: Request) -> Response:
        changes = await _request_json(request)
        if not isinstance(changes, dict):
            return json_response({"error": "expected a JSON object"}, 400, PLAIN_JSON_TYPE)
        try:
            sim.reconfigure(changes)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400, PLAIN_JSON_TYPE)
        return json_response(asdict(sim.config), media_type=PLAIN_JSON_TYPE)

    return [
        Route("/sim/stats", stats, methods=["GET"]),
        Route("/sim/reset", reset, methods=["POST"]),
        Route("/sim/config", config, methods=["PUT"]),
    ]


async def _gin_error(request: Request, exc: Exception) -> Response:
    """Gin's answer to an unknown path, or to a known path with another method."""
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return PlainTextResponse("405 method not allowed", status_code=405)
    return PlainTextResponse("404 page not found", status_code=404)


_INFERENCE_PATHS = {
    "/api/generate": Api.GENERATE,
    "/api/chat": Api.CHAT,
    "/api/embed": Api.EMBED,
    "/api/embeddings": Api.EMBEDDINGS,
    "/v1/chat/completions": Api.OPENAI_CHAT,
    "/v1/completions": Api.OPENAI_COMPLETION,
    "/v1/embeddings": Api.OPENAI_EMBEDDINGS,
    "/v1/responses": Api.OPENAI_RESPONSES,
    "/v1/messages": Api.ANTHROPIC_MESSAGES,
}


def create_app(config: SimConfig) -> ASGIApp:
    """The simulator as an ASGI app; its Simulator is at `app.state.sim`."""
    sim = Simulator(config)
    inference = [
        Route(path, InferenceEndpoint(sim, api), methods=["POST"])
        for path, api in _INFERENCE_PATHS.items()
    ]
    routes = [
        *inference,
        *metadata_routes(sim),
        *ModelManagement(sim).routes(),
        *control_routes(sim),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _gin_error})
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
    parser.add_argument(
        "--load-time",
        type=float,
        default=defaults.load_time_s,
        help="seconds to load a 3.2B model (llama3.2); others in proportion to their size",
    )
    parser.add_argument(
        "--max-loaded",
        type=int,
        default=defaults.max_loaded,
        help="like OLLAMA_MAX_LOADED_MODELS (0: no limit)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = SimConfig(
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        tokens=args.tokens,
        token_delay_s=args.token_delay,
        parallel=args.parallel,
        fail_mode=args.fail_mode,
        load_time_s=args.load_time,
        max_loaded=args.max_loaded,
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
