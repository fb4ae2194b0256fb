"""The GPU cap across worker processes, leases after kill -9, live tuning, tiers and
priority, and metrics that every API instance reads from Redis."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from shared import keys
from tests.conftest import StackFactory, sim_configure, sim_stats, slow_sim_fixture
from tests.processes import Process, wait_until

GEN = {"model": "llama3.2", "prompt": "hello", "stream": False}
ADMIN = {"X-Admin-Key": "admin-secret"}


slow_sim = slow_sim_fixture(0.05)


def submit(client: httpx.Client, key: str, body: dict[str, object] | None = None) -> str:
    r = client.post(
        "/v1/jobs",
        json={"endpoint": "/api/generate", "body": body or GEN},
        headers={"X-API-Key": key},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


async def _burst(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        replies = await asyncio.gather(
            *(
                client.post("/api/generate", json=GEN, headers={"X-API-Key": f"b{i}"})
                for i in range(n)
            )
        )
    return [r.status_code for r in replies]


def test_two_workers_hold_the_cap_under_sixty_concurrent_requests(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(workers=2, ollama_url=slow_sim.url, gpu_concurrency=2, max_queue_depth=64)
    statuses = asyncio.run(_burst(stack.url, 60))
    assert statuses == [200] * 60
    stats = sim_stats(slow_sim)
    assert stats["max_in_flight"] == 2, stats
    assert stats["requests"] == 60


def test_a_killed_workers_slot_comes_back_and_its_job_ends(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.2, tokens=10)
    stack = make_stack(workers=1, ollama_url=slow_sim.url, gpu_concurrency=1, lease_ttl=2)
    with stack.client() as client:
        job_id = submit(client, "victim")
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the job running")
        stack.workers[0].kill()
        killed_at = time.monotonic()
        stack.add_worker()
        done = client.get(
            f"/v1/jobs/{job_id}", params={"wait": 30}, headers={"X-API-Key": "victim"}
        )
        job = done.json()
        assert job["status"] == "succeeded", job  # re-run on the new worker
        assert time.monotonic() - killed_at < 10
        assert client.get("/v1/queue").json()["running"] == 0
    with stack.redis() as rdb:
        assert rdb.hget(keys.STATS, "jobs_requeued") == b"1"
        assert rdb.hget(keys.job(job_id), "attempt") == b"2"


def test_the_cap_changes_live_within_a_second_each_way(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.1, tokens=10)
    stack = make_stack(
        workers=1,
        ollama_url=slow_sim.url,
        gpu_concurrency=1,
        worker_concurrency=8,
        max_queue_depth=64,
        admin_key="admin-secret",
    )
    with stack.client() as client:
        for i in range(30):
            submit(client, f"load-{i % 5}-{i}")
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="one running")
        changed = time.monotonic()
        r = client.put("/admin/concurrency", json={"gpu_concurrency": 3}, headers=ADMIN)
        assert r.status_code == 200
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 3, timeout=1, what="3 at once")
        assert time.monotonic() - changed < 1
        httpx.post(slow_sim.url + "/sim/reset")
        r = client.put("/admin/concurrency", json={"gpu_concurrency": 1}, headers=ADMIN)
        lowered = time.monotonic()
        # running jobs finish (1 s each); no new one starts until under the new cap
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, timeout=2.5, what="back to 1")
        httpx.post(slow_sim.url + "/sim/reset")
        wait_until(lambda: client.get("/v1/queue").json()["queue_depth"] <= 20, what="progress")
        assert sim_stats(slow_sim)["max_in_flight"] <= 1
        assert time.monotonic() - lowered < 10
        status = client.get("/admin/status", headers=ADMIN).json()
    assert status["gpu_concurrency"] == 1
    assert len(status["workers"]) == 1 and status["workers"][0]["pid"]
    assert status["running"] <= 1


def test_gpugate_concurrency_command_sets_the_cap(make_stack: StackFactory) -> None:
    import subprocess
    import sys

    stack = make_stack(workers=0)
    env = {**stack.env}
    out = subprocess.run(
        [sys.executable, "-m", "gpugate", "concurrency", "5"],
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "gpu_concurrency=5 (set live)" in out
    with stack.client() as client:
        assert client.get("/v1/queue").json()["gpu_concurrency"] == 5


def _keys_file(tmp_path: Path) -> Path:
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode()).hexdigest()

    path = tmp_path / "keys.toml"
    path.write_text(
        f"""
[tiers.free]
rate = "600/hour"
burst = 50
max_queued = 3
priority = 0
[tiers.pro]
rate = "600/hour"
burst = 50
max_queued = 20
priority = 10
[[keys]]
name = "free-a"
sha256 = "{digest("free-a")}"
[[keys]]
name = "free-b"
sha256 = "{digest("free-b")}"
[[keys]]
name = "pro"
sha256 = "{digest("pro")}"
tier = "pro"
"""
    )
    return path


def test_higher_priority_jobs_start_before_waiting_lower_ones(
    make_stack: StackFactory, slow_sim: Process, tmp_path: Path
) -> None:
    sim_configure(slow_sim, token_delay_s=0.1, tokens=3)
    stack = make_stack(
        workers=1, ollama_url=slow_sim.url, gpu_concurrency=1, keys_file=_keys_file(tmp_path)
    )
    with stack.client() as client:
        free = [submit(client, "free-a")]
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the first job running")
        free += [submit(client, "free-a") for _ in range(2)]
        pro = submit(client, "pro")
        for job_id, key in [*((j, "free-a") for j in free), (pro, "pro")]:
            client.get(f"/v1/jobs/{job_id}", params={"wait": 20}, headers={"X-API-Key": key})
        started = {
            job_id: client.get(f"/v1/jobs/{job_id}", headers={"X-API-Key": key}).json()[
                "started_at"
            ]
            for job_id, key in [*((j, "free-a") for j in free), (pro, "pro")]
        }
    # the first free job was already running; the pro job overtook the two waiting ones
    assert started[free[0]] < started[pro] < started[free[1]] < started[free[2]]


def test_a_key_over_its_queued_quota_is_refused_while_others_are_admitted(
    make_stack: StackFactory, slow_sim: Process, tmp_path: Path
) -> None:
    sim_configure(slow_sim, token_delay_s=0.3, tokens=5)
    stack = make_stack(
        workers=1, ollama_url=slow_sim.url, gpu_concurrency=1, keys_file=_keys_file(tmp_path)
    )
    with stack.client() as client:
        submit(client, "free-a")  # one runs ...
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the first job running")
        for _ in range(3):  # ... and three wait: free-a's quota
            submit(client, "free-a")
        wait_until(lambda: client.get("/v1/queue").json()["queue_depth"] == 3, what="3 queued")
        over = client.post(
            "/v1/jobs",
            json={"endpoint": "/api/generate", "body": GEN},
            headers={"X-API-Key": "free-a"},
        )
        other = client.post(
            "/v1/jobs",
            json={"endpoint": "/api/generate", "body": GEN},
            headers={"X-API-Key": "free-b"},
        )
    assert over.status_code == 429 and over.json()["error"] == "queue_full"
    assert 1 <= int(over.headers["Retry-After"]) <= 120
    assert over.headers["X-RateLimit-Remaining"] == "46"  # four spent, the refusal spent none
    assert other.status_code == 202


def test_metrics_parse_and_match_the_queue(make_stack: StackFactory, slow_sim: Process) -> None:
    sim_configure(slow_sim, token_delay_s=0.3, tokens=5)
    stack = make_stack(workers=1, ollama_url=slow_sim.url, gpu_concurrency=1)
    with stack.client() as client:
        for i in range(3):
            submit(client, f"m{i}")
        wait_until(lambda: client.get("/v1/queue").json()["running"] == 1, what="one running")
        queue = client.get("/v1/queue").json()
        text = client.get("/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    value = {
        name: families[name].samples[0].value
        for name in (
            "gpugate_queue_depth",
            "gpugate_running_jobs",
            "gpugate_gpu_concurrency",
            "gpugate_workers_alive",
        )
    }
    assert value["gpugate_queue_depth"] == queue["queue_depth"] == 2
    assert value["gpugate_running_jobs"] == queue["running"] == 1
    assert value["gpugate_gpu_concurrency"] == queue["gpu_concurrency"] == 1
    assert value["gpugate_workers_alive"] == 1
    for name in (
        "gpugate_queue_wait_seconds",
        "gpugate_job_duration_seconds",
        "gpugate_requests",
        "gpugate_rejections",
        "gpugate_ollama_errors",
        "gpugate_jobs",
    ):
        assert name in families, name
