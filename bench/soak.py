"""Soak: minutes of mixed load while parts fail, then an account of every admitted job.

Clients send synchronous, streamed and async requests, more than the GPU cap can serve,
for SOAK_S seconds (default 150) in each of two modes:

- **standalone**: a private redis-server with an append-only file (as in production). One
  worker is killed with SIGKILL and restarted, and Redis is stopped and restarted once.
- **sentinel**: a Sentinel cluster (a master, two replicas, three Sentinels:
  gpugate.testing.sentinel) and the gateway on its `redis+sentinel://` URL with
  GPUGATE_REDIS_MIN_REPLICAS=1. The master is killed with `kill -9` (a replica is
  promoted; the timeline kill, promotion seen, `/ready` 200, first admission after is
  recorded), later a worker is killed with SIGKILL and restarted.

At the end every job record in Redis must have ended (succeeded, failed with a reason, or
cancelled), every job a client was told of (a 202 or a started response) must be among
them, the simulator must never have seen more than the cap at once nor `/v1/queue` (sampled
every 0.2 s) more running than the cap, no client may have seen a 500, and the API's and
workers' memory must be flat.

`python -m bench soak` (and `make bench`) runs both modes and writes both sections;
`python -m bench.soak --standalone` or `--sentinel` (or SOAK_MODE=standalone|sentinel) one
of them; `--quick` (or SOAK_QUICK=1) is a 30 s smoke run of each that writes nothing.
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

import httpx
import redis

from bench.report import arguments, is_quick, publish
from gpugate.testing.processes import Process, wait_until
from gpugate.testing.revision import revision
from gpugate.testing.sentinel import SentinelCluster, start_cluster
from gpugate.testing.stack import settings_env, start_redis, start_sim, start_stack, start_worker
from gpugate.testing.stats import rss_mb
from shared import keys

GPU_CONCURRENCY = 2
TOKENS, TOKEN_DELAY_S = 5, 0.04  # a job holds its slot for about 0.2 s: ~10 jobs/s
CLIENTS = 12
THINK_S = 0.15  # mean pause of a client between requests (async jobs do not wait)
FINAL = {"succeeded", "failed", "cancelled"}
DEFAULT_S, QUICK_S = 150.0, 30.0
MODES = ("standalone", "sentinel")
SENTINEL_SETTINGS = {"redis_min_replicas": 1, "redis_wait_ms": 500}
RESUME_TARGET_S = 15.0  # SPEC: service resumes within 15 s of the promotion
QUEUE_SAMPLE_S = 0.2


@dataclass
class Tally:
    """What the clients saw. `told`: jobs a client was told of by a 2xx (a 202, or a started
    synchronous or streamed response); `named_in_errors`: job ids found in error answers;
    `answers`: (sent, answered, kind, status), monotonic seconds."""

    outcomes: Counter[str] = field(default_factory=Counter)
    told: set[str] = field(default_factory=set)
    named_in_errors: set[str] = field(default_factory=set)
    answers: list[tuple[float, float, str, int]] = field(default_factory=list)
    reasons: Counter[str] = field(default_factory=Counter)  # "kind status: message" of 5xx
    lock: threading.Lock = field(default_factory=threading.Lock)

    def saw(
        self,
        kind: str,
        status: int,
        job_id: str | None,
        sent: float,
        answered: float,
        content: bytes = b"",
    ) -> None:
        with self.lock:
            self.outcomes[f"{kind} {status}"] += 1
            self.answers.append((sent, answered, kind, status))
            if job_id:
                (self.told if 200 <= status < 300 else self.named_in_errors).add(job_id)
            if status >= 500:
                self.reasons[f"{kind} {status}: {reason_of(content)}"] += 1


def reason_of(content: bytes) -> str:
    """The message of an error body, whichever API's shape it has."""
    try:
        body = json.loads(content)
    except ValueError:
        return content[:90].decode(errors="replace")
    if not isinstance(body, dict):
        return str(body)[:90]
    error = body.get("error")
    message = body.get("message") or (error.get("message") if isinstance(error, dict) else error)
    return str(message)[:90]


async def one_request(client: httpx.AsyncClient, kind: str, tally: Tally) -> None:
    prompt = {"model": "llama3.2", "prompt": "soak"}
    chat = {"model": "llama3.2", "messages": [{"role": "user", "content": "soak"}]}
    sent = time.monotonic()
    try:
        if kind == "sync":
            r = await client.post("/api/generate", json={**prompt, "stream": False})
            job_id = job_id_of(r.headers, r.content)
            tally.saw(kind, r.status_code, job_id, sent, time.monotonic(), r.content)
        elif kind == "stream":
            body = {**chat, "stream": True}
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                answered = time.monotonic()  # the status line: the job was admitted and started
                content = b"".join([chunk async for chunk in r.aiter_raw()])
            tally.saw(kind, r.status_code, job_id_of(r.headers, content), sent, answered, content)
        else:
            r = await client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": prompt})
            job_id = r.json().get("id") if r.status_code == 202 else None
            tally.saw(kind, r.status_code, job_id, sent, time.monotonic(), r.content)
    except httpx.HTTPError as exc:
        # status 0: the connection failed or timed out (counted, not hidden)
        tally.saw(kind, 0, None, sent, time.monotonic())
        print(
            f"  {kind}: {exc.__class__.__name__} after {time.monotonic() - sent:.1f} s", flush=True
        )


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


@dataclass
class QueueSamples:
    """`/v1/queue` every QUEUE_SAMPLE_S: (t, running, cap) of the answers, and the others."""

    running: list[tuple[float, int, int]] = field(default_factory=list)
    failed: Counter[int] = field(default_factory=Counter)  # status (0: no answer) -> count


@dataclass
class Fleet:
    mode: str
    sim: Process
    api: Process
    workers: list[Process]
    env: dict[str, str]
    redis: Process | None = None  # standalone
    redis_dir: str = ""
    cluster: SentinelCluster | None = None  # sentinel
    events: list[str] = field(default_factory=list)
    memory: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    queue: QueueSamples = field(default_factory=QueueSamples)
    failover: dict[str, float] = field(default_factory=dict)  # moment -> monotonic time
    ports: dict[str, int] = field(default_factory=dict)  # old / new master
    revision: str = ""  # the code under test, when the run began

    def redis_client(self) -> redis.Redis:
        """A client on the master (the Sentinels' choice in sentinel mode)."""
        if self.cluster is None:
            assert self.redis is not None
            return redis.Redis.from_url(self.redis.url)
        return self.cluster.client(self.cluster.wait_healthy(replicas=1, timeout=30))

    def processes(self) -> list[Process]:
        return [self.api, *self.workers, self.sim, *([self.redis] if self.redis else [])]

    def stop(self) -> None:
        for proc in self.processes():
            proc.stop()
        if self.cluster is not None:
            self.cluster.stop()


def start_fleet(mode: str) -> Fleet:
    sim = start_sim(
        "--tokens", str(TOKENS), "--token-delay", str(TOKEN_DELAY_S), "--parallel", "64"
    )
    fleet = Fleet(mode, sim, sim, [], {})  # api filled in below
    try:
        if mode == "sentinel":
            fleet.cluster = start_cluster()
            url, extra = fleet.cluster.url(), SENTINEL_SETTINGS
        else:
            fleet.redis_dir = tempfile.mkdtemp(prefix="gpugate-soak-redis-")
            fleet.redis = start_redis(data_dir=fleet.redis_dir)
            url, extra = fleet.redis.url, {}
        stack = start_stack(
            sim.url,
            url,
            workers=2,
            ready_timeout=30,
            gpu_concurrency=GPU_CONCURRENCY,
            max_queue_depth=32,
            rate_limit="100/second",
            burst=100,
            sync_timeout=60,
            **extra,
        )
        fleet.api, fleet.workers, fleet.env = stack.apis[0], stack.workers, stack.env
    except BaseException:
        fleet.stop()
        raise
    return fleet


class Chaos:
    """The faults of a mode, on a plan in seconds from the start; memory every second."""

    def __init__(self, fleet: Fleet, started: float, duration: float, stop: threading.Event):
        self.fleet, self.started, self.stop = fleet, started, stop
        self.threads: list[threading.Thread] = []
        if fleet.mode == "sentinel":
            self.plan = [
                (started + duration * 0.3, "kill master"),
                (started + duration * 0.65, "kill worker"),
                (started + duration * 0.65 + 5, "restart worker"),
            ]
        else:
            self.plan = [
                (started + duration * 0.25, "kill worker"),
                (started + duration * 0.25 + 5, "restart worker"),
                (started + duration * 0.5, "stop redis"),
                (started + duration * 0.5 + 3, "start redis"),
            ]

    def note(self, text: str, at: float | None = None) -> None:
        at = time.monotonic() if at is None else at
        self.fleet.events.append(f"{at - self.started:6.1f} s  {text}")
        print("  " + self.fleet.events[-1], flush=True)

    def run(self) -> None:
        fleet = self.fleet
        while not self.stop.is_set():
            now = time.monotonic()
            for name, proc in [("api", fleet.api), ("worker 2", fleet.workers[1])]:
                fleet.memory.setdefault(name, []).append((now - self.started, rss_mb(proc.pid)))
            while self.plan and self.plan[0][0] <= now:
                self.act(self.plan.pop(0)[1])
            self.stop.wait(1.0)
        for thread in self.threads:
            thread.join()

    def act(self, action: str) -> None:
        fleet = self.fleet
        if action == "kill worker":
            fleet.workers[0].kill()
            self.note("worker 1 killed (SIGKILL)")
        elif action == "restart worker":
            fleet.workers[0] = start_worker(fleet.env)
            self.note("worker 1 restarted")
        elif action == "stop redis":
            assert fleet.redis is not None
            fleet.redis.stop()
            self.note("redis stopped (SIGTERM)")
        elif action == "start redis":
            assert fleet.redis is not None
            fleet.redis = start_redis(fleet.redis.port, data_dir=fleet.redis_dir)
            self.note("redis restarted (same port, same append-only file)")
        else:  # kill master: followed in a thread of its own, memory sampling goes on
            thread = threading.Thread(target=self.kill_master)
            thread.start()
            self.threads.append(thread)

    def kill_master(self) -> None:
        cluster, fleet = self.fleet.cluster, self.fleet
        assert cluster is not None
        try:
            old = cluster.wait_healthy(timeout=20)
            cluster.server(old).kill()
            fleet.failover["kill"] = killed = time.monotonic()
            fleet.ports["old master"] = old
            self.note(f"master (port {old}) killed (kill -9)", killed)
            new, promoted = cluster.wait_promotion(old)
            fleet.failover["promoted"], fleet.ports["new master"] = promoted, new
            self.note(f"replica on port {new} promoted (+{promoted - killed:.2f} s)", promoted)

            def ready() -> bool:
                return httpx.get(fleet.api.url + "/ready", timeout=5).status_code == 200

            wait_until(ready, timeout=60, interval=0.05, what="/ready 200 after the promotion")
            fleet.failover["ready"] = at = time.monotonic()
            self.note(f"/ready 200 (+{at - promoted:.2f} s after the promotion)", at)
        except AssertionError as exc:
            self.note(f"FAILOVER NOT SEEN: {exc}")


def sample_queue(url: str, samples: QueueSamples, started: float, stop: threading.Event) -> None:
    with httpx.Client(base_url=url, timeout=2) as client:
        while not stop.is_set():
            try:
                r = client.get("/v1/queue")
            except httpx.HTTPError:
                samples.failed[0] += 1
            else:
                if r.status_code == 200:
                    q = r.json()
                    at = time.monotonic() - started
                    samples.running.append((at, int(q["running"]), int(q["gpu_concurrency"])))
                else:
                    samples.failed[r.status_code] += 1
            stop.wait(QUEUE_SAMPLE_S)


@dataclass
class Account:
    """The job records in Redis after the drain, against what the clients were told."""

    records: int
    admitted: int  # the Redis counter
    ends: Counter[str]
    lost: list[str]  # told of (2xx), missing in Redis
    lost_named: list[str]  # named in an error answer only, missing in Redis
    not_ended: dict[str, str]  # job id -> status
    no_reason: list[str]  # failed without an error code


def account(fleet: Fleet, tally: Tally, drain_s: float = 90) -> Account:
    """Wait for every job to end, then count the job records in Redis by final state."""
    rdb = fleet.redis_client()

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
    stats = {k.decode(): v.decode() for k, v in rdb.hgetall(keys.STATS).items()}
    rdb.close()
    ends: Counter[str] = Counter()
    not_ended, no_reason = {}, []
    for job_id, record in jobs.items():
        status = record.get(b"status", b"?").decode()
        if status not in FINAL:
            not_ended[job_id] = status
        elif status != "succeeded":
            code = json.loads(record.get(b"error") or b"{}").get("code")
            if status == "failed" and not code:
                no_reason.append(job_id)
            status += f" ({code or 'no reason'})"
        ends[status] += 1
    return Account(
        records=len(jobs),
        admitted=int(stats.get("jobs_admitted", 0)),
        ends=ends,
        lost=sorted(tally.told - jobs.keys()),
        lost_named=sorted(tally.named_in_errors - jobs.keys()),
        not_ended=not_ended,
        no_reason=no_reason,
    )


def trend(samples: list[tuple[float, float]], start_s: float) -> tuple[float, float, float]:
    """(RSS at `start_s`, RSS at the end, slope in MB/min over the samples after start_s)."""
    tail = [(t, m) for t, m in samples if t >= start_s]
    ts, ms = [t for t, _ in tail], [m for _, m in tail]
    slope = statistics.linear_regression(ts, ms).slope * 60 if len(tail) > 2 else 0.0
    return ms[0], ms[-1], slope


def run(mode: str, duration: float) -> str:
    """The soak of `duration` seconds in `mode`; returns its BENCHMARKS.md section."""
    print(f"-- soak, {mode} mode, {duration:.0f} s", flush=True)
    under_test = revision()
    fleet = start_fleet(mode)
    fleet.revision = under_test
    tally = Tally()
    stop = threading.Event()
    try:
        httpx.post(fleet.sim.url + "/sim/reset").raise_for_status()
        started = time.monotonic()
        chaos = Chaos(fleet, started, duration, stop)
        watcher = threading.Thread(target=chaos.run)
        sampler = threading.Thread(
            target=sample_queue, args=(fleet.api.url, fleet.queue, started, stop)
        )
        watcher.start()
        sampler.start()

        async def load() -> None:
            until = started + duration
            await asyncio.gather(
                *(client_loop(fleet.api.url, f"soak-{i}", until, tally) for i in range(CLIENTS))
            )

        try:
            asyncio.run(load())
            result = account(fleet, tally)
        finally:
            stop.set()
            watcher.join()
            sampler.join()
        sim = httpx.get(fleet.sim.url + "/sim/stats").json()
    finally:
        stop.set()
        fleet.stop()
    return report(fleet, tally, result, sim, duration, started)


# --- the report ------------------------------------------------------------------------


def failover_timeline(fleet: Fleet, tally: Tally) -> tuple[list[str], dict[str, object]]:
    """Rows of the failover table, and the figures the checks need."""
    moments = fleet.failover
    if "kill" not in moments:
        return ["| master killed | — | — |"], {"resumed_s": None}
    killed = moments["kill"]
    promoted = moments.get("promoted")
    after = [(a, kind, s) for sent, a, kind, s in tally.answers if sent >= killed]
    admitted = [a for a, _, s in after if s in (200, 202)]
    first_202 = min((a for a, kind, s in after if kind == "async" and s == 202), default=None)
    first = min(admitted, default=None)

    def row(what: str, at: float | None) -> str:
        if at is None:
            return f"| {what} | never | never |"
        since = f"{at - promoted:+.2f}" if promoted is not None else "—"
        return f"| {what} | {at - killed:.2f} | {since} |"

    rows = [
        row("master killed (`kill -9`)", killed),
        row("a replica promoted (a Sentinel names it, it answers as master)", promoted),
        row("`/ready` 200 again", moments.get("ready")),
        row("first admission answered (a request sent after the kill: 202 or 200)", first),
        row("first async `202` for a job sent after the kill", first_202),
    ]
    window: Counter[str] = Counter()
    end = first if first is not None else float("inf")
    for _sent, answered, kind, status in tally.answers:
        if killed <= answered <= end:
            window[f"{kind} {status}"] += 1
    resumed = None if first is None or promoted is None else first - promoted
    return rows, {"resumed_s": resumed, "window": window}


def checks(
    fleet: Fleet, tally: Tally, result: Account, sim: dict[str, int]
) -> tuple[list[tuple[str, object, str, bool]], dict[str, object]]:
    """(what, figure, target, met) for every check, and the failover figures."""
    sampled = fleet.queue.running
    most_running = max((r for _, r, _ in sampled), default=0)
    over_cap = sum(1 for _, r, cap in sampled if r > cap)
    statuses: Counter[int] = Counter()
    for outcome, count in tally.outcomes.items():
        statuses[int(outcome.split()[1])] += count
    sentinel = fleet.mode == "sentinel"
    admitted = result.admitted
    rows: list[tuple[str, object, str, bool]] = [
        ("jobs admitted (Redis counter)", admitted, "= job records", True),
        ("job records in Redis", result.records, f"= {admitted}", result.records == admitted),
        ("job records not ended after the drain", len(result.not_ended), "0", not result.not_ended),
        ("failed job records without a reason", len(result.no_reason), "0", not result.no_reason),
        (
            "jobs a client was told of (202, started 200), missing in Redis: **lost**",
            len(result.lost),
            "0",
            not result.lost,
        ),
        (
            "jobs named only in an error answer, missing in Redis",
            len(result.lost_named),
            "(not counted)" if sentinel else "0",
            sentinel or not result.lost_named,
        ),
        (
            "most requests in flight at the simulator",
            sim["max_in_flight"],
            f"≤ {GPU_CONCURRENCY}",
            sim["max_in_flight"] <= GPU_CONCURRENCY,
        ),
        (
            f"`/v1/queue` samples with running > cap (of {len(sampled)}; most running "
            f"{most_running})",
            over_cap,
            "0",
            over_cap == 0,
        ),
        ("answers 500", statuses[500], "0", statuses[500] == 0),
        (
            "requests with no answer (connection failed, timed out)",
            statuses[0],
            "0",
            not statuses[0],
        ),
    ]
    extra: dict[str, object] = {}
    if sentinel:
        timeline, extra = failover_timeline(fleet, tally)
        extra["timeline"] = timeline
        resumed = extra["resumed_s"]
        assert resumed is None or isinstance(resumed, float)
        rows.append(
            (
                "first admission after the promotion, s",
                "never" if resumed is None else f"{resumed:.2f}",
                f"< {RESUME_TARGET_S:g}",
                resumed is not None and resumed < RESUME_TARGET_S,
            )
        )
    return rows, extra


def setup_text(fleet: Fleet, duration: float, served: float) -> str:
    capacity = GPU_CONCURRENCY / (TOKENS * TOKEN_DELAY_S)
    load = (
        f"{duration:.0f} s of mixed load ({CLIENTS} clients: 40 % synchronous, 30 % streamed, "
        f"30 % async jobs), GPU cap {GPU_CONCURRENCY}, two workers, one API, the simulator at "
        f"{TOKENS} tokens, {TOKEN_DELAY_S} s each: capacity about {capacity:.0f} jobs/s; served "
        f"{served:.1f} jobs/s over the run; {fleet.revision}."
    )
    if fleet.mode == "sentinel":
        return (
            load + " Redis: a Sentinel cluster on loopback (a master, two replicas, three "
            "Sentinels, quorum 2, `down-after-milliseconds 1000`; gpugate.testing.sentinel), the "
            "gateway on its `redis+sentinel://` URL with "
            + ", ".join(f"`{k}={v}`" for k, v in settings_env(SENTINEL_SETTINGS).items())
            + ". The master is killed with `kill -9` at 30 % of the run and not restarted (one "
            "replica is left, which `GPUGATE_REDIS_MIN_REPLICAS=1` needs); worker 1 is killed "
            "with SIGKILL at 65 % and restarted 5 s later. `/v1/queue` is sampled every "
            f"{QUEUE_SAMPLE_S} s."
        )
    return (
        load + " Redis: a private redis-server with an append-only file (`appendfsync "
        "always`); worker 1 is killed with SIGKILL at 25 % and restarted 5 s later, Redis "
        f"stopped at 50 % and restarted 3 s later. `/v1/queue` is sampled every {QUEUE_SAMPLE_S} s."
    )


def failures_text(result: Account) -> str:
    """The job ids behind a failed check, so that a failure can be followed up."""
    parts = []
    for label, ids in (
        ("lost (told of, missing in Redis)", result.lost),
        ("named in an error answer, missing in Redis", result.lost_named),
        ("failed without a reason", result.no_reason),
    ):
        if ids:
            parts.append(f"- {label}: " + ", ".join(f"`{i}`" for i in ids[:50]))
    if result.not_ended:
        shown = ", ".join(f"`{i}` ({s})" for i, s in list(result.not_ended.items())[:50])
        parts.append(f"- not ended: {shown}")
    return "\n".join(parts)


def server_errors(tally: Tally, started: float) -> str:
    """When the 5xx answers came: runs of whole seconds of the run with their count."""
    seconds: dict[int, Counter[str]] = {}
    for _sent, answered, kind, status in tally.answers:
        if status >= 500:
            seconds.setdefault(int(answered - started), Counter())[f"{kind} {status}"] += 1
    runs: list[tuple[int, int, Counter[str]]] = []
    for second in sorted(seconds):
        if runs and runs[-1][1] == second - 1:
            runs[-1] = (runs[-1][0], second, runs[-1][2] + seconds[second])
        else:
            runs.append((second, second, Counter(seconds[second])))
    return "; ".join(
        f"{a} to {b + 1} s: " + ", ".join(f"{k} x {v}" for k, v in sorted(c.items()))
        for a, b, c in runs
    )


def report(
    fleet: Fleet,
    tally: Tally,
    result: Account,
    sim: dict[str, int],
    duration: float,
    started: float,
) -> str:
    rows, extra = checks(fleet, tally, result, sim)
    ok = all(met for *_, met in rows)
    warm = duration * 0.1
    served = result.ends["succeeded"] / duration
    memory_rows = []
    for name, samples in fleet.memory.items():
        first, last, slope = trend(samples, warm)
        memory_rows.append(f"| {name} | {first:.1f} | {last:.1f} | {slope:+.2f} |")
    check_rows = "\n".join(
        f"| {what} | {figure} | {target}{'' if met else ' **not met**'} |"
        for what, figure, target, met in rows
    )
    outcome_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(tally.outcomes.items()))
    end_rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(result.ends.items()))
    failed_polls = ", ".join(
        f"{s or 'no answer'}: {n}" for s, n in sorted(fleet.queue.failed.items())
    )
    verdict = (
        "every job a client was told of accounted for and ended, cap held, no 500"
        if ok
        else "FAILED — see below"
    )
    parts = [
        setup_text(fleet, duration, served),
        "Events:\n\n```\n" + "\n".join(fleet.events) + "\n```",
    ]
    if fleet.mode == "sentinel":
        window = extra.get("window") or Counter()
        assert isinstance(window, Counter)
        timeline = extra["timeline"]
        assert isinstance(timeline, list)
        parts.append(
            "The failover (an admission is the answer to a request sent after the kill: a "
            "202, or the status line of a synchronous or streamed 200):\n\n"
            "| moment | s after the kill | s after the promotion |\n|---|---|---|\n"
            + "\n".join(timeline)
            + "\n\nAnswers between the kill and the first admission after it: "
            + (", ".join(f"{k}: {v}" for k, v in sorted(window.items())) or "none")
            + "."
        )
    parts += [
        f"**Result: {verdict}.**",
        "| check | figure | target |\n|---|---|---|\n" + check_rows,
    ]
    if not ok and (detail := failures_text(result)):
        parts.append(detail)
    parts += [
        "How the job records ended (failed and cancelled with their reason):\n\n"
        "| end | jobs |\n|---|---|\n" + end_rows,
        "What the clients saw (kind, HTTP status; 0 = no answer):\n\n"
        "| request | count |\n|---|---|\n" + outcome_rows,
        "When the 5xx answers came (seconds of the run): "
        + (server_errors(tally, started) or "none")
        + ".",
        "The 5xx answers by message:\n\n| answer | count |\n|---|---|\n"
        + ("\n".join(f"| {k} | {v} |" for k, v in sorted(tally.reasons.items())) or "| none | |"),
        f"`/v1/queue` polls not answered 200: {failed_polls or 'none'}.",
        f"Memory (RSS, MB) from {warm:.0f} s to the end; worker 2 is the one never restarted:"
        f"\n\n| process | RSS at {warm:.0f} s | RSS at end | trend MB/min |\n|---|---|---|---|\n"
        + "\n".join(memory_rows),
    ]
    text = "\n\n".join(parts)
    print(text, flush=True)
    return text


SECTIONS = {"standalone": "soak", "sentinel": "soak-sentinel"}
COMMANDS = {
    "standalone": "make bench  # python -m bench soak (both modes); SOAK_S=150 each",
    "sentinel": "make bench  # python -m bench soak (both modes), python -m bench.soak "
    "--sentinel; SOAK_S=150 each",
}


def main(argv: list[str] | None = None) -> None:
    parser = arguments("soak", __doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--standalone", action="store_true", help="only the standalone mode")
    group.add_argument("--sentinel", action="store_true", help="only the sentinel mode")
    args = parser.parse_args(argv or [])
    quick = is_quick(args, "soak")
    chosen = os.environ.get("SOAK_MODE", "both")
    if args.standalone or args.sentinel:
        chosen = "standalone" if args.standalone else "sentinel"
    if chosen not in (*MODES, "both"):
        parser.error(f"SOAK_MODE={chosen!r}: standalone, sentinel or both")
    duration = float(os.environ.get("SOAK_S", QUICK_S if quick else DEFAULT_S))
    for mode in MODES if chosen == "both" else (chosen,):
        publish(SECTIONS[mode], run(mode, duration), quick=quick, command=COMMANDS[mode])


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
