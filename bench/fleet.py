"""A fleet of backends (issue 14): gpugate's model-aware dispatch against round-robin and
least-busy, on 2 and 4 simulated GPUs serving 3 models, in one run.

Every backend is one `python -m gpugate.sim`: the 3 models (3.2B-size, so each loads in
LOAD_S), `--max-loaded 1` (one model fits at once: another needs an unload and a load),
`--parallel` equal to the cap, answers of 10 tokens at 0.05 s (a job runs 0.5 s once its
model is loaded). The load is closed-loop: for each model, its own stream of clients, each
sending a synchronous `POST /api/generate` (non-streamed) as soon as its last one was
answered, CLIENTS_PER_SLOT clients per GPU slot of the fleet in all, split evenly between
the models; for a window of 30 s (`FULL`), then the clients stop and what is in flight
finishes.

The gateways, each run on fresh simulators (nothing loaded):

- **gpugate**: one API process, two workers, a private redis-server, `GPUGATE_BACKENDS`
  with every simulator at cap CAP (models from their `/api/tags`); once with the default
  `GPUGATE_AFFINITY_WAIT` (30 s) and once with 5 s.
- **round-robin** and **least-busy**: what other gateways do (nginx's default and
  `least_conn` upstreams, LiteLLM's simple-shuffle and least-busy routing), implemented
  here as a small asyncio proxy (`python -m bench.fleet --proxy POLICY`, starlette on
  uvicorn, one process) with the same per-backend cap: round-robin sends each request to
  the next backend in turn, least-busy to the backend with the fewest requests assigned and
  not yet answered (ties in turn); whatever the model, since every backend serves every
  model; the request then waits, in order, for one of that backend's CAP slots.

Figures per run: jobs/s (answers within the window / its length), model loads (the sum of
the simulators' `loads` at the end of the window), p50/p99 latency (send to answer, every
request sent in the window), and each simulator's `max_in_flight` against its cap.

`python -m bench fleet` runs it and writes its section of BENCHMARKS.md;
`python -m bench.fleet --quick` (or FLEET_QUICK=1) is a smoke run: short windows, printed,
nothing written.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.report import arguments, is_quick, publish, verdict
from gpugate.testing.processes import Process, free_port, start_http, wait_until
from gpugate.testing.stack import NO_RATE_LIMIT, queue, start_sim, start_stack
from gpugate.testing.stats import cpu_s, percentile

MODELS = ("llama3.2", "qwen2.5", "gemma2")
"""No size tag: each is a 3.2B model for the simulator, loading in LOAD_S."""
CAP = 2
TOKENS, TOKEN_DELAY_S = 10, 0.05
JOB_S = TOKENS * TOKEN_DELAY_S
LOAD_S = 1.0
CLIENTS_PER_SLOT = 3
WORKERS = 2
PROMPT = "which way does the wind blow"
POLL_S = 0.05
REQUEST_TIMEOUT_S = 300.0
DRAIN_S = 120.0
THROUGHPUT_TARGET = 2.0
LOADS_TARGET = 5.0


@dataclass(frozen=True)
class Plan:
    duration_s: float
    backend_counts: tuple[int, ...]


FULL = Plan(30.0, (2, 4))
QUICK = Plan(6.0, (2, 4))


@dataclass(frozen=True)
class Policy:
    name: str
    gateway: str
    """"gpugate", or the proxy's policy: "round-robin" or "least-busy"."""
    affinity_wait_s: float | None = None
    """GPUGATE_AFFINITY_WAIT for gpugate; None: the default."""


GPUGATE = Policy("gpugate", "gpugate")
GPUGATE_SHORT = Policy("gpugate, GPUGATE_AFFINITY_WAIT=5", "gpugate", 5.0)
ROUND_ROBIN = Policy("round-robin proxy", "round-robin")
LEAST_BUSY = Policy("least-busy proxy", "least-busy")
POLICIES = (GPUGATE, GPUGATE_SHORT, ROUND_ROBIN, LEAST_BUSY)


# --- the baseline proxy ------------------------------------------------------------------


class Router:
    """Which backend a request goes to, and the per-backend caps (FIFO waits)."""

    def __init__(self, policy: str, urls: list[str], cap: int) -> None:
        if policy not in ("round-robin", "least-busy"):
            raise ValueError(f"unknown policy {policy!r}")
        self.policy, self.urls = policy, urls
        self.slots = [asyncio.Semaphore(cap) for _ in urls]
        self.assigned = [0] * len(urls)
        """Requests sent to each backend and not answered yet (waiting for a slot too)."""
        self.sent = [0] * len(urls)
        self.turn = 0

    def choose(self) -> int:
        n = len(self.urls)
        if self.policy == "round-robin":
            i = self.turn
        else:
            i = min(((self.turn + k) % n for k in range(n)), key=lambda b: self.assigned[b])
        self.turn = (i + 1) % n
        return i

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[str]:
        i = self.choose()
        self.assigned[i] += 1
        self.sent[i] += 1
        try:
            async with self.slots[i]:
                yield self.urls[i]
        finally:
            self.assigned[i] -= 1


def serve_proxy(policy: str, port: int, urls: list[str], cap: int) -> None:
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    router = Router(policy, urls, cap)
    clients: list[httpx.AsyncClient] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=5)
        async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
            clients.append(client)
            yield

    async def generate(request: Request) -> Response:
        body = await request.body()
        async with router.slot() as url:
            r = await clients[0].post(
                url + "/api/generate", content=body, headers={"Content-Type": "application/json"}
            )
        return Response(r.content, r.status_code, media_type=r.headers.get("content-type"))

    async def stats(request: Request) -> Response:
        return JSONResponse({"policy": policy, "sent": router.sent, "assigned": router.assigned})

    app = Starlette(
        routes=[
            Route("/api/generate", generate, methods=["POST"]),
            Route("/proxy/stats", stats, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def start_proxy(policy: str, sims: list[Process]) -> Process:
    port = free_port()
    argv = [sys.executable, "-m", "bench.fleet", "--proxy", policy, "--port", str(port)]
    argv += ["--cap", str(CAP), "--backends", ",".join(s.url for s in sims)]
    return start_http("proxy", argv, port, "/proxy/stats", timeout=30, interval=0.1, status=200)


# --- the stacks --------------------------------------------------------------------------


def start_sims(n: int) -> list[Process]:
    args = ["--models", ",".join(MODELS), "--max-loaded", "1", "--load-time", str(LOAD_S)]
    args += ["--parallel", str(CAP), "--tokens", str(TOKENS), "--token-delay", str(TOKEN_DELAY_S)]
    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(lambda _: start_sim(*args), range(n)))


@contextlib.contextmanager
def gateway(policy: Policy, sims: list[Process]) -> Iterator[tuple[str, list[Process]]]:
    """The gateway's URL and its processes (whose CPU is counted)."""
    if policy.gateway != "gpugate":
        proxy = start_proxy(policy.gateway, sims)
        try:
            yield proxy.url, [proxy]
        finally:
            proxy.stop()
        return
    backends = [
        {"name": f"gpu-{i}", "url": s.url, "gpu_concurrency": CAP} for i, s in enumerate(sims)
    ]
    settings: dict[str, object] = {**NO_RATE_LIMIT}
    if policy.affinity_wait_s is not None:
        settings["affinity_wait"] = policy.affinity_wait_s
    stack = start_stack(
        None,
        workers=WORKERS,
        ready_timeout=30,
        backends=json.dumps(backends),
        worker_concurrency=CAP * len(sims),
        max_queue_depth=10000,
        **settings,
    )
    try:

        def ready() -> bool:
            backends = queue(stack.url)["backends"]
            return len(backends) == len(sims) and all(b["healthy"] for b in backends)

        wait_until(ready, timeout=30, interval=0.1, what="gpugate ready with every backend")
        yield stack.url, stack.processes
    finally:
        stack.stop()


# --- load --------------------------------------------------------------------------------


@dataclass
class Call:
    model: str
    sent: float
    """Seconds since the window's start (as is done)."""
    done: float = math.nan


@dataclass
class Run:
    policy: Policy
    backends: int
    duration_s: float
    requests: list[Call] = field(default_factory=list)
    sims_at_end_of_window: list[dict[str, Any]] = field(default_factory=list)
    sims_at_end: list[dict[str, Any]] = field(default_factory=list)
    gateway_cores: float = 0.0


async def _client(gw: httpx.AsyncClient, model: str, run: Run, start: float) -> None:
    """Closed loop: one request at a time until the window ends; each answer is checked."""
    body = {"model": model, "prompt": PROMPT, "stream": False}
    while (now := time.monotonic()) < start + run.duration_s:
        req = Call(model, now - start)
        run.requests.append(req)
        r = await gw.post("/api/generate", json=body, headers={"X-API-Key": f"fleet-{model}"})
        answer = r.json() if r.status_code == 200 else {}
        if (
            answer.get("model") != model
            or not answer.get("done")
            or answer.get("eval_count") != TOKENS
        ):
            raise AssertionError(f"{run.policy.name}: {model}: {r.status_code} {r.text[:300]}")
        req.done = time.monotonic() - start


async def _stats(sims: httpx.AsyncClient, urls: list[str]) -> list[dict[str, Any]]:
    answers = await asyncio.gather(*(sims.get(url + "/sim/stats") for url in urls))
    for a in answers:
        a.raise_for_status()
    return [a.json() for a in answers]


async def _drive(url: str, sim_urls: list[str], run: Run) -> None:
    clients = CLIENTS_PER_SLOT * CAP * run.backends
    limits = httpx.Limits(max_connections=clients + 16, max_keepalive_connections=clients + 16)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=5)
    async with (
        httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as gw,
        httpx.AsyncClient(timeout=10) as sims,
    ):
        start = time.monotonic()
        tasks = [
            asyncio.create_task(_client(gw, MODELS[i % len(MODELS)], run, start))
            for i in range(clients)
        ]
        done, _ = await asyncio.wait(tasks, timeout=run.duration_s)
        for task in done:
            task.result()  # a failed client fails the run now
        run.sims_at_end_of_window = await _stats(sims, sim_urls)
        await asyncio.wait_for(asyncio.gather(*tasks), DRAIN_S)
        run.sims_at_end = await _stats(sims, sim_urls)


def run_one(policy: Policy, backends: int, duration_s: float) -> Run:
    run = Run(policy, backends, duration_s)
    sims = start_sims(backends)
    try:
        with gateway(policy, sims) as (url, procs):
            before, t = sum(cpu_s(p.pid) for p in procs), time.monotonic()
            asyncio.run(_drive(url, [s.url for s in sims], run))
            run.gateway_cores = (sum(cpu_s(p.pid) for p in procs) - before) / (time.monotonic() - t)
    finally:
        for sim in sims:
            sim.stop()
    failed = [s for s in run.sims_at_end if s["failed"] or s["in_flight"]]
    if failed:
        raise AssertionError(f"{policy.name}: simulators with failures or work left: {failed}")
    return run


# --- figures -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    jobs_per_s: float
    per_model: dict[str, int]
    """Answers within the window, per model."""
    loads: int
    loads_total: int
    evictions: int
    p50_s: float | None
    p99_s: float | None
    p99_by_model: dict[str, float | None]
    max_in_flight: list[int]
    requests_per_backend: list[int]


def figures(run: Run) -> Figures:
    answered = [r for r in run.requests if r.done <= run.duration_s]
    latencies = [r.done - r.sent for r in run.requests]
    return Figures(
        jobs_per_s=len(answered) / run.duration_s,
        per_model={m: sum(1 for r in answered if r.model == m) for m in MODELS},
        loads=sum(int(s["loads"]) for s in run.sims_at_end_of_window),
        loads_total=sum(int(s["loads"]) for s in run.sims_at_end),
        evictions=sum(int(s["evictions"]) for s in run.sims_at_end_of_window),
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        p99_by_model={
            m: percentile([r.done - r.sent for r in run.requests if r.model == m], 99)
            for m in MODELS
        },
        max_in_flight=[int(s["max_in_flight"]) for s in run.sims_at_end],
        requests_per_backend=[int(s["requests"]) for s in run.sims_at_end],
    )


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def row(run: Run) -> str:
    f = figures(run)
    per_model = " / ".join(str(f.per_model[m]) for m in MODELS)
    p99s = " / ".join(_s(f.p99_by_model[m]) for m in MODELS)
    held = all(x <= CAP for x in f.max_in_flight)
    return (
        f"| {run.backends} | {run.policy.name} | **{f.jobs_per_s:.2f}** | {per_model} | "
        f"**{f.loads}** ({f.loads_total}) | {f.evictions} | {_s(f.p50_s)} | {_s(f.p99_s)} | "
        f"{p99s} | {' / '.join(map(str, f.max_in_flight))} ({'held' if held else '**EXCEEDED**'})"
        f" | {' / '.join(map(str, f.requests_per_backend))} | {run.gateway_cores:.0%} |"
    )


HEADER = (
    "| backends | gateway | jobs/s | answers per model (" + " / ".join(MODELS) + ") | model "
    "loads in the window (whole run) | evictions | p50 s | p99 s | p99 s per model | max in "
    f"flight per backend (cap {CAP}) | requests per backend | gateway CPU, of one core |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def targets(runs: list[Run]) -> str:
    lines = []
    for n in sorted({r.backends for r in runs}):
        rr = figures(next(r for r in runs if r.backends == n and r.policy is ROUND_ROBIN))
        for policy in (GPUGATE, GPUGATE_SHORT):
            g = figures(next(r for r in runs if r.backends == n and r.policy is policy))
            speedup = g.jobs_per_s / rr.jobs_per_s if rr.jobs_per_s else math.inf
            lines.append(
                f"| {n} backends, {policy.name}: jobs/s ≥ {THROUGHPUT_TARGET:g}x round-robin | "
                f"{g.jobs_per_s:.2f} / {rr.jobs_per_s:.2f} = {speedup:.2f}x | "
                f"{verdict(speedup >= THROUGHPUT_TARGET)} |"
            )
            lines.append(
                f"| {n} backends, {policy.name}: model loads ≤ 1/{LOADS_TARGET:g} of "
                f"round-robin's | {g.loads} vs {rr.loads} (1/{rr.loads / max(g.loads, 1):.1f}) | "
                f"{verdict(g.loads * LOADS_TARGET <= rr.loads)} |"
            )
    worst = max(max(figures(r).max_in_flight) for r in runs)
    lines.append(
        f"| every backend's cap ({CAP}) held, every run (simulator's `max_in_flight`) | "
        f"max {worst} | {verdict(worst <= CAP)} |"
    )
    return "| target | measured | verdict |\n|---|---|---|\n" + "\n".join(lines) + "\n"


def report(plan: Plan, runs: list[Run], started: float) -> str:
    rows = "\n".join(row(r) for r in runs)
    return f"""\
Each backend is one `gpugate sim`: models {", ".join(MODELS)} (3.2B-size for the simulator:
each loads in {LOAD_S:g} s), `--max-loaded 1` (a model switch is an unload and a {LOAD_S:g} s
load, once the loaded model has no request left), `--parallel {CAP}`, answers of {TOKENS}
tokens x {TOKEN_DELAY_S:g} s ({JOB_S:g} s a job once its model is loaded): at most
{CAP / JOB_S:g} jobs/s per backend without switches. Fresh simulators for every run (nothing
loaded). Closed-loop load: {CLIENTS_PER_SLOT} clients per GPU slot of the fleet, split evenly
between the 3 models (each model its own stream; for gpugate one API key per model); each
client sends a synchronous non-streamed `POST /api/generate` as soon as its last one was
answered, for a window of {plan.duration_s:g} s; then the clients stop and what is in flight
finishes. Every answer is checked (status 200, the model asked for, `done`, {TOKENS} tokens);
anything else aborts the run.

- **gpugate**: one API process, {WORKERS} workers (`GPUGATE_WORKER_CONCURRENCY` = the
  fleet's slots), a private redis-server, `GPUGATE_BACKENDS` listing every simulator with
  `gpu_concurrency` {CAP} (models from `/api/tags`); default `GPUGATE_AFFINITY_WAIT` (30 s),
  and a second run with 5 s.
- **round-robin proxy** and **least-busy proxy**: what other gateways do (nginx's default
  and `least_conn` upstreams, LiteLLM's simple-shuffle and least-busy routing), written for
  this benchmark (`python -m bench.fleet --proxy POLICY`: starlette on uvicorn, one
  process, httpx to the backends) with the same cap per backend: round-robin sends each
  request to the next backend in turn, least-busy to the one with the fewest requests
  assigned and not yet answered (ties in turn); the request then waits in order for one of
  that backend's {CAP} slots. Neither looks at the model: every backend serves all three.
- **jobs/s**: answers received within the window / its length (per model in the next
  column). **Model loads**: the sum of the simulators' `loads` at the end of the window (in
  brackets: at the end of the run). **Latency**: send to answer, every request sent in the
  window (including the ones answered after it). **Max in flight**: each simulator's own
  `max_in_flight` over the whole run. **Gateway CPU**: user + system CPU of the gateway's
  processes (gpugate: API, workers, redis-server; a proxy: its process) / wall time.

{HEADER}{rows}

{targets(runs)}
The whole run took {time.monotonic() - started:.0f} s.
"""


# --- the run -----------------------------------------------------------------------------


def run(plan: Plan) -> str:
    started = time.monotonic()
    runs = []
    for n in plan.backend_counts:
        for policy in POLICIES:
            result = run_one(policy, n, plan.duration_s)
            runs.append(result)
            print(row(result), flush=True)
    return report(plan, runs, started)


def main(argv: list[str] | None = None) -> None:
    parser = arguments("fleet", __doc__)
    parser.add_argument("--proxy", choices=("round-robin", "least-busy"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cap", type=int, default=CAP, help=argparse.SUPPRESS)
    parser.add_argument("--backends", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv or [])
    if args.proxy:
        serve_proxy(args.proxy, args.port, args.backends.split(","), args.cap)
        return
    quick = is_quick(args, "fleet")
    text = run(QUICK if quick else FULL)
    print(text, flush=True)
    publish("fleet", text, quick=quick)


if __name__ == "__main__":
    main(sys.argv[1:])
