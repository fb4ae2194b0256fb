"""What the simulator serves and how fast, and the changes `PUT /sim/config` may make."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

FAILURES: dict[str, tuple[int, str]] = {
    "error500": (500, "simulated failure"),
    # what Ollama answers past OLLAMA_MAX_QUEUE, and when a model does not fit
    "error503": (503, "server busy, please try again.  maximum pending requests exceeded"),
    "oom": (500, "model requires more system memory than is available: out of memory"),
}
"""The fail modes that answer an error: its status and message."""
FAIL_MODES = ("none", *FAILURES, "hang")


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
