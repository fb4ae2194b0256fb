"""The fleet's counters a worker's runs add to: usage per key, jobs by outcome, errors by
code, and the queue-wait and job-duration histograms. Kept here and added to Redis in one
pipeline every FLUSH_S, not by the scripts once per job: at load one flush carries the
counts of hundreds of jobs, where finish.lua and dispatch.lua spent eight commands a job on
them (issue 21). What reads them (`/admin/usage`, `/metrics`, `/admin/status`) sees a run
at most FLUSH_S after it ended. A worker killed outright loses its last FLUSH_S of counts;
what must be exact is not here: budgets, token buckets and fair-share counters (finish.lua).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from redis.asyncio import Redis

from shared import keys
from shared.outage import supervised
from shared.redis.store import redis_errors
from shared.scripts import HISTOGRAMS, FinishReply, FinishStatus, Grant, histogram_field

if TYPE_CHECKING:
    from worker.state import WorkerContext

log = logging.getLogger("gpugate.worker.tally")

FLUSH_S = 0.5


class Tally:
    """Counts to add: (key, field) -> amount (an int, or a float for a field that holds
    one: HINCRBY refuses a field HINCRBYFLOAT wrote)."""

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str], int | float] = {}

    def dispatched(self, grant: Grant) -> None:
        """The job of `grant` left the queue (a batch line never waited in it)."""
        if grant.waited_ms is not None:
            self._observe("queue_wait_seconds", grant.waited_ms / 1000)

    def finished(
        self,
        grant: Grant,
        reply: FinishReply,
        *,
        error_code: str,
        duration_ms: float,
        input_tokens: int,
        output_tokens: int,
    ) -> None:
        """finish.lua recorded the run of `grant` (`reply`); a stale run counts nothing."""
        if reply.status is FinishStatus.STALE:
            return
        if input_tokens + output_tokens > 0 or duration_ms > 0:
            name = grant.usage_name
            self._add(keys.USAGE, f"{name}|input_tokens", input_tokens)
            self._add(keys.USAGE, f"{name}|output_tokens", output_tokens)
            self._add(keys.USAGE, f"{name}|gpu_ms", float(duration_ms))
        if reply.ended:
            self._add(keys.STATS, f"jobs_{reply.status}", 1)
        if error_code:
            self._add(keys.STATS, f"errors_{error_code}", 1)
        self._observe("job_duration_seconds", duration_ms / 1000)

    def _add(self, key: str, name: str, amount: float) -> None:
        self._counts[key, name] = self._counts.get((key, name), 0) + amount

    def _observe(self, name: str, value: float) -> None:
        """One count in the value's own bucket (the smallest bound it is under), and the
        sum; api/metrics.py adds the buckets up."""
        key = keys.histogram(name)
        bucket = next((b for b in HISTOGRAMS[name] if value <= b), None)
        self._add(key, "+Inf" if bucket is None else histogram_field(bucket), 1)
        self._add(key, "sum", float(value))

    async def flush(self, redis: Redis) -> None:
        """Add the counts to Redis; kept for the next flush if Redis cannot take them."""
        counts, self._counts = self._counts, {}
        if not counts:
            return
        try:
            with redis_errors():
                async with redis.pipeline(transaction=False) as pipe:
                    for (key, name), amount in counts.items():
                        if isinstance(amount, float):  # gpu_ms and sums: always floats
                            pipe.hincrbyfloat(key, name, amount)
                        else:
                            pipe.hincrby(key, name, amount)
                    await pipe.execute()
        except BaseException:
            for (key, name), amount in counts.items():
                self._add(key, name, amount)
            raise


async def tally_loop(ctx: WorkerContext) -> None:
    """Flush this worker's tally every FLUSH_S."""

    async def turn() -> float:
        await ctx.tally.flush(ctx.redis)
        return FLUSH_S

    await supervised("tally", turn, ctx.redis_outage, log, retry_s=FLUSH_S)
