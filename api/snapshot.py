"""The queue and the fleet as every API instance sees them: read from Redis, never kept
locally (`/v1/queue`, `/admin/status`, `/metrics`, `/ready`)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline

from shared import keys, scripts
from shared.estimates import Backlog
from shared.redis.store import redis_errors
from shared.settings import Settings

_PER_BACKEND = 1
_FIXED = 3


def queue_backlog(pipe: Pipeline, settings: Settings) -> None:
    """Add the backlog reads to `pipe`; `backlog_from` reads their replies."""
    pipe.zcard(keys.QUEUED)
    pipe.hget(keys.MODEL_STATS, keys.MEAN_JOB_MS)
    pipe.hgetall(keys.FLEET)
    for b in settings.backends:
        pipe.zcard(keys.backend_running(b.name))


def backlog_replies(settings: Settings) -> int:
    return _FIXED + _PER_BACKEND * len(settings.backends)


@dataclass(frozen=True)
class _Caps:
    ceiling: int
    """The operator's live cap, else the configured one."""
    effective: int
    """What dispatch fills: below the ceiling when adaptive concurrency lowered it."""
    running: int
    healthy: bool


def _caps(replies: list[Any], settings: Settings) -> list[_Caps]:
    state = {k.decode(): v for k, v in (replies[2] or {}).items()}
    now_ms = time.time() * 1000
    out = []
    for i, b in enumerate(settings.backends):
        running = replies[_FIXED + _PER_BACKEND * i]
        cap = state.get(keys.cap_field(b.name))
        ceiling = int(cap) if cap else b.gpu_concurrency
        found = state.get(keys.effective_field(b.name))
        down_until = state.get(keys.down_field(b.name))
        out.append(
            _Caps(
                ceiling,
                min(ceiling, int(found)) if found else ceiling,
                int(running),
                healthy=not down_until or now_ms >= float(down_until),
            )
        )
    return out


def backlog_from(replies: list[Any], settings: Settings) -> Backlog:
    caps = _caps(replies, settings)
    return Backlog(
        depth=int(replies[0]),
        running=sum(c.running for c in caps),
        cap=sum(c.effective for c in caps),
        mean_job_ms=float(replies[1]) if replies[1] else None,
    )


@dataclass(frozen=True)
class BackendView:
    name: str
    url: str
    gpu_concurrency: int
    running: int
    healthy: bool
    loaded_models: list[str]
    kind: str = "ollama"
    """`openai`: an OpenAI-compatible server (its models all count as loaded)."""
    effective_concurrency: int = 0
    """What dispatch fills now: `gpu_concurrency`, or below it what adaptive concurrency
    found (worker/adaptive.py)."""
    adaptive: bool = False

    def public(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "url": self.url,
            "gpu_concurrency": self.gpu_concurrency,
            "effective_concurrency": self.effective_concurrency or self.gpu_concurrency,
            "adaptive": self.adaptive,
            "running": self.running,
            "healthy": self.healthy,
            "loaded_models": self.loaded_models,
        }


def _model_names(loaded: list[bytes]) -> list[str]:
    """Loaded models, each once (the loaded set holds `x` and `x:latest` for matching)."""
    return sorted({m.decode().removesuffix(":latest") for m in loaded})


@dataclass(frozen=True)
class Queue:
    backlog: Backlog
    backends: list[BackendView]
    batch_queued: int = 0
    """Batch lines waiting (not in the backlog: they take only what it leaves)."""
    batch_running: int = 0


async def read_queue(redis: Redis, settings: Settings) -> Queue:
    with redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            queue_backlog(pipe, settings)
            for b in settings.backends:
                pipe.zrange(keys.backend_loaded(b.name), 0, -1)
            pipe.hmget(keys.STATS, ["batch_queued", "batch_running"])
            *replies, batch = await pipe.execute()
    n = backlog_replies(settings)
    caps = _caps(replies[:n], settings)
    backends = [
        BackendView(
            b.name,
            b.url,
            c.ceiling,
            c.running,
            c.healthy,
            _model_names(loaded),
            b.kind,
            effective_concurrency=c.effective,
            adaptive=settings.adaptive_on(b),
        )
        for b, c, loaded in zip(settings.backends, caps, replies[n:], strict=True)
    ]
    queued, running = (int(v or 0) for v in batch)
    return Queue(backlog_from(replies[:n], settings), backends, max(0, queued), max(0, running))


@dataclass(frozen=True)
class Snapshot:
    """Fleet-wide facts for /metrics and /admin/status."""

    queue: Queue
    workers: list[dict[str, Any]]
    stats: dict[str, float]
    histograms: dict[str, dict[str, float]] = field(default_factory=dict)
    running_jobs: list[dict[str, Any]] = field(default_factory=list)
    model_loads: dict[tuple[str, str], float] = field(default_factory=dict)
    usage: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def backlog(self) -> Backlog:
        return self.queue.backlog


HISTOGRAMS = tuple(scripts.HISTOGRAMS)
USAGE_KINDS = ("requests", "input_tokens", "output_tokens", "gpu_ms")


def _floats(raw: dict[bytes, bytes]) -> dict[str, float]:
    return {k.decode(): float(v) for k, v in raw.items()}


def _fleet_means(means: list[bytes | None]) -> dict[str, float]:
    """The fleet's moving means (kept with the models', finish.lua), as stats show them."""
    names = ("mean_cost", "mean_job_ms")
    return {name: float(v) for name, v in zip(names, means, strict=True) if v is not None}


def usage_by_key(raw: dict[str, float]) -> dict[str, dict[str, float]]:
    """`name|kind -> count` as `{name: {kind: count}}`, every kind present."""
    out: dict[str, dict[str, float]] = {}
    for field_name, value in raw.items():
        name, _, kind = field_name.rpartition("|")
        out.setdefault(name, dict.fromkeys(USAGE_KINDS, 0.0))[kind] = value
    return out


async def read_snapshot(redis: Redis, settings: Settings) -> Snapshot:
    queue = await read_queue(redis, settings)
    with redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            pipe.time()
            pipe.zrange(keys.WORKERS, 0, -1, withscores=True)
            pipe.hgetall(keys.STATS)
            pipe.hmget(keys.MODEL_STATS, [keys.MEAN_COST, keys.MEAN_JOB_MS])
            pipe.zrange(keys.LEASES, 0, -1)
            pipe.hgetall(keys.MODEL_LOADS)
            pipe.hgetall(keys.USAGE)
            for name in HISTOGRAMS:
                pipe.hgetall(keys.histogram(name))
            now, workers, stats, means, running, loads, usage, *hists = await pipe.execute()
        now_ms = now[0] * 1000 + now[1] // 1000
        live = [(w.decode(), int(s)) for w, s in workers if now_ms - s <= settings.worker_stale_ms]
        runs = [keys.split_run(run) for run in running]
        async with redis.pipeline(transaction=False) as pipe:
            for worker_id, _ in live:
                pipe.hget(keys.worker(worker_id), "info")
            for job_id, _attempt in runs:
                pipe.hmget(keys.job(job_id), ["worker", "backend", "started_at"])
            infos = await pipe.execute()
    worker_infos = infos[: len(live)]
    run_fields = infos[len(live) :]
    return Snapshot(
        queue=queue,
        workers=[
            {"id": worker_id, "last_heartbeat": beat / 1000, **(json.loads(info) if info else {})}
            for (worker_id, beat), info in zip(live, worker_infos, strict=True)
        ],
        stats=_floats(stats) | _fleet_means(means),
        histograms={name: _floats(h) for name, h in zip(HISTOGRAMS, hists, strict=True)},
        running_jobs=[
            {
                "job_id": job_id,
                "attempt": attempt,
                "started_at": float(fields[2] or 0) / 1000,
                "worker": (fields[0] or b"").decode(),
                "backend": (fields[1] or b"").decode(),
            }
            for (job_id, attempt), fields in zip(runs, run_fields, strict=True)
        ],
        model_loads={
            tuple(k.rsplit("|", 1)): v  # type: ignore[misc]
            for k, v in _floats(loads).items()
        },
        usage=usage_by_key(_floats(usage)),
    )
