"""Fair share (issue 13): 2, 4 and 8 keys of unequal demand on one slow GPU, FIFO against
gpugate's fair share (VTC), in one run.

The GPU is the bottleneck: the simulator answers 10 tokens at 0.05 s each (a job holds its
slot for 0.5 s; its own parallel limit is far above the cap, so only gpugate limits it),
GPU cap 2, so the fleet finishes 4 jobs a second. For each number of keys, one key floods: 32 async
jobs at once, and a new one each time one ends, so its backlog stays full for the whole
run; every other key trickles: a batch of 3 jobs every 10 s, the keys' phases spread over
the period (0.3 jobs/s, less than its share even with 8 keys). New arrivals stop after
30 s; then everything drains (the figures are in `FULL` and `QUICK`).

The two policies run on the same gateway code, each on a fresh stack (its own redis-server,
one API process, two workers) in front of the same simulator:

- **FIFO**: today's order before fair share, admission order. gpugate orders the jobs of
  one owner by their start score (admission ms minus the tier's priority boost), so the
  FIFO run sends every job with the same API key: the gateway sees one owner and starts
  jobs in admission order, while the benchmark keeps track of which logical key each job
  belongs to. Nothing else differs: the same tier, and limits (request bucket,
  `max_queued`, `GPUGATE_MAX_QUEUE_DEPTH`) far above the load, so no job of either policy
  is refused (a refusal aborts the run). The run checks that the order really is FIFO: the
  number of job pairs started in the reverse of their admission order is printed (0 is
  FIFO).
- **gpugate**: every logical key is its own API key of the keys file, on the same tier
  (priority 0, weight 1): fair share between keys.

Figures, per run, from the job records (`created_at`, `started_at`, `finished_at`) and the
results (`prompt_eval_count` + `eval_count` = the job's tokens):

- a key is **backlogged** while it has a job admitted and not yet started;
- **service**: a job's tokens go to its key when it starts (the scheduler's decision; every
  job then runs for the same time, whoever owns it);
- **Jain's index over backlogged keys**: at each start made while two or more keys were
  backlogged, each of them was due an equal part of the started job's tokens; a key's
  normalised service is what it got at those starts over what it was due (1 is its fair
  share); Jain's index of the normalised services of those keys (1 = all got their share;
  1/n = one key got all);
- **largest service gap**: for every pair of keys, over every stretch of time both were
  backlogged, the largest difference between the service the two got over any part of that
  stretch (tokens, and in jobs);
- **light keys' wait**: `started_at - created_at` of the trickling keys' jobs.

`python -m bench fairness` runs it and writes its section of BENCHMARKS.md and the plot
bench/fairness.png; `python -m bench.fairness --quick` (or FAIRNESS_QUICK=1) is a smoke run:
shorter, fewer configurations, printed, nothing written.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.report import ROOT, arguments, is_quick, publish, verdict
from gpugate.testing.keys import Key, write_keys_file
from gpugate.testing.processes import Process
from gpugate.testing.stack import sim_configure, sim_stats, start_sim, start_stack
from gpugate.testing.stats import cpu_s, percentile

CAP = 2
WORKERS = 2
TOKENS, TOKEN_DELAY_S = 10, 0.05
JOB_S = TOKENS * TOKEN_DELAY_S
CAPACITY = CAP / JOB_S
"""Jobs per second the GPU finishes under the cap."""
SIM_PARALLEL = 64
BODY = {"model": "llama3.2", "prompt": "how far away is the moon tonight"}
ADMIN_KEY = "fairness-bench-admin"
SHARED_KEY = "shared"
"""The one API key of the FIFO runs."""
TIER = {"rate": "100000/second", "burst": 100000, "max_queued": 10000}
MAX_QUEUE_DEPTH = 10000
POLL_WAIT_S = 10
DRAIN_S = 120.0
"""After the last arrival, every job must have ended within this."""
TERMINAL = ("succeeded", "failed", "cancelled")
FIFO, FAIR = "FIFO", "gpugate"
POLICIES = (FIFO, FAIR)
WAIT_RATIO_TARGET = 5.0
JAIN_TARGET = 0.95
PLOT = ROOT / "bench" / "fairness.png"


@dataclass(frozen=True)
class Plan:
    duration_s: float
    """Arrivals stop after this; figures are taken over [0, duration_s]."""
    key_counts: tuple[int, ...]
    flood_depth: int
    light_batch: int
    light_period_s: float
    first_light_s: float
    """When the first light key's first batch arrives (the flood is queued by then)."""


FULL = Plan(30.0, (2, 4, 8), flood_depth=32, light_batch=3, light_period_s=10.0, first_light_s=1)
QUICK = Plan(8.0, (2, 8), flood_depth=16, light_batch=3, light_period_s=4.0, first_light_s=1)


@dataclass
class Job:
    key: str
    """The logical key (the FIFO runs send every job with the same API key)."""
    light: bool
    id: str = ""
    created: float = 0.0
    """Seconds since the run's start, from the job record (as are started and finished)."""
    started: float = 0.0
    finished: float = 0.0
    tokens: int = 0


@dataclass
class Run:
    policy: str
    keys: list[str]
    plan: Plan
    jobs: list[Job] = field(default_factory=list)
    sim: dict[str, Any] = field(default_factory=dict)
    usage: dict[str, Any] = field(default_factory=dict)
    gateway_cores: float = 0.0
    wall_s: float = 0.0

    @property
    def flood(self) -> str:
        return self.keys[0]


# --- the stack ---------------------------------------------------------------------------


def _secret(name: str) -> str:
    """The clear API key of key `name`."""
    return f"fairness-{name}"


@contextlib.contextmanager
def _stack(sim: Process, names: list[str]) -> Iterator[tuple[str, list[Process]]]:
    """A fresh gpugate (redis-server, workers, API) whose keys file lists `names`."""
    keys = [Key(name, _secret(name), "free") for name in names]
    directory = Path(tempfile.mkdtemp(prefix="gpugate-fair-"))
    stack = start_stack(
        sim.url,
        workers=WORKERS,
        ready_timeout=30,
        gpu_concurrency=CAP,
        max_queue_depth=MAX_QUEUE_DEPTH,
        keys_file=write_keys_file(directory / "keys.toml", keys, {"free": TIER}),
        admin_key=ADMIN_KEY,
    )
    try:
        yield stack.url, stack.processes
    finally:
        stack.stop()


# --- load --------------------------------------------------------------------------------


async def _one(gw: httpx.AsyncClient, api_key: str, job: Job, t0: float) -> None:
    """Submit one async job, follow it to its end, record its times; anything but a 202,
    a 200 and a succeeded job with the expected answer aborts the run."""
    headers = {"X-API-Key": api_key}
    r = await gw.post("/v1/jobs", json={"endpoint": "/api/generate", "body": BODY}, headers=headers)
    if r.status_code != 202:
        raise AssertionError(f"{job.key}: POST /v1/jobs answered {r.status_code}: {r.text}")
    job.id = r.json()["id"]
    deadline = time.monotonic() + DRAIN_S + 60
    while True:
        r = await gw.get(f"/v1/jobs/{job.id}", params={"wait": POLL_WAIT_S}, headers=headers)
        if r.status_code != 200:
            raise AssertionError(f"{job.key}: GET /v1/jobs/{job.id} answered {r.status_code}")
        record = r.json()
        if record["status"] in TERMINAL:
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"{job.key}: job {job.id} still {record['status']}")
    result = record.get("result") or {}
    if record["status"] != "succeeded" or result.get("eval_count") != TOKENS:
        raise AssertionError(f"{job.key}: job {job.id} ended badly: {record}")
    job.created = record["created_at"] - t0
    job.started = record["started_at"] - t0
    job.finished = record["finished_at"] - t0
    job.tokens = int(result["prompt_eval_count"]) + int(result["eval_count"])


async def _drive(api_url: str, run: Run) -> None:
    plan = run.plan
    limits = httpx.Limits(max_connections=512, max_keepalive_connections=512)
    async with httpx.AsyncClient(
        base_url=api_url, timeout=httpx.Timeout(POLL_WAIT_S + 20, connect=5), limits=limits
    ) as gw:
        t0, start = time.time(), time.monotonic()
        end = start + plan.duration_s

        def api_key(key: str) -> str:
            return _secret(SHARED_KEY if run.policy == FIFO else key)

        async def lane() -> None:  # one of the flood's FLOOD_DEPTH jobs at a time
            while time.monotonic() < end:
                job = Job(run.flood, light=False)
                run.jobs.append(job)
                await _one(gw, api_key(run.flood), job, t0)

        async def trickle(key: str, first_s: float) -> None:
            tasks = []
            for batch in itertools.count():
                due = start + first_s + batch * plan.light_period_s
                if due >= end:
                    break
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                for _ in range(plan.light_batch):
                    job = Job(key, light=True)
                    run.jobs.append(job)
                    tasks.append(asyncio.create_task(_one(gw, api_key(key), job, t0)))
            await asyncio.gather(*tasks)

        lights = run.keys[1:]
        phases = [
            plan.first_light_s + i * plan.light_period_s / len(lights) for i in range(len(lights))
        ]
        work = [lane() for _ in range(plan.flood_depth)]
        work += [trickle(key, phase) for key, phase in zip(lights, phases, strict=True)]
        await asyncio.wait_for(asyncio.gather(*work), plan.duration_s + DRAIN_S)
        run.wall_s = time.monotonic() - start
        r = await gw.get("/admin/usage", headers={"X-Admin-Key": ADMIN_KEY})
        r.raise_for_status()
        run.usage = r.json()["keys"]
        r = await gw.get("/v1/queue")
        r.raise_for_status()
        queue = r.json()
        if queue["queue_depth"] or queue["running"]:
            raise AssertionError(f"the gateway is not idle after the drain: {queue}")


def run_one(sim: Process, policy: str, n: int, plan: Plan) -> Run:
    keys = [f"key{i}" for i in range(n)]
    run = Run(policy, keys, plan)
    with _stack(sim, [SHARED_KEY] if policy == FIFO else keys) as (api_url, procs):
        sim_configure(sim)  # counters reset
        pids = [p.pid for p in procs]
        before = sum(cpu_s(pid) for pid in pids)
        asyncio.run(_drive(api_url, run))
        run.gateway_cores = (sum(cpu_s(pid) for pid in pids) - before) / run.wall_s
        run.sim = sim_stats(sim)
    if run.sim["in_flight"] or run.sim["completed"] != len(run.jobs):
        raise AssertionError(f"the simulator saw {run.sim} for {len(run.jobs)} jobs")
    return run


# --- figures -----------------------------------------------------------------------------


def _backlogs(run: Run) -> dict[str, list[tuple[float, float]]]:
    """Per key, the union of its jobs' [created, started] (closed), within [0, duration]."""
    out: dict[str, list[tuple[float, float]]] = {}
    for key in run.keys:
        spans = sorted(
            (j.created, min(j.started, run.plan.duration_s))
            for j in run.jobs
            if j.key == key and j.created <= run.plan.duration_s
        )
        merged: list[tuple[float, float]] = []
        for a, b in spans:
            if merged and a <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], b))
            else:
                merged.append((a, b))
        out[key] = merged
    return out


def _inside(spans: list[tuple[float, float]], t: float) -> bool:
    return any(a <= t <= b for a, b in spans)


def _starts(run: Run) -> list[Job]:
    """The jobs that started within [0, duration], in start order."""
    return sorted(
        (j for j in run.jobs if j.started <= run.plan.duration_s), key=lambda j: j.started
    )


@dataclass(frozen=True)
class Figures:
    jain: float | None
    jain_starts: int
    """Starts made while two or more keys were backlogged."""
    normalised: dict[str, float]
    gap_tokens: float
    gap_pair: str
    tokens_per_job: float
    light_p50: float | None
    light_p90: float | None
    light_n: int
    flood_p50: float | None
    served: dict[str, int]
    """Tokens of the jobs each key started within [0, duration]."""
    waits: dict[str, tuple[float | None, float | None]]
    inversions: int
    max_in_flight: int


def figures(run: Run) -> Figures:
    backlogs = _backlogs(run)
    starts = _starts(run)
    got: dict[str, float] = dict.fromkeys(run.keys, 0.0)
    due: dict[str, float] = {}
    jain_starts = 0
    for job in starts:
        waiting = [k for k in run.keys if _inside(backlogs[k], job.started)]
        if len(waiting) < 2:
            continue
        jain_starts += 1
        for k in waiting:
            due[k] = due.get(k, 0.0) + job.tokens / len(waiting)
        got[job.key] += job.tokens
    normalised = {k: got[k] / due[k] for k in due}
    values = list(normalised.values())
    jain = sum(values) ** 2 / (len(values) * sum(v * v for v in values)) if values else None
    gap, pair = 0.0, "-"
    for a, b in itertools.combinations(run.keys, 2):
        for lo, hi in _overlaps(backlogs[a], backlogs[b]):
            diff = top = bottom = 0.0
            for job in starts:
                if lo <= job.started <= hi and job.key in (a, b):
                    diff += job.tokens if job.key == a else -job.tokens
                    top, bottom = max(top, diff), min(bottom, diff)
            if top - bottom > gap:
                gap, pair = top - bottom, f"{a}/{b}"
    in_window = [j for j in run.jobs if j.created <= run.plan.duration_s]
    light = [j.started - j.created for j in in_window if j.light]
    flood = [j.started - j.created for j in in_window if not j.light]
    waits = {
        k: (percentile(w, 50), percentile(w, 90))
        for k in run.keys
        for w in [[j.started - j.created for j in in_window if j.key == k]]
    }
    served = {k: sum(j.tokens for j in starts if j.key == k) for k in run.keys}
    return Figures(
        jain=jain,
        jain_starts=jain_starts,
        normalised=normalised,
        gap_tokens=gap,
        gap_pair=pair,
        tokens_per_job=statistics.fmean(j.tokens for j in run.jobs),
        light_p50=percentile(light, 50),
        light_p90=percentile(light, 90),
        light_n=len(light),
        flood_p50=percentile(flood, 50),
        served=served,
        waits=waits,
        inversions=_inversions(run.jobs),
        max_in_flight=int(run.sim["max_in_flight"]),
    )


def _overlaps(
    a: list[tuple[float, float]], b: list[tuple[float, float]]
) -> list[tuple[float, float]]:
    out = []
    for (a0, a1), (b0, b1) in itertools.product(a, b):
        lo, hi = max(a0, b0), min(a1, b1)
        if lo <= hi:
            out.append((lo, hi))
    return out


def _inversions(jobs: list[Job]) -> int:
    """Pairs of jobs where the one admitted later (by at least the records' 1 ms) started
    strictly first: 0 under FIFO."""
    return sum(
        1
        for x, y in itertools.combinations(jobs, 2)
        if (x.created + 0.0005 < y.created and x.started > y.started)
        or (y.created + 0.0005 < x.created and y.started > x.started)
    )


# --- the report --------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_row(run: Run, f: Figures) -> str:
    jain = "-" if f.jain is None else f"{f.jain:.3f}"
    return (
        f"| {len(run.keys)} | {run.policy} | {len(_starts(run))} | {_s(f.light_p50)} | "
        f"{_s(f.light_p90)} | {f.light_n} | {_s(f.flood_p50)} | **{jain}** ({f.jain_starts}) | "
        f"{f.gap_tokens:.0f} ({f.gap_tokens / f.tokens_per_job:.1f} jobs, {f.gap_pair}) | "
        f"{f.inversions} | {f.max_in_flight} | {run.gateway_cores:.0%} |"
    )


SUMMARY_HEADER = (
    "| keys | policy | jobs started in the window | light keys' wait p50 s | p90 s | light "
    "jobs | flood's wait p50 s | Jain's index over backlogged keys (starts judged) | "
    "largest service gap between backlogged keys, tokens | pairs started out of admission "
    "order | max in flight at the simulator (cap) | gateway CPU (API + workers + Redis), of "
    "one core |\n|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def key_table(fifo: Run, fair: Run) -> str:
    ff, gf = figures(fifo), figures(fair)
    rows = []
    for key in fifo.keys:
        cells = []
        for f in (ff, gf):
            total = sum(f.served.values()) or 1
            p50, p90 = f.waits[key]
            norm = f.normalised.get(key)
            cells.append(
                f"{f.served[key]} ({f.served[key] / total:.0%}) | {_s(p50)} / {_s(p90)} | "
                + ("-" if norm is None else f"{norm:.2f}")
            )
        role = "flood" if key == fifo.flood else "light"
        rows.append(f"| {len(fifo.keys)} | {key} ({role}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


KEY_HEADER = (
    "| keys | key | FIFO: tokens served in the window (share) | FIFO: wait p50 / p90 s | "
    "FIFO: normalised service while backlogged | gpugate: tokens served (share) | gpugate: "
    "wait p50 / p90 s | gpugate: normalised service |\n|---|---|---|---|---|---|---|---|\n"
)


def targets(pairs: list[tuple[Run, Run]]) -> str:
    rows = []
    for fifo, fair in pairs:
        ff, gf = figures(fifo), figures(fair)
        n = len(fifo.keys)
        ratio = (ff.light_p50 or 0.0) / gf.light_p50 if gf.light_p50 else math.inf
        rows.append(
            f"| {n} keys: light keys' median wait ≥ {WAIT_RATIO_TARGET:g}x shorter than FIFO "
            f"| FIFO {_s(ff.light_p50)} s / gpugate {_s(gf.light_p50)} s = {ratio:.1f}x | "
            f"{verdict(ratio >= WAIT_RATIO_TARGET)} |"
        )
        jain = gf.jain
        rows.append(
            f"| {n} keys: gpugate's Jain's index over backlogged keys ≥ {JAIN_TARGET:g} | "
            f"{'-' if jain is None else f'{jain:.3f}'} (FIFO {_s(ff.jain)}) | "
            f"{verdict(jain is not None and jain >= JAIN_TARGET)} |"
        )
    worst = max(figures(r).max_in_flight for pair in pairs for r in pair)
    rows.append(
        f"| jobs in flight at the simulator ≤ cap ({CAP}), every run | max {worst} | "
        f"{verdict(worst <= CAP)} |"
    )
    fifo_inv = sum(figures(f).inversions for f, _ in pairs)
    rows.append(
        f"| the FIFO baseline started every job in admission order | {fifo_inv} pairs out of "
        f"order | {verdict(fifo_inv == 0)} |"
    )
    return "| target | measured | verdict |\n|---|---|---|\n" + "\n".join(rows) + "\n"


def usage_check(pairs: list[tuple[Run, Run]]) -> str:
    """gpugate's own usage counters (`/admin/usage`) against the tokens the clients saw."""
    bad = []
    for run in (r for pair in pairs for r in pair):
        seen: dict[str, int] = {}
        for job in run.jobs:
            name = SHARED_KEY if run.policy == FIFO else job.key
            seen[name] = seen.get(name, 0) + job.tokens
        counted = {
            name: int(u["input_tokens"]) + int(u["output_tokens"]) for name, u in run.usage.items()
        }
        if counted != seen:
            bad.append(f"{run.policy}, {len(run.keys)} keys: gateway {counted}, clients {seen}")
    if not bad:
        return "gpugate's `/admin/usage` token counts equal the clients' sums in every run."
    return "**`/admin/usage` disagrees with the clients**: " + "; ".join(bad)


def plot(pairs: list[tuple[Run, Run]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(pairs), 2, figsize=(12, 3.4 * len(pairs)), squeeze=False)
    for row, (fifo, fair) in enumerate(pairs):
        top = 0.0
        for col, run in enumerate((fifo, fair)):
            ax = axes[row][col]
            palette = plt.get_cmap("tab10").colors
            light_colors = iter(c for i, c in enumerate(palette) if i not in (3, 7))
            for key in run.keys:
                ends = sorted((j.finished, j.tokens) for j in run.jobs if j.key == key)
                t, total, ys = [0.0], 0, [0]
                for end, tokens in ends:
                    total += tokens
                    t.append(end)
                    ys.append(total)
                top = max(top, total)
                flood = key == run.flood
                ax.step(
                    t,
                    ys,
                    where="post",
                    lw=2.2 if flood else 1.1,
                    color="black" if flood else next(light_colors),
                    label=f"{key} ({'flood' if flood else 'light'})",
                )
            ax.axvline(run.plan.duration_s, color="grey", ls="--", lw=0.8)
            f = figures(run)
            jain = "-" if f.jain is None else f"{f.jain:.2f}"
            name = "FIFO (admission order)" if run.policy == FIFO else "gpugate fair share (VTC)"
            ax.set_title(
                f"{name}, {len(run.keys)} keys: light wait p50 {_s(f.light_p50)} s, Jain {jain}",
                fontsize=9,
            )
            ax.set_xlabel("seconds since the start (dashed: arrivals stop)", fontsize=8)
            ax.set_ylabel("cumulative tokens served", fontsize=8)
            ax.tick_params(labelsize=7)
            if col == 1:
                ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)
        for col in (0, 1):
            axes[row][col].set_ylim(0, top * 1.05)
    fig.suptitle(
        f"gpugate fairness: one flooding key and trickling keys, cap {CAP}, job {JOB_S:g} s "
        f"({CAPACITY:g} jobs/s); tokens of finished jobs per key over time",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(plan: Plan, pairs: list[tuple[Run, Run]], started: float) -> str:
    summary = "\n".join(summary_row(r, figures(r)) for pair in pairs for r in pair)
    keys = "\n".join(key_table(fifo, fair) for fifo, fair in pairs)
    rel = PLOT.relative_to(ROOT)
    light_rate = plan.light_batch / plan.light_period_s
    return f"""\
Simulator: {TOKENS} tokens x {TOKEN_DELAY_S:g} s, so a job holds a slot for {JOB_S:g} s (its own
parallel limit {SIM_PARALLEL}: only gpugate limits it); GPU cap {CAP}: {CAPACITY:g} jobs/s.
Each run: a fresh redis-server, {WORKERS} worker processes (default
`GPUGATE_WORKER_CONCURRENCY`), one API process, a keys file with one tier (rate and
`max_queued` far above the load), `GPUGATE_MAX_QUEUE_DEPTH={MAX_QUEUE_DEPTH}`; async jobs
(`POST /v1/jobs`, `/api/generate`, the same prompt for everyone), followed with
`GET /v1/jobs/{{id}}?wait=…`. Every answer is checked: a refusal, an error or a failed job
aborts the run. For {plan.duration_s:g} s: key0 floods — {plan.flood_depth} jobs at once and a
new one whenever one ends, so its backlog stays full —, every other key trickles a batch of
{plan.light_batch} jobs every {plan.light_period_s:g} s ({light_rate:.2f} jobs/s, phases spread
over the period, the first at {plan.first_light_s:g} s); then arrivals stop and all drains.

- **FIFO** is gpugate itself with every job sent under one API key: gpugate starts one
  owner's jobs in admission order (their start score is the admission time in ms), so this
  is the order before fair share, on the same code; the benchmark keeps track of each job's
  logical key. With the limits above nothing is refused in either policy, so admission is
  the same; the column "pairs started out of admission order" checks the order (0: FIFO).
  **gpugate**: each logical key its own API key, same tier (priority 0, weight 1).
- A key is **backlogged** while it has a job admitted and not started. **Service**: a job's
  tokens (`prompt_eval_count` + `eval_count` of its result) count for its key when it
  starts. Figures over the window [0, {plan.duration_s:g} s] (jobs that started in it; waits of
  the jobs admitted in it).
- **Jain's index over backlogged keys**: at each start made while two or more keys were
  backlogged (how many: in brackets), every one of them is due an equal part of the
  started job's tokens; a key's **normalised service** = tokens it got at those starts /
  tokens it was due (1: its fair share); Jain's index of the normalised services
  ((Σx)² / (n Σx²); 1: each backlogged key got its share, 1/n: one got everything).
- **Largest service gap**: over every pair of keys and every stretch where both were
  backlogged, the largest difference between the service the two got over any part of the
  stretch, in tokens (in jobs of the mean size; which pair).
- **Wait**: `started_at - created_at` of the job records.

{SUMMARY_HEADER}{summary}

Per key (tokens of the jobs started in the window, and their share; waits of the jobs
admitted in the window):

{KEY_HEADER}{keys}

{targets(pairs)}
{usage_check(pairs)}

![cumulative tokens per key over time, FIFO and gpugate]({rel})

Plot: [{rel}]({rel}). The whole run took {time.monotonic() - started:.0f} s.
"""


# --- the run -----------------------------------------------------------------------------


def run(plan: Plan) -> tuple[str, list[tuple[Run, Run]]]:
    started = time.monotonic()
    sim = start_sim(
        "--tokens",
        str(TOKENS),
        "--token-delay",
        str(TOKEN_DELAY_S),
        "--parallel",
        str(SIM_PARALLEL),
    )
    pairs = []
    try:
        for n in plan.key_counts:
            fifo, fair = (run_one(sim, policy, n, plan) for policy in POLICIES)
            pairs.append((fifo, fair))
            for r in (fifo, fair):
                print(summary_row(r, figures(r)), flush=True)
    finally:
        sim.stop()
    return report(plan, pairs, started), pairs


def main(argv: list[str] | None = None) -> None:
    quick = is_quick(arguments("fairness", __doc__).parse_args(argv or []), "fairness")
    text, pairs = run(QUICK if quick else FULL)
    print(text, flush=True)
    path = Path(tempfile.mkdtemp(prefix="gpugate-fairness-")) / "fairness.png" if quick else PLOT
    plot(pairs, path)
    print(f"plot: {path}", flush=True)
    publish("fairness", text, quick=quick)


if __name__ == "__main__":
    main(sys.argv[1:])
