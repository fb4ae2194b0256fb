"""Each Lua script on its own, against the suite's real redis-server, through its typed
wrapper (shared/scripts.py): the reply, and the keys it leaves behind. The end-to-end
tests run the same scripts through the API and the workers."""

from __future__ import annotations

import asyncio
import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

import shared
from shared import keys
from shared.jobs import new_job_id
from shared.scripts import (
    SCRIPTS,
    AdmitOutcome,
    Ask,
    CancelVerdict,
    FinishStatus,
    Grant,
    HeldRun,
    Scripts,
    fleet_argv,
    library,
)
from shared.settings import Backend
from tests.processes import Process, start_redis
from worker.tally import Tally

FLEET = fleet_argv([Backend(name="gpu-a", url="http://127.0.0.1:1", gpu_concurrency=1)])
_databases = itertools.count(200)


@pytest.fixture
async def redis(redis_proc: Process) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/{next(_databases) % 56 + 200}")
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def scripts(redis: Redis) -> Scripts:
    scripts = Scripts(redis.execute_command)
    await heartbeat(scripts)  # admission needs a live worker
    return scripts


async def heartbeat(scripts: Scripts, held: list[HeldRun] | None = None) -> Any:
    return await scripts.heartbeat(
        worker="w1",
        info="{}",
        lease_ms=10_000,
        worker_stale_ms=30_000,
        max_runs=3,
        result_ttl_ms=60_000,
        record_ttl_ms=600_000,
        fair_share_memory_ms=10_000,
        held=held or [],
        backends=FLEET,
    )


async def admit(scripts: Scripts, owner: str = "key:a", **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "owner": owner,
        "owner_name": owner,
        "usage_name": "anonymous",
        "rate_per_ms": 1.0,
        "burst": 100,
        "tpm_per_ms": 0,
        "tpm_burst": 0,
        "reserve_tokens": 0,
        "max_depth": 100,
        "max_queued": 100,
        "priority": 0,
        "boost_ms": 0,
        "weight": 1,
        "job_id": new_job_id(),
        "endpoint": "/api/generate",
        "model": "llama3.2",
        "body": '{"model": "llama3.2"}',
        "stream": False,
        "sync": False,
        "deadline_ms": 0,
        "idempotency_key": "",
        "digest": "",
        "result_ttl_ms": 60_000,
        "record_ttl_ms": 600_000,
        "worker_stale_ms": 30_000,
        "backends": FLEET,
    }
    args.update(overrides)
    return await scripts.admit(**args)


async def dispatch(scripts: Scripts, want: int = 1) -> list[Grant]:
    return await scripts.dispatch(ask(want))


def ask(want: int = 1) -> Ask:
    return Ask(
        worker="w1",
        want=want,
        lease_ms=10_000,
        affinity_wait_ms=30_000,
        provisional_cost=1,
        result_ttl_ms=60_000,
        fence_ms=2_000,
        backends=FLEET,
    )


async def finish(scripts: Scripts, grant: Grant, **overrides: Any) -> Any:
    args: dict[str, Any] = {
        "job_id": grant.job_id,
        "attempt": grant.attempt,
        "backend": grant.backend,
        "status": FinishStatus.SUCCEEDED,
        "http_status": 200,
        "content_type": "application/json",
        "result": '{"done": true}',
        "error": "",
        "error_code": "",
        "duration_ms": 12.0,
        "input_tokens": 3,
        "output_tokens": 5,
        "model_load_ms": 0,
        "max_attempts": 3,
        "breaker_threshold": 3,
        "breaker_cooldown_ms": 30_000,
        "ewma_weight": 0.2,
        "wake": False,
        "result_ttl_ms": 60_000,
        "record_ttl_ms": 600_000,
    }
    args.update(overrides)
    return await scripts.finish(**args)


async def test_the_library_loads_with_every_script_and_its_names_written_as_values(
    redis: Redis,
) -> None:
    names = re.compile(r"\b(K|S|E|B|RUN)_[A-Z_]+\b|\bKEYS\b|\bWAKE_MAX\b|\bMEAN_(JOB_MS|COST)\b")
    lib = library()
    assert names.search(lib.text) is None, names.search(lib.text)
    files = sorted(p.stem for p in (Path(shared.__file__).parent / "lua").glob("*.lua"))
    assert SCRIPTS == tuple(files) and len(files) >= 13
    await redis.execute_command("FUNCTION", "LOAD", "REPLACE", lib.text)
    (listed,) = await redis.execute_command(
        "FUNCTION", "LIST", "LIBRARYNAME", f"gpugate_{lib.version}"
    )
    listed = dict(zip(listed[::2], listed[1::2], strict=True))
    functions = {dict(zip(f[::2], f[1::2], strict=True))[b"name"] for f in listed[b"functions"]}
    assert functions == {lib.function(name).encode() for name in files}


async def test_admit_records_the_job_and_spends_one_token(scripts: Scripts, redis: Redis) -> None:
    reply = await admit(scripts)
    assert reply.outcome is AdmitOutcome.ADMITTED and reply.rank == 0
    assert reply.tokens == pytest.approx(99, abs=0.1)
    job = await redis.hgetall(keys.job(reply.job_id))
    assert job[b"status"] == b"queued" and job[b"model"] == b"llama3.2"
    assert await redis.zscore(keys.QUEUED, reply.job_id) is not None
    assert await redis.zcard(keys.owner_queue("key:a")) == 1
    assert await redis.zscore(keys.BACKLOG, "key:a") == 0
    # arq's per-run records are not written: nothing reads them (issue 21)
    assert await redis.keys("arq:*") == []
    assert await redis.llen(keys.WAKE) == 1  # a slot is free: one idle worker is woken


async def test_admit_refuses_without_spending(scripts: Scripts, redis: Redis) -> None:
    await admit(scripts, burst=1)
    limited = await admit(scripts, burst=1, rate_per_ms=0.000001)
    assert limited.outcome is AdmitOutcome.RATE_LIMITED and limited.next_token_ms > 0
    full = await admit(scripts, owner="key:b", max_depth=1)
    assert full.outcome is AdmitOutcome.QUEUE_FULL
    assert await redis.zcard(keys.QUEUED) == 1
    assert await redis.hget(keys.STATS, "rejected_queue_full") == b"1"
    budget = dict(tpm_per_ms=0.001, tpm_burst=100)
    over = await admit(scripts, owner="key:c", reserve_tokens=101, **budget)
    assert over.outcome is AdmitOutcome.TOKEN_LIMITED and over.budget == 100
    assert await redis.exists(keys.bucket("key:c")) == 0, "a token refusal spent a request token"


async def test_dispatch_grants_the_free_slot_and_finish_gives_it_back(
    scripts: Scripts, redis: Redis
) -> None:
    first, second = await admit(scripts), await admit(scripts)
    grants = await dispatch(scripts, want=4)
    assert [g.job_id for g in grants] == [first.job_id]  # the cap of gpu-a is 1
    assert await redis.zcard(keys.backend_running("gpu-a")) == 1
    assert await redis.hget(keys.job(first.job_id), "status") == b"running"
    assert await dispatch(scripts) == []
    done = await finish(scripts, grants[0])
    assert done.status is FinishStatus.SUCCEEDED and done.ended
    assert await redis.zcard(keys.LEASES) == 0
    assert await redis.keys("arq:*") == []
    tally = Tally()  # the counters, as the worker adds them (worker/tally.py)
    tally.dispatched(grants[0])
    usage = {"input_tokens": 3, "output_tokens": 5}
    tally.finished(grants[0], done, error_code="", duration_ms=12.0, **usage)
    await tally.flush(redis)
    assert await redis.hget(keys.USAGE, "anonymous|output_tokens") == b"5"
    assert await redis.hget(keys.STATS, "jobs_succeeded") == b"1"
    assert await redis.hget(keys.histogram("job_duration_seconds"), "0.05") == b"1"
    assert await redis.hget(keys.histogram("queue_wait_seconds"), "sum") is not None
    assert [g.job_id for g in await dispatch(scripts)] == [second.job_id]


async def test_a_runs_end_says_whether_anything_waits_for_a_slot(
    scripts: Scripts, redis: Redis
) -> None:
    """finish.lua's `waiting`: the worker asks the scheduler for the place a run frees
    only while a job (or a batch line) waits; else the next admission wakes it."""
    await admit(scripts), await admit(scripts)
    (first,) = await dispatch(scripts, want=4)  # the cap of gpu-a is 1
    assert (await finish(scripts, first)).waiting  # the second job waits
    (second,) = await dispatch(scripts)
    done = await finish(scripts, second)
    assert done.status is FinishStatus.SUCCEEDED and not done.waiting
    await redis.zadd(keys.BATCH_BACKLOG, {"key:b": 0})  # a batch owner with lines waiting
    await admit(scripts)
    (third,) = await dispatch(scripts)
    assert (await finish(scripts, third)).waiting


async def test_jobs_admitted_in_one_millisecond_start_in_their_order(scripts: Scripts) -> None:
    """Admissions a few microseconds apart (several per millisecond here) keep their order:
    a start score at millisecond resolution tied them, and ties went by the random id."""
    admitted = [(await admit(scripts)).job_id for _ in range(30)]
    started = []
    for _ in admitted:
        (grant,) = await dispatch(scripts)
        started.append(grant.job_id)
        await finish(scripts, grant)
    assert started == admitted


async def test_finish_of_a_stale_run_records_nothing(scripts: Scripts, redis: Redis) -> None:
    """The latent bug of issue 10: the stale reply was a bare string."""
    await admit(scripts)
    (grant,) = await dispatch(scripts)
    await redis.hset(keys.job(grant.job_id), "attempt", 2)  # the job moved on
    reply = await finish(scripts, grant)
    assert reply.status is FinishStatus.STALE and reply.breaker_opened is False
    assert await redis.hget(keys.job(grant.job_id), "status") == b"running"


async def test_finish_keeps_the_moving_means_of_cost_and_time(
    scripts: Scripts, redis: Redis
) -> None:
    """Cost (input + 2 x output tokens) moves with whatever was served, time only with a
    success; EWMA weight 0.2."""
    runs = [
        {"duration_ms": 12.0, "input_tokens": 3, "output_tokens": 5},
        {"duration_ms": 22.0, "input_tokens": 1, "output_tokens": 2},
        {"duration_ms": 50.0, "input_tokens": 2, "output_tokens": 0, "status": "failed"},
    ]
    for run in runs:
        await admit(scripts)
        (grant,) = await dispatch(scripts)
        await finish(scripts, grant, **run)
    stats = await redis.hmget(keys.MODEL_STATS, keys.MEAN_COST, keys.MEAN_JOB_MS)
    # cost: 13, then 13 + 0.2 (5 - 13) = 11.4, then 11.4 + 0.2 (2 - 11.4) = 9.52
    assert [float(v) for v in stats] == pytest.approx([9.52, 14.0])
    assert float(await redis.hget(keys.MODEL_STATS, "llama3.2")) == pytest.approx(14.0)


async def test_fair_share_alternates_a_flood_and_a_trickle(scripts: Scripts) -> None:
    for _ in range(6):
        await admit(scripts, owner="key:flood")
    trickle = [(await admit(scripts, owner="key:trickle")).job_id for _ in range(3)]
    order = []
    for _ in range(9):
        (grant,) = await dispatch(scripts)
        order.append("T" if grant.job_id in trickle else "F")
        await finish(scripts, grant, input_tokens=10, output_tokens=10)
    assert order[:6] == ["F", "T", "F", "T", "F", "T"], order


async def test_priority_goes_first_over_every_waiting_job(scripts: Scripts) -> None:
    for _ in range(3):
        await admit(scripts, owner="key:free")
    pro = await admit(scripts, owner="key:pro", priority=10, boost_ms=10_000)
    (grant,) = await dispatch(scripts)
    assert grant.job_id == pro.job_id


async def test_cancel_of_a_queued_job_leaves_nothing_waiting(
    scripts: Scripts, redis: Redis
) -> None:
    job = await admit(scripts)
    reply = await scripts.cancel(
        job_id=job.job_id, owner="key:a", code="cancelled", message="m", result_ttl_ms=60_000
    )
    assert reply.verdict is CancelVerdict.CANCELLED and reply.status == "queued"
    assert await redis.zcard(keys.QUEUED) == 0 and await redis.zcard(keys.BACKLOG) == 0
    assert await redis.hget(keys.WAITING_MODELS, "llama3.2") is None
    again = await scripts.cancel(
        job_id=job.job_id, owner="key:a", code="cancelled", message="m", result_ttl_ms=60_000
    )
    assert again.verdict is CancelVerdict.FINISHED


async def test_heartbeat_reaps_a_lapsed_lease_into_the_next_attempt(
    scripts: Scripts, redis: Redis
) -> None:
    job = await admit(scripts)
    (grant,) = await dispatch(scripts)
    await redis.zadd(keys.LEASES, {grant.run_id: 0})  # its worker died
    reply = await heartbeat(scripts)
    assert reply.reaped == 1
    record = await redis.hmget(keys.job(job.job_id), ["status", "attempt"])
    assert record == [b"queued", b"2"]
    assert await redis.zcard(keys.backend_running("gpu-a")) == 0
    assert await redis.hget(keys.STATS, "jobs_requeued") == b"1"


async def test_heartbeat_reasserts_a_run_the_promoted_replica_lacks(
    scripts: Scripts, redis: Redis
) -> None:
    await admit(scripts)
    (grant,) = await dispatch(scripts)
    for key in (keys.LEASES, keys.backend_running("gpu-a")):
        await redis.zrem(key, grant.run_id)  # as if the grant never replicated
    reply = await heartbeat(scripts, [HeldRun(grant.run_id, grant.backend)])
    assert reply.lost == []
    assert await redis.zcard(keys.backend_running("gpu-a")) == 1


async def test_no_slot_is_granted_on_a_new_master_until_workers_reasserted(
    scripts: Scripts, redis: Redis
) -> None:
    await admit(scripts)
    await redis.hset(keys.FLEET, keys.MASTER_FIELD, "the-run-id-of-a-master-that-died")
    assert await dispatch(scripts) == []
    run_id, until_ms = (await redis.hget(keys.FLEET, keys.MASTER_FIELD)).decode().split()
    seconds, micros = await redis.time()
    assert 0 < int(until_ms) - (seconds * 1000 + micros // 1000) <= 2_000  # fenced for 2 s
    # the fence lapsed: the heartbeats came in
    await redis.hset(keys.FLEET, keys.MASTER_FIELD, f"{run_id} 0")
    assert len(await dispatch(scripts)) == 1


async def test_each_redis_knows_its_own_run_id_through_a_promotion_and_back() -> None:
    """dispatch.lua asks INFO for the run id once per Redis process (lib/clock.lua
    `run_id_here`): a promoted replica still fences, and so does the first master when it
    is promoted again after the other one granted."""
    first, second = start_redis(), start_redis()
    a, b = Redis(port=first.port), Redis(port=second.port)
    try:
        on_a, on_b = Scripts(a.execute_command), Scripts(b.execute_command)
        await heartbeat(on_a)
        await admit(on_a)
        (grant,) = await dispatch(on_a)  # A's first grant: A's run id recorded
        await finish(on_a, grant)  # its slot free again (the fleet's cap is 1)
        await admit(on_a)

        async def promote(new: Redis, master: Redis, master_proc: Process) -> None:
            """`new` takes a copy of `master`'s data (all of it: up to a marker written
            after it became a replica), then is a master itself."""
            await new.execute_command("REPLICAOF", "127.0.0.1", str(master_proc.port))
            marker = new_job_id()
            await master.set("promotion-marker", marker)
            for _ in range(3000):
                if await new.get("promotion-marker") == marker.encode():
                    break
                await asyncio.sleep(0.01)
            else:
                raise AssertionError("the replica never caught up")
            await new.execute_command("REPLICAOF", "NO", "ONE")

        await promote(b, a, first)  # B has A's data, then is the master
        assert await dispatch(on_b) == []  # fenced: A's newest grants may be missing here
        fence = (await b.hget(keys.FLEET, keys.MASTER_FIELD)).split()[0] + b" 0"
        await b.hset(keys.FLEET, keys.MASTER_FIELD, fence)  # lapsed
        (grant,) = await dispatch(on_b)
        await finish(on_b, grant)
        await admit(on_b)
        await promote(a, b, second)  # A again, with B's data: B granted last
        assert await dispatch(on_a) == []
    finally:
        await a.aclose()
        await b.aclose()
        first.stop()
        second.stop()


async def test_take_token_empties_and_refuses(scripts: Scripts) -> None:
    for _ in range(2):
        assert (await scripts.take_token(name="h", rate_per_ms=0.000001, burst=2)).allowed
    refused = await scripts.take_token(name="h", rate_per_ms=0.000001, burst=2)
    assert not refused.allowed and refused.next_token_ms > 0
