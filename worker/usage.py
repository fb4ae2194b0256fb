"""What Ollama served a job, in tokens: input (the prompt) and output (generated).

Read from what Ollama answered, whatever the API: `prompt_eval_count` / `eval_count`
(native), `usage.prompt_tokens` / `completion_tokens` (OpenAI), `input_tokens` /
`output_tokens` (Anthropic, Responses). A streamed answer carries them in its last events,
so the tail of the stream is enough. An OpenAI stream without `include_usage` reports
none: its output is then counted as one token per streamed event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_INPUT = re.compile(rb'"(?:prompt_eval_count|prompt_tokens|input_tokens)"\s*:\s*(\d+)')
_OUTPUT = re.compile(rb'"(?:eval_count|completion_tokens|output_tokens)"\s*:\s*(\d+)')
TAIL_BYTES = 16_384
"""How much of the end of a stream is kept to read its usage from."""


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0


def _last(pattern: re.Pattern[bytes], text: bytes) -> int | None:
    found = pattern.findall(text)
    return int(found[-1]) if found else None


def usage_of(text: bytes, events: int = 0) -> Usage:
    """The usage reported in `text` (a whole body, or a stream's tail of `events` events)."""
    input_tokens = _last(_INPUT, text)
    output_tokens = _last(_OUTPUT, text)
    if output_tokens is None and events:
        output_tokens = max(0, events - 1)  # the last event of an OpenAI stream is [DONE]
    return Usage(input_tokens or 0, output_tokens or 0)


_LOAD = re.compile(rb'"load_duration"\s*:\s*(\d+)')
MODEL_LOAD_NS = 100_000_000
"""A `load_duration` above this (100 ms) means the model was loaded for this job."""


def model_load_ms(text: bytes) -> float:
    """The model load Ollama reported (native API answers only), in ms; 0 when none."""
    found = _last(_LOAD, text)
    return found / 1e6 if found is not None and found > MODEL_LOAD_NS else 0.0
