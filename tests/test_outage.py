"""Redis that refuses or stalls, on a real redis-server of the test's own: out of memory
(`CONFIG SET maxmemory`, noeviction), paused (`CLIENT PAUSE`), error replies. New work gets
`503 unavailable` with `Retry-After`, never a 500; workers keep heartbeating and keep
their runs; when Redis takes writes again, work resumes by itself and nothing admitted is
lost (shared/outage.py, shared/redis/store.py)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import redis
from redis import exceptions as redis_exceptions

from api.app import create_app
from shared import keys
from shared.errors import RedisUnavailable
from shared.outage import Outage, supervised
from shared.redis import store
from shared.scripts import FinishReply, FinishStatus, Grant
from shared.settings import Settings
from tests.conftest import Stack, build_stack, slow_sim_fixture
from tests.processes import Process, free_port, start_redis, wait_until
from worker.arq_adapter import create_worker, on_shutdown, on_startup
from worker.ollama import EventWriter
from worker.tally import Tally

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}
JOB = {"endpoint": "/api/generate", "body": GENERATE}

slow_sim = slow_sim_fixture(0.1)  # 5 tokens at 0.1 s: a job takes about half a second


@pytest.fixture
def own_redis() -> Iterator[Process]:
    """A redis-server of this test alone: the faults below are server-wide."""
    proc = start_redis()
    yield proc
    proc.stop()


@contextmanager
def _stack(
    own_redis: Process, slow_sim: Process, **settings: object
) -> Iterator[tuple[Stack, redis.Redis]]:
    """A stack on this test's redis-server with no rate limit in the way, and a client of
    its database; both gone afterwards."""
    stack = build_stack(
        own_redis,
        slow_sim,
        burst=10_000,
        rate_limit="100000/minute",
        **settings,  # type: ignore[arg-type]
    )
    rdb = stack.redis()
    try:
        yield stack, rdb
    finally:
        stack.stop()
        rdb.close()


def _submit(client: httpx.Client, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = client.post("/v1/jobs", json=JOB)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def _job(client: httpx.Client, job_id: str) -> dict[str, object]:
    job: dict[str, object] = client.get(f"/v1/jobs/{job_id}").json()
    return job


def _all_succeeded(client: httpx.Client, ids: list[str]) -> bool:
    return all(_job(client, i)["status"] == "succeeded" for i in ids)


def _heartbeats(rdb: redis.Redis) -> dict[bytes, float]:
    return dict(rdb.zrange("gpugate:workers", 0, -1, withscores=True))


def _assert_503(reply: httpx.Response) -> None:
    assert reply.status_code == 503, (reply.status_code, reply.text)
    body = reply.json()
    assert body["error"] == "unavailable", body
    assert 1 <= int(reply.headers["Retry-After"]) <= 120
    assert int(reply.headers["Retry-After"]) == body["retry_after"]


def test_redis_out_of_memory_refuses_new_work_with_503_and_loses_nothing(
    own_redis: Process, slow_sim: Process
) -> None:
    with _stack(own_redis, slow_sim, workers=2, gpu_concurrency=2) as (stack, rdb):
        with stack.client("oom") as client:
            jobs = _submit(client, 4)  # two run, two wait
            wait_until(
                lambda: sum(_job(client, i)["status"] == "running" for i in jobs) == 2,
                what="two jobs running",
            )
            rdb.config_set("maxmemory-policy", "noeviction")
            rdb.config_set("maxmemory", 1)
            try:
                began = time.monotonic()
                before = _heartbeats(rdb)
                while time.monotonic() - began < 4:
                    _assert_503(client.post("/api/generate", json=GENERATE))
                    _assert_503(client.post("/v1/jobs", json=JOB))
                ready = httpx.get(stack.url + "/ready", timeout=5)
                assert ready.status_code == 503, ready.text
                assert ready.json()["checks"]["redis"] == "out of memory", ready.text
                assert "redis out of memory" in ready.json()["message"]
                during = _heartbeats(rdb)
                assert len(during) == 2, during
                for worker, beat in during.items():  # both kept beating through the refusal
                    assert beat > before[worker] + 2_000, (worker, before, during)
                assert all(w.alive() for w in stack.workers)
            finally:
                rdb.config_set("maxmemory", 0)
            wait_until(lambda: _all_succeeded(client, jobs), timeout=20, what="every job ended")
            attempts = [rdb.hget(f"gpugate:job:{i}", "attempt") for i in jobs]
            assert attempts == [b"1"] * 4, attempts  # no run was lost and run again
            reply = client.post("/api/generate", json=GENERATE)
            assert reply.status_code == 200, reply.text
            assert httpx.get(stack.url + "/ready", timeout=5).status_code == 200


def test_a_paused_redis_gives_no_500_and_loses_no_job(
    own_redis: Process, slow_sim: Process
) -> None:
    with _stack(own_redis, slow_sim, workers=2, gpu_concurrency=2) as (stack, rdb):
        with stack.client("paused") as client:
            jobs = _submit(client, 4)
            wait_until(
                lambda: any(_job(client, i)["status"] == "running" for i in jobs),
                what="a job running",
            )
            replies: list[httpx.Response] = []

            def call() -> None:
                with stack.client("paused") as own:
                    replies.append(own.post("/api/generate", json=GENERATE))

            rdb.execute_command("CLIENT", "PAUSE", 3000, "ALL")
            callers = [threading.Thread(target=call) for _ in range(6)]
            for caller in callers:
                caller.start()
            for caller in callers:
                caller.join(timeout=30)
            assert len(replies) == 6
            for reply in replies:  # answered once Redis was back, or 503 while it was not
                assert reply.status_code in (200, 503), (reply.status_code, reply.text)
                if reply.status_code == 503:
                    _assert_503(reply)
            wait_until(lambda: _all_succeeded(client, jobs), timeout=20, what="every job ended")
            for reply in replies:
                if reply.status_code == 503 and "job_id" in reply.json():
                    job_id = str(reply.json()["job_id"])  # admitted before the pause bit
                    wait_until(
                        lambda j=job_id: _job(client, j)["status"] == "succeeded",  # type: ignore[misc]
                        timeout=20,
                        what=f"admitted job {job_id} to succeed",
                    )
            assert client.post("/api/generate", json=GENERATE).status_code == 200
            assert all(w.alive() for w in stack.workers)


def test_error_replies_to_every_loop_do_not_end_them(own_redis: Process, slow_sim: Process) -> None:
    """An ACL that denies the scripts (an error reply, not a lost connection) for a few
    seconds: the heartbeat, the worker's loop and the inbox reader all live on, each
    outage is logged once, and service resumes by itself."""
    with _stack(own_redis, slow_sim, workers=1) as (stack, rdb):
        with stack.client("denied") as client:
            assert client.post("/api/generate", json=GENERATE).status_code == 200
            rdb.execute_command("ACL", "SETUSER", "default", "-fcall", "-blpop")
            try:
                began = time.monotonic()
                while time.monotonic() - began < 3:
                    _assert_503(client.post("/api/generate", json=GENERATE))
            finally:
                rdb.execute_command("ACL", "SETUSER", "default", "+fcall", "+blpop")
            wait_until(
                lambda: client.post("/api/generate", json=GENERATE).status_code == 200,
                timeout=10,
                what="service back once the scripts are allowed again",
            )
            beat = _heartbeats(rdb)
            wait_until(
                lambda: max(_heartbeats(rdb).values()) > max(beat.values()),
                timeout=5,
                what="the heartbeat going on",
            )
        logs = "".join(w.log() for w in stack.workers)
        assert logs.count("Redis is unavailable (denied") == 1, logs[-2000:]
        assert "Traceback" not in logs, logs[-2000:]


async def test_a_supervised_loop_ends_when_cancelled_even_if_the_cancel_became_a_redis_error() -> (
    None
):
    """redis-py can answer a cancel in the middle of a read with a timeout or a lost
    connection; the loop must still end, or whoever stops it (an API's lifespan) waits
    for ever. Seen as a hang of an API's shutdown under load."""
    started = asyncio.Event()

    async def read_that_turns_cancel_into_an_error() -> float:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise redis_exceptions.TimeoutError("Timeout reading from socket") from None

    outage = Outage(logging.getLogger("test"), "Redis")
    task = asyncio.create_task(
        supervised("test", read_that_turns_cancel_into_an_error, outage, outage.log, retry_s=60)
    )
    await started.wait()
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=5)
    assert done == {task} and task.cancelled()


async def test_an_api_stops_at_once_however_often_it_starts_and_stops(
    own_redis: Process,
) -> None:
    """Python 3.11's asyncio.wait_for, through which redis-py writes every command, drops
    a cancel that comes as the write ends; the loop's task still counts it. An API's
    lifespan cancels its loops (keys, inbox, webhooks) on the way out, often in the
    middle of such a write: each stop must still end, and soon. Before the fix, one in a
    few stops waited for ever (seen as two API tests timing out in CI)."""
    settings = Settings(redis_url=own_redis.url, ollama_url="http://127.0.0.1:9")
    for turn in range(30):
        app = create_app(settings)
        async with asyncio.timeout(10):
            async with app.router.lifespan_context(app):
                await asyncio.sleep(0.01 * (turn % 5))


async def _lose_a_cancel() -> None:
    """Cancel the running task and drop the cancel, as Python 3.11's wait_for does when
    the redis-py write it waits for had ended: the task still counts it (`cancelling()`)."""
    task = asyncio.current_task()
    assert task is not None
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(0)


async def test_a_backend_call_whose_cancel_a_write_lost_ends_at_its_next_flush(
    own_redis: Process,
) -> None:
    """The same lost cancel in a backend call (a job cancelled, a worker stopping): the
    call must end at its next write of the answer to Redis, not relay the rest of it."""
    redis = store.connect(own_redis.url)
    events = EventWriter(redis, "job-lost-cancel", 60_000)

    async def call() -> str:
        await _lose_a_cancel()
        await events.chunk(b'{"response": "more"}\n')
        await events.flush()
        return "relayed the rest"

    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.create_task(call())
        assert await redis.xlen(keys.events("job-lost-cancel")) == 1  # what came is written
    finally:
        await redis.aclose()


async def test_a_worker_whose_stop_a_write_lost_still_stops(own_redis: Process) -> None:
    """arq stops a worker by cancelling its loop's task; lost in a redis-py write (arq's
    health key, say), the loop went on and the worker never stopped: a turn of it ends
    when its task is being cancelled."""
    worker = create_worker(Settings(redis_url=own_redis.url, ollama_url="http://127.0.0.1:9"))
    await on_startup(worker.ctx)

    async def loop() -> None:
        await _lose_a_cancel()
        await worker._poll_iteration()

    try:
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(asyncio.create_task(loop()), 10)
    finally:
        await on_shutdown(worker.ctx)
        await worker.pool.aclose(close_connection_pool=True)


async def test_the_tally_keeps_its_counts_through_a_redis_outage(own_redis: Process) -> None:
    """A worker's counts (worker/tally.py) that Redis could not take are added at the next
    flush that it can: an outage delays usage, it loses none of it."""
    grant = Grant(
        run_id="j.1",
        job_id="j",
        attempt=1,
        endpoint="/api/generate",
        body="{}",
        stream=False,
        backend="default",
        model="m",
        usage_name="team-a",
        waited_ms=3,
    )
    reply = FinishReply(FinishStatus.SUCCEEDED, breaker_opened=False, ended=True)
    tally = Tally()
    tally.dispatched(grant)
    tally.finished(grant, reply, error_code="", duration_ms=40.0, input_tokens=3, output_tokens=5)
    gone = redis.asyncio.Redis(port=free_port(), socket_connect_timeout=0.5)
    with pytest.raises(RedisUnavailable):
        await tally.flush(gone)
    await gone.aclose()
    tally.finished(grant, reply, error_code="", duration_ms=60.0, input_tokens=1, output_tokens=2)
    up = redis.asyncio.Redis.from_url(own_redis.url)
    try:
        await tally.flush(up)
        usage = await up.hgetall(keys.USAGE)
        assert usage[b"team-a|output_tokens"] == b"7" and usage[b"team-a|input_tokens"] == b"4"
        assert float(usage[b"team-a|gpu_ms"]) == pytest.approx(100.0)
        assert await up.hget(keys.STATS, "jobs_succeeded") == b"2"
        await tally.flush(up)  # nothing new: nothing added twice
        assert await up.hget(keys.USAGE, "team-a|output_tokens") == b"7"
    finally:
        await up.flushdb()
        await up.aclose()
