"""What an attacker with a client, or a reader of Redis or logs, must not get."""

from __future__ import annotations

import json

from tests.conftest import Stack

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


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
