"""Async jobs: submit, poll, wait, cancel; owner-only; idempotency; deadlines."""

from __future__ import annotations

import time

from tests.conftest import Stack, StackFactory, sim_configure, sim_stats, slow_sim_fixture
from tests.processes import Process, wait_until

GEN = {"model": "llama3.2", "prompt": "hello"}


slow_sim = slow_sim_fixture(0.2)


def submit(client, body=None, **kwargs):  # type: ignore[no-untyped-def]
    return client.post(
        "/v1/jobs", json={"endpoint": "/api/generate", "body": body or GEN}, **kwargs
    )


def test_submit_returns_202_with_location_and_position(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = submit(client)
    assert r.status_code == 202
    job = r.json()
    assert r.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] in ("queued", "running", "succeeded")
    assert job["endpoint"] == "/api/generate"
    if job["status"] == "queued":
        assert job["queue_position"] >= 0
        assert job["estimated_start_seconds"] >= 0
    assert r.headers["X-RateLimit-Remaining"] == "9"


def test_wait_returns_the_result_when_done(stack: Stack, key: str, sim_proc: Process) -> None:
    with stack.client(key) as client:
        job_id = submit(client, {**GEN, "stream": True}).json()["id"]
        done = client.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()
    assert done["status"] == "succeeded"
    assert done["result"]["done"] is True  # unstreamed, whatever the body asked
    assert done["result"]["response"]
    assert done["started_at"] >= done["created_at"]
    assert done["finished_at"] >= done["started_at"]


def test_polling_sees_the_job_finish(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        job_id = submit(client).json()["id"]
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded",
            what="the job to succeed",
        )


def test_wait_returns_early_with_the_job_still_running(
    make_stack: StackFactory, slow_sim: Process, key: str
) -> None:
    stack = make_stack(ollama_url=slow_sim.url)
    with stack.client(key) as client:
        job_id = submit(client).json()["id"]
        started = time.monotonic()
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 0.3}).json()
        assert time.monotonic() - started < 0.9
        assert job["status"] in ("queued", "running")
        assert client.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()["status"] == "succeeded"


def test_a_job_is_visible_only_to_its_owner(stack: Stack, key: str) -> None:
    with stack.client(key) as owner, stack.client(key + "-x") as other, stack.client() as anon:
        job_id = submit(owner).json()["id"]
        for client in (other, anon):
            r = client.get(f"/v1/jobs/{job_id}")
            assert r.status_code == 404
            assert r.json()["error"] == "not_found"
            assert client.delete(f"/v1/jobs/{job_id}").status_code == 404
        assert owner.get(f"/v1/jobs/{job_id}").status_code == 200


def test_unknown_job_is_404(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.get("/v1/jobs/job_0123456789abcdef0123456789abcdef")
    assert r.status_code == 404
    assert r.json() == {"error": "not_found", "message": "No such job."}


def test_cancel_a_queued_job_and_it_never_runs(
    make_stack: StackFactory, slow_sim: Process, key: str
) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1)
    with stack.client(key) as client:
        first = submit(client).json()["id"]
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the first job running")
        second = submit(client).json()["id"]
        r = client.delete(f"/v1/jobs/{second}")
        assert r.status_code == 200
        assert r.json()["status"] == "cancelled"
        assert r.json()["error"]["code"] == "cancelled"
        assert client.get(f"/v1/jobs/{first}", params={"wait": 10}).json()["status"] == "succeeded"
        assert client.get(f"/v1/jobs/{second}").json()["status"] == "cancelled"
    assert sim_stats(slow_sim)["requests"] == 1


def test_cancel_a_running_job_frees_the_slot(
    make_stack: StackFactory, slow_sim: Process, key: str
) -> None:
    sim_configure(slow_sim, token_delay_s=0.5, tokens=20)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1)
    with stack.client(key) as client:
        job_id = submit(client).json()["id"]
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the job running")
        r = client.delete(f"/v1/jobs/{job_id}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 0, timeout=2, what="Ollama freed")
        wait_until(lambda: client.get("/v1/queue").json()["running"] == 0, timeout=2, what="slot")
        sim_configure(slow_sim, token_delay_s=0.01, tokens=5)
        after = submit(client).json()["id"]
        assert client.get(f"/v1/jobs/{after}", params={"wait": 10}).json()["status"] == "succeeded"


def test_cancelling_a_finished_job_is_a_conflict(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        job_id = submit(client).json()["id"]
        client.get(f"/v1/jobs/{job_id}", params={"wait": 10})
        r = client.delete(f"/v1/jobs/{job_id}")
    assert r.status_code == 409
    assert r.json()["error"] == "conflict"


def test_idempotency_key_returns_the_same_job(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        a = submit(client, headers={"Idempotency-Key": "order-1"})
        b = submit(client, headers={"Idempotency-Key": "order-1"})
        c = submit(
            client, {"model": "llama3.2", "prompt": "other"}, headers={"Idempotency-Key": "order-1"}
        )
        d = submit(client, headers={"Idempotency-Key": "order-2"})
    assert a.status_code == b.status_code == 202
    assert a.json()["id"] == b.json()["id"]
    assert c.status_code == 409 and c.json()["error"] == "conflict"
    assert d.json()["id"] != a.json()["id"]
    assert b.headers["X-RateLimit-Remaining"] == "9"  # the replay spent no token


def test_idempotency_keys_are_scoped_to_the_api_key(stack: Stack, key: str) -> None:
    with stack.client(key) as a, stack.client(key + "-b") as b:
        first = submit(a, headers={"Idempotency-Key": "same"}).json()["id"]
        second = submit(b, headers={"Idempotency-Key": "same"}).json()["id"]
    assert first != second


def test_a_queued_job_past_its_deadline_never_runs(
    make_stack: StackFactory, slow_sim: Process, key: str
) -> None:
    sim_configure(slow_sim, token_delay_s=0.3, tokens=5)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1)
    with stack.client(key) as client:
        blocker = submit(client).json()["id"]
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the blocker running")
        late = client.post(
            "/v1/jobs", json={"endpoint": "/api/generate", "body": GEN, "deadline_s": 0.3}
        ).json()["id"]
        job = client.get(f"/v1/jobs/{late}", params={"wait": 5}).json()
        assert job["status"] == "cancelled"
        assert job["error"]["code"] == "deadline_exceeded"
        client.get(f"/v1/jobs/{blocker}", params={"wait": 10})
    assert sim_stats(slow_sim)["requests"] == 1
