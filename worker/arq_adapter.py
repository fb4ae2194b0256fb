"""gpugate's use of arq 0.28, in one place: the `Worker` overrides, arq's job format, the
JSON serializer, and the clients opened in `on_startup` and closed in `on_shutdown`.

arq is the worker's runtime: its Worker runs the process (its loop, `max_jobs` and the
task bookkeeping, on_startup/on_shutdown, the health-check key, SIGTERM draining with
`job_completion_wait`). A job's record is gpugate's own (shared/jobs.py): arq's per-run
records (`arq:job:<run>`, `arq:queue`, `arq:in-progress:<run>`) were written for every
job and read by nothing here, so none is written (issue 21: five Redis commands a job).

What is replaced, and why:

- *Which run starts.* arq reads the head of its ZSET and claims ids one by one
  (WATCH/MULTI per id, ~5 commands each), in score order only. Here the scheduler
  (shared/lua/lib/schedule.lua) grants this worker as many runs as it has free places,
  over every waiting job of the fleet (priority, fair share, a backend with a free slot
  and the model), and claims the slots in the same script: one round trip for the whole
  batch. `_poll_iteration` asks it (dispatch.lua), then starts arq's `run_job` for each
  grant.
- *When to look.* arq polls every `poll_delay`. Here an idle worker blocks on the wake
  list (BLPOP `gpugate:wake`): admission pushes one entry (at most 16 wait there), so one
  idle worker wakes, not all. A worker whose run ended asks again at once, unless the
  run's finish saw nothing waiting (finish.lua's `waiting`): then the next admission
  wakes it, and no call asks the scheduler for nothing.
- *arq's per-job reads and writes.* arq's `run_job` reads the job record back and
  counts a try (a MULTI/EXEC), then writes the end (another): the grant already carries
  the work and attempts are ours (shared/jobs.py). `run_job` here calls the job function
  directly, under arq's timeout.
- A Redis outage does not stop the worker (arq alone would exit): the loop waits for
  Redis to come back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import signal
import time
from typing import Any

import aiohttp
from arq.connections import ArqRedis
from arq.worker import Worker, func

from shared import keys
from shared.errors import RedisUnavailable
from shared.outage import end_if_cancelled
from shared.redis import store
from shared.redis.lane import Lane
from shared.scripts import Grant, Scripts
from shared.settings import Settings
from worker import jobs
from worker.loops import start_loops, stop_loops
from worker.state import WorkerContext

log = logging.getLogger("gpugate.worker")

IDLE_WAIT_S = 1.0
"""An idle worker asks for work at least this often (a lost wake-up, an affinity wait)."""
REDIS_RETRY_S = 0.5
ARQ_TIMEOUT_S = 7 * 86400
"""arq's own job timeout: a backstop only; job runs are bounded by GPUGATE_JOB_TIMEOUT."""


def arq_serialize(obj: dict[str, Any]) -> bytes:
    """arq's job and result serializer: JSON, never pickle (arq records failures as
    exceptions: JSON keeps their text only)."""
    return json.dumps(
        obj, separators=(",", ":"), default=lambda v: f"{type(v).__name__}: {v}"
    ).encode()


def arq_deserialize(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("an arq record must be a JSON object")
    return value


class GateWorker(Worker):
    """arq's Worker, started by the scheduler's grants instead of its own queue reads."""

    def __init__(self, context: WorkerContext, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.context = context

    async def main(self) -> None:
        while True:  # Redis may be down when the worker starts
            try:
                await self.pool.ping()
                break
            except store.REDIS_ERRORS as exc:
                self.context.redis_outage.failed(store.unavailable(exc), "waiting for it")
                await asyncio.sleep(REDIS_RETRY_S)
        self.context.redis_outage.recovered()
        await super().main()

    async def _poll_iteration(self) -> None:
        """One turn of arq's loop, which ends the worker on any exception: so nothing
        raises out of here. Redis failures (error replies included) wait for Redis; any
        other failure is logged and the next turn tries again. A stop (arq cancels this
        loop's task) that a redis-py write lost ends it all the same (shared/outage.py
        `supervised` says how a cancel gets lost)."""
        try:
            await self._poll_once()
            end_if_cancelled()
        except (RedisUnavailable, *store.REDIS_ERRORS) as exc:
            self.context.redis_outage.failed(store.unavailable(exc), "waiting for it")
            await asyncio.sleep(REDIS_RETRY_S)
        except Exception:
            log.exception("a turn of the worker's loop failed; it goes on")
            await asyncio.sleep(REDIS_RETRY_S)

    async def _poll_once(self) -> None:
        ctx = self.context
        ctx.wake.clear()
        for run_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[run_id]
        free = self.max_jobs - self.job_counter
        granted: list[Grant] = []
        if free > 0 and self.allow_pick_jobs and not ctx.draining:
            granted = await ctx.scripts.dispatch(await ctx.ask(free))
        for grant in granted:
            ctx.hold(grant)
            ctx.tally.dispatched(grant)
            await self._start(grant)
        with contextlib.suppress(*store.REDIS_ERRORS):
            await self.heart_beat()  # arq's health-check key
        if len(granted) < free or free <= 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.wake.wait(), IDLE_WAIT_S)

    async def _start(self, grant: Grant) -> None:
        """What arq's `start_jobs` does once it has claimed a job (the claim itself was the
        scheduler's; the run is held already)."""
        await self.sem.acquire()  # never waits: there was a free place
        self.job_counter += 1
        task = self.loop.create_task(self.run_job(grant.run_id, int(time.time() * 1000)))
        task.add_done_callback(functools.partial(self._run_ended, grant.run_id))
        self.tasks[grant.run_id] = task

    def _run_ended(self, run_id: str, _: asyncio.Task[None]) -> None:
        """A run's place is free: the loop asks the scheduler for work, unless the run's
        finish saw nothing waiting (an admission wakes an idle worker)."""
        self._release_sem_dec_counter_on_complete()
        if run_id in self.context.quiet:
            self.context.quiet.discard(run_id)
        else:
            self.context.wake.set()

    async def run_job(self, job_id: str, score: int) -> None:
        """Run a granted run. arq's own `run_job` would read the run's arq record back,
        count a try and write the end (two MULTI/EXEC round trips per job): the grant
        already carries the work, attempts are ours, and finish.lua removes the run
        from arq's keys. Here the job function runs directly, under arq's job timeout."""
        job_id_, attempt = keys.split_run(job_id)
        task = asyncio.ensure_future(granted_run(self.ctx, job_id_, attempt))
        self.job_tasks[job_id] = task
        try:
            await asyncio.wait_for(task, self.job_timeout_s)
        except Exception:  # never into arq's loop: worker/jobs.py records every ending
            log.exception("run %s failed outside its job function", job_id)
        finally:
            self.job_tasks.pop(job_id, None)

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        # Nothing waits for a slot here: stop asking for work, let running runs finish
        # (up to GPUGATE_SHUTDOWN_GRACE).
        self.context.draining = True
        self.context.wake.set()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        self.context.draining = True
        super().handle_sig(signum)


async def granted_run(ctx: dict[str, Any], job_id: str, attempt: int) -> None:
    """The one arq job function (`GateWorker.run_job` calls it for each grant); arq's
    ctx dict carries ours, the typed context."""
    await jobs.run_job(ctx["gate"], job_id, attempt)


async def on_startup(ctx: dict[str, Any]) -> None:
    context: WorkerContext = ctx["gate"]
    settings = context.settings
    context.redis = store.connect(settings.redis_url)
    context.blocking_redis = store.connect(settings.redis_url, blocking=True)
    context.lane = Lane(settings.redis_url)
    context.scripts = Scripts(context.lane.execute)
    context.http = aiohttp.ClientSession(
        # a run's own bound is GPUGATE_JOB_TIMEOUT (worker/jobs.py); no pool limit: the
        # scheduler's slots bound how many calls are open
        timeout=aiohttp.ClientTimeout(total=None, connect=5.0),
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        auto_decompress=False,  # relay bytes as Ollama sent them
    )
    start_loops(context)
    log.info(
        "worker %s up: max_jobs=%d, backends: %s",
        context.worker_id,
        settings.worker_concurrency,
        ", ".join(f"{b.name}={b.url} (cap {b.gpu_concurrency})" for b in settings.backends),
    )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    context: WorkerContext = ctx["gate"]
    await stop_loops(context)
    with contextlib.suppress(*store.REDIS_ERRORS):
        await context.tally.flush(context.redis)  # the counts of its last runs
    with contextlib.suppress(*store.REDIS_ERRORS):
        async with context.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.WORKERS, context.worker_id)
            pipe.delete(keys.worker(context.worker_id))
            await pipe.execute()
    await context.http.close()
    await context.lane.aclose()
    await context.blocking_redis.aclose()
    await context.redis.aclose()


def create_worker(settings: Settings) -> GateWorker:
    """The worker for `settings`. arq's own client (its queue reads, health key) is
    opened and closed by arq; ours are opened in `on_startup`, closed in `on_shutdown`."""
    context = WorkerContext(settings=settings)
    arq_redis = ArqRedis(
        store.connect(settings.redis_url).connection_pool,
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        default_queue_name=keys.ARQ_QUEUE,
    )
    return GateWorker(
        context,
        # the only job function, under the name the runs' arq records carry; listed here,
        # not registered by import
        functions=[func(granted_run, name=keys.ARQ_FUNCTION)],
        queue_name=keys.ARQ_QUEUE,
        redis_pool=arq_redis,
        ctx={"gate": context},
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=settings.worker_concurrency,
        job_timeout=ARQ_TIMEOUT_S,
        keep_result=0,  # results live in the job record (JSON), not in arq
        poll_delay=0,
        max_tries=1_000,  # re-runs are ours (attempts), see shared/jobs.py
        retry_jobs=False,
        job_completion_wait=int(settings.shutdown_grace),
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        log_results=False,
    )
