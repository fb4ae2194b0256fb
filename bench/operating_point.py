"""The operating point (issue 23): `python -m bench operating-point`.

(a) One backend whose throughput stops rising at concurrency 4 (the simulator's
    performance model: time per output token flat up to the knee, growing past it),
    32 clients in a closed loop: fixed caps 1, 2, 4, 8, 16 against adaptive concurrency
    (ceiling 16, not told the knee) — jobs/s, output tokens/s, and p50/p99 time per output
    token (each job's eval_duration / eval_count, as the backend reports it).
(b) Two backends, the model loaded on one (its cap 1), a load costing 1 s on the other:
    model loads and jobs/s for a short queue (3 jobs) and a long one (60).
(c) Multi-turn chats on two backends with per-slot prompt caches (prompt processing
    in proportion to the uncached prompt): time to the first streamed byte, p50/p99, with
    sessions against without (GPUGATE_SESSION_TTL=0).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

from bench import operating_point_engine as engine_bench
from bench.operating_point_engine import CapRuns
from bench.report import ROOT, arguments, is_quick, publish, verdict
from gpugate.testing.llama import llama_server_binary
from gpugate.testing.processes import Process, wait_until
from gpugate.testing.revision import tree_at
from gpugate.testing.stack import (
    Stack,
    queue,
    sim_stats,
    start_sim,
    start_stack,
)
from gpugate.testing.stats import percentile

NO_LIMITS: dict[str, object] = {
    "rate_limit": "1000000/second",
    "burst": 1_000_000,
    "max_queue_depth": 5_000,
}
GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}
KNEE = 4
BACKENDS_C = 4
CLIENTS = 32


async def _closed_loop(
    url: str, clients: int, seconds: float, call: Callable[[httpx.AsyncClient], Awaitable[Any]]
) -> list[Any]:
    results: list[Any] = []
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

        async def one() -> None:
            while time.monotonic() < deadline:
                results.append(await call(client))

        await asyncio.gather(*(one() for _ in range(clients)))
    return results


async def _generate(client: httpx.AsyncClient) -> tuple[int, float]:
    r = await client.post("/api/generate", json=GEN, headers={"X-API-Key": "bench"})
    r.raise_for_status()
    body = r.json()
    tokens = int(body["eval_count"])
    return tokens, body["eval_duration"] / 1e6 / max(1, tokens)


def _cap_run(sim: Process, seconds: float, warm_s: float, **settings: object) -> dict[str, float]:
    stack = start_stack(sim.url, worker_concurrency=16, **NO_LIMITS, **settings)
    try:
        if warm_s:  # adaptive: let it find the knee first
            asyncio.run(_closed_loop(stack.url, CLIENTS, warm_s, _generate))
        started = time.monotonic()
        results = asyncio.run(_closed_loop(stack.url, CLIENTS, seconds, _generate))
        wall = time.monotonic() - started
        backends = httpx.get(stack.url + "/v1/queue", timeout=5).json()["backends"]
    finally:
        stack.stop()
    tpots = [t for _, t in results]
    return {
        "jobs_s": len(results) / wall,
        "tokens_s": sum(n for n, _ in results) / wall,
        "p50": percentile(tpots, 50) or 0.0,
        "p99": percentile(tpots, 99) or 0.0,
        "effective": float(backends[0]["effective_concurrency"]),
    }


def part_a(seconds: float) -> tuple[str, bool, dict[str, dict[str, float]]]:
    sim = start_sim(
        "--tokens", "20", "--token-delay", "0.01", "--parallel", "32", "--knee", str(KNEE)
    )
    try:
        rows = {
            f"fixed {cap}": _cap_run(sim, seconds, 0, gpu_concurrency=cap)
            for cap in (1, 2, 4, 8, 16)
        }
        rows["adaptive (ceiling 16)"] = _cap_run(
            sim, seconds, 20, gpu_concurrency=16, adaptive="true"
        )
    finally:
        sim.stop()
    best_name = max((n for n in rows if n.startswith("fixed")), key=lambda n: rows[n]["tokens_s"])
    best, adaptive = rows[best_name], rows["adaptive (ceiling 16)"]
    ok = adaptive["tokens_s"] >= 0.9 * best["tokens_s"] and adaptive["p50"] <= 1.25 * best["p50"]
    lines = [
        "| cap | jobs/s | output tokens/s | TPOT p50 ms | TPOT p99 ms | effective cap at the end |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['jobs_s']:.1f} | {r['tokens_s']:.0f} | {r['p50']:.1f} | "
            f"{r['p99']:.1f} | {r['effective']:.0f} |"
        )
    lines.append(
        f"\nBest fixed cap: {best_name}. Adaptive/best: throughput "
        f"{adaptive['tokens_s'] / best['tokens_s']:.2f}x (target >= 0.90), TPOT p50 "
        f"{adaptive['p50'] / best['p50']:.2f}x (target <= 1.25): {verdict(ok)}."
    )
    return "\n".join(lines), ok, rows


def _two(a: Process, b: Process, cap_a: int, cap_b: int) -> str:
    return json.dumps(
        [
            {"name": "gpu-a", "url": a.url, "gpu_concurrency": cap_a},
            {"name": "gpu-b", "url": b.url, "gpu_concurrency": cap_b},
        ]
    )


async def _burst(url: str, n: int) -> float:
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        replies = await asyncio.gather(
            *(
                client.post("/api/generate", json=GEN, headers={"X-API-Key": f"q{i}"})
                for i in range(n)
            )
        )
    assert all(r.status_code == 200 for r in replies)
    return n / (time.monotonic() - started)


class _Watch:
    """When a simulator first gets a request and first completes one (`/sim/stats`, read
    every 20 ms in a thread), in `time.monotonic()` seconds."""

    def __init__(self, sim: Process) -> None:
        self.sim, self.first_request, self.first_done = sim, 0.0, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02) and not self.first_done:
            try:
                stats = sim_stats(self.sim)
            except httpx.HTTPError:
                continue  # stopped, or not yet started again
            now = time.monotonic()
            if stats["requests"] and not self.first_request:
                self.first_request = now
            if stats["completed"]:
                self.first_done = now

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


async def _burst_statuses(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        replies = await asyncio.gather(
            *(
                client.post("/api/generate", json=GEN, headers={"X-API-Key": f"q{i}"})
                for i in range(n)
            )
        )
    return [r.status_code for r in replies]


def _burst_in_thread(url: str, n: int) -> tuple[threading.Thread, list[int]]:
    """`n` jobs at once from a thread; their statuses once it is joined."""
    statuses: list[int] = []
    thread = threading.Thread(target=lambda: statuses.extend(asyncio.run(_burst_statuses(url, n))))
    thread.start()
    return thread, statuses


B_ARGS: tuple[str, ...] = (
    "--tokens",
    "5",
    "--token-delay",
    "0.05",
    "--parallel",
    "8",
    "--load-time",
    "1",
)


def part_b() -> tuple[str, dict[str, float]]:
    lines = [
        "| queue | loads on the empty backend | jobs/s | the empty backend's first job "
        "after the queue formed (sent / answered) |",
        "|---|---|---|---|",
    ]
    figures: dict[str, float] = {}
    for n in (3, 60):
        a, b = start_sim(*B_ARGS), start_sim(*B_ARGS)
        stack = start_stack(None, backends=_two(a, b, 1, 1), **NO_LIMITS)
        watch = None
        try:
            with stack.client("warm") as client:
                client.post("/api/generate", json=GEN).raise_for_status()
            cold = b if sim_stats(a)["loads"] else a
            watch = _Watch(cold)
            started = time.monotonic()
            rate = asyncio.run(_burst(stack.url, n))
            watch.stop()
            first = (
                f"{watch.first_request - started:.2f} s / {watch.first_done - started:.2f} s"
                if watch.first_done
                else "none"
            )
            if watch.first_request:
                figures[f"first_{n}"] = watch.first_request - started
            lines.append(f"| {n} jobs | {sim_stats(cold)['loads']} | {rate:.1f} | {first} |")
        finally:
            if watch:
                watch.stop()
            stack.stop()
            a.stop()
            b.stop()
    return "\n".join(lines), figures


def _healthy(url: str, name: str) -> bool:
    return any(b["healthy"] for b in queue(url)["backends"] if b["name"] == name)


def part_b_return(n: int = 60) -> tuple[str, dict[str, float]]:
    """A backend down (its simulator stopped; gpugate opens its breaker on the failures)
    comes back, on the same port, while a long queue for the model loaded on the other
    one waits: seconds from its return to its first job."""
    a, b = start_sim(*B_ARGS), start_sim(*B_ARGS)
    stack = start_stack(None, backends=_two(a, b, 1, 1), **NO_LIMITS)
    procs = [a, b]
    watch = None
    try:
        with stack.client("warm") as client:
            client.post("/api/generate", json=GEN).raise_for_status()
        cold, name = (b, "gpu-b") if sim_stats(a)["loads"] else (a, "gpu-a")
        port = cold.port
        cold.stop()
        formed = time.monotonic()
        burst, statuses = _burst_in_thread(stack.url, n)
        wait_until(lambda: not _healthy(stack.url, name), timeout=30, what="its breaker open")
        down_after = time.monotonic() - formed
        waiting = queue(stack.url)["queue_depth"]
        back = start_sim(*B_ARGS, port=port)
        procs.append(back)
        returned = time.monotonic()
        watch = _Watch(back)
        burst.join()
        watch.stop()
    finally:
        if watch:
            watch.stop()
        stack.stop()
        for proc in procs:
            proc.stop()
    sent = watch.first_request - returned if watch.first_request else float("nan")
    done = watch.first_done - returned if watch.first_done else float("nan")
    counted = {code: statuses.count(code) for code in sorted(set(statuses))}
    answered = ", ".join(f"{count} answered {code}" for code, count in counted.items())
    text = (
        f"A backend back from a restart: gpu-a and gpu-b as above, the model warm on one; "
        f"the other's simulator stopped, {n} jobs sent at once (its breaker opened on the "
        f"jobs it failed, {down_after:.1f} s after the queue formed), then the simulator "
        f"started again on the same port with {waiting} jobs still queued: its first job "
        f"sent **{sent:.2f} s** after its return (answered after {done:.2f} s, a 1 s load "
        f"included). Of the {n} jobs: {answered}. Target: a returning backend runs work "
        "<= 5 s after a long queue forms: "
        f"{verdict(sent <= 5)}."
    )
    return text, {"return_first": sent}


MODELS3 = ("llama3.2", "qwen2.5", "gemma2")
BEFORE = "f3616b7"
"""The commit of "Waiting against loading": its parent is gpugate as it was before."""


async def _three_models(url: str, seconds: float) -> list[tuple[str, float, float]]:
    """4 closed-loop clients per model (3 per slot of the fleet), one API key per model,
    for `seconds`: each request's (model, sent, answered) in seconds from the start."""
    calls: list[tuple[str, float, float]] = []
    start = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def loop(model: str) -> None:
            while time.monotonic() - start < seconds:
                sent = time.monotonic() - start
                body = {"model": model, "prompt": "hi", "stream": False}
                r = await client.post("/api/generate", json=body, headers={"X-API-Key": model})
                r.raise_for_status()
                calls.append((model, sent, time.monotonic() - start))

        await asyncio.gather(*(loop(m) for m in MODELS3 for _ in range(4)))
    return calls


def _third_run(tree: Path | None, seconds: float) -> dict[str, Any]:
    args: tuple[str, ...] = ("--models", ",".join(MODELS3), "--max-loaded", "1")
    args += ("--load-time", "1")
    args += ("--parallel", "2", "--tokens", "10", "--token-delay", "0.05")
    sims = [start_sim(*args), start_sim(*args)]
    fleet = [{"name": f"gpu-{i}", "url": s.url, "gpu_concurrency": 2} for i, s in enumerate(sims)]
    stack = start_stack(
        None, tree=tree, backends=json.dumps(fleet), workers=2, worker_concurrency=4, **NO_LIMITS
    )
    try:

        def ready() -> bool:
            backends = queue(stack.url)["backends"]
            return len(backends) == 2 and all(b["healthy"] for b in backends)

        wait_until(ready, timeout=30, what="both backends up")
        calls = asyncio.run(_three_models(stack.url, seconds))
        loads = sum(sim_stats(s)["loads"] for s in sims)
    finally:
        stack.stop()
        for sim in sims:
            sim.stop()
    per_model = {
        m: (
            sum(1 for c in calls if c[0] == m and c[2] <= seconds),
            max((c[2] - c[1] for c in calls if c[0] == m), default=float("nan")),
        )
        for m in MODELS3
    }
    return {
        "per_model": per_model,
        "loads": loads,
        "jobs_s": sum(a for a, _ in per_model.values()) / seconds,
    }


def part_b_third(seconds: float) -> tuple[str, dict[str, float]]:
    """The fleet bench's 2-backend run, on today's dispatch and on the one before
    `BEFORE`: each model's longest wait."""
    runs = {"today": _third_run(None, seconds)}
    tree = tree_at(f"{BEFORE}^")
    if tree is not None:
        runs[f"before ({BEFORE}^)"] = _third_run(tree, seconds)
    lines = [
        "| dispatch | jobs/s | answers in the window (" + " / ".join(MODELS3) + ") | "
        "longest wait, send to answer, s (" + " / ".join(MODELS3) + ") | model loads |",
        "|---|---|---|---|---|",
    ]
    figures = {}
    for label, r in runs.items():
        answers = " / ".join(str(r["per_model"][m][0]) for m in MODELS3)
        waits = " / ".join(f"{r['per_model'][m][1]:.1f}" for m in MODELS3)
        longest = max(w for _, w in r["per_model"].values())
        figures[label] = longest
        lines.append(f"| {label} | {r['jobs_s']:.2f} | {answers} | {waits} | {r['loads']} |")
    return "\n".join(lines), figures


def _conversation(turns: int, seed: int) -> list[dict[str, str]]:
    system = f"You are assistant number {seed}. " + "Answer with care and cite sources. " * 60
    messages = [{"role": "system", "content": system}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i} of conversation {seed}"})
        messages.append({"role": "assistant", "content": f"answer {i}"})
    messages.append({"role": "user", "content": f"question {turns} of conversation {seed}"})
    return messages


async def _chats(stack: Stack, conversations: int, turns: int) -> list[float]:
    ttfts: list[float] = []
    async with httpx.AsyncClient(base_url=stack.url, timeout=120) as client:

        async def converse(seed: int) -> None:
            for turn in range(turns):
                body = {"model": "llama3.2", "messages": _conversation(turn, seed), "stream": True}
                started = time.monotonic()
                first = True
                async with client.stream("POST", "/api/chat", json=body) as r:
                    async for _ in r.aiter_bytes():
                        if first:
                            ttfts.append((time.monotonic() - started) * 1000)
                            first = False

        await asyncio.gather(*(converse(seed) for seed in range(conversations)))
    return ttfts


def _warm(stack: Stack, *sims: Process) -> None:
    """The model loaded on every backend, as gpugate sees it (/api/ps, read every 2 s)."""
    for sim in sims:
        httpx.post(sim.url + "/api/generate", json=GEN, timeout=30).raise_for_status()

    def loaded() -> bool:
        backends = httpx.get(stack.url + "/v1/queue", timeout=5).json()["backends"]
        return all(b["loaded_models"] for b in backends)

    wait_until(loaded, timeout=15, what="the model loaded on every backend")


def part_c(conversations: int, turns: int) -> tuple[str, bool]:
    args = ("--tokens", "5", "--token-delay", "0.01", "--parallel", "2", "--knee", "2")
    args += ("--prompt-token-time", "0.002")
    rows = {}
    for label, ttl in (("sessions", 600), ("no sessions", 0)):
        sims = [start_sim(*args) for _ in range(BACKENDS_C)]
        fleet = json.dumps(
            [{"name": f"gpu-{i}", "url": s.url, "gpu_concurrency": 2} for i, s in enumerate(sims)]
        )
        stack = start_stack(None, backends=fleet, session_ttl=ttl, **NO_LIMITS)
        try:
            _warm(stack, *sims)
            ttfts = asyncio.run(_chats(stack, conversations, turns))
        finally:
            stack.stop()
            for sim in sims:
                sim.stop()
        rows[label] = (percentile(ttfts, 50) or 0.0, percentile(ttfts, 99) or 0.0)
    ratio = rows["no sessions"][0] / max(rows["sessions"][0], 1e-9)
    lines = ["| | TTFT p50 ms | TTFT p99 ms |", "|---|---|---|"]
    lines += [f"| {k} | {p50:.0f} | {p99:.0f} |" for k, (p50, p99) in rows.items()]
    lines.append(
        f"\n{conversations} conversations of {turns} turns (a ~360-token system prompt), "
        f"{BACKENDS_C} backends of 2 slots, each slot caching one prompt (prompts 2 ms a "
        f"token): TTFT p50 without sessions / with "
        f"= {ratio:.2f}x "
        f"(target on the simulator >= 2): {verdict(ratio >= 2)}."
    )
    return "\n".join(lines), ratio >= 2


PLOT = ROOT / "bench" / "operating_point.png"


def plot(sim_rows: dict[str, dict[str, float]], engine: CapRuns | None, path: Path) -> None:
    """Output tokens/s and median time per output token against the cap, fixed caps as a
    line and adaptive as a star at its effective cap (a bar: the caps it took), on the
    simulator and on llama-server."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caps = list(engine_bench.CAPS)
    sim_fixed = [sim_rows[f"fixed {c}"] for c in caps]
    sim_adaptive = sim_rows["adaptive (ceiling 16)"]
    series = [
        (
            f"simulator (knee {KNEE})",
            [r["tokens_s"] for r in sim_fixed],
            [r["p50"] for r in sim_fixed],
            (sim_adaptive["tokens_s"], sim_adaptive["p50"]),
            (sim_adaptive["effective"],) * 3,
            "tab:blue",
        )
    ]
    if engine is not None:
        fixed = [engine.fixed[c] for c in caps]
        took = engine.adaptive.effective or [1]
        series.append(
            (
                "llama-server (-t 1, small model)",
                [s.tokens_s for s in fixed],
                [s.p(50) for s in fixed],
                (engine.adaptive.tokens_s, engine.adaptive.p(50)),
                (float(statistics.median(took)), float(min(took)), float(max(took))),
                "tab:orange",
            )
        )
    fig, (rate, pace) = plt.subplots(1, 2, figsize=(10, 4))
    for label, tokens, tpots, (a_tokens, a_tpot), (x, lo, hi), color in series:
        rate.plot(caps, tokens, "o-", color=color, label=f"{label}, fixed caps")
        pace.plot(caps, tpots, "o-", color=color, label=f"{label}, fixed caps")
        err = [[x - lo], [hi - x]]
        for ax, y in ((rate, a_tokens), (pace, a_tpot)):
            ax.errorbar(
                [x],
                [y],
                xerr=err,
                fmt="*",
                ms=14,
                color=color,
                capsize=3,
                label=f"{label}, adaptive (at its effective cap)",
            )
    for ax, title in ((rate, "output tokens/s"), (pace, "median ms per output token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(caps, [str(c) for c in caps])
        ax.set_xlabel("cap (concurrent jobs on the backend)", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
    rate.legend(fontsize=6)
    fig.suptitle(
        "The operating point: fixed caps against adaptive concurrency (ceiling 16)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = arguments("operating_point", __doc__).parse_args(argv or [])
    quick = is_quick(args, "operating_point")
    started = time.monotonic()
    seconds = 3.0 if quick else 10.0
    a, _, sim_rows = part_a(seconds)
    print(a, flush=True)
    b, _ = part_b()
    print(b, flush=True)
    back, _ = part_b_return()
    print(back, flush=True)
    third, longest = part_b_third(10.0 if quick else 30.0)
    print(third, flush=True)
    c, _ = part_c(8, 4 if quick else 10)
    print(c, flush=True)
    engine: CapRuns | None = None
    try:
        llama_server_binary()
    except FileNotFoundError as missing:
        engine_text = f"Not run: {missing}."
    else:
        engine = engine_bench.part_a(
            seconds=4.0 if quick else 12.0, rounds=1 if quick else 2, warm_s=10 if quick else 30
        )
        ea, _, _ = engine_bench.table_a(engine)
        print(ea, flush=True)
        conversations, turns = (4, 3) if quick else (4, 8)
        chats = {
            cache: engine_bench.part_c(conversations, turns, extra)
            for cache, extra in engine_bench.CACHES.items()
        }
        ec, _ = engine_bench.table_c(chats, conversations, turns)
        print(ec, flush=True)
        engine_text = engine_bench.describe(engine_bench.CLIENTS) + (
            f"\n\n(a) Fixed caps against adaptive concurrency on llama-server:\n\n{ea}\n\n"
            f"(c) Sessions and llama-server's prompt cache:\n\n{ec}"
        )
    path = Path(tempfile.mkdtemp(prefix="gpugate-op-")) / PLOT.name if quick else PLOT
    plot(sim_rows, engine, path)
    print(f"plot: {path}", flush=True)
    text = (
        "**On the simulator's performance model.**\n\n"
        "(a) Fixed caps against adaptive concurrency; one simulated card, knee at 4 "
        f"(20 tokens a job, 10 ms a token up to the knee), {CLIENTS} clients:\n\n{a}\n\n"
        "(b) Waiting against loading; model loaded on gpu-a (cap 1), gpu-b empty, a load "
        "costs 1 s (dispatch knows it from gpu-a's first load), jobs of a quarter second:"
        f"\n\n{b}\n\n{back}\n\n"
        "A third model's longest wait: the fleet bench's 2-backend run (bench/fleet.py: "
        "models llama3.2, qwen2.5, gemma2 on 2 simulators of 2 slots, `--max-loaded 1`, a "
        "load 1 s, jobs of 0.5 s; 4 closed-loop clients per model, one API key per model, "
        f"for {10 if quick else 30} s; default GPUGATE_AFFINITY_WAIT, 30 s), on today's "
        f'dispatch and on gpugate as it was before {BEFORE} ("Waiting against loading"; '
        "its tree from `git archive`, its API and workers run from it against the same "
        "simulators): a model loaded nowhere, both backends busy with models that have work "
        "waiting, waited GPUGATE_AFFINITY_WAIT before; it now waits at most a load time:"
        f"\n\n{third}\n\n"
        f"(c) Sessions and the prompt cache:\n\n{c}\n\n"
        f"**On the real engine.**\n\n{engine_text}\n\n"
        "![tokens/s and time per token against the cap](bench/operating_point.png)\n\n"
        f"The whole run took {time.monotonic() - started:.0f} s."
    )
    del longest
    publish("operating-point", text, quick=quick, command="python -m bench operating-point")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
