"""Closing the circuit breaker: while it is open, ask Ollama every PROBE_S whether it
answers; the first answer closes it for the whole fleet. (`finish.lua` opens it after
GPUGATE_BREAKER_THRESHOLD jobs in a row failed on Ollama; `admit.lua` refuses new work
while it is open.)"""

from __future__ import annotations

import asyncio
import logging

import httpx
from redis.exceptions import RedisError

from shared import keys
from shared.store import DRIVER_ERRORS
from worker.state import WorkerState

log = logging.getLogger("gpugate.worker")

PROBE_S = 1.0
PROBE_TIMEOUT_S = 2.0


async def ollama_answers(state: WorkerState) -> bool:
    """Any HTTP answer below 500 from Ollama's cheapest endpoint."""
    try:
        response = await state.http.get(
            state.settings.ollama_url + "/api/version", timeout=PROBE_TIMEOUT_S
        )
    except httpx.HTTPError:
        return False
    return response.status_code < 500


async def breaker_loop(state: WorkerState) -> None:
    while True:
        await asyncio.sleep(PROBE_S)
        try:
            if await state.redis.exists(keys.BREAKER) and await ollama_answers(state):
                async with state.redis.pipeline(transaction=True) as pipe:
                    pipe.delete(keys.BREAKER)
                    pipe.hset(keys.STATS, "backend_failures_in_row", "0")
                    closed, _ = await pipe.execute()
                if closed:
                    log.warning("Ollama answers again: circuit breaker closed")
        except (*DRIVER_ERRORS, RedisError):
            pass  # the heartbeat reports Redis outages
