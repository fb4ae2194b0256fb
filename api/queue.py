"""The queue as every API instance sees it: read from Redis, never kept locally."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.client import Pipeline

from api.state import Gate
from shared import keys
from shared.estimates import Backlog
from shared.store import redis_errors

BACKLOG_REPLIES = 4


def queue_backlog(pipe: Pipeline) -> None:
    """Add the backlog reads to `pipe`; `backlog_from` reads their BACKLOG_REPLIES replies."""
    pipe.zcard(keys.QUEUED)
    pipe.zcard(keys.RUNNING)
    pipe.get(keys.CAP)
    pipe.hget(keys.STATS, "mean_job_ms")


def backlog_from(replies: list[Any], default_cap: int) -> Backlog:
    depth, running, cap, mean = replies
    return Backlog(
        depth=int(depth),
        running=int(running),
        cap=int(cap) if cap else default_cap,
        mean_job_ms=float(mean) if mean else None,
    )


async def read_backlog(gate: Gate) -> Backlog:
    with redis_errors():
        async with gate.redis.pipeline(transaction=False) as pipe:
            queue_backlog(pipe)
            replies = await pipe.execute()
    return backlog_from(replies, gate.settings.gpu_concurrency)


@dataclass(frozen=True)
class Snapshot:
    """Queue-wide facts for /metrics and /admin/status."""

    backlog: Backlog
    workers: list[dict[str, Any]]
    stats: dict[str, float]
    breaker_open: bool = False
    histograms: dict[str, dict[str, float]] = field(default_factory=dict)
    running_jobs: list[dict[str, Any]] = field(default_factory=list)


HISTOGRAMS = ("queue_wait_seconds", "job_duration_seconds")


def _floats(raw: dict[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}


async def read_snapshot(gate: Gate) -> Snapshot:
    stale_ms = gate.settings.lease_ttl * 3000
    with redis_errors():
        async with gate.redis.pipeline(transaction=False) as pipe:
            queue_backlog(pipe)
            pipe.time()
            pipe.zrange(keys.WORKERS, 0, -1, withscores=True)
            pipe.hgetall(keys.STATS)
            pipe.zrange(keys.RUNNING, 0, -1, withscores=True)
            pipe.exists(keys.BREAKER)
            for name in HISTOGRAMS:
                pipe.hgetall(keys.histogram(name))
            replies = await pipe.execute()
        backlog = backlog_from(replies[:BACKLOG_REPLIES], gate.settings.gpu_concurrency)
        now, workers, stats, running, breaker, *hists = replies[BACKLOG_REPLIES:]
        now_ms = now[0] * 1000 + now[1] // 1000
        live = [(w.decode(), int(s)) for w, s in workers if now_ms - s <= stale_ms]
        runs = [(*keys.split_run(run), started) for run, started in running]
        async with gate.redis.pipeline(transaction=False) as pipe:
            for worker_id, _ in live:
                pipe.hget(keys.worker(worker_id), "info")
            for job_id, _attempt, _started in runs:
                pipe.hget(keys.job(job_id), "worker")
            infos = await pipe.execute()
    worker_infos = infos[: len(live)]
    run_workers = infos[len(live) :]
    return Snapshot(
        backlog=backlog,
        workers=[
            {
                "id": worker_id,
                "last_heartbeat": beat / 1000,
                **(json.loads(info) if info else {}),
            }
            for (worker_id, beat), info in zip(live, worker_infos, strict=True)
        ],
        stats=_floats(stats),
        breaker_open=bool(breaker),
        histograms={name: _floats(h) for name, h in zip(HISTOGRAMS, hists, strict=True)},
        running_jobs=[
            {
                "job_id": job_id,
                "attempt": attempt,
                "started_at": started / 1000,
                "worker": (worker or b"").decode(),
            }
            for (job_id, attempt, started), worker in zip(runs, run_workers, strict=True)
        ],
    )
