"""What this worker's runs did on each backend (tokens, time per output token), added to
the backend's meter in Redis at every flush, where the adaptive controller reads it
(worker/adaptive.py)."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import astuple, dataclass, fields

from redis.asyncio import Redis

from shared import keys

METER_TTL_MS = 60_000
"""A meter nobody takes (adaptive turned off) is gone after this."""


@dataclass
class Pace:
    """What a backend's runs that started under one cap did: how many, their output
    tokens, the sum of their times per output token and of their run times (ms)."""

    jobs: float = 0.0
    tokens: float = 0.0
    tpot_sum: float = 0.0
    busy_ms: float = 0.0


PACE_FIELDS = tuple(f.name for f in fields(Pace))
"""Pace's fields, in order: the meter's `<field>:<cap>` and `Window.of_runs`'s arguments."""


class Meter:
    """What this worker's runs did per backend and per the cap they started under, until
    the next flush to Redis (the backend's meter: `jobs`, and `<field>:<cap>` of Pace)."""

    def __init__(self) -> None:
        self._paces: dict[tuple[str, int], Pace] = defaultdict(Pace)

    def record(self, backend: str, cap: int, output_tokens: int, run_ms: float) -> None:
        """A run of `backend` granted under `cap` served `output_tokens` in `run_ms`: its
        wall time less a model load, as its caller lives it. Not Ollama's eval_duration
        alone: a backend given more than its own parallelism queues requests inside
        (Ollama past OLLAMA_NUM_PARALLEL, llama.cpp past its slots) and the eval time of
        each hides that wait."""
        if output_tokens <= 0 or run_ms <= 0:
            return  # an embedding, an error: no pace to learn from
        pace = self._paces[backend, cap]
        pace.jobs += 1
        pace.tokens += output_tokens
        pace.tpot_sum += run_ms / output_tokens
        pace.busy_ms += run_ms

    async def flush(self, redis: Redis) -> None:
        paces, self._paces = self._paces, defaultdict(Pace)
        if not paces:
            return
        async with redis.pipeline(transaction=False) as pipe:
            for (backend, cap), pace in paces.items():
                key = keys.METER + backend
                pipe.hincrbyfloat(key, "jobs", pace.jobs)
                for name, value in zip(PACE_FIELDS, astuple(pace), strict=True):
                    pipe.hincrbyfloat(key, f"{name}:{cap}", value)
                pipe.pexpire(key, METER_TTL_MS)
            await pipe.execute()
