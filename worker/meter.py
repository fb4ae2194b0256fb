"""What this worker's runs did on each backend (tokens, time per output token), added to
the backend's meter in Redis at every flush, where the adaptive controller reads it
(worker/adaptive.py)."""

from __future__ import annotations

from collections import defaultdict

from redis.asyncio import Redis

from shared import keys

METER_TTL_MS = 60_000
"""A meter nobody takes (adaptive turned off) is gone after this."""


def tpot_ms(duration_ms: float, model_load_ms: float, output_tokens: int) -> float:
    """A job's time per output token, as its caller lives it: the run's wall time less a
    model load, per token. Not Ollama's eval_duration alone: a backend given more than its
    own parallelism queues requests inside (Ollama past OLLAMA_NUM_PARALLEL, llama.cpp
    past its slots) and the eval time of each hides that wait."""
    if output_tokens <= 0:
        return 0.0
    return max(0.0, duration_ms - model_load_ms) / output_tokens


class Meter:
    """What this worker's runs did per backend, until the next flush to Redis."""

    def __init__(self) -> None:
        self._sums: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])

    def record(self, backend: str, output_tokens: int, tpot_ms: float) -> None:
        if output_tokens <= 0 or tpot_ms <= 0:
            return  # an embedding, an error: no pace to learn from
        sums = self._sums[backend]
        sums[0] += 1
        sums[1] += output_tokens
        sums[2] += tpot_ms

    async def flush(self, redis: Redis) -> None:
        sums, self._sums = self._sums, defaultdict(lambda: [0.0, 0.0, 0.0])
        if not sums:
            return
        async with redis.pipeline(transaction=False) as pipe:
            for backend, (jobs, tokens, tpot_sum) in sums.items():
                key = keys.METER + backend
                pipe.hincrbyfloat(key, "jobs", jobs)
                pipe.hincrbyfloat(key, "tokens", tokens)
                pipe.hincrbyfloat(key, "tpot_sum", tpot_sum)
                pipe.pexpire(key, METER_TTL_MS)
            await pipe.execute()
