"""OpenAI's Batch API over gpugate's queue (shared/batches.py): create a batch from an input
file, read, list and cancel it, for its owner only.

A batch is validated when it is created: every line must be a JSON object with a unique
`custom_id`, `"method": "POST"`, the batch's `endpoint` as `url`, and a `body` that
endpoint takes (api/bodies.py) for a model the key may use. An invalid file makes a
`failed` batch whose `errors.data` names each line at fault (the first 100); a valid one
has its lines written where the scheduler's batch band finds them, then is opened (one
script, shared/lua/batch_create.lua), and runs on what interactive work leaves.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, StrictStr

from api.bodies import BODIES, parse
from api.files import file_content
from api.identity import Identity
from api.listing import listing
from api.state import Gate
from shared import keys
from shared.batches import MAX_LINES, batch_object
from shared.budget import open_period
from shared.errors import GatewayError, InvalidRequest, NotFound, RateLimited
from shared.redis.store import redis_errors

ENDPOINTS = tuple(path for path in BODIES if path != "/v1/messages")
"""What a batch may run: every inference path but Anthropic's Messages."""
MAX_ERRORS = 100
"""Errors of an invalid file reported at most (the first ones, by line)."""
WRITE_CHUNK = 1000
"""Lines written to Redis per round trip when a batch is created."""
MAX_WINDOW_S = 86_400
_WINDOW = re.compile(r"^(\d+)(s|m|h)$")
_UNITS_S = {"s": 1, "m": 60, "h": 3600}
_NOT_FOUND = "No such batch."


class BatchBody(BaseModel):
    """`POST /v1/batches`."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    endpoint: StrictStr
    completion_window: StrictStr = "24h"
    metadata: dict[StrictStr, StrictStr] | None = None


def window_s(text: str) -> int:
    """`24h` (OpenAI's one window), or a shorter one (`30m`, `90s`): gpugate takes any
    window up to 24 hours."""
    match = _WINDOW.match(text)
    seconds = int(match.group(1)) * _UNITS_S[match.group(2)] if match else 0
    if not 0 < seconds <= MAX_WINDOW_S:
        raise InvalidRequest("completion_window: '24h', or a shorter window such as '1h'")
    return seconds


@dataclass
class Lines:
    """A parsed input file: its lines by model (numbered from 1), or what is wrong with it."""

    total: int = 0
    bodies: list[bytes] = field(default_factory=list)
    """Line n's `{"custom_id", "model", "body"}` (the body as JSON text), at n - 1."""
    by_model: dict[str, list[int]] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def fail(self, line: int, code: str, message: str, param: str | None = None) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"code": code, "message": message, "param": param, "line": line})


def read_lines(content: bytes, endpoint: str, who: Identity) -> Lines:
    """Validate an input file for `endpoint`: every line, so that a failed batch names each
    line at fault."""
    out = Lines()
    rows = content.splitlines()
    while rows and not rows[-1].strip():
        rows.pop()
    if not rows:
        out.fail(0, "empty_file", "The input file has no lines.")
    elif len(rows) > MAX_LINES:
        out.fail(0, "too_many_lines", f"The input file has {len(rows)} lines; at most {MAX_LINES}.")
    else:
        seen: set[str] = set()
        for n, row in enumerate(rows, 1):
            fault = _read_line(out, n, row, endpoint, who, seen)
            if fault is not None:
                out.fail(n, *fault)
        out.total = len(rows)
    return out


def _read_line(
    out: Lines, n: int, row: bytes, endpoint: str, who: Identity, seen: set[str]
) -> tuple[str, str, str | None] | None:
    """Line `n` into `out`, or what is wrong with it: (code, message, param)."""
    try:
        line = orjson.loads(row)
    except orjson.JSONDecodeError:
        return "invalid_json_line", "This line is not valid JSON.", None
    if not isinstance(line, dict):
        return "invalid_json_line", "This line is not a JSON object.", None
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return "missing_required_parameter", "custom_id: a non-empty string", "custom_id"
    if custom_id in seen:
        return "duplicate_custom_id", f"custom_id {custom_id!r} is repeated.", "custom_id"
    seen.add(custom_id)
    if line.get("method") != "POST":
        return "invalid_method", "method: only POST", "method"
    if line.get("url") != endpoint:
        return "mismatched_url", f"url: this batch's endpoint is {endpoint}", "url"
    body = line.get("body")
    if not isinstance(body, dict):
        return "missing_required_parameter", "body: a JSON object", "body"
    try:
        request = parse(BODIES[endpoint], body, prefix="body.")
    except GatewayError as exc:
        return "invalid_request", exc.message, "body"
    if not who.may_use(request.model):
        return "model_not_allowed", f"This key may not use model {request.model!r}.", "body.model"
    text = _json_text({**body, "stream": False})  # a batch line never streams
    out.bodies.append(orjson.dumps({"custom_id": custom_id, "model": request.model, "body": text}))
    out.by_model.setdefault(request.model, []).append(n)
    return None


def _json_text(value: dict[str, Any]) -> str:
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # an integer beyond 64 bits: the json module takes it
        return json.dumps(value)


def new_batch_id() -> str:
    return "batch_" + secrets.token_hex(12)


async def create_batch(gate: Gate, who: Identity, body: BatchBody) -> dict[str, Any]:
    """Validate the input file and create the batch (`in_progress` or `failed`); it costs
    one token of the key's request bucket."""
    if body.endpoint not in ENDPOINTS:
        raise InvalidRequest(f"endpoint: one of {', '.join(ENDPOINTS)}")
    window = window_s(body.completion_window)
    content = await file_content(gate, who.owner, body.input_file_id)
    await _take_request_token(gate, who)
    lines = await asyncio.to_thread(read_lines, content, body.endpoint, who)
    batch_id = new_batch_id()
    settings = gate.settings
    ttl_ms = settings.files_ttl * 1000
    if not lines.errors:
        await _write_lines(gate, batch_id, lines, ttl_ms)
    budget, budget_key = who.budget, ""
    if budget is not None:
        with redis_errors():
            async with gate.redis.pipeline(transaction=True) as pipe:
                budget_key = open_period(pipe, who.owner, budget, time.time())
                await pipe.execute()
    with redis_errors():
        await gate.scripts.batch_create(
            batch_id=batch_id,
            owner=who.owner,
            owner_name=who.name,
            usage_name=who.usage_name,
            hook=who.hook,
            endpoint=body.endpoint,
            input_file_id=body.input_file_id,
            completion_window=body.completion_window,
            window_s=window,
            metadata=json.dumps(body.metadata) if body.metadata else "",
            files_ttl_ms=ttl_ms,
            weight=who.tier.weight,
            key_record=who.record,
            max_running=who.max_running or 0,
            budget_tokens=budget.tokens if budget else 0,
            budget_period=budget.period if budget else "",
            budget_key=budget_key,
            total=lines.total,
            errors=json.dumps(lines.errors) if lines.errors else "",
        )
    return await read_batch(gate, who.owner, batch_id)


async def _take_request_token(gate: Gate, who: Identity) -> None:
    tier = who.tier
    with redis_errors():
        token = await gate.scripts.take_token(
            name=who.owner, rate_per_ms=tier.rate.per_second / 1000, burst=tier.burst
        )
    if not token.allowed:
        raise RateLimited(token.next_token_ms / 1000)


async def _write_lines(gate: Gate, batch_id: str, lines: Lines, ttl_ms: int) -> None:
    """The lines and, per model, their numbers in file order, before the batch opens."""
    redis = gate.redis
    bodies_key = keys.BATCH_LINES + batch_id
    with redis_errors():
        for start in range(0, len(lines.bodies), WRITE_CHUNK):
            chunk = lines.bodies[start : start + WRITE_CHUNK]
            async with redis.pipeline(transaction=False) as pipe:
                pipe.hset(bodies_key, mapping={start + i + 1: b for i, b in enumerate(chunk)})
                pipe.pexpire(bodies_key, ttl_ms)
                await pipe.execute()
        async with redis.pipeline(transaction=False) as pipe:
            for model, numbers in lines.by_model.items():
                todo = f"{keys.BATCH_TODO}{batch_id}:{model}"
                for start in range(0, len(numbers), WRITE_CHUNK):
                    pipe.rpush(todo, *numbers[start : start + WRITE_CHUNK])
                pipe.pexpire(todo, ttl_ms)
            pipe.hset(
                keys.BATCH_MODELS + batch_id,
                mapping={m: len(n) for m, n in lines.by_model.items()},
            )
            pipe.pexpire(keys.BATCH_MODELS + batch_id, ttl_ms)
            await pipe.execute()


async def read_batch(gate: Gate, owner: str, batch_id: str) -> dict[str, Any]:
    with redis_errors():
        raw = await gate.redis.hgetall(keys.BATCH + batch_id)  # type: ignore[misc]
    fields = {k.decode(): v.decode() for k, v in raw.items()}
    if fields.get("owner") != owner or "status" not in fields:
        raise NotFound(_NOT_FOUND)
    return batch_object(fields)


async def list_batches(gate: Gate, owner: str, limit: int, after: str | None) -> dict[str, Any]:
    """The owner's batches, newest first (OpenAI's list object, `after` a batch id)."""

    async def read(batch_id: str) -> dict[str, Any]:
        return await read_batch(gate, owner, batch_id)

    return await listing(gate, keys.BATCHES_OF + owner, limit, after, read)


async def cancel_batch(gate: Gate, owner: str, batch_id: str) -> dict[str, Any]:
    """`cancelling` at once; `cancelled` once its running lines have ended."""
    with redis_errors():
        status = await gate.scripts.batch_cancel(batch_id=batch_id, owner=owner)
    if status is None:
        raise NotFound(_NOT_FOUND)
    return await read_batch(gate, owner, batch_id)  # one that had ended, as it ended
