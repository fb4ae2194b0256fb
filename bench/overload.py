"""Overload: open-loop arrivals stepped from 0.5x to 20x the simulator's capacity, through
one API process and two worker processes sharing one GPU cap.

Each arrival is an async job (`POST /v1/jobs`, then `GET /v1/jobs/{id}?wait=…` until it
ends), so the latency of an admitted request is end to end for the client and the 202
carries the gateway's `estimated_start_seconds`. A sampler reads the simulator's counters
(`/sim/stats`) and the gateway's queue (`/v1/queue`) every SAMPLE_S. It records, per step:
the most jobs in flight at the simulator, the slot utilisation while jobs are queued, the
share of 429s, the p50/p99 latency of admitted requests, the median ratio of actual to
predicted wait, and lost jobs; and it plots in-flight, queue depth and rejections over time.

OVERLOAD_STEP_S (seconds per step, default 15) shortens development runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from redis import Redis

from bench.report import ROOT, verdict, write_section
from gpugate.testing.processes import stop_all
from gpugate.testing.stack import NO_RATE_LIMIT, start_sim, start_stack
from gpugate.testing.stats import percentile
from shared import keys

GPU_CONCURRENCY = 2
WORKERS = 2
MAX_QUEUE_DEPTH = 16
TOKENS, TOKEN_DELAY_S = 5, 0.1
JOB_S = TOKENS * TOKEN_DELAY_S
CAPACITY = GPU_CONCURRENCY / JOB_S
"""Jobs per second the simulator can finish under the cap."""
MULTIPLES = (0.5, 1, 2, 5, 10, 20)
KEYS = 8
SAMPLE_S = 0.05
DRAIN_S = 30.0
"""After the last arrival of a step, every admitted job must end within this."""
POLL_WAIT_S = 10
BIN_S = 0.5
"""Width of the rejections-per-second bins of the plot."""
ADMIN_KEY = "overload-bench"
PLOT = ROOT / "bench" / "overload.png"
TERMINAL = ("succeeded", "failed", "cancelled")
CODES_429 = ("queue_full", "rate_limit_exceeded")
UTIL_TARGET = 0.95
UTIL_FROM = 1.0
"""The utilisation target is judged from this load up: below it, the queue holds a job
only for the few ms between its admission and its start, so idle slots are the norm."""
IDLE_LIMIT_S = 0.05
MIN_RATIO_N = 10
"""Fewest waiting jobs whose median ratio is judged against the target."""
RATIO_RANGE = (0.5, 2.0)


@dataclass
class Arrival:
    t: float
    """Seconds since the start of the run, when the POST was sent."""
    outcome: str = "pending"
    job_id: str = ""
    """admitted, or the error code of the refusal (queue_full, rate_limit_exceeded, …)."""
    status: str = ""
    """The job's last seen status (admitted jobs only)."""
    latency_s: float | None = None
    predicted_s: float | None = None
    actual_wait_s: float | None = None
    queue_position: int | None = None
    waited: tuple[float, float] | None = None
    """Epoch seconds from admission (`created_at`) until the job reached the GPU, or ended."""
    gpu: tuple[float, float] | None = None
    """Epoch seconds during which the simulator held a slot for the job (from its reply)."""


@dataclass
class Sample:
    t: float
    in_flight: int
    running: int
    depth: int


@dataclass
class Step:
    multiple: float
    start: float
    arrivals_end: float = 0.0
    end: float = 0.0
    arrivals: list[Arrival] = field(default_factory=list)
    sim: dict[str, Any] = field(default_factory=dict)
    max_lag_s: float = 0.0
    """How far behind its schedule the arrival loop fell at worst (client saturation)."""


@dataclass
class Run:
    t0: float = field(default_factory=time.monotonic)
    samples: list[Sample] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    sampling: bool = True

    def now(self) -> float:
        return time.monotonic() - self.t0


async def _until(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(SAMPLE_S)


# --- load --------------------------------------------------------------------------------


async def _follow(
    gw: httpx.AsyncClient, key: str, rec: Arrival, t_sent: float, deadline: float
) -> None:
    """Wait for an admitted job to end (or the deadline), then record its times."""
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        wait = max(0.1, min(POLL_WAIT_S, deadline - time.monotonic()))
        try:
            r = await gw.get(
                f"/v1/jobs/{rec.job_id}", params={"wait": wait}, headers={"X-API-Key": key}
            )
        except httpx.HTTPError:
            await asyncio.sleep(0.1)
            continue
        if r.status_code != 200:
            await asyncio.sleep(0.1)
            continue
        job = r.json()
        rec.status = job["status"]
        if rec.status in TERMINAL:
            rec.latency_s = time.monotonic() - t_sent
            break
    if job.get("started_at") is not None:
        rec.actual_wait_s = job["started_at"] - job["created_at"]
    rec.gpu = _gpu_interval(job)
    until = rec.gpu[0] if rec.gpu else job.get("started_at") or job.get("finished_at")
    if until is not None:
        rec.waited = (job["created_at"], until)


def _gpu_interval(job: dict[str, Any]) -> tuple[float, float] | None:
    """The simulator's reply ends at its `created_at` and held a slot for its
    `total_duration` minus `load_duration` (the wait for a slot), in ns."""
    result = job.get("result")
    if not isinstance(result, dict) or "created_at" not in result:
        return None
    end = datetime.fromisoformat(result["created_at"]).timestamp()
    return end - (result["total_duration"] - result["load_duration"]) / 1e9, end


async def _arrive(gw: httpx.AsyncClient, key: str, rec: Arrival, deadline: float, run: Run) -> None:
    t_sent = time.monotonic()
    rec.t = t_sent - run.t0
    body = {"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "overload"}}
    try:
        r = await gw.post("/v1/jobs", json=body, headers={"X-API-Key": key})
    except httpx.HTTPError as exc:
        rec.outcome = f"client error {exc.__class__.__name__}"
        return
    if r.status_code != 202:
        try:
            rec.outcome = str(r.json().get("error", r.status_code))
        except ValueError:
            rec.outcome = str(r.status_code)
        return
    job = r.json()
    rec.outcome = "admitted"
    # A job that started before the 202 was written carries no estimate: it waited 0.
    rec.predicted_s = job.get("estimated_start_seconds") or 0.0
    rec.queue_position = job.get("queue_position")
    rec.job_id, rec.status = job["id"], job["status"]
    await _follow(gw, key, rec, t_sent, deadline)


async def _offer(
    gw: httpx.AsyncClient, step: Step, rate: float, step_s: float, run: Run
) -> list[asyncio.Task[None]]:
    """Poisson arrivals at `rate` for `step_s`; returns the tasks that follow them."""
    rng = random.Random(f"overload-{step.multiple}")
    tasks: list[asyncio.Task[None]] = []
    start = time.monotonic()
    deadline = start + step_s + DRAIN_S
    due = start
    n = 0
    while True:
        due += rng.expovariate(rate)
        if due - start >= step_s:
            break
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            step.max_lag_s = max(step.max_lag_s, -delay)
        rec = Arrival(t=0.0)
        step.arrivals.append(rec)
        key = f"overload-{n % KEYS}"
        tasks.append(asyncio.create_task(_arrive(gw, key, rec, deadline, run)))
        n += 1
    return tasks


# --- observation -------------------------------------------------------------------------


async def _sample(sim: httpx.AsyncClient, gw: httpx.AsyncClient, run: Run) -> None:
    while run.sampling:
        tick = time.monotonic()
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
            stats, queue = await asyncio.gather(sim.get("/sim/stats"), gw.get("/v1/queue"))
            s, q = stats.json(), queue.json()
            run.samples.append(Sample(run.now(), s["in_flight"], s["running"], q["queue_depth"]))
        await asyncio.sleep(max(0.0, SAMPLE_S - (time.monotonic() - tick)))


async def _idle(sim: httpx.AsyncClient, gw: httpx.AsyncClient) -> bool:
    s = (await sim.get("/sim/stats")).json()
    q = (await gw.get("/v1/queue")).json()
    return bool(s["in_flight"] == 0 and q["queue_depth"] == 0 and q["running"] == 0)


async def _step(
    sim: httpx.AsyncClient, gw: httpx.AsyncClient, run: Run, multiple: float, step_s: float
) -> Step:
    await _until(lambda: _idle(sim, gw), DRAIN_S, "an idle gateway and simulator")
    (await sim.post("/sim/reset")).raise_for_status()  # maxima restart from 0
    step = Step(multiple, start=run.now())
    run.steps.append(step)
    tasks = await _offer(gw, step, multiple * CAPACITY, step_s, run)
    step.arrivals_end = run.now()
    await asyncio.gather(*tasks)
    with contextlib.suppress(AssertionError):
        await _until(lambda: _idle(sim, gw), DRAIN_S, "the drain")
    step.end = run.now()
    step.sim = (await sim.get("/sim/stats")).json()
    return step


async def _warm_up(gw: httpx.AsyncClient, run: Run) -> None:
    """A few jobs first, so that estimates use a measured mean job time, not the prior."""
    deadline = time.monotonic() + DRAIN_S
    recs = [Arrival(t=0.0) for _ in range(2 * GPU_CONCURRENCY)]
    await asyncio.gather(*(_arrive(gw, "overload-warm", r, deadline, run) for r in recs))
    bad = [r for r in recs if r.status != "succeeded"]
    if bad:
        raise AssertionError(f"warm-up jobs did not succeed: {bad}")


async def _drive(sim_url: str, api_url: str, step_s: float) -> tuple[Run, dict[str, Any]]:
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    timeout = httpx.Timeout(POLL_WAIT_S + 20, connect=5)
    async with (
        httpx.AsyncClient(base_url=sim_url, timeout=10) as sim,
        httpx.AsyncClient(base_url=api_url, timeout=timeout, limits=limits) as gw,
        httpx.AsyncClient(base_url=api_url, timeout=10) as observer,
    ):
        run = Run()
        await _warm_up(gw, run)
        sampler = asyncio.create_task(_sample(sim, observer, run))
        try:
            for multiple in MULTIPLES:
                step = await _step(sim, gw, run, multiple, step_s)
                print(_row(step, _samples(run, step)), flush=True)
        finally:
            run.sampling = False
            await sampler
        admin = await observer.get("/admin/status", headers={"X-Admin-Key": ADMIN_KEY})
        return run, admin.json()


# --- figures -----------------------------------------------------------------------------


def _samples(run: Run, step: Step) -> list[Sample]:
    return [s for s in run.samples if step.start <= s.t <= step.end]


def gpu_util(arrivals: list[Arrival]) -> tuple[float | None, float]:
    """Exact slot utilisation while work waits, and the longest time a slot stayed idle
    while work waited (seconds).

    A job waits from its admission until the simulator starts it (so the hop from the
    worker's slot grant to the simulator counts as waiting); a slot is busy while the
    simulator runs a job. Over the time some job waited: the mean of min(busy, cap) / cap.
    """
    events: list[tuple[float, int, int]] = []  # (time, change of waiting, change of busy)
    for a in arrivals:
        if a.waited is not None:
            events += [(a.waited[0], 1, 0), (a.waited[1], -1, 0)]
        if a.gpu is not None:
            events += [(a.gpu[0], 0, 1), (a.gpu[1], 0, -1)]
    events.sort()
    waiting = busy = 0
    waited_s = busy_s = longest_gap = 0.0
    last = gap_from = events[0][0] if events else 0.0
    for t, d_waiting, d_busy in events:
        if waiting > 0:
            waited_s += t - last
            busy_s += (t - last) * min(busy, GPU_CONCURRENCY) / GPU_CONCURRENCY
        idle_before = waiting > 0 and busy < GPU_CONCURRENCY
        waiting, busy, last = waiting + d_waiting, busy + d_busy, t
        idle_after = waiting > 0 and busy < GPU_CONCURRENCY
        if idle_after and not idle_before:
            gap_from = t
        elif idle_before and not idle_after:
            longest_gap = max(longest_gap, t - gap_from)
    return (busy_s / waited_s if waited_s > 0 else None), longest_gap


@dataclass(frozen=True)
class Figures:
    sent: int
    sent_rate: float
    admitted: int
    rejected_share: float
    rejected_by: dict[str, int]
    max_in_flight: int
    max_in_flight_sampled: int
    util: float | None
    queued_samples: int
    util_exact: float | None
    longest_idle_s: float
    p50_s: float | None
    p99_s: float | None
    ratio: float | None
    ratio_n: int
    zero_predicted_wait_s: float | None
    lost: int
    failed: int


def figures(step: Step, samples: list[Sample]) -> Figures:
    arrivals = step.arrivals
    admitted = [a for a in arrivals if a.outcome == "admitted"]
    rejected: dict[str, int] = {}
    for a in arrivals:
        if a.outcome != "admitted":
            rejected[a.outcome] = rejected.get(a.outcome, 0) + 1
    done = [a.latency_s for a in admitted if a.status == "succeeded" and a.latency_s is not None]
    ratios = [
        a.actual_wait_s / a.predicted_s
        for a in admitted
        if a.predicted_s and a.actual_wait_s is not None
    ]
    zero = [a.actual_wait_s for a in admitted if not a.predicted_s and a.actual_wait_s is not None]
    queued = [s for s in samples if s.depth > 0]
    util_exact, longest_idle_s = gpu_util(admitted)
    util = (
        statistics.fmean(min(s.running, GPU_CONCURRENCY) / GPU_CONCURRENCY for s in queued)
        if queued
        else None
    )
    return Figures(
        sent=len(arrivals),
        sent_rate=len(arrivals) / max(1e-9, step.arrivals_end - step.start),
        admitted=len(admitted),
        rejected_share=sum(rejected.get(c, 0) for c in CODES_429) / max(1, len(arrivals)),
        rejected_by=rejected,
        max_in_flight=int(step.sim.get("max_in_flight", -1)),
        max_in_flight_sampled=max((s.in_flight for s in samples), default=0),
        util=util,
        queued_samples=len(queued),
        util_exact=util_exact,
        longest_idle_s=longest_idle_s,
        p50_s=percentile(done, 50),
        p99_s=percentile(done, 99),
        ratio=statistics.median(ratios) if ratios else None,
        ratio_n=len(ratios),
        zero_predicted_wait_s=statistics.median(zero) if zero else None,
        lost=sum(1 for a in admitted if a.status not in TERMINAL),
        failed=sum(1 for a in admitted if a.status in ("failed", "cancelled")),
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def _row(step: Step, samples: list[Sample]) -> str:
    f = figures(step, samples)
    exact = "-" if f.util_exact is None else f"{f.util_exact:.1%}"
    sampled = "-" if f.util is None else f"{f.util:.1%} ({f.queued_samples})"
    ratio = "-" if f.ratio is None else f"{f.ratio:.2f} ({f.ratio_n})"
    return (
        f"| {step.multiple:g}x | {step.multiple * CAPACITY:.1f} / {f.sent_rate:.1f} | {f.sent} | "
        f"{f.admitted} | {f.rejected_share:.1%} | {f.max_in_flight} / {f.max_in_flight_sampled} "
        f"| {exact} / {sampled} | {_ms(f.longest_idle_s)} | {_ms(f.p50_s)} | {_ms(f.p99_s)} "
        f"| {ratio} | {_ms(f.zero_predicted_wait_s)} | {f.lost} | {f.failed} |"
    )


HEADER = (
    "| load | offered req/s | sent | admitted | 429 share | max in flight (sim / sampled) "
    "| util while queued (exact / sampled) | longest idle slot while queued, ms | p50 ms "
    "| p99 ms | wait ratio (n) | wait ms, predicted 0 | lost | failed |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def _targets(run: Run) -> str:
    rows = [(s, figures(s, _samples(run, s))) for s in run.steps]
    worst_flight = max(max(f.max_in_flight, f.max_in_flight_sampled) for _, f in rows)
    utils = [(s.multiple, f.util_exact) for s, f in rows if s.multiple >= UTIL_FROM]
    low_util = min(utils, key=lambda u: -1.0 if u[1] is None else u[1]) if utils else None
    util_ok = low_util is not None and (low_util[1] or 0.0) >= UTIL_TARGET
    gap_m, gap = max(((s.multiple, f.longest_idle_s) for s, f in rows), key=lambda g: g[1])
    ratios = [(s.multiple, f.ratio, f.ratio_n) for s, f in rows if f.ratio is not None]
    judged = [(m, r) for m, r, n in ratios if n >= MIN_RATIO_N]
    ratio_ok = bool(judged) and all(RATIO_RANGE[0] <= r <= RATIO_RANGE[1] for _, r in judged)
    lost = sum(f.lost for _, f in rows)
    util_text = "-"
    if low_util is not None and low_util[1] is not None:
        util_text = f"lowest {low_util[1]:.1%} (at {low_util[0]:g}x)"
    ratio_text = ", ".join(
        f"{m:g}x: {r:.2f}" + ("" if n >= MIN_RATIO_N else f" (only {n}, not judged)")
        for m, r, n in ratios
    )
    return (
        "| target | measured | verdict |\n|---|---|---|\n"
        f"| jobs in flight at the simulator ≤ cap ({GPU_CONCURRENCY}) | "
        f"max {worst_flight} | {verdict(worst_flight <= GPU_CONCURRENCY)} |\n"
        f"| slot utilisation while queued ≥ {UTIL_TARGET:.0%} (exact; steps ≥ {UTIL_FROM:g}x) "
        f"| {util_text} | {verdict(util_ok)} |\n"
        f"| no slot idle > {IDLE_LIMIT_S * 1000:.0f} ms while work is queued (SPEC: a few "
        f"tens of ms) | longest {gap * 1000:.0f} ms (at {gap_m:g}x) "
        f"| {verdict(gap <= IDLE_LIMIT_S)} |\n"
        f"| median actual/predicted wait within {RATIO_RANGE[0]:g}-{RATIO_RANGE[1]:g} "
        f"(steps with ≥ {MIN_RATIO_N} waiting jobs) | {ratio_text or '-'} "
        f"| {verdict(ratio_ok)} |\n"
        f"| lost jobs = 0 | {lost} | {verdict(lost == 0)} |\n"
    )


def plot(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t0 = run.steps[0].start if run.steps else 0.0
    t = [s.t - t0 for s in run.samples]
    fig, (ax_run, ax_queue, ax_rej) = plt.subplots(3, 1, sharex=True, figsize=(11, 7.5))
    ax_run.step(t, [s.in_flight for s in run.samples], where="post", lw=0.8, label="in flight")
    ax_run.axhline(GPU_CONCURRENCY, color="red", ls="--", lw=1, label="GPU cap")
    ax_run.set_ylabel("jobs at simulator")
    ax_run.set_ylim(0, GPU_CONCURRENCY + 1.5)
    ax_queue.step(t, [s.depth for s in run.samples], where="post", lw=0.8, color="tab:green")
    ax_queue.axhline(MAX_QUEUE_DEPTH, color="red", ls="--", lw=1, label="max queue depth")
    ax_queue.set_ylabel("queue depth")
    ax_queue.set_ylim(0, MAX_QUEUE_DEPTH * 1.25)
    end = max((s.end for s in run.steps), default=0.0)
    bins = [0] * (int((end - t0) / BIN_S) + 1)
    for step in run.steps:
        for a in step.arrivals:
            if a.outcome in CODES_429 and t0 <= a.t < end:
                bins[int((a.t - t0) / BIN_S)] += 1
    ax_rej.bar(
        [i * BIN_S for i in range(len(bins))],
        [b / BIN_S for b in bins],
        width=BIN_S,
        align="edge",
        color="tab:orange",
    )
    ax_rej.set_ylabel("rejections / s (429)")
    ax_rej.set_xlabel("seconds since the first step")
    for step in run.steps:
        for ax in (ax_run, ax_queue, ax_rej):
            ax.axvline(step.start - t0, color="grey", lw=0.7)
            ax.axvspan(step.arrivals_end - t0, step.end - t0, color="grey", alpha=0.12, lw=0)
        ax_run.text(
            step.start - t0,
            1.02,
            f" {step.multiple:g}x capacity",
            transform=ax_run.get_xaxis_transform(),
            fontsize=8,
        )
    for ax in (ax_run, ax_queue):
        ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.suptitle(
        f"gpugate overload: cap {GPU_CONCURRENCY}, {WORKERS} workers, job {JOB_S:g} s, "
        f"capacity {CAPACITY:g} jobs/s; offered load stepped, shaded: drain after each step",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the run -----------------------------------------------------------------------------


def run(step_s: float) -> str:
    sim = start_sim(
        "--tokens", str(TOKENS), "--token-delay", str(TOKEN_DELAY_S), "--parallel", "64"
    )
    procs = [sim]
    try:
        stack = start_stack(
            sim.url,
            workers=WORKERS,
            ready_timeout=30,
            gpu_concurrency=GPU_CONCURRENCY,
            max_queue_depth=MAX_QUEUE_DEPTH,
            admin_key=ADMIN_KEY,
            **NO_RATE_LIMIT,
        )
        procs += stack.processes
        result, admin = asyncio.run(_drive(sim.url, stack.url, step_s))
        per_worker = _jobs_per_worker(stack.redis_url, result)
    finally:
        stop_all(procs)
    plot(result, PLOT)
    return _body(result, admin, per_worker, step_s)


def _jobs_per_worker(redis_url: str, result: Run) -> list[int]:
    """How many of the admitted jobs each worker process ran (from the job records)."""
    ids = [a.job_id for step in result.steps for a in step.arrivals if a.job_id]
    client = Redis.from_url(redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hget(keys.job(job_id), "worker")
            workers = pipe.execute()
    finally:
        client.close()
    counts: dict[bytes, int] = {}
    for worker in workers:
        counts[worker or b""] = counts.get(worker or b"", 0) + 1
    return sorted(counts.values(), reverse=True)


def _body(result: Run, admin: dict[str, Any], per_worker: list[int], step_s: float) -> str:
    rows = "\n".join(_row(s, _samples(result, s)) for s in result.steps)
    codes: dict[str, int] = {}
    for step in result.steps:
        for code, n in figures(step, _samples(result, step)).rejected_by.items():
            codes[code] = codes.get(code, 0) + n
    lag = max((s.max_lag_s for s in result.steps), default=0.0)
    rel = PLOT.relative_to(ROOT)
    return (
        f"Simulator at {TOKENS} tokens x {TOKEN_DELAY_S:g} s = {JOB_S:g} s per job "
        f"(its own parallel limit 64, so only gpugate limits it), GPU cap {GPU_CONCURRENCY}: "
        f"capacity {CAPACITY:g} jobs/s. {WORKERS} worker processes, one API process, private "
        f"redis-server, `GPUGATE_MAX_QUEUE_DEPTH={MAX_QUEUE_DEPTH}`, {KEYS} API keys with a "
        "bucket too large to empty, so every 429 is the bounded queue's. Open-loop Poisson "
        f"arrivals of async jobs (`POST /v1/jobs`, `/api/generate`) at each multiple of the "
        f"capacity for {step_s:g} s, then a drain until the queue and the simulator are idle; "
        f"{2 * GPU_CONCURRENCY} warm-up jobs first, so the estimates use a measured job time. "
        f"The client's arrival loop fell at most {lag * 1000:.0f} ms behind its schedule.\n\n"
        "- **offered**: target / sent req/s. **max in flight**: the simulator's own "
        "`max_in_flight` counter over the step and its drain (reset at the step's start) / "
        f"the largest sampled value. A sampler reads `/sim/stats` and `/v1/queue` every "
        f"{SAMPLE_S * 1000:.0f} ms.\n"
        "- **util while queued, exact**: a job waits from its admission (`created_at` of its "
        "record) until the simulator starts it (from the simulator's reply: its `created_at` "
        "minus `total_duration` plus `load_duration`), so the hop from the worker's slot "
        "grant to the simulator counts as waiting; a slot is busy while the simulator runs a "
        "job. Over all the time some job waited: mean of min(busy, cap) / cap. **Sampled**: "
        "the same over the samples where `/v1/queue` shows a depth > 0, with the simulator's "
        "`running` (number of such samples). **Longest idle slot while queued**: the longest "
        "stretch, from the same exact timeline, in which a job waited and a slot was free. "
        f"The utilisation target is judged from {UTIL_FROM:g}x up: below, the queue holds "
        "a job only for the few ms between its admission and its start at a free slot.\n"
        "- **latency**: POST sent to the job's end seen by `GET /v1/jobs/{id}?wait=…` "
        "(succeeded jobs; ms).\n"
        "- **wait ratio**: median of actual / predicted wait over the admitted jobs with a "
        "prediction > 0, where predicted = `estimated_start_seconds` of the 202 and actual = "
        "`started_at - created_at` of the job record (number of jobs). Jobs predicted to "
        "start at once are shown apart: their median actual wait in ms.\n"
        "- **lost**: admitted jobs not `succeeded`/`failed`/`cancelled` "
        f"{DRAIN_S:g} s after the step's last arrival. **failed**: failed or cancelled.\n\n"
        f"{HEADER}"
        f"{rows}\n\n"
        f"Refusals by code (client): {codes or 'none'}; the gateway's own counters "
        f"(`/admin/status`, warm-up included): {admin.get('rejections')}, jobs "
        f"{admin.get('jobs')}. Admitted jobs run by each worker process: {per_worker}.\n\n"
        f"{_targets(result)}\n"
        f"![in flight, queue depth and rejections over time]({rel})\n\n"
        f"Plot: [{rel}]({rel})\n"
    )


def main() -> None:
    step_s = float(os.environ.get("OVERLOAD_STEP_S", "15"))
    write_section("overload", "make bench  # python -m bench overload", run(step_s))


if __name__ == "__main__":
    main()
