"""What durable admission costs: GPUGATE_REDIS_MIN_REPLICAS=0 against =1, on one Sentinel
cluster, in interleaved rounds of one run.

The cluster is gpugate.testing.sentinel's: a master, two replicas and three Sentinels on
loopback. Two gateway stacks use it at once through its `redis+sentinel://` URL, each on a
database of its own: one API and two workers each, on the same simulator at zero time per
token; one stack with GPUGATE_REDIS_MIN_REPLICAS=0, the other with =1
(GPUGATE_REDIS_WAIT_MS=500). In every round, for each stack (the order alternates between
rounds):

- admission throughput: `wrk` posts async jobs (`POST /v1/jobs`) at a fixed concurrency
  while the stack's workers run them; wrk's script counts every response by status and
  checks each 202 carries a job id. Then the queue is left to drain; at the end of the run
  every job record must have ended `succeeded`.
- hop latency: one client sends tiny synchronous `/api/generate` calls one at a time,
  each alternating with the same call to the simulator directly; every response is checked
  (200, `done`, the simulator's text, a job id header through the gateway). The added
  latency is the gateway's p50/p99 minus the direct p50/p99.

And once a round, the WAIT round trip itself: SET then `WAIT 1 500` (and `WAIT 2 500`) on
the master from this process (redis-py), beside the SET alone.

`python -m bench replication` writes the BENCHMARKS.md section; `python -m
bench.replication --quick` (or REPLICATION_QUICK=1) is a smoke run that writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import redis

from bench.report import arguments, is_quick, publish
from gpugate.testing import stack as harness
from gpugate.testing import wrk
from gpugate.testing.processes import Process, wait_until
from gpugate.testing.revision import revision
from gpugate.testing.sentinel import SentinelCluster, start_cluster
from gpugate.testing.stack import NO_RATE_LIMIT, queue, start_sim
from gpugate.testing.stats import cpu_s, percentile
from shared import keys

GPU_CONCURRENCY = 4
WORKERS = 2
WAIT_MS = 500
THREADS, CONNECTIONS = 1, 32
BODY = {"model": "llama3.2", "prompt": "hi"}
JOB = {"endpoint": "/api/generate", "body": BODY}
KEY = "bench-replication"
MODES = (0, 1)  # GPUGATE_REDIS_MIN_REPLICAS


@dataclass(frozen=True)
class Plan:
    rounds: int
    wrk_s: int
    hops: int  # synchronous calls per stack and round (each with a direct one)
    waits: int  # WAIT samples per round


FULL = Plan(rounds=4, wrk_s=6, hops=150, waits=300)
QUICK = Plan(rounds=1, wrk_s=2, hops=30, waits=50)


@dataclass
class Stack:
    replicas: int
    db: int
    gateway: harness.Stack

    @property
    def api(self) -> Process:
        return self.gateway.apis[0]

    @property
    def workers(self) -> list[Process]:
        return self.gateway.workers

    @property
    def label(self) -> str:
        return f"MIN_REPLICAS={self.replicas}"


@dataclass
class Figures:
    """Everything measured for one stack over the rounds."""

    rates: list[float] = field(default_factory=list)  # admissions (202) per second, by round
    sustained: list[float] = field(default_factory=list)  # jobs ended per s, start to drained
    wrk_p50: list[float] = field(default_factory=list)  # ms
    wrk_p99: list[float] = field(default_factory=list)
    master_cores: list[float] = field(default_factory=list)
    api_ms: list[float] = field(default_factory=list)  # API CPU per 202 during wrk
    api_cores: list[float] = field(default_factory=list)  # API CPU during wrk
    worker_ms: list[float] = field(default_factory=list)  # workers' CPU per 202, to drained
    statuses: Counter[int] = field(default_factory=Counter)
    socket_errors: int = 0
    no_id: int = 0
    direct: list[float] = field(default_factory=list)  # seconds
    gateway: list[float] = field(default_factory=list)
    bad_hops: list[str] = field(default_factory=list)
    ends: Counter[str] = field(default_factory=Counter)


def start_stack(cluster: SentinelCluster, sim: Process, replicas: int, db: int) -> Stack:
    gateway = harness.start_stack(
        sim.url,
        cluster.url(db),
        workers=WORKERS,
        ready_timeout=30,
        gpu_concurrency=GPU_CONCURRENCY,
        redis_min_replicas=replicas,
        redis_wait_ms=WAIT_MS,
        max_queue_depth=1000000000,
        **NO_RATE_LIMIT,
    )
    return Stack(replicas, db, gateway)


def drained(stack: Stack) -> bool:
    q = queue(stack.api.url)
    return q["queue_depth"] == 0 and q["running"] == 0


def post_jobs(stack: Stack, duration_s: int, master_pid: int, figures: Figures) -> None:
    """One wrk run on `stack`, then the wait for its queue to drain."""
    sent = wrk.Load(json.dumps(JOB), 202, ('"id"', ""), ("X-API-Key", KEY))
    started, master_before = time.perf_counter(), cpu_s(master_pid)
    api_before, workers_before = cpu_s(stack.api.pid), sum(cpu_s(w.pid) for w in stack.workers)
    result = wrk.run(
        stack.api.url + "/v1/jobs",
        sent,
        duration_s=duration_s,
        connections=CONNECTIONS,
        threads=THREADS,
        what=stack.label,
    )
    elapsed = time.perf_counter() - started
    figures.master_cores.append((cpu_s(master_pid) - master_before) / elapsed)
    api_s = cpu_s(stack.api.pid) - api_before
    figures.api_cores.append(api_s / elapsed)
    statuses = result.statuses
    figures.statuses += statuses
    figures.no_id += result.unexpected - (sum(statuses.values()) - statuses[202])
    figures.socket_errors += sum(result.socket_errors)
    figures.rates.append(statuses[202] / result.duration_s)
    figures.wrk_p50.append(result.p50_ms)
    figures.wrk_p99.append(result.p99_ms)
    wait_until(lambda: drained(stack), timeout=300, interval=0.2, what=f"{stack.label} to drain")
    figures.sustained.append(statuses[202] / (time.perf_counter() - started))
    workers_s = sum(cpu_s(w.pid) for w in stack.workers) - workers_before
    figures.api_ms.append(api_s * 1000 / max(1, statuses[202]))
    figures.worker_ms.append(workers_s * 1000 / max(1, statuses[202]))
    print(
        f"  {stack.label}: {figures.rates[-1]:.0f} admissions/s (wrk {result.requests} requests, "
        f"statuses {dict(statuses)}, p50 {result.p50_ms:.1f} ms, p99 {result.p99_ms:.1f} ms), "
        f"drained at {figures.sustained[-1]:.0f} jobs/s, master "
        f"{figures.master_cores[-1]:.2f} cores, API {figures.api_cores[-1]:.2f} cores, "
        f"{figures.api_ms[-1]:.2f} ms CPU per 202, "
        f"workers {figures.worker_ms[-1]:.2f} ms",
        flush=True,
    )


def check_generate(r: httpx.Response, through_gateway: bool) -> str | None:
    """What is wrong with a synchronous /api/generate answer, if anything."""
    if r.status_code != 200:
        return f"{r.status_code} {r.text[:200]}"
    body = r.json()
    if body.get("done") is not True or not body.get("response"):
        return f"200 without a finished response: {r.text[:200]}"
    if through_gateway and "x-gpugate-job-id" not in r.headers:
        return "200 without X-GpuGate-Job-Id"
    return None


def hops(stack: Stack, sim: Process, n: int, figures: Figures) -> None:
    """`n` synchronous calls through `stack`, each after the same call to the simulator."""
    body = {**BODY, "stream": False}
    with (
        httpx.Client(base_url=sim.url, timeout=30) as direct,
        httpx.Client(base_url=stack.api.url, timeout=30, headers={"X-API-Key": KEY}) as gateway,
    ):
        for i in range(n + 5):  # the first 5 warm the connections
            pair = []
            for client, through in ((direct, False), (gateway, True)):
                t = time.perf_counter()
                r = client.post("/api/generate", json=body)
                pair.append(time.perf_counter() - t)
                if (problem := check_generate(r, through)) is not None:
                    figures.bad_hops.append(f"{'gateway' if through else 'direct'}: {problem}")
            if i >= 5:
                figures.direct.append(pair[0])
                figures.gateway.append(pair[1])
    added = statistics.median(figures.gateway[-n:]) - statistics.median(figures.direct[-n:])
    print(f"  {stack.label}: hop added p50 {added * 1000:.2f} ms over {n} calls", flush=True)


def waits(client: redis.Redis, n: int, samples: dict[str, list[float]], bad: Counter[str]) -> None:
    """SET alone, SET then WAIT 1, SET then WAIT 2: the time of the SET and of the WAIT."""
    for i in range(n):
        for replicas in (0, 1, 2):
            t = time.perf_counter()
            client.set("bench:replication:wait", i)
            samples["SET"].append(time.perf_counter() - t)
            if replicas:
                t = time.perf_counter()
                acked = client.execute_command("WAIT", replicas, WAIT_MS)
                samples[f"WAIT {replicas} {WAIT_MS}"].append(time.perf_counter() - t)
                if acked < replicas:
                    bad[f"WAIT {replicas}: {acked} acknowledged"] += 1


def job_ends(cluster: SentinelCluster, master: int, db: int) -> Counter[str]:
    client = cluster.client(master, db)
    ends: Counter[str] = Counter()
    try:
        names = list(client.scan_iter(keys.JOB + "*", count=1000))
        for start in range(0, len(names), 500):
            pipe = client.pipeline(transaction=False)
            for name in names[start : start + 500]:
                pipe.hget(name, "status")
            ends.update((s or b"?").decode() for s in pipe.execute())
    finally:
        client.close()
    return ends


def pct(values: list[float], q: int) -> float:
    """The q-th percentile, in ms."""
    seconds = percentile(values, q)
    return math.nan if seconds is None else seconds * 1000


def run(plan: Plan) -> str:
    cluster = start_cluster()
    sim = start_sim("--tokens", "5", "--token-delay", "0", "--parallel", "64")
    stacks: list[Stack] = []
    figures = {replicas: Figures() for replicas in MODES}
    wait_samples: dict[str, list[float]] = {"SET": [], "WAIT 1 500": [], "WAIT 2 500": []}
    bad_waits: Counter[str] = Counter()
    load, under_test = [os.getloadavg()[0]], revision()
    try:
        master = cluster.wait_healthy()
        master_pid = cluster.server(master).pid
        stacks = [start_stack(cluster, sim, replicas, db=1 + replicas) for replicas in MODES]
        for stack in stacks:  # warm: connections open, scripts loaded
            post_jobs(stack, 1, master_pid, Figures())
            hops(stack, sim, 5, Figures())
        with cluster.client(master) as client:
            waits(client, 20, {k: [] for k in wait_samples}, Counter())
            for r in range(plan.rounds):
                print(f"-- round {r + 1} of {plan.rounds}", flush=True)
                order = stacks if r % 2 == 0 else stacks[::-1]
                for stack in order:
                    post_jobs(stack, plan.wrk_s, master_pid, figures[stack.replicas])
                for stack in order:
                    hops(stack, sim, plan.hops, figures[stack.replicas])
                waits(client, plan.waits, wait_samples, bad_waits)
        if cluster.wait_healthy() != master:
            raise AssertionError("the master changed during the run")
        for stack in stacks:
            figures[stack.replicas].ends = job_ends(cluster, master, stack.db)
        load.append(os.getloadavg()[0])
    finally:
        for stack in stacks:
            stack.gateway.stop()
        sim.stop()
        cluster.stop()
    text = report(plan, figures, wait_samples, bad_waits, load, under_test)
    print(text, flush=True)
    return text


def report(
    plan: Plan,
    figures: dict[int, Figures],
    wait_samples: dict[str, list[float]],
    bad_waits: Counter[str],
    load: list[float],
    under_test: str,
) -> str:
    base, durable = figures[0], figures[1]
    problems = []
    for replicas, f in figures.items():
        label = f"MIN_REPLICAS={replicas}"
        if set(f.statuses) - {202}:
            problems.append(f"{label}: wrk saw statuses {dict(f.statuses)}")
        if f.socket_errors or f.no_id:
            problems.append(
                f"{label}: {f.socket_errors} socket errors, {f.no_id} 202s without an id"
            )
        if set(f.ends) - {"succeeded"}:
            problems.append(f"{label}: job records ended {dict(f.ends)}")
        if f.bad_hops:
            problems.append(f"{label}: {len(f.bad_hops)} bad synchronous answers: {f.bad_hops[:5]}")
    problems += [f"{what} ({n} times)" for what, n in bad_waits.items()]

    def med(values: list[float]) -> float:
        return statistics.median(values)

    def throughput_row(replicas: int, f: Figures) -> str:
        return (
            f"| {replicas} | **{med(f.rates):.0f}** | "
            + " / ".join(f"{x:.0f}" for x in f.rates)
            + f" | {med(f.wrk_p50):.1f} | {med(f.wrk_p99):.1f} | {med(f.sustained):.0f} | "
            f"{med(f.master_cores):.2f} | {med(f.api_cores):.2f} | {med(f.api_ms):.2f} | "
            f"{med(f.worker_ms):.2f} | "
            f"{f.statuses[202]} | "
            + ", ".join(f"{k}: {v}" for k, v in sorted(f.ends.items()))
            + " |"
        )

    def hop_row(replicas: int, f: Figures) -> str:
        d50, d99, g50, g99 = (
            pct(f.direct, 50),
            pct(f.direct, 99),
            pct(f.gateway, 50),
            pct(f.gateway, 99),
        )
        return (
            f"| {replicas} | {len(f.gateway)} | {d50:.2f} | {g50:.2f} | **{g50 - d50:.2f}** | "
            f"{d99:.2f} | {g99:.2f} | **{g99 - d99:.2f}** |"
        )

    rate_cost = 1 - med(durable.rates) / med(base.rates)
    hop_cost50 = (pct(durable.gateway, 50) - pct(durable.direct, 50)) - (
        pct(base.gateway, 50) - pct(base.direct, 50)
    )
    hop_cost99 = (pct(durable.gateway, 99) - pct(durable.direct, 99)) - (
        pct(base.gateway, 99) - pct(base.direct, 99)
    )
    wait_rows = "\n".join(
        f"| {name} | {len(v)} | {pct(v, 50):.3f} | {pct(v, 99):.3f} |"
        for name, v in wait_samples.items()
    )
    setup = (
        "A Sentinel cluster on loopback (a master, two replicas, three Sentinels; "
        "gpugate.testing.sentinel, no persistence) and two gateway stacks on its "
        "`redis+sentinel://` URL at once, each on a database of its own: one API and "
        f"{WORKERS} workers each, GPU cap {GPU_CONCURRENCY}, the simulator at 5 tokens and "
        "0 s per token, rate limits out of the way, one API key; one stack with "
        "`GPUGATE_REDIS_MIN_REPLICAS=0`, the other with `=1` and "
        f"`GPUGATE_REDIS_WAIT_MS={WAIT_MS}` (its workers then also WAIT after recording a "
        f"job's end). {plan.rounds} interleaved rounds, the order alternating; in each, "
        f"for each stack: `wrk -t{THREADS} -c{CONNECTIONS} -d{plan.wrk_s}s` posting async "
        "jobs (`POST /v1/jobs`) while the stack's workers run them, then the wait for its "
        f"queue to drain; then, for each stack, {plan.hops} synchronous tiny `/api/generate` "
        "calls one at a time, each after the same call to the simulator directly; then the "
        "WAIT samples. Everything shares the machine's cores (wrk, the APIs, four workers, "
        "three redis-servers, three Sentinels, the simulator), so absolute figures are "
        "lower than on a dedicated box; the difference between the two stacks is the point. "
        f"The machine is shared: its 1-minute load average was {load[0]:.1f} at the start and "
        f"{load[-1]:.1f} at the end. {under_test[0].upper()}{under_test[1:]}."
    )
    throughput = (
        "Admission throughput (async jobs; a figure is the median of the rounds; *drained*: "
        "202s of a round over the time from its start until its queue was empty; master "
        "CPU: the master redis-server's, during wrk; API CPU: the API process's during wrk "
        "over the round's 202s; workers' CPU: both workers' from the start of wrk until the "
        "queue was empty, over the round's 202s):\n\n"
        "| MIN_REPLICAS | 202/s | per round | wrk p50 ms | wrk p99 ms | drained jobs/s | "
        "master CPU, cores | API CPU, cores | API CPU ms per 202 | workers' CPU ms per job | "
        "202s | job records at the end |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
        f"{throughput_row(0, base)}\n{throughput_row(1, durable)}\n\n"
        f"`MIN_REPLICAS=1` against `=0`: **{-rate_cost * 100:+.0f} %** admissions per second "
        "(medians)."
    )
    latency = (
        "Hop latency (synchronous `/api/generate`, one at a time; ms; added = gateway - "
        "direct, at the same percentile, over all rounds):\n\n"
        "| MIN_REPLICAS | calls | direct p50 | gateway p50 | added p50 | direct p99 | "
        "gateway p99 | added p99 |\n|---|---|---|---|---|---|---|---|\n"
        f"{hop_row(0, base)}\n{hop_row(1, durable)}\n\n"
        f"Cost of `MIN_REPLICAS=1`: **{hop_cost50:+.2f} ms** at p50, "
        f"**{hop_cost99:+.2f} ms** at p99 per synchronous call."
    )
    wait = (
        "The WAIT round trip itself, from this process (redis-py, one connection to the "
        "master): a SET, then `WAIT n 500` right after it, timed apart; ms.\n\n"
        "| command | samples | p50 | p99 |\n|---|---|---|---|\n" + wait_rows
    )
    verdict = (
        "**Every response checked: all as expected.**"
        if not problems
        else "**Unexpected answers:**\n\n" + "\n".join(f"- {p}" for p in problems)
    )
    return "\n\n".join((setup, verdict, throughput, latency, wait))


def main(argv: list[str] | None = None) -> None:
    quick = is_quick(arguments("replication", __doc__).parse_args(argv or []), "replication")
    publish("replication", run(QUICK if quick else FULL), quick=quick)


if __name__ == "__main__":
    main(sys.argv[1:])
