"""Faults of the parts around the gate: Redis stopped and restarted, a worker told to stop,
Ollama refusing or hanging. Each test breaks a real process and watches the gate cope."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time

import httpx

from tests.conftest import Stack, build_stack, sim_stats, slow_sim_fixture
from tests.processes import Process, start_redis, start_sim, wait_until

JOB = {"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "hi"}}
GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}


# Jobs of about half a second, so that the tests can act while one runs.
slow_sim = slow_sim_fixture(0.1)


def submit(client: httpx.Client, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = client.post("/v1/jobs", json=JOB)
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def wait_status(client: httpx.Client, job_id: str, *, timeout: float = 20) -> dict[str, object]:
    def ended() -> dict[str, object] | None:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 5}).json()
        return job if job["status"] not in ("queued", "running") else None

    return wait_until(ended, timeout=timeout, what=f"job {job_id} to end")  # type: ignore[return-value]


def test_redis_stopped_and_restarted_loses_no_job_and_everything_reconnects(
    slow_sim: Process,
) -> None:
    data_dir = tempfile.mkdtemp(prefix="gpugate-redis-aof-")
    redis_proc = start_redis(data_dir=data_dir)
    stack = build_stack(redis_proc, slow_sim, gpu_concurrency=1, burst=6, rate_limit="1/minute")
    try:
        workers_before = [w.pid for w in stack.workers]
        with stack.client("owner") as owner, stack.client("other") as other:
            jobs = submit(owner, 4)
            wait_until(
                lambda: owner.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "running",
                what="the first job to run",
            )
            waiting: dict[str, httpx.Response] = {}
            sync = threading.Thread(
                target=lambda: waiting.update(r=owner.post("/api/generate", json=GENERATE))
            )
            sync.start()  # a synchronous caller queued behind the four jobs
            wait_until(
                lambda: httpx.get(stack.url + "/v1/queue").json()["queue_depth"] == 4,
                what="the synchronous call to be queued",
            )

            redis_proc.stop()  # SIGTERM: Redis writes its append-only file and exits

            sync.join(timeout=10)
            cut = waiting["r"]
            assert cut.status_code == 503 and cut.json()["error"] == "unavailable"
            sync_job = str(cut.json()["job_id"])
            for _ in range(6):  # the key's bucket is in this process while Redis is away
                started = time.monotonic()
                r = other.post("/api/generate", json=GENERATE)
                assert time.monotonic() - started < 2
                assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
                assert 1 <= int(r.headers["Retry-After"]) <= 120
            over = other.post("/api/generate", json=GENERATE)
            assert over.status_code == 429 and over.json()["error"] == "rate_limit_exceeded"
            assert over.headers["X-RateLimit-Remaining"] == "0"
            assert other.get("/health").status_code == 200
            ready = other.get("/ready")
            assert ready.status_code == 503 and "redis" in ready.json()["message"]

            redis_proc = start_redis(redis_proc.port, data_dir=data_dir)

            for job_id in [*jobs, sync_job]:
                assert wait_status(owner, job_id)["status"] == "succeeded"
            wait_until(
                lambda: other.post("/api/generate", json=GENERATE).status_code == 200,
                what="new requests to be served again",
            )
        assert [w.pid for w in stack.workers if w.alive()] == workers_before
        assert stack.api is not None
        assert stack.api.log().count("Redis is unreachable") == 1  # not one per request
        assert "Redis is back" in stack.api.log()
        for worker in stack.workers:  # one warning each way, however many loops noticed
            assert worker.log().count("Redis is unreachable") == 1
            assert worker.log().count("Redis is back") == 1
    finally:
        stack.stop()
        redis_proc.stop()


def test_sigterm_lets_the_running_job_finish_and_leaves_queued_ones_to_others(
    redis_proc: Process, slow_sim: Process
) -> None:
    stack = build_stack(redis_proc, slow_sim, gpu_concurrency=1, shutdown_grace=10)
    try:
        with stack.client("owner") as client:
            jobs = submit(client, 3)
            wait_until(
                lambda: client.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "running",
                what="the first job to run",
            )
            first = stack.workers[0]
            first.stop(timeout=15)  # SIGTERM, then wait for the process to exit
            assert client.get(f"/v1/jobs/{jobs[0]}").json()["status"] == "succeeded"
            assert [client.get(f"/v1/jobs/{j}").json()["status"] for j in jobs[1:]] == [
                "queued",
                "queued",
            ]
            stack.add_worker()
            for job_id in jobs[1:]:
                assert wait_status(client, job_id)["status"] == "succeeded"
        assert sim_stats(slow_sim)["requests"] == 3  # nothing ran twice
    finally:
        stack.stop()


def test_ollama_down_opens_the_breaker_and_it_closes_when_ollama_answers(
    redis_proc: Process,
) -> None:
    backend = start_sim("--tokens", "2", "--token-delay", "0")
    stack = build_stack(
        redis_proc,
        backend,
        breaker_threshold=2,
        ollama_retries=0,
        admin_key="admin-secret",
    )
    try:
        backend.stop()
        with stack.client("owner") as client:
            for _ in range(2):
                r = client.post("/api/generate", json=GENERATE)
                assert r.status_code == 502 and r.json()["error"] == "backend_error", r.text
            started = time.monotonic()
            r = client.post("/api/generate", json=GENERATE)
            assert time.monotonic() - started < 1  # fails fast, queues nothing
            assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
            assert "circuit breaker" in r.json()["message"]
            assert int(r.headers["Retry-After"]) == r.json()["retry_after"]
            status = client.get("/admin/status", headers={"X-Admin-Key": "admin-secret"}).json()
            assert status["ollama_breaker"] == "open"
            assert status["queue_depth"] == 0
            assert status["rejections"]["backend_down"] >= 1

            backend = start_sim("--tokens", "2", "--token-delay", "0", port=backend.port)
            wait_until(
                lambda: client.post("/api/generate", json=GENERATE).status_code == 200,
                timeout=5,
                interval=0.2,
                what="the breaker to close once Ollama answers",
            )
            metrics = client.get("/metrics").text
            assert "gpugate_breaker_open 0.0" in metrics
    finally:
        stack.stop()
        backend.stop()


def test_a_hung_ollama_call_ends_at_the_job_timeout_and_frees_its_slot(
    redis_proc: Process,
) -> None:
    backend = start_sim("--tokens", "2", "--token-delay", "0", "--fail-mode", "hang")
    stack: Stack = build_stack(redis_proc, backend, gpu_concurrency=1, job_timeout=1)
    try:
        with stack.client("owner") as client:
            hung, queued = submit(client, 2)
            job = wait_status(client, hung)
            assert job["status"] == "failed"
            assert job["error"]["code"] == "timeout"  # type: ignore[index]
            assert "GPUGATE_JOB_TIMEOUT" in job["error"]["message"]  # type: ignore[index]
            # the slot came back: the next job got it (and hung in turn)
            assert wait_status(client, queued)["status"] == "failed"
            httpx.put(backend.url + "/sim/config", json={"fail_mode": "none"}).raise_for_status()
            (after,) = submit(client, 1)
            assert wait_status(client, after)["status"] == "succeeded"
    finally:
        stack.stop()
        backend.stop()


def test_a_redis_that_hangs_costs_one_caller_a_second_not_every_caller(
    slow_sim: Process,
) -> None:
    """SIGSTOP: Redis accepts connections but never answers. Requests that need it get 503
    within the 2 s timeout; while it is known to hang, answers come at once (one caller a
    second tries again); /health stays fast; after SIGCONT everything carries on."""
    redis_proc = start_redis()
    stack = build_stack(redis_proc, slow_sim)
    try:
        with stack.client("owner") as client:
            assert client.post("/api/generate", json=GENERATE).status_code == 200
            os.kill(redis_proc.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                r = client.post("/api/generate", json=GENERATE)
                assert r.status_code == 503 and time.monotonic() - started < 3
                started = time.monotonic()
                for _ in range(5):
                    assert client.post("/api/generate", json=GENERATE).status_code == 503
                    assert client.get("/health").status_code == 200
                assert time.monotonic() - started < 1  # no one waited for Redis again
            finally:
                os.kill(redis_proc.pid, signal.SIGCONT)
            wait_until(
                lambda: client.post("/api/generate", json=GENERATE).status_code == 200,
                what="requests to be served once Redis answers again",
            )
    finally:
        stack.stop()
        redis_proc.stop()
