"""Every error row of the SPEC: the status, the JSON body, and that nothing is queued."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from shared import keys
from tests.conftest import Stack, StackFactory
from tests.processes import Process, free_port, start_api, start_sim

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code
    assert isinstance(body["message"], str) and body["message"]
    return dict(body)


def test_malformed_json_is_400(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post(
            "/v1/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
    assert_error(r, 400, "invalid_request")


def test_non_utf8_bytes_are_400(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post(
            "/api/generate",
            content=b'{"model": "\xff\xfe"}',
            headers={"content-type": "application/json"},
        )
    assert_error(r, 400, "invalid_request")


def test_missing_model_names_the_field(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post("/v1/chat/completions", json={"messages": CHAT["messages"]})
    body = assert_error(r, 422, "invalid_request")
    assert "model" in str(body["message"])


def test_a_missing_body_is_named(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post("/api/generate")
    body = assert_error(r, 422, "invalid_request")
    assert body["message"] == "body: Field required"


def test_wrong_type_names_the_field(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post("/api/generate", json={"model": "llama3.2", "stream": "yes"})
    body = assert_error(r, 422, "invalid_request")
    assert "stream" in str(body["message"])


def test_a_job_with_a_bad_body_names_the_nested_field(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post(
            "/v1/jobs", json={"endpoint": "/v1/chat/completions", "body": {"model": "m"}}
        )
        bad_endpoint = client.post("/v1/jobs", json={"endpoint": "/api/pull", "body": {}})
    assert "body.messages" in str(assert_error(r, 422, "invalid_request")["message"])
    assert "endpoint" in str(assert_error(bad_endpoint, 422, "invalid_request")["message"])


def test_invalid_requests_spend_no_token_and_queue_nothing(stack: Stack, key: str) -> None:
    with stack.client(key) as client, stack.redis() as rdb:
        before = rdb.hget(keys.STATS, "jobs_admitted")
        for _ in range(12):
            client.post("/v1/chat/completions", json={"model": 3})
        assert rdb.hget(keys.STATS, "jobs_admitted") == before
        assert (
            client.post("/v1/chat/completions", json=CHAT).headers["X-RateLimit-Remaining"] == "9"
        )


def test_oversized_body_is_413(make_stack: StackFactory, key: str) -> None:
    stack = make_stack(max_body_bytes=1000)
    with stack.client(key) as client:
        declared = client.post("/api/generate", json={"model": "llama3.2", "prompt": "x" * 2000})

        def chunks() -> Iterator[bytes]:  # no Content-Length: checked as it streams in
            yield b'{"model": "llama3.2", "prompt": "'
            for _ in range(100):
                yield b"x" * 100
            yield b'"}'

        streamed = client.post("/api/generate", content=chunks())
    assert_error(declared, 413, "request_too_large")
    assert_error(streamed, 413, "request_too_large")


def test_unknown_key_with_a_keys_file_is_401(make_stack: StackFactory, tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.toml"
    digest = hashlib.sha256(b"good-key").hexdigest()
    keys_file.write_text(f'[[keys]]\nname = "team-a"\nsha256 = "{digest}"\n')
    stack = make_stack(keys_file=keys_file)
    with stack.client("bad-key") as bad, stack.client("good-key") as good:
        assert_error(bad.post("/v1/chat/completions", json=CHAT), 401, "invalid_api_key")
        assert good.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_require_api_key_refuses_anonymous_requests(make_stack: StackFactory) -> None:
    stack = make_stack(require_api_key="true")
    with stack.client() as anon, stack.client("any-key") as keyed:
        assert_error(anon.post("/api/generate", json={"model": "llama3.2"}), 401, "invalid_api_key")
        assert (
            keyed.post("/api/generate", json={"model": "llama3.2", "stream": False}).status_code
            == 200
        )


def test_admin_is_404_when_off_and_403_without_the_key(
    stack: Stack, make_stack: StackFactory
) -> None:
    with stack.client() as client:
        assert_error(client.get("/admin/status"), 404, "not_found")
    admin = make_stack(workers=0, admin_key="s3cret")
    with admin.client() as client:
        assert_error(client.get("/admin/status"), 403, "forbidden")
        assert_error(
            client.put(
                "/admin/concurrency", json={"gpu_concurrency": 3}, headers={"X-Admin-Key": "no"}
            ),
            403,
            "forbidden",
        )
        ok = client.get("/admin/status", headers={"X-Admin-Key": "s3cret"})
        assert ok.status_code == 200 and ok.json()["gpu_concurrency"] == 2


def test_ollama_unreachable_is_502(make_stack: StackFactory, key: str) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    stack = make_stack(ollama_url=dead, ollama_retries=1)
    with stack.client(key) as client:
        r = client.post("/v1/chat/completions", json=CHAT)
        tags = client.get("/api/tags")
    assert_error(r, 502, "backend_error")
    assert_error(tags, 502, "backend_error")


def test_ollama_5xx_after_retries_is_502(make_stack: StackFactory, key: str) -> None:
    failing = start_sim("--fail-mode", "error500")
    try:
        stack = make_stack(ollama_url=failing.url, ollama_retries=2)
        with stack.client(key) as client:
            r = client.post("/api/generate", json={"model": "llama3.2", "stream": False})
        assert_error(r, 502, "backend_error")
        assert httpx.get(failing.url + "/sim/stats").json()["requests"] == 3  # 1 + 2 retries
    finally:
        failing.stop()


def test_no_live_worker_is_503(make_stack: StackFactory, key: str) -> None:
    stack = make_stack(workers=0)
    with stack.client(key) as client:
        r = client.post("/v1/chat/completions", json=CHAT)
    body = assert_error(r, 503, "unavailable")
    assert r.headers["Retry-After"] == str(body["retry_after"])


def test_redis_down_is_503_for_queueing_requests_and_health_stays_up(
    make_stack: StackFactory, key: str, redis_proc: Process
) -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    stack = make_stack(workers=0)
    api = start_api({**stack.env, "GPUGATE_REDIS_URL": dead_redis})
    try:
        with httpx.Client(base_url=api.url, timeout=10) as client:
            r = client.post("/v1/chat/completions", json=CHAT, headers={"X-API-Key": key})
            body = assert_error(r, 503, "unavailable")
            assert 1 <= int(r.headers["Retry-After"]) <= 120 and body["retry_after"]
            assert client.get("/health").status_code == 200
            ready = client.get("/ready")
            assert_error(ready, 503, "unavailable")
            assert "redis" in str(ready.json()["message"])
    finally:
        api.stop()


def test_sync_timeout_is_504_with_the_job_id(make_stack: StackFactory, key: str) -> None:
    hung = start_sim("--fail-mode", "hang")
    try:
        stack = make_stack(ollama_url=hung.url, sync_timeout=0.5, gpu_concurrency=1)
        with stack.client(key) as client:
            running = client.post("/api/generate", json={"model": "llama3.2", "stream": False})
            queued = client.post("/api/generate", json={"model": "llama3.2", "stream": False})
            body = assert_error(running, 504, "timeout")
            assert body["status"] == "running" and str(body["job_id"]).startswith("job_")
            job = client.get(f"/v1/jobs/{body['job_id']}").json()
            assert job["status"] == "running"  # it goes on, readable by its id
            queued_body = assert_error(queued, 504, "timeout")
            assert queued_body["status"] == "cancelled"
            assert client.get(f"/v1/jobs/{queued_body['job_id']}").json()["status"] == "cancelled"
    finally:
        hung.stop()


def test_unknown_route_is_json_404(stack: Stack) -> None:
    with stack.client() as client:
        assert_error(client.get("/v2/nothing"), 404, "not_found")
