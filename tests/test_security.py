"""What an attacker with a client, or a reader of Redis or logs, must not get."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from api.state import MAX_WAITERS
from shared import keys
from tests.conftest import Stack, StackFactory
from tests.processes import start_sim

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
JOB = {"endpoint": "/api/generate", "body": {"model": "llama3.2"}}


def test_nothing_in_redis_is_pickle_and_keys_are_stored_hashed(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        client.post("/v1/chat/completions", json=CHAT)
        job_id = client.post(
            "/v1/jobs", json={"endpoint": "/api/generate", "body": {"model": "llama3.2"}}
        ).json()["id"]
        client.get(f"/v1/jobs/{job_id}", params={"wait": 10})
    seen = 0
    with stack.redis() as rdb:
        for name in rdb.scan_iter():
            kind = rdb.type(name).decode()
            values: list[bytes] = []
            if kind == "string":
                values = [rdb.get(name) or b""]
            elif kind == "hash":
                values = list(rdb.hgetall(name).values())
            elif kind == "stream":
                values = [v for _, f in rdb.xrange(name) for v in f.values()]
            for value in values:
                seen += 1
                assert not value.startswith(b"\x80"), f"{name!r} holds pickle"
                assert key.encode() not in value and key.encode() not in name
            if name.startswith(b"arq:job:"):
                json.loads(values[0])  # arq's own job record is JSON
    assert seen > 5


def test_job_ids_are_unguessable(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        ids = {
            client.post(
                "/v1/jobs", json={"endpoint": "/api/generate", "body": {"model": "llama3.2"}}
            ).json()["id"]
            for _ in range(3)
        }
    assert len(ids) == 3
    for job_id in ids:
        assert len(job_id.removeprefix("job_")) == 32  # 128 random bits


def test_logs_never_show_a_key(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        client.post("/v1/chat/completions", json=CHAT)
    assert stack.api is not None
    for proc in [stack.api, *stack.workers]:
        assert key not in proc.log()


def test_waiting_reads_are_bounded_per_process(make_stack: StackFactory, key: str) -> None:
    """`?wait=` holds a Redis connection: past MAX_WAITERS at once, reads answer at once."""
    hung = start_sim("--fail-mode", "hang")
    try:
        stack = make_stack(ollama_url=hung.url, gpu_concurrency=1)
        with stack.client(key) as client:
            job_id = client.post("/v1/jobs", json=JOB).json()["id"]
        extra = 40

        async def read_all() -> list[float]:
            headers = {"Authorization": f"Bearer {key}"}
            limits = httpx.Limits(max_connections=MAX_WAITERS + extra)
            async with httpx.AsyncClient(
                base_url=stack.url, headers=headers, timeout=30, limits=limits
            ) as client:

                async def read() -> float:
                    started = time.monotonic()
                    r = await client.get(f"/v1/jobs/{job_id}", params={"wait": 3})
                    assert r.status_code == 200 and r.json()["status"] in ("queued", "running")
                    return time.monotonic() - started

                return await asyncio.gather(*(read() for _ in range(MAX_WAITERS + extra)))

        took = asyncio.run(read_all())
        assert sum(t < 2 for t in took) >= extra  # answered at once, not held
        assert sum(t >= 2.5 for t in took) >= MAX_WAITERS // 2  # the rest waited
        with stack.redis() as rdb:
            clients = int(rdb.info("clients")["connected_clients"])
        assert clients < MAX_WAITERS + 50
    finally:
        hung.stop()


def test_a_worker_calls_only_inference_endpoints(make_stack: StackFactory, key: str) -> None:
    """Whoever can write Redis cannot make workers call another Ollama path."""
    hung = start_sim("--fail-mode", "hang")
    try:
        stack = make_stack(ollama_url=hung.url, gpu_concurrency=1)
        with stack.client(key) as client:
            running, queued = (client.post("/v1/jobs", json=JOB).json()["id"] for _ in range(2))
            with stack.redis() as rdb:
                rdb.hset(keys.job(queued), "endpoint", "/api/pull")
            client.delete(f"/v1/jobs/{running}")
            job = client.get(f"/v1/jobs/{queued}", params={"wait": 10}).json()
        assert job["status"] == "failed"
        assert job["error"]["code"] == "invalid_request"
        assert "/api/pull" in job["error"]["message"]
    finally:
        hung.stop()
