"""The per-key token bucket, through the real API on a real Redis."""

from __future__ import annotations

import math
import time

from tests.conftest import Stack, StackFactory

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def test_ten_rapid_requests_pass_and_the_eleventh_is_rejected(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        statuses = [client.post("/v1/chat/completions", json=CHAT).status_code for _ in range(10)]
        eleventh = client.post("/v1/chat/completions", json=CHAT)
    assert statuses == [200] * 10
    assert eleventh.status_code == 429
    body = eleventh.json()
    retry_after = int(eleventh.headers["Retry-After"])
    assert 1 <= retry_after <= 120
    assert body == {
        "error": "rate_limit_exceeded",
        "message": f"Too many requests. Try again in {retry_after} seconds.",
        "retry_after": retry_after,
    }
    # 60/minute: the next token comes within about a second
    assert retry_after == 1


def test_rate_limit_headers_on_success_count_down(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        first = client.post("/api/generate", json={"model": "llama3.2", "prompt": "a"})
        second = client.post("/api/generate", json={"model": "llama3.2", "prompt": "a"})
    assert first.status_code == second.status_code == 200
    assert first.headers["X-RateLimit-Limit"] == "10"
    assert first.headers["X-RateLimit-Remaining"] == "9"
    assert second.headers["X-RateLimit-Remaining"] in ("8", "9")  # a refill may land between
    reset = int(first.headers["X-RateLimit-Reset"])
    # one token spent at 1/s: full again in about a second
    assert time.time() - 1 <= reset <= math.ceil(time.time()) + 2


def test_rejections_carry_rate_limit_headers(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        for _ in range(10):
            client.post("/v1/chat/completions", json=CHAT)
        rejected = client.post("/v1/chat/completions", json=CHAT)
    assert rejected.status_code == 429
    assert rejected.headers["X-RateLimit-Limit"] == "10"
    assert rejected.headers["X-RateLimit-Remaining"] == "0"
    assert int(rejected.headers["X-RateLimit-Reset"]) >= int(time.time())


def test_two_keys_have_separate_buckets(stack: Stack, key: str) -> None:
    with stack.client(key) as a, stack.client(key + "-other") as b:
        for _ in range(10):
            assert a.post("/v1/chat/completions", json=CHAT).status_code == 200
        assert a.post("/v1/chat/completions", json=CHAT).status_code == 429
        assert b.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_x_api_key_and_bearer_name_the_same_key(stack: Stack, key: str) -> None:
    with stack.client(key) as bearer, stack.client() as plain:
        for _ in range(5):
            assert bearer.post("/v1/chat/completions", json=CHAT).status_code == 200
        for _ in range(5):
            r = plain.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": key})
            assert r.status_code == 200
        assert bearer.post("/v1/chat/completions", json=CHAT).status_code == 429


def test_a_key_is_admitted_again_after_flushdb(make_stack: StackFactory, key: str) -> None:
    stack = make_stack()
    with stack.client(key) as client, stack.redis() as rdb:
        for _ in range(10):
            client.post("/v1/chat/completions", json=CHAT)
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 429
        rdb.flushdb()
        stack.wait_for_workers()  # the worker re-registers at its next heartbeat
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_health_is_not_limited_at_the_inference_threshold(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        statuses = [client.get("/health").status_code for _ in range(30)]
    assert statuses == [200] * 30


def test_health_has_its_own_limit(make_stack: StackFactory, key: str) -> None:
    stack = make_stack(workers=0, health_rate_limit="3/minute")
    with stack.client(key) as client:
        statuses = [client.get("/health").status_code for _ in range(3)]
        limited = client.get("/health")
    assert statuses == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.json()["error"] == "rate_limit_exceeded"
    assert 1 <= int(limited.headers["Retry-After"]) <= 120


def test_forged_forwarded_for_from_an_untrusted_client_changes_nothing(stack: Stack) -> None:
    with stack.client() as client:
        statuses = [
            client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-Forwarded-For": f"203.0.113.{i}"}
            ).status_code
            for i in range(11)
        ]
    # all eleven come from 127.0.0.1: ten pass, the eleventh is over the limit
    assert statuses[:10] == [200] * 10
    assert statuses[10] == 429


def test_forwarded_for_is_believed_from_a_trusted_proxy(make_stack: StackFactory) -> None:
    stack = make_stack(trusted_proxies="127.0.0.0/8")
    with stack.client() as client:
        for _ in range(10):
            r = client.post(
                "/v1/chat/completions", json=CHAT, headers={"X-Forwarded-For": "198.51.100.7"}
            )
            assert r.status_code == 200
        blocked = client.post(
            "/v1/chat/completions", json=CHAT, headers={"X-Forwarded-For": "198.51.100.7"}
        )
        other = client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers={"X-Forwarded-For": "198.51.100.8, 127.0.0.1"},
        )
    assert blocked.status_code == 429
    assert other.status_code == 200  # a different client behind the proxy
