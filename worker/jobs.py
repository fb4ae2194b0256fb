"""The job function arq runs for a run the scheduler granted (worker/arq_adapter.py):
call Ollama on the granted backend, relay the stream, record the outcome (finish.lua).

A run never raises into arq (an exception in arq's machinery can stop the worker); every
ending is recorded by `finish.lua`. When the worker stops, it expires the run's lease so
the reaper queues the job again at once. Through a Redis outage a finished run keeps its
outcome in memory until Redis takes it (or the run's lease was taken back meanwhile).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from typing import TYPE_CHECKING

from shared import keys, logs, telemetry
from shared.errors import RedisUnavailable
from shared.estimates import EWMA_WEIGHT
from shared.jobs import ErrorCode, record_ttl_ms
from shared.redis.store import REDIS_ERRORS
from shared.scripts import FinishStatus, Grant
from worker.adaptive import backoff
from worker.batches import output_line
from worker.ollama import EventWriter, Outcome, Work, backend_failure, call, stream_error_chunk
from worker.state import Held, WorkerContext

if TYPE_CHECKING:
    from worker.tracing import RunSpans

log = logging.getLogger("gpugate.worker")

REDIS_RETRY_S = 0.5
"""While Redis is unreachable, a finished run retries recording its outcome this often."""


async def run_job(ctx: WorkerContext, job_id: str, attempt: int) -> None:
    """Run `job_id.attempt`, whose GPU slot the scheduler granted to this worker."""
    run_id = keys.run_id(job_id, attempt)
    held = ctx.held.get(run_id)
    if held is None:  # arq ran a run we were not granted: nothing of ours to do
        return
    grant = held.grant
    if logs.JSON:  # the run's log lines name it (shared/logs.py)
        logs.bind(job_id=job_id, backend=grant.backend, key=grant.owner_name)
    spans = _spans(ctx, grant) if grant.traceparent and telemetry.ENABLED else None
    try:
        outcome = await run(ctx, held)
        if spans is not None:
            spans.called(outcome)
        await measure(ctx, held, outcome)
        if not held.lost:
            await record(ctx, held, outcome)
    except asyncio.CancelledError:
        # The worker is stopping: hand the run back now instead of after its lease.
        await asyncio.shield(expire_lease(ctx, run_id))
        raise
    finally:
        if spans is not None:
            spans.end()
        ctx.release(run_id)


PUSHBACK_STATUSES = (429, 503)
_PUSHBACK = re.compile(r"failed with (429|503)\b|out of memory", re.IGNORECASE)
"""A 5xx is retried and reported as `Ollama failed with 503: …` (worker/ollama.py)."""


async def measure(ctx: WorkerContext, held: Held, outcome: Outcome) -> None:
    """What the run tells adaptive concurrency (worker/adaptive.py): its pace, or that the
    backend pushed back (503, 429, out of memory), which halves the cap at once."""
    backend = ctx.backend(held.grant.backend)
    if not ctx.settings.adaptive_on(backend):
        return
    tokens = outcome.usage.output_tokens
    run_ms = max(0.0, held.duration_ms - outcome.model_load_ms)
    ctx.meter.record(backend.name, held.grant.cap, tokens, run_ms)
    message = str((outcome.error or {}).get("message", ""))
    if outcome.http_status in PUSHBACK_STATUSES or _PUSHBACK.search(message):
        why = f"it answered {outcome.http_status}" if outcome.http_status else message[:120]
        with contextlib.suppress(RedisUnavailable):
            await backoff(ctx, backend, why)


def _spans(ctx: WorkerContext, grant: Grant) -> RunSpans:
    """The run's spans, in the trace its request began (worker/tracing.py)."""
    from worker.tracing import RunSpans

    return RunSpans(grant, ctx.backend(grant.backend).url, ctx.worker_id)


async def run(ctx: WorkerContext, held: Held) -> Outcome:
    settings, grant = ctx.settings, held.grant
    backend = ctx.backend(grant.backend)
    work = Work(
        grant.job_id,
        grant.endpoint,
        grant.body,
        grant.stream,
        backend.url,
        alone=len(settings.backends) == 1,
        openai=backend.openai,
        headers=tuple(backend.auth_headers().items()),
    )
    events = EventWriter(ctx.redis, work.job_id, settings.result_ttl * 1000)
    held.started = time.monotonic()
    held.call = asyncio.create_task(call(ctx.http, work, events, settings.ollama_retries))
    try:
        async with asyncio.timeout(settings.job_timeout):
            outcome: Outcome = await held.call
            return outcome
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if not (held.cancelled or held.lost) or (task is not None and task.cancelling()):
            held.call.cancel()
            events.abandon()
            raise
        events.abandon()
        return Outcome(FinishStatus.CANCELLED)
    except TimeoutError:
        message = f"Ollama did not finish within GPUGATE_JOB_TIMEOUT ({settings.job_timeout:g}s)"
        if events.started:
            with contextlib.suppress(*REDIS_ERRORS):
                await events.chunk(stream_error_chunk(work.endpoint, message))
                await events.flush()
        return backend_failure(message, code=ErrorCode.TIMEOUT)
    except REDIS_ERRORS as exc:  # a streamed chunk could not be written (an OOM reply too)
        return Outcome(
            FinishStatus.FAILED,
            error={
                "code": ErrorCode.REDIS_UNAVAILABLE,
                "message": f"Redis went away while relaying the stream ({exc.__class__.__name__})",
            },
        )
    except Exception as exc:  # a bug of ours must not take the worker down
        log.exception("job %s failed unexpectedly", work.job_id)
        return backend_failure(f"gateway worker error: {exc.__class__.__name__}")


async def record(ctx: WorkerContext, held: Held, outcome: Outcome) -> None:
    """Run `finish.lua`, retrying through a Redis outage while the run is still ours."""
    settings, grant = ctx.settings, held.grant
    started = time.monotonic()
    warned = False
    error = outcome.error
    error_code = "" if error is None else str(error.get("code", ""))
    # a batch's line: its end is a line of the batch's output or error file
    batch_line = output_line(grant, outcome) if grant.batch else ""
    result = "" if grant.batch else outcome.result
    while not held.lost:
        try:
            reply = await ctx.scripts.finish(
                job_id=grant.job_id,
                attempt=grant.attempt,
                backend=grant.backend,
                status=outcome.status,
                http_status=outcome.http_status or "",
                content_type=outcome.content_type,
                result=result,
                error="" if error is None else json.dumps(error),
                error_code=error_code,
                duration_ms=held.duration_ms,
                input_tokens=outcome.usage.input_tokens,
                output_tokens=outcome.usage.output_tokens,
                model_load_ms=outcome.model_load_ms,
                cold=grant.cold,
                max_attempts=settings.max_attempts,
                breaker_threshold=settings.breaker_threshold,
                breaker_cooldown_ms=int(settings.breaker_cooldown * 1000),
                ewma_weight=EWMA_WEIGHT,
                wake=ctx.draining,
                result_ttl_ms=settings.result_ttl * 1000,
                record_ttl_ms=record_ttl_ms(settings.result_ttl),
                batch_line=batch_line,
            )
        except RedisUnavailable as exc:
            if not warned and time.monotonic() - started > settings.lease_ttl * 3:
                warned = True  # once: the outage itself is logged by the heartbeat
                log.warning(
                    "job %s: its end waits for Redis (%s); kept while the run is ours",
                    grant.job_id,
                    exc.reason,
                )
            await asyncio.sleep(REDIS_RETRY_S)
            continue
        if not reply.waiting:
            ctx.quiet.add(grant.run_id)
        ctx.tally.finished(
            grant,
            reply,
            error_code=error_code,
            duration_ms=held.duration_ms,
            input_tokens=outcome.usage.input_tokens,
            output_tokens=outcome.usage.output_tokens,
        )
        if settings.redis_min_replicas > 0:  # the end survives a failover too
            with contextlib.suppress(*REDIS_ERRORS):
                await ctx.lane.wait_replicas(settings.redis_min_replicas, settings.redis_wait_ms)
        if reply.breaker_opened:
            log.warning(
                "backend %s failed %d jobs in a row (last: %s); it is out of dispatch until it "
                "answers again",
                grant.backend,
                settings.breaker_threshold,
                error and error.get("message"),
            )
        return


async def expire_lease(ctx: WorkerContext, run_id: str) -> None:
    """Let the reaper take the run back now: queued again, or failed if it ran too often."""
    with contextlib.suppress(Exception):
        await ctx.redis.zadd(keys.LEASES, {run_id: 0}, xx=True)
