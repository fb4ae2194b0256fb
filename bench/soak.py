"""Soak: minutes of mixed load while parts fail, then an account of every admitted job.

Clients send synchronous, streamed and async requests, more than the GPU cap can
serve, for SOAK_S seconds (default 180). Meanwhile one worker is killed with SIGKILL and
restarted, and Redis is stopped and restarted once (append-only file, as in production).
At the end every job record in Redis must have ended (succeeded, failed with a reason, or
cancelled), every job a client was told about must be among them, the simulator must
never have seen more than the cap at once, and the API's and workers' memory must be flat.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.report import write_section
from shared import keys
from tests.processes import Process, start_api, start_redis, start_sim, start_worker, wait_until

GPU_CONCURRENCY = 2
TOKENS, TOKEN_DELAY_S = 5, 0.04  # a job holds its slot for about 0.2 s: ~10 jobs/s
CLIENTS = 12
THINK_S = 0.15  # mean pause of a client between requests (async jobs do not wait)
FINAL = {"succeeded", "failed", "cancelled"}


@dataclass
class Tally:
    """What the clients saw; `job_ids` are the jobs the gateway told a client about."""

    outcomes: Counter[str] = field(default_factory=Counter)
    job_ids: set[str] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(self, kind: str, status: int, job_id: str | None) -> None:
        with self.lock:
            self.outcomes[f"{kind} {status}"] += 1
            if job_id:
                self.job_ids.add(job_id)


async def one_request(client: httpx.AsyncClient, kind: str, tally: Tally) -> None:
    prompt = {"model": "llama3.2", "prompt": "soak"}
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "soak"}]}
    try:
        if kind == "sync":
            r = await client.post("/api/generate", json={**prompt, "stream": False})
            tally.saw(kind, r.status_code, job_id_of(r.headers, r.content))
        elif kind == "stream":
            body = {**chat, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                content = b"".join([chunk async for chunk in r.aiter_raw()])
            tally.saw(kind, r.status_code, job_id_of(r.headers, content))
        else:
            r = await client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": prompt})
            tally.saw(kind, r.status_code, r.json().get("id") if r.status_code == 202 else None)
    except httpx.HTTPError as exc:
        tally.saw(kind, 0, None)  # status 0: the connection failed (counted, not hidden)
        print(f"  {kind}: {exc.__class__.__name__}", flush=True)


def job_id_of(headers: httpx.Headers, content: bytes) -> str | None:
    """The job behind a synchronous answer: its header, or `job_id` in an error body."""
    if "x-gpugate-job-id" in headers:
        return headers["x-gpugate-job-id"]
    try:
        return json.loads(content).get("job_id") or None
    except (ValueError, AttributeError):
        return None


async def client_loop(url: str, key: str, until: float, tally: Tally) -> None:
    kinds = ["sync"] * 4 + ["stream"] * 3 + ["async"] * 3
    async with httpx.AsyncClient(base_url=url, headers={"X-API-Key": key}, timeout=60) as c:
        while time.monotonic() < until:
            await one_request(c, random.choice(kinds), tally)
            await asyncio.sleep(random.expovariate(1 / THINK_S))


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Fleet:
    redis: Process
    redis_dir: str
    sim: Process
    api: Process
    workers: list[Process]
    env: dict[str, str]
    events: list[str] = field(default_factory=list)
    memory: dict[str, list[tuple[float, float]]] = field(default_factory=dict)


def start_fleet() -> Fleet:
    redis_dir = tempfile.mkdtemp(prefix="gpugate-soak-redis-")
    redis_proc = start_redis(data_dir=redis_dir)
    sim = start_sim(
        "--tokens", str(TOKENS), "--token-delay", str(TOKEN_DELAY_S), "--parallel", "64"
    )
    env = {
        "GPUGATE_REDIS_URL": redis_proc.url,
        "GPUGATE_OLLAMA_URL": sim.url,
        "GPUGATE_GPU_CONCURRENCY": str(GPU_CONCURRENCY),
        "GPUGATE_MAX_QUEUE_DEPTH": "32",
        "GPUGATE_RATE_LIMIT": "100/second",
        "GPUGATE_BURST": "100",
        "GPUGATE_SYNC_TIMEOUT": "60",
        "GPUGATE_LOG_LEVEL": "warning",
    }
    workers = [start_worker(env), start_worker(env)]
    api = start_api(env)
    wait_until(lambda: "2 alive" in httpx.get(api.url + "/ready").text, timeout=30, what="workers")
    return Fleet(redis_proc, redis_dir, sim, api, workers, env)


def chaos(fleet: Fleet, started: float, duration: float, stop: threading.Event) -> None:
    """Kill a worker at 25 %, restart it 5 s later; stop Redis at 50 %, restart it 3 s later.
    Sample memory every second throughout."""

    def at(fraction: float) -> float:
        return started + duration * fraction

    def note(text: str) -> None:
        fleet.events.append(f"{time.monotonic() - started:6.1f} s  {text}")
        print("  " + fleet.events[-1], flush=True)

    plan = [
        (at(0.25), "kill"),
        (at(0.25) + 5, "restart worker"),
        (at(0.5), "stop redis"),
        (at(0.5) + 3, "start redis"),
    ]
    while not stop.is_set():
        now = time.monotonic()
        for name, proc in [("api", fleet.api), ("worker 2", fleet.workers[1])]:
            fleet.memory.setdefault(name, []).append((now - started, rss_mb(proc.pid)))
        while plan and plan[0][0] <= now:
            _, action = plan.pop(0)
            if action == "kill":
                fleet.workers[0].kill()
                note("worker 1 killed (SIGKILL)")
            elif action == "restart worker":
                fleet.workers[0] = start_worker(fleet.env)
                note("worker 1 restarted")
            elif action == "stop redis":
                fleet.redis.stop()
                note("redis stopped (SIGTERM)")
            else:
                fleet.redis = start_redis(fleet.redis.port, data_dir=fleet.redis_dir)
                note("redis restarted (same port, same append-only file)")
        stop.wait(1.0)


def account(fleet: Fleet, tally: Tally, drain_s: float = 90) -> dict[str, object]:
    """Wait for every job to end, then count the job records in Redis by final state."""
    rdb = redis.Redis.from_url(fleet.redis.url)

    def records() -> dict[str, dict[bytes, bytes]]:
        out = {}
        for name in rdb.scan_iter(keys.JOB + "*", count=1000):
            out[name.decode().removeprefix(keys.JOB)] = rdb.hgetall(name)
        return out

    def all_ended() -> bool:
        return all(r.get(b"status", b"").decode() in FINAL for r in records().values())

    try:
        wait_until(all_ended, timeout=drain_s, interval=0.5, what="every job to end")
    except AssertionError as exc:
        print(f"  {exc}", flush=True)
    jobs = records()
    ends: Counter[str] = Counter()
    for record in jobs.values():
        status = record.get(b"status", b"?").decode()
        if status == "failed":
            error = json.loads(record.get(b"error") or b"{}")
            status += f" ({error.get('code', 'no reason!')})"
        ends[status] += 1
    stats = {k.decode(): v.decode() for k, v in rdb.hgetall(keys.STATS).items()}
    rdb.close()
    return {
        "records": len(jobs),
        "ends": ends,
        "admitted": int(stats.get("jobs_admitted", 0)),
        "unknown_to_redis": len(tally.job_ids - jobs.keys()),
        "not_ended": sum(1 for r in jobs.values() if r.get(b"status", b"").decode() not in FINAL),
    }


def trend(samples: list[tuple[float, float]], start_s: float) -> tuple[float, float, float]:
    """(RSS at `start_s`, RSS at the end, slope in MB/min over the samples after start_s)."""
    tail = [(t, m) for t, m in samples if t >= start_s]
    ts, ms = [t for t, _ in tail], [m for _, m in tail]
    slope = statistics.linear_regression(ts, ms).slope * 60 if len(tail) > 2 else 0.0
    return ms[0], ms[-1], slope


def run(duration: float) -> str:
    """The soak of `duration` seconds; returns its BENCHMARKS.md section."""
    fleet = start_fleet()
    tally = Tally()
    stop = threading.Event()
    try:
        httpx.post(fleet.sim.url + "/sim/reset").raise_for_status()
        started = time.monotonic()
        watcher = threading.Thread(target=chaos, args=(fleet, started, duration, stop))
        watcher.start()

        async def load() -> None:
            until = started + duration
            await asyncio.gather(
                *(client_loop(fleet.api.url, f"soak-{i}", until, tally) for i in range(CLIENTS))
            )

        asyncio.run(load())
        result = account(fleet, tally)
        stop.set()
        watcher.join()
        sim = httpx.get(fleet.sim.url + "/sim/stats").json()
    finally:
        stop.set()
        for proc in [fleet.api, *fleet.workers, fleet.sim, fleet.redis]:
            proc.stop()
    return report(fleet, tally, result, sim, duration)


def report(
    fleet: Fleet, tally: Tally, result: dict[str, object], sim: dict[str, int], duration: float
) -> str:
    ends: Counter[str] = result["ends"]  # type: ignore[assignment]
    ok = (
        result["not_ended"] == 0
        and result["unknown_to_redis"] == 0
        and result["records"] == result["admitted"]
        and sim["max_in_flight"] <= GPU_CONCURRENCY
    )
    warm = duration * 0.1
    capacity = GPU_CONCURRENCY / (TOKENS * TOKEN_DELAY_S)
    served = ends["succeeded"] / duration
    memory_rows = []
    for name, samples in fleet.memory.items():
        first, last, slope = trend(samples, warm)
        memory_rows.append(f"| {name} | {first:.1f} | {last:.1f} | {slope:+.2f} |")
    outcome_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(tally.outcomes.items()))
    end_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(ends.items()))
    return f"""\
{duration:.0f} s of mixed load ({CLIENTS} clients: 40 % synchronous, 30 % streamed, 30 % async
jobs), GPU cap {GPU_CONCURRENCY}, two workers, one API, a private redis-server with an
append-only file, the simulator at {TOKENS} tokens, {TOKEN_DELAY_S} s each: capacity about
{capacity:.0f} jobs/s; served {served:.1f} jobs/s over the run.

Events:

```
{chr(10).join(fleet.events)}
```

**Result: {"every admitted job accounted for, cap held" if ok else "FAILED — see below"}.**

| check | figure | target |
|---|---|---|
| jobs admitted (Redis counter) | {result["admitted"]} | = job records |
| job records in Redis | {result["records"]} | |
| job records not ended after the drain | {result["not_ended"]} | 0 |
| jobs a client was told of, missing in Redis | {result["unknown_to_redis"]} | 0 |
| most requests in flight at the simulator | {sim["max_in_flight"]} | ≤ {GPU_CONCURRENCY} |

How the admitted jobs ended:

| end | jobs |
|---|---|
{end_rows}

What the clients saw (kind, HTTP status; 0 = connection failed):

| request | count |
|---|---|
{outcome_rows}

Memory (RSS, MB) from {warm:.0f} s to the end; worker 2 is the one never restarted:

| process | RSS at {warm:.0f} s | RSS at end | trend MB/min |
|---|---|---|---|
{chr(10).join(memory_rows)}
"""


def main() -> None:
    duration = float(os.environ.get("SOAK_S", "180"))
    write_section("soak", "make bench  # python -m bench soak; SOAK_S=180", run(duration))


if __name__ == "__main__":
    main()
