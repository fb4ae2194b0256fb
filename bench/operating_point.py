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
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx

from bench.report import arguments, is_quick, publish, verdict
from gpugate.testing.processes import Process, wait_until
from gpugate.testing.stack import Stack, sim_stats, start_sim, start_stack
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


def part_a(seconds: float) -> tuple[str, bool]:
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
    return "\n".join(lines), ok


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


def part_b() -> str:
    args = ("--tokens", "5", "--token-delay", "0.05", "--parallel", "8", "--load-time", "1")
    lines = ["| queue | loads on the empty backend | jobs/s |", "|---|---|---|"]
    for n in (3, 60):
        a, b = start_sim(*args), start_sim(*args)
        stack = start_stack(None, backends=_two(a, b, 1, 1), **NO_LIMITS)
        try:
            with stack.client("warm") as client:
                client.post("/api/generate", json=GEN).raise_for_status()
            cold = b if sim_stats(a)["loads"] else a
            rate = asyncio.run(_burst(stack.url, n))
            lines.append(f"| {n} jobs | {sim_stats(cold)['loads']} | {rate:.1f} |")
        finally:
            stack.stop()
            a.stop()
            b.stop()
    return "\n".join(lines)


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


def main(argv: list[str] | None = None) -> None:
    args = arguments("operating_point", __doc__).parse_args(argv or [])
    quick = is_quick(args, "operating_point")
    seconds = 3.0 if quick else 10.0
    a, _ = part_a(seconds)
    print(a, flush=True)
    b = part_b()
    print(b, flush=True)
    c, _ = part_c(8, 4 if quick else 10)
    print(c, flush=True)
    text = (
        "(a) Fixed caps against adaptive concurrency; one simulated card, knee at 4 "
        f"(20 tokens a job, 10 ms a token up to the knee), {CLIENTS} clients:\n\n{a}\n\n"
        "(b) Waiting against loading; model loaded on gpu-a (cap 1), gpu-b empty, a load "
        "costs 1 s (dispatch knows it from gpu-a's first load), jobs of a quarter second:"
        f"\n\n{b}\n\n"
        f"(c) Sessions and the prompt cache:\n\n{c}\n"
    )
    publish("operating-point", text, quick=quick, command="python -m bench operating-point")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
