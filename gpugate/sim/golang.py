"""How Ollama's Go reads and writes values: JSON binding errors, durations, times, numbers."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from gpugate.sim.apis import INVALID_REQUEST, ApiError


def rfc3339(moment: datetime) -> str:
    """Go's RFC3339Nano in UTC: trailing zeros of the fraction dropped, `Z` suffix."""
    text = moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
    return text + "Z"


def now_rfc3339() -> str:
    return rfc3339(datetime.now(UTC))


def go_number(value: Any) -> Any:
    """A float as Go prints a float64: integral values without `.0`."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)
    return value


def go_json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


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
        kind = go_json_type(data)
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
        f"json: cannot unmarshal {go_json_type(value)} into Go struct field "
        f"{struct}.{name} of type {_GO_TYPES[kind]}"
    )
    raise ApiError(400, message, INVALID_REQUEST)


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


def encode_json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


def encode_sorted(value: Any) -> bytes:
    """A Go map[string]any marshalled: keys in order."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, sort_keys=True).encode()
