"""The worker's background loops, each run by `supervised` (shared/outage.py): a Redis
failure of any kind, an error reply such as OOM included, is an outage logged once and
retried; no loop ends but by cancellation.

- `heartbeat`: say it is alive, renew the leases of its runs, reap the runs of dead
  workers, cancel expired queued jobs (heartbeat.lua);
- `waker`: while it has room, block on the wake list (one entry wakes one worker);
- `cancels`: pub/sub of cancelled job ids, turned into closing the Ollama call;
- `fleet`: probe backends whose breaker is open, and learn what each backend serves
  (/api/tags) and has loaded (/api/ps); of an `openai` backend, both from /v1/models;
- `batches`: expire, drain and end batches (worker/batches.py);
- `webhooks`: deliver the keys' webhook events (worker/webhooks.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp

from shared import keys
from shared.jobs import record_ttl_ms
from shared.outage import supervised
from shared.redis.store import redis_errors
from shared.scripts import fleet_argv
from shared.settings import Backend
from worker.adaptive import adaptive_loop
from worker.batches import batch_loop
from worker.state import WorkerContext, heartbeat_interval_s
from worker.tally import tally_loop
from worker.webhooks import webhook_loop

log = logging.getLogger("gpugate.worker")

RETRY_S = 0.5
WAKE_BLOCK_S = 1
PROBE_S = 1.0
PROBE_TIMEOUT = aiohttp.ClientTimeout(total=2.0)
LOADED_REFRESH_S = 2.0
"""How often some worker reads each backend's /api/ps."""
MODELS_REFRESH_S = 15.0
"""How often some worker reads each backend's /api/tags or /v1/models (the SPEC: at least
every 30 s)."""


def start_loops(ctx: WorkerContext) -> None:
    loops: dict[str, Callable[[WorkerContext], Coroutine[Any, Any, None]]] = {
        "heartbeat": heartbeat_loop,
        "waker": waker_loop,
        "cancels": cancel_loop,
        "fleet": fleet_loop,
        "adaptive": adaptive_loop,
        "tally": tally_loop,
        "batches": batch_loop,
        "webhooks": webhook_loop,
    }
    ctx.tasks = [asyncio.create_task(loop(ctx), name=name) for name, loop in loops.items()]


async def stop_loops(ctx: WorkerContext) -> None:
    for task in ctx.tasks:
        task.cancel()
    await asyncio.gather(*ctx.tasks, return_exceptions=True)


async def heartbeat_once(ctx: WorkerContext, started_at: float) -> None:
    settings = ctx.settings
    info = json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started_at,
            "max_jobs": settings.worker_concurrency,
            "held": len(ctx.held),
        }
    )
    reply = await ctx.scripts.heartbeat(
        worker=ctx.worker_id,
        info=info,
        lease_ms=settings.lease_ms,
        worker_stale_ms=settings.worker_stale_ms,
        max_runs=settings.max_attempts,
        result_ttl_ms=settings.result_ttl * 1000,
        record_ttl_ms=record_ttl_ms(settings.result_ttl),
        fair_share_memory_ms=settings.fair_share_memory_ms,
        held=ctx.held_runs(),
        backends=fleet_argv(settings.backends),
    )
    for run_id in reply.lost:
        log.warning("lost the lease of run %s; stopping it", run_id)
        ctx.lose(run_id)
    for job_id in reply.cancelled:
        ctx.cancel_job(job_id)
    if reply.reaped:
        ctx.wake.set()  # slots came back


async def heartbeat_loop(ctx: WorkerContext) -> None:
    started_at = time.time()
    interval = heartbeat_interval_s(ctx.settings)

    async def beat() -> float:
        await heartbeat_once(ctx, started_at)
        ctx.redis_outage.recovered()
        return interval

    await supervised("heartbeat", beat, ctx.redis_outage, log, retry_s=interval)


async def waker_loop(ctx: WorkerContext) -> None:
    """Take one wake-up from the list while this worker could start a run."""

    async def wait_for_wakes() -> float:
        ctx.room.clear()  # before the look at `held`: a release after it sets it again
        if ctx.draining or len(ctx.held) >= ctx.settings.worker_concurrency:
            with contextlib.suppress(TimeoutError):  # until a run is let go, or a second
                await asyncio.wait_for(ctx.room.wait(), WAKE_BLOCK_S)
            return 0.0
        with redis_errors():
            popped = await ctx.blocking_redis.blpop([keys.WAKE], timeout=WAKE_BLOCK_S)  # type: ignore[misc]
        if popped is not None:
            ctx.wake.set()
        return 0.0

    await supervised("waker", wait_for_wakes, ctx.redis_outage, log, retry_s=RETRY_S)


async def cancel_loop(ctx: WorkerContext) -> None:
    """Subscribe to cancelled job ids; subscribe again after any Redis failure."""

    async def listen() -> float:
        with redis_errors():
            async with ctx.blocking_redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(keys.CANCEL_CHANNEL)
                async for message in pubsub.listen():
                    ctx.cancel_job(message["data"].decode())
        return RETRY_S  # the subscription ended: subscribe again

    await supervised("cancels", listen, ctx.redis_outage, log, retry_s=RETRY_S)


async def _status(ctx: WorkerContext, backend: Backend, path: str) -> int | None:
    try:
        async with ctx.http.get(
            backend.url + path, timeout=PROBE_TIMEOUT, headers=backend.auth_headers()
        ) as response:
            return response.status
    except (aiohttp.ClientError, TimeoutError):
        return None


async def _answers(ctx: WorkerContext, backend: Backend) -> bool:
    """Ollama: any HTTP answer below 500 from its cheapest endpoint. An `openai` backend:
    200 from /health, or else from /v1/models (not every such server has /health)."""
    if not backend.openai:
        status = await _status(ctx, backend, "/api/version")
        return status is not None and status < 500
    if await _status(ctx, backend, "/health") == 200:
        return True
    return await _status(ctx, backend, "/v1/models") == 200


async def _get_json(ctx: WorkerContext, backend: Backend, path: str) -> Any:
    try:
        async with ctx.http.get(
            backend.url + path,
            timeout=PROBE_TIMEOUT,
            raise_for_status=True,
            headers=backend.auth_headers(),
        ) as response:
            return await response.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _turn(ctx: WorkerContext, what: str, backend: Backend, every_s: float) -> bool:
    """True for the one worker whose turn it is to refresh `what` of `backend` now."""
    key = f"{keys.PREFIX}turn:{what}:{backend.name}"
    return bool(await ctx.redis.set(key, ctx.worker_id, nx=True, px=int(every_s * 1000)))


async def refresh_backend(ctx: WorkerContext, backend: Backend) -> None:
    redis = ctx.redis
    down = keys.down_field(backend.name)
    down_until = await redis.hget(keys.FLEET, down)  # type: ignore[misc]
    is_down = down_until is not None and time.time() * 1000 < float(down_until)
    if is_down and await _answers(ctx, backend):
        async with redis.pipeline(transaction=True) as pipe:
            pipe.hdel(keys.FLEET, down)
            pipe.hset(keys.BACKEND_FAILURES, backend.name, "0")
            closed, _ = await pipe.execute()
        if closed:
            log.warning("backend %s answers again: back in dispatch", backend.name)
    if backend.openai:
        await refresh_openai_models(ctx, backend)
        return
    if await _turn(ctx, "ps", backend, LOADED_REFRESH_S):
        ps = await _get_json(ctx, backend, "/api/ps")
        if isinstance(ps, dict):
            await set_loaded(ctx, backend, [str(m.get("name")) for m in ps.get("models", [])])
    if backend.models is None and await _turn(ctx, "tags", backend, MODELS_REFRESH_S):
        tags = await _get_json(ctx, backend, "/api/tags")
        if isinstance(tags, dict) and tags.get("models"):
            names = {str(m.get("name")) for m in tags["models"]}
            names |= {n.removesuffix(":latest") for n in names}
            await set_models(ctx, backend, names)


async def set_models(ctx: WorkerContext, backend: Backend, names: set[str]) -> None:
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.backend_models(backend.name))
        pipe.sadd(keys.backend_models(backend.name), *names)
        pipe.hset(keys.FLEET, keys.models_field(backend.name), "1")
        await pipe.execute()


async def refresh_openai_models(ctx: WorkerContext, backend: Backend) -> None:
    """An `openai` backend serves what its /v1/models lists (or its configured `models`),
    all of it counted as loaded: such a server has no /api/ps, and serves them at once."""
    if not await _turn(ctx, "tags", backend, MODELS_REFRESH_S):
        return
    if backend.models is not None:
        await set_loaded(ctx, backend, list(backend.models))
        return
    listed = await _get_json(ctx, backend, "/v1/models")
    data = listed.get("data") if isinstance(listed, dict) else None
    if isinstance(data, list) and data:
        names = {str(m.get("id")) for m in data if isinstance(m, dict) and m.get("id")}
        names |= {n.removesuffix(":latest") for n in names}  # Ollama's own /v1 lists those
        if names:
            await set_models(ctx, backend, names)
            await set_loaded(ctx, backend, sorted(names))


async def set_loaded(ctx: WorkerContext, backend: Backend, models: list[str]) -> None:
    """What /api/ps shows is loaded on `backend` now (names with and without `:latest`)."""
    now_ms = int(time.time() * 1000)
    names = {m for name in models for m in (name, name.removesuffix(":latest"))}
    async with ctx.redis.pipeline(transaction=True) as pipe:
        pipe.delete(keys.backend_loaded(backend.name))
        if names:
            pipe.zadd(keys.backend_loaded(backend.name), dict.fromkeys(names, now_ms))
        await pipe.execute()


async def configure_models(ctx: WorkerContext) -> None:
    """Backends with a configured model list serve exactly that."""
    async with ctx.redis.pipeline(transaction=True) as pipe:
        for backend in ctx.settings.backends:
            if backend.models is not None:
                pipe.delete(keys.backend_models(backend.name))
                pipe.sadd(keys.backend_models(backend.name), *backend.models)
                pipe.hset(keys.FLEET, keys.models_field(backend.name), "1")
        await pipe.execute()


async def fleet_loop(ctx: WorkerContext) -> None:
    configured = False

    async def refresh() -> float:
        nonlocal configured
        with redis_errors():
            if not configured:
                await configure_models(ctx)
                configured = True
            await asyncio.gather(*(refresh_backend(ctx, b) for b in ctx.settings.backends))
        return PROBE_S

    await supervised("fleet", refresh, ctx.redis_outage, log, retry_s=PROBE_S)
