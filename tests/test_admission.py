"""GPU admission: the bounded backlog, queue_full, and the cap under overload."""

from __future__ import annotations

import asyncio

import httpx
import redis

from api.app import create_app
from shared import keys
from shared.settings import Settings
from tests.conftest import StackFactory, sim_configure, sim_stats, slow_sim_fixture
from tests.processes import Process, wait_until

GEN = {"model": "llama3.2", "prompt": "hello", "stream": False}


# 5 tokens at 50 ms: a job holds its slot for about a quarter second.
slow_sim = slow_sim_fixture(0.05)


def all_jobs_ended(rdb: redis.Redis) -> bool:
    statuses = [rdb.hget(k, "status") for k in rdb.scan_iter(keys.JOB + "*")]
    return all(s in (b"succeeded", b"failed", b"cancelled") for s in statuses)


async def _burst(url: str, n: int, path: str, body: dict[str, object]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        return list(
            await asyncio.gather(
                *(
                    client.post(path, json=body, headers={"X-API-Key": f"burst-{i}"})
                    for i in range(n)
                )
            )
        )


def test_sixty_concurrent_requests_never_exceed_the_gpu_cap(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=2, max_queue_depth=8)
    rdb = stack.redis()
    responses = asyncio.run(_burst(stack.url, 60, "/api/generate", GEN))

    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    served = [r for r in responses if r.status_code == 200]
    rejected = [r for r in responses if r.status_code == 429]
    assert len(served) >= 8  # at least the eight queue places (more if jobs started meanwhile)
    assert rejected, "a burst of 60 against 2 slots and 8 places must overflow"
    for r in rejected:
        body = r.json()
        assert body["error"] == "queue_full"
        assert body["queue_depth"] >= 8
        assert r.headers["Retry-After"] == str(body["retry_after"])
        assert 1 <= body["retry_after"] <= 120
    stats = sim_stats(slow_sim)
    assert stats["max_in_flight"] == 2, stats
    assert stats["requests"] == len(served)
    wait_until(lambda: all_jobs_ended(rdb), timeout=10, what="every admitted job to end")
    assert rdb.zcard(keys.QUEUED) == 0
    assert rdb.zcard(keys.LEASES) == 0
    rdb.close()


def test_queue_full_does_not_spend_the_keys_token(
    make_stack: StackFactory, slow_sim: Process, key: str
) -> None:
    sim_configure(slow_sim, token_delay_s=0.5)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, max_queue_depth=1)
    with stack.client() as filler, stack.client(key) as probe:
        # occupy the slot, then the one queue place, with async jobs of other keys
        for i in range(2):
            r = filler.post(
                "/v1/jobs",
                json={"endpoint": "/api/generate", "body": GEN},
                headers={"X-API-Key": f"filler-{i}"},
            )
            assert r.status_code == 202, r.text
            if i == 0:
                wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the first running")
        wait_until(
            lambda: filler.get("/v1/queue").json()["queue_depth"] >= 1,
            what="one job waiting",
        )
        full = probe.post("/v1/jobs", json={"endpoint": "/api/generate", "body": GEN})
        assert full.status_code == 429
        assert full.json()["error"] == "queue_full"
        assert full.headers["X-RateLimit-Remaining"] == "10"  # untouched: the bucket is full


def test_queue_full_retry_after_grows_with_the_backlog_and_mean_job_time(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.5)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, max_queue_depth=2)
    with stack.client() as client:
        for i in range(3):
            r = client.post(
                "/v1/jobs",
                json={"endpoint": "/api/generate", "body": GEN},
                headers={"X-API-Key": f"k-{i}"},
            )
            assert r.status_code == 202
            if i == 0:
                wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the first running")
        wait_until(lambda: client.get("/v1/queue").json()["queue_depth"] == 2, what="depth 2")
        full = client.post(
            "/v1/jobs", json={"endpoint": "/api/generate", "body": GEN}, headers={"X-API-Key": "x"}
        )
    # no job measured yet: the prior mean (5 s) for one job to start at cap 1
    assert full.status_code == 429
    assert full.json()["retry_after"] == 5
    assert full.json()["queue_depth"] == 2


def test_the_queue_endpoint_reports_depth_running_and_cap(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.3)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, max_queue_depth=5)
    with stack.client("q") as client:
        for _ in range(3):
            client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": GEN})
        wait_until(lambda: client.get("/v1/queue").json()["running"] == 1, what="one running job")
        queue = client.get("/v1/queue").json()
    assert queue["gpu_concurrency"] == 1
    assert queue["max_queue_depth"] == 5
    assert queue["queue_depth"] == 2
    assert queue["estimated_wait_seconds"] > 0


async def test_admission_at_the_edge_also_works_under_a_root_path(
    make_stack: StackFactory, key: str
) -> None:
    """Behind a path prefix (uvicorn --root-path), ASGI paths carry the prefix: the edge
    must still recognise the inference routes and admit there."""
    stack = make_stack()
    app = create_app(Settings(redis_url=stack.redis_url, ollama_url=stack.ollama_url))
    transport = httpx.ASGITransport(app=app, root_path="/gw")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gpugate") as client,
    ):
        r = await client.post(
            "/gw/v1/jobs",
            json={"endpoint": "/api/generate", "body": {"model": "llama3.2"}},
            headers={"X-API-Key": key},
        )
        assert r.status_code == 202, r.text
        assert r.headers["X-RateLimit-Remaining"] == "9"
