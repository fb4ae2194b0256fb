"""A Redis failover under load, on real processes: a master, two replicas and three
Sentinels; the gateway on a redis+sentinel:// URL with GPUGATE_REDIS_MIN_REPLICAS=1;
the master killed with -9 while jobs are admitted and run. Every job a client was told
of ends, none stays queued or running, the simulator never sees more than the cap, and
service resumes within 15 s of the promotion. And the refusal: with no replica up,
admissions are 503 and nothing reaches Ollama."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Stack, sim_stats
from tests.processes import Process, start_api, start_sim, start_worker, wait_until
from tests.sentinel import SentinelCluster, start_cluster

CAP = 2
GEN = {"model": "llama3.2", "prompt": "hi"}


@pytest.fixture
def cluster() -> Iterator[SentinelCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def sim() -> Iterator[Process]:
    proc = start_sim("--tokens", "4", "--token-delay", "0.05", "--parallel", "64")
    yield proc
    proc.stop()


def gateway(cluster: SentinelCluster, sim: Process, workers: int = 2) -> Stack:
    env = {
        "GPUGATE_REDIS_URL": cluster.url(),
        "GPUGATE_OLLAMA_URL": sim.url,
        "GPUGATE_GPU_CONCURRENCY": str(CAP),
        "GPUGATE_REDIS_MIN_REPLICAS": "1",
        "GPUGATE_REDIS_WAIT_MS": "500",
        "GPUGATE_LEASE_TTL": "2",
        "GPUGATE_RATE_LIMIT": "100000/minute",
        "GPUGATE_BURST": "10000",
        "GPUGATE_MAX_QUEUE_DEPTH": "1000",
        "GPUGATE_LOG_LEVEL": "warning",
    }
    stack = Stack(cluster.url(), sim.url, env)
    try:
        stack.workers = [start_worker(env) for _ in range(workers)]
        stack.api = start_api(env)
        stack.wait_for_workers()
    except BaseException:
        stack.stop()
        raise
    return stack


class Load:
    """Jobs submitted from a thread, one every few ms, remembering every one the
    gateway said it admitted (202)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.admitted: list[str] = []
        self.statuses: list[tuple[float, int]] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.stop.is_set():
                try:
                    r = client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": GEN})
                except httpx.HTTPError:
                    self.statuses.append((time.monotonic(), 0))
                    continue
                self.statuses.append((time.monotonic(), r.status_code))
                if r.status_code == 202:
                    self.admitted.append(r.json()["id"])
                time.sleep(0.02)

    def __enter__(self) -> Load:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=20)


def test_a_failover_under_load_loses_no_admitted_job_and_breaks_no_cap(
    cluster: SentinelCluster, sim: Process
) -> None:
    stack = gateway(cluster, sim)
    try:
        with Load(stack.url) as load:
            wait_until(lambda: len(load.admitted) >= 20, timeout=20, what="20 admissions")
            master = cluster.wait_healthy()
            cluster.server(master).kill()
            killed = time.monotonic()
            _, promoted = cluster.wait_promotion(master)
            wait_until(
                lambda: httpx.get(stack.url + "/ready", timeout=5).status_code == 200,
                timeout=15,
                what="/ready 200 after the promotion",
            )
            ready = time.monotonic()
            wait_until(
                lambda: any(t > ready and s == 202 for t, s in load.statuses),
                timeout=15,
                what="an admission answered after the promotion",
            )
            resumed = min(t for t, s in load.statuses if t > ready and s == 202)
            after = len(load.admitted)
            wait_until(lambda: len(load.admitted) >= after + 10, timeout=20, what="more jobs")
        print(
            f"failover: promotion {promoted - killed:.2f}s after kill -9, /ready "
            f"{ready - promoted:.2f}s after it, first admission {resumed - promoted:.2f}s after it"
        )
        assert resumed - promoted < 15

        def ended(job_id: str) -> str:
            r = httpx.get(f"{stack.url}/v1/jobs/{job_id}", params={"wait": 10}, timeout=20)
            assert r.status_code == 200, f"a job the client was told of is gone: {r.text}"
            return str(r.json()["status"])

        finals = {}
        for job_id in load.admitted:
            status = wait_until(
                lambda job_id=job_id: (s := ended(job_id)) not in ("queued", "running") and s,
                timeout=60,
                what=f"job {job_id} to end",
            )
            finals[job_id] = status
        assert set(finals.values()) <= {"succeeded", "failed", "cancelled"}, finals
        assert list(finals.values()).count("succeeded") >= len(finals) - 5, finals
        assert sim_stats(sim)["max_in_flight"] <= CAP
        refusals = {s for _, s in load.statuses} - {202}
        assert refusals <= {0, 503}, refusals  # during the failover: unavailable, never 500
    finally:
        stack.stop()


def test_without_a_replica_admissions_are_503_and_nothing_reaches_ollama(
    cluster: SentinelCluster, sim: Process
) -> None:
    stack = gateway(cluster, sim, workers=1)
    try:
        with stack.client("k") as client:
            assert client.post("/api/generate", json={**GEN, "stream": False}).status_code == 200
            master = cluster.wait_healthy()
            for proc in cluster.servers:
                if proc.port != master:
                    proc.stop()
            before = sim_stats(sim)["requests"]
            sync = client.post("/api/generate", json={**GEN, "stream": False})
            job = client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": GEN})
            for r in (sync, job):
                assert r.status_code == 503 and r.json()["error"] == "unavailable", r.text
                assert 1 <= int(r.headers["Retry-After"]) <= 120
            assert client.get("/v1/queue").json()["queue_depth"] == 0
            assert sim_stats(sim)["requests"] == before
    finally:
        stack.stop()
