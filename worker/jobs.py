"""The job function arq runs: hold the run, wait for a GPU slot, call Ollama, record.

A run never raises into arq (an exception in arq's machinery can stop the worker, see
../shared/ARQ.md); every ending is recorded by `finish.lua`. When the worker stops or
loses the run, it expires the run's lease so the reaper re-queues the job at once.
Through a Redis outage a run keeps waiting for its slot, and a finished run keeps its
outcome in memory until Redis takes it (or the run's lease was taken back meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from shared import keys
from shared.estimates import EWMA_WEIGHT
from shared.jobs import JobStatus
from shared.store import DRIVER_ERRORS
from worker.ollama import EventWriter, Outcome, Work, backend_failure, call, stream_error_chunk
from worker.state import Held, WorkerState

log = logging.getLogger("gpugate.worker")

SLOT_RECHECK_S = 1.0
"""A run waiting for a slot asks again this often even without a message (lost messages)."""
REDIS_RETRY_S = 0.5
"""While Redis is unreachable, a run retries its next step this often."""


async def run_job(ctx: dict[str, Any], job_id: str, attempt: int) -> None:
    state: WorkerState = ctx["gate"]
    run_id = keys.run_id(job_id, attempt)
    held = state.hold(run_id, job_id)
    try:
        work = await wait_for_slot(state, held, attempt)
        if work is None:
            return
        await run(state, held, attempt, work)
    except asyncio.CancelledError:
        # The worker is stopping: hand the run back now instead of after its lease.
        await asyncio.shield(expire_lease(state, run_id))
        raise
    finally:
        state.release(run_id)


async def wait_for_slot(state: WorkerState, held: Held, attempt: int) -> Work | None:
    """Hold the run until a GPU slot is ours; None when there is nothing to run."""
    settings = state.settings
    while True:
        if state.draining or held.lost:
            await expire_lease(state, held.run_id)
            return None
        changed = state.slots_changed.current()
        try:
            reply = await state.scripts.take_slot(
                args=[
                    held.job_id,
                    attempt,
                    state.worker_id,
                    state.lease_ms,
                    settings.gpu_concurrency,
                    settings.result_ttl * 1000,
                ]
            )
        except DRIVER_ERRORS:
            await asyncio.sleep(REDIS_RETRY_S)
            continue
        verdict = reply[0].decode()
        if verdict == "run":
            return Work(held.job_id, reply[1].decode(), reply[2].decode(), reply[3] == b"1")
        if verdict == "stale":
            return None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), SLOT_RECHECK_S)


async def run(state: WorkerState, held: Held, attempt: int, work: Work) -> None:
    settings = state.settings
    events = EventWriter(state.redis, work.job_id, settings.result_ttl * 1000)
    started = time.monotonic()
    held.call = asyncio.create_task(
        call(state.http, settings.ollama_url, work, events, settings.ollama_retries)
    )
    try:
        async with asyncio.timeout(settings.job_timeout):
            outcome: Outcome = await held.call
    except asyncio.CancelledError:
        if not (held.cancelled or held.lost) or asyncio.current_task().cancelling():  # type: ignore[union-attr]
            held.call.cancel()
            raise
        outcome = Outcome(JobStatus.CANCELLED)
    except TimeoutError:
        message = f"Ollama did not finish within GPUGATE_JOB_TIMEOUT ({settings.job_timeout:g}s)"
        if events.started:
            await events.chunk(stream_error_chunk(work.endpoint, message))
        outcome = backend_failure(message, code="timeout")
    except DRIVER_ERRORS as exc:  # a streamed chunk could not be written
        outcome = Outcome(
            JobStatus.FAILED,
            error={
                "code": "redis_unavailable",
                "message": f"Redis went away while relaying the stream ({exc.__class__.__name__})",
            },
        )
    except Exception as exc:  # a bug of ours must not take the worker down
        log.exception("job %s failed unexpectedly", work.job_id)
        outcome = backend_failure(f"gateway worker error: {exc.__class__.__name__}")
    if held.lost:
        return
    duration_ms = (time.monotonic() - started) * 1000
    opened = await record(
        state,
        held,
        [
            work.job_id,
            attempt,
            outcome.status.value,
            outcome.http_status or "",
            outcome.content_type,
            outcome.result,
            "" if outcome.error is None else json.dumps(outcome.error),
            settings.result_ttl * 1000,
            f"{duration_ms:.3f}",
            EWMA_WEIGHT,
            "" if outcome.error is None else outcome.error.get("code", ""),
            settings.breaker_threshold,
            int(settings.breaker_cooldown * 1000),
        ],
    )
    if opened:
        log.warning(
            "Ollama failed %d jobs in a row (last: %s); circuit breaker open: new work is "
            "refused until Ollama answers again",
            settings.breaker_threshold,
            outcome.error and outcome.error.get("message"),
        )


async def record(state: WorkerState, held: Held, finish_args: list[Any]) -> bool:
    """Run `finish.lua`, retrying through a Redis outage while the run is still ours.
    True if this ending opened the circuit breaker."""
    while not held.lost:
        try:
            _status, opened = await state.scripts.finish(args=finish_args)
            return bool(opened)
        except DRIVER_ERRORS:
            await asyncio.sleep(REDIS_RETRY_S)
    return False


async def expire_lease(state: WorkerState, run_id: str) -> None:
    """Let the reaper take the run back now: re-queued, or failed if it ran too often."""
    with contextlib.suppress(Exception):
        await state.redis.zadd(keys.LEASES, {run_id: 0}, xx=True)
        await state.redis.publish(keys.WAKE_CHANNEL, "released")
