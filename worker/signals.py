"""The worker's two background loops: the heartbeat (leases, reaping) and the pub/sub
listener that turns Redis messages into local wake-ups. Both survive Redis outages."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time

from redis.exceptions import RedisError

from shared import keys
from shared.jobs import record_ttl_ms
from shared.store import DRIVER_ERRORS
from worker.state import WorkerState

log = logging.getLogger("gpugate.worker")

RETRY_S = 0.5


def heartbeat_interval_s(state: WorkerState) -> float:
    """Renew well before the lease lapses; reap promptly."""
    return min(1.0, state.settings.lease_ttl / 4)


async def heartbeat_once(state: WorkerState, started_at: float) -> None:
    info = json.dumps(
        {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started_at": started_at,
            "max_jobs": state.settings.worker_concurrency,
            "held": len(state.held),
        }
    )
    settings = state.settings
    lost = await state.scripts.heartbeat(
        args=[
            state.worker_id,
            state.lease_ms,
            info,
            settings.max_attempts,
            settings.result_ttl * 1000,
            record_ttl_ms(settings.result_ttl),
            *state.held,
        ]
    )
    for run_id in lost:
        run = run_id.decode()
        log.warning("lost the lease of run %s; stopping it", run)
        state.lose(run)


async def heartbeat_loop(state: WorkerState) -> None:
    started_at = time.time()
    interval = heartbeat_interval_s(state)
    while True:
        try:
            await heartbeat_once(state, started_at)
            state.redis_outage.recovered()
        except (*DRIVER_ERRORS, RedisError) as exc:
            state.redis_outage.failed(exc, "waiting for it")
        await asyncio.sleep(interval)


async def listen(state: WorkerState) -> None:
    """Subscribe to wake, slot and cancel messages; resubscribe after any Redis failure."""
    while True:
        try:
            async with state.pubsub_redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                await pubsub.subscribe(keys.WAKE_CHANNEL, keys.SLOTS_CHANNEL, keys.CANCEL_CHANNEL)
                # Messages may have been missed while (re)subscribing: look again.
                state.wake.set()
                state.slots_changed.fire()
                async for message in pubsub.listen():
                    dispatch(state, message["channel"], message["data"])
        except (*DRIVER_ERRORS, RedisError) as exc:
            state.redis_outage.failed(exc, "waiting for it")
            await asyncio.sleep(RETRY_S)


def dispatch(state: WorkerState, channel: bytes, data: bytes) -> None:
    name = channel.decode()
    if name == keys.WAKE_CHANNEL:
        state.wake.set()
    elif name == keys.SLOTS_CHANNEL:
        state.slots_changed.fire()
    elif name == keys.CANCEL_CHANNEL:
        state.cancel_job(data.decode())
