"""The gpugate worker: arq runs `run_job`, woken by Redis messages instead of a poll delay.

arq polls its queue every `poll_delay` (0.5 s by default; see ../shared/ARQ.md). Here arq's
own delay is zero and the loop instead waits for a wake-up: a job was enqueued (the
admission script publishes on `gpugate:wake`), or one of ours ended and a place is free,
with `IDLE_POLL_S` as the fallback for a lost message.

A Redis outage does not stop the worker (arq alone would exit): the loop waits for Redis
to come back, and arq runs that died of the outage are handed back to arq's queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

import httpx
from arq.connections import ArqRedis
from arq.worker import Worker

from shared import keys, store
from shared.jobs import arq_deserialize, arq_serialize
from shared.scripts import Scripts
from shared.settings import Settings
from worker.breaker import breaker_loop
from worker.jobs import run_job
from worker.signals import heartbeat_loop, listen
from worker.state import WorkerState

log = logging.getLogger("gpugate.worker")

IDLE_POLL_S = 0.5
REDIS_RETRY_S = 0.5
ARQ_TIMEOUT_S = 7 * 86400
"""arq's own job timeout: a backstop only. Slot waits are bounded by deadlines and job
runs by GPUGATE_JOB_TIMEOUT; arq's in-progress lock must outlive both."""


class GateWorker(Worker):
    """arq's Worker with a wake-up instead of a fixed poll delay, a draining SIGTERM, and
    a loop that rides out Redis outages."""

    def __init__(self, state: WorkerState, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.state = state
        self.orphans: set[str] = set()
        """arq job ids whose arq task died of a Redis error: their in-progress lock
        would keep them from running again for ARQ_TIMEOUT_S."""

    async def main(self) -> None:
        while True:  # Redis may be down when the worker starts
            try:
                await self.pool.ping()
                break
            except store.DRIVER_ERRORS as exc:
                self.state.redis_outage.failed(exc, "waiting for it")
                await asyncio.sleep(REDIS_RETRY_S)
        self.state.redis_outage.recovered()
        await super().main()

    async def _poll_iteration(self) -> None:
        self.state.wake.clear()
        self.orphans.update(
            job_id
            for job_id, task in self.tasks.items()
            if task.done()
            and not task.cancelled()
            and isinstance(task.exception(), store.DRIVER_ERRORS)
        )
        try:
            if self.orphans:
                await self.pool.delete(*(keys.ARQ_IN_PROGRESS + job_id for job_id in self.orphans))
                self.orphans.clear()
            await super()._poll_iteration()
        except store.DRIVER_ERRORS as exc:
            # arq's loop may not touch Redis on every turn: the heartbeat, which does,
            # is the one to say when Redis is back.
            self.state.redis_outage.failed(exc, "waiting for it")
            await asyncio.sleep(REDIS_RETRY_S)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.state.wake.wait(), IDLE_POLL_S)

    async def start_jobs(self, job_ids: list[bytes]) -> None:
        # arq counts a job and takes a semaphore place before its Redis calls; if one of
        # them fails, give both back, or each outage would shrink max_jobs by one.
        for job_id in job_ids:
            before = self.tasks.get(job_id.decode())
            try:
                await super().start_jobs([job_id])
            except store.DRIVER_ERRORS:
                if self.tasks.get(job_id.decode()) is before:
                    self.job_counter -= 1
                    self.sem.release()
                raise

    def handle_sig_wait_for_completion(self, signum: signal.Signals) -> None:
        # Runs still waiting for a slot go back to the queue for other workers now;
        # running ones get up to GPUGATE_SHUTDOWN_GRACE to finish.
        self.state.draining = True
        self.state.slots_changed.fire()
        super().handle_sig_wait_for_completion(signum)

    def handle_sig(self, signum: signal.Signals) -> None:
        self.state.draining = True
        super().handle_sig(signum)


async def on_startup(ctx: dict[str, Any]) -> None:
    state: WorkerState = ctx["gate"]
    ctx["tasks"] = [
        asyncio.create_task(heartbeat_loop(state), name="heartbeat"),
        asyncio.create_task(listen(state), name="listen"),
        asyncio.create_task(breaker_loop(state), name="breaker"),
    ]
    log.info(
        "worker %s up: max_jobs=%d, gpu cap=%d (unless set live), ollama=%s",
        state.worker_id,
        state.settings.worker_concurrency,
        state.settings.gpu_concurrency,
        state.settings.ollama_url,
    )


async def on_shutdown(ctx: dict[str, Any]) -> None:
    state: WorkerState = ctx["gate"]
    for task in ctx.get("tasks", []):
        task.cancel()
    await asyncio.gather(*ctx.get("tasks", []), return_exceptions=True)
    with contextlib.suppress(*store.DRIVER_ERRORS):
        async with state.redis.pipeline(transaction=True) as pipe:
            pipe.zrem(keys.WORKERS, state.worker_id)
            pipe.delete(keys.worker(state.worker_id))
            await pipe.execute()
    await state.http.aclose()
    await state.pubsub_redis.aclose()


def create_worker(settings: Settings) -> GateWorker:
    """The worker for `settings`; clients are opened here and closed in `on_shutdown`."""
    # One client for arq and for us; arq closes it in Worker.close().
    redis = ArqRedis(
        store.connect(settings.redis_url).connection_pool,
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        default_queue_name=keys.ARQ_QUEUE,
    )
    state = WorkerState(
        settings=settings,
        redis=redis,
        pubsub_redis=store.connect(settings.redis_url, blocking=True),
        scripts=Scripts.register(redis),
        http=httpx.AsyncClient(
            timeout=httpx.Timeout(settings.job_timeout, connect=5.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        ),
    )
    return GateWorker(
        state,
        functions=[run_job],  # the only job function; listed here, not registered by import
        queue_name=keys.ARQ_QUEUE,
        redis_pool=redis,
        ctx={"gate": state},
        on_startup=on_startup,
        on_shutdown=on_shutdown,
        max_jobs=settings.worker_concurrency,
        job_timeout=ARQ_TIMEOUT_S,
        keep_result=0,  # results live in the job record (JSON), not in arq
        poll_delay=0,
        max_tries=1_000,  # re-runs are ours (attempts), see worker/jobs.py
        retry_jobs=False,
        job_completion_wait=int(settings.shutdown_grace),
        job_serializer=arq_serialize,
        job_deserializer=arq_deserialize,
        log_results=False,
    )


def run_worker(settings: Settings) -> None:
    create_worker(settings).run()
