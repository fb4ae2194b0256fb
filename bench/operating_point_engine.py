"""The operating point on the real engine (issue 23): llama.cpp's `llama-server`
(`make llama-server`), `-t 1`, on the "small" random-weight model of bench/engine_curve.py
(8 layers x 512, ~52 MB: a pace the clients and the gateway can follow; the tiny model's
fraction of a millisecond a token measures the Python clients, not the engine).

(a) One llama-server with 16 slots behind gpugate (one `openai` backend): fixed caps 1, 2,
    4, 8, 16 against adaptive concurrency (ceiling 16, not told anything), 32 clients in a
    closed loop, non-streamed chats of 32 output tokens (`ignore_eos`). Two gateways on the
    one engine: one with adaptive off whose cap is set live (`PUT /admin/concurrency`), one
    adaptive, warmed up once; the steps run in rounds, in turn, so that every cap sees the
    same noisy machine. Time per output token: the engine's own
    (`timings.predicted_per_token_ms`, as the simulator's bench takes Ollama's
    eval_duration / eval_count).
(c) Two llama-servers of 2 slots each (prompt cache on, as by default: `cache_prompt`, and
    the server's host-memory prompt cache, `--cache-ram`, 8 GiB by default), fresh for each
    mode: multi-turn chats with a long system prompt, streamed, time to the first content
    token, with sessions against without (GPUGATE_SESSION_TTL=0), and the prompt tokens the
    engine says it processed (`llamacpp:prompt_tokens_total` of its `/metrics`).

Called by bench/operating_point.py (`python -m bench operating-point`).
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.engine_curve import SHAPES
from gpugate.testing.llama import (
    DEFAULT_ALIAS,
    llama_server_argv,
    start_llama_server,
    write_model,
)
from gpugate.testing.processes import Process, free_port, start_http, stop_all, wait_until
from gpugate.testing.stack import Stack, start_stack
from gpugate.testing.stats import percentile

NO_LIMITS: dict[str, object] = {
    "rate_limit": "1000000/second",
    "burst": 1_000_000,
    "max_queue_depth": 5_000,
}
CAPS = (1, 2, 4, 8, 16)
CEILING = 16
CLIENTS = 32
MAX_TOKENS = 32
ADMIN = "bench-admin"
MODEL_SHAPE = "small"
THINK_S = 0.5
"""A chat user's pause before each turn, uniform up to this (seeded per conversation)."""
CACHES = {"default": (), "--cache-ram 0": ("--cache-ram", "0")}
"""llama-server as it comes (each slot's prompt cache, and a host-memory cache of prompts
any slot can restore), and with the host-memory cache off (the slots' caches only, as
Ollama's runners keep them)."""


@dataclass
class Step:
    """What the clients saw of one cap over all its rounds."""

    tokens: int = 0
    jobs: int = 0
    seconds: float = 0.0
    tpots: list[float] = field(default_factory=list)
    effective: list[int] = field(default_factory=list)
    """Adaptive only: the effective cap, sampled every second while it ran."""

    @property
    def tokens_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def jobs_s(self) -> float:
        return self.jobs / self.seconds if self.seconds else 0.0

    def p(self, q: float) -> float:
        return percentile(self.tpots, q) or 0.0


def _model(folder: Path) -> Path:
    return write_model(folder / f"{MODEL_SHAPE}.gguf", SHAPES[MODEL_SHAPE])


def _backend(url: str, name: str, cap: int, adaptive: bool = False) -> dict[str, object]:
    return {
        "name": name,
        "kind": "openai",
        "url": url,
        "gpu_concurrency": cap,
        "adaptive": adaptive,
    }


def _wait_models(stack: Stack, backends: int) -> None:
    """Until gpugate lists the engine's model on every backend (from its /v1/models)."""

    def listed() -> bool:
        found = httpx.get(stack.url + "/v1/queue", timeout=5).json()["backends"]
        return len(found) == backends and all(b["loaded_models"] for b in found)

    wait_until(listed, timeout=30, what="the engine's model listed on every backend")


async def _closed_loop(url: str, seconds: float, step: Step) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=CLIENTS)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

        async def one(i: int) -> None:
            r = 0
            while time.monotonic() < deadline:
                body = {
                    "model": DEFAULT_ALIAS,
                    "messages": [{"role": "user", "content": f"client {i} round {r}: go on"}],
                    "max_tokens": MAX_TOKENS,
                    "ignore_eos": True,
                    "stream": False,
                }
                r += 1
                answer = await client.post(
                    "/v1/chat/completions", json=body, headers={"X-API-Key": f"c{i}"}
                )
                answer.raise_for_status()
                reply = answer.json()
                tokens = int(reply["usage"]["completion_tokens"])
                step.tokens += tokens
                step.jobs += 1
                tpot = (reply.get("timings") or {}).get("predicted_per_token_ms")
                if isinstance(tpot, int | float):
                    step.tpots.append(float(tpot))

        await asyncio.gather(*(one(i) for i in range(CLIENTS)))


def _effective(url: str) -> int:
    return int(
        httpx.get(url + "/v1/queue", timeout=5).json()["backends"][0]["effective_concurrency"]
    )


def _run_step(url: str, seconds: float, step: Step, sample: bool) -> None:
    """`CLIENTS` clients for `seconds` against `url`, added to `step`; with `sample`, the
    effective cap read every second meanwhile."""
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(1.0):
            step.effective.append(_effective(url))

    thread = threading.Thread(target=sampler) if sample else None
    if thread:
        thread.start()
    started = time.monotonic()
    try:
        asyncio.run(_closed_loop(url, seconds, step))
    finally:
        step.seconds += time.monotonic() - started
        stop.set()
        if thread:
            thread.join()


def _set_cap(stack: Stack, cap: int) -> None:
    httpx.put(
        stack.url + "/admin/concurrency",
        json={"gpu_concurrency": cap},
        headers={"X-Admin-Key": ADMIN},
        timeout=5,
    ).raise_for_status()


@dataclass
class CapRuns:
    fixed: dict[int, Step]
    adaptive: Step
    warm_caps: list[int]
    """The adaptive gateway's effective cap, every second of its warm-up."""


def part_a(seconds: float, rounds: int, warm_s: float) -> CapRuns:
    folder = Path(tempfile.mkdtemp(prefix="gpugate-bench-op-engine-"))
    engine = start_llama_server(_model(folder), parallel=CEILING, context_per_slot=512)
    procs: list[Process] = [engine]
    try:
        fixed_stack = start_stack(
            None,
            backends=json.dumps([_backend(engine.url, "llama", CEILING)]),
            worker_concurrency=CEILING,
            admin_key=ADMIN,
            **NO_LIMITS,
        )
        procs += fixed_stack.processes
        adaptive_stack = start_stack(
            None,
            backends=json.dumps([_backend(engine.url, "llama", CEILING, adaptive=True)]),
            worker_concurrency=CEILING,
            **NO_LIMITS,
        )
        procs += adaptive_stack.processes
        _wait_models(fixed_stack, 1)
        _wait_models(adaptive_stack, 1)
        warm = Step()
        _run_step(adaptive_stack.url, warm_s, warm, sample=True)
        print(f"engine adaptive warm-up: effective caps {warm.effective}", flush=True)
        fixed = {cap: Step() for cap in CAPS}
        adaptive = Step()
        for r in range(rounds):
            order: list[int | None] = [*CAPS, None]
            if r % 2:
                order.reverse()
            for cap in order:
                if cap is None:
                    _run_step(adaptive_stack.url, seconds, adaptive, sample=True)
                    print(f"engine adaptive round {r}: caps {adaptive.effective}", flush=True)
                else:
                    _set_cap(fixed_stack, cap)
                    _run_step(fixed_stack.url, seconds, fixed[cap], sample=False)
                    s = fixed[cap]
                    print(
                        f"engine fixed {cap} round {r}: {s.tokens_s:.0f} tok/s so far, "
                        f"p50 {s.p(50):.1f} ms",
                        flush=True,
                    )
    finally:
        stop_all(procs)
    return CapRuns(fixed, adaptive, warm.effective)


def table_a(runs: CapRuns) -> tuple[str, bool, dict[str, float]]:
    """The table, whether the target is met, and the ratios."""
    best_cap = max(CAPS, key=lambda c: runs.fixed[c].tokens_s)
    best, adaptive = runs.fixed[best_cap], runs.adaptive
    rate = adaptive.tokens_s / best.tokens_s if best.tokens_s else 0.0
    pace = adaptive.p(50) / best.p(50) if best.p(50) else 0.0
    ok = rate >= 0.9 and pace <= 1.25
    lines = [
        "| cap | jobs/s | output tokens/s | TPOT p50 ms | TPOT p99 ms | effective cap |",
        "|---|---|---|---|---|---|",
    ]
    for cap in CAPS:
        s = runs.fixed[cap]
        lines.append(
            f"| fixed {cap} | {s.jobs_s:.1f} | {s.tokens_s:.0f} | {s.p(50):.1f} | "
            f"{s.p(99):.1f} | {cap} |"
        )
    caps = adaptive.effective or [0]
    lines.append(
        f"| adaptive (ceiling {CEILING}) | {adaptive.jobs_s:.1f} | {adaptive.tokens_s:.0f} | "
        f"{adaptive.p(50):.1f} | {adaptive.p(99):.1f} | median {statistics.median(caps):g} "
        f"({min(caps)}-{max(caps)}) |"
    )
    from bench.report import verdict

    lines.append(
        f"\nBest fixed cap: {best_cap}. Adaptive/best: throughput {rate:.2f}x "
        f"(target >= 0.90), TPOT p50 {pace:.2f}x (target <= 1.25): {verdict(ok)}. "
        f"Adaptive's effective cap during its warm-up, a second apart: "
        f"{', '.join(map(str, runs.warm_caps))}."
    )
    return "\n".join(lines), ok, {"rate": rate, "pace": pace, "best_cap": float(best_cap)}


# (c) sessions on two engines


def _system(seed: int) -> str:
    return f"You are assistant number {seed}. " + "Answer with care and cite sources. " * 60


def _messages(seed: int, turn: int) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": _system(seed)}]
    for i in range(turn):
        messages.append({"role": "user", "content": f"question {i} of conversation {seed}"})
        messages.append({"role": "assistant", "content": f"answer {i}"})
    messages.append({"role": "user", "content": f"question {turn} of conversation {seed}"})
    return messages


@dataclass
class Chats:
    ttft_ms: list[float] = field(default_factory=list)
    processed: float = 0.0
    """Prompt tokens the engines processed, all turns (`llamacpp:prompt_tokens_total`)."""
    prompted: int = 0
    """Prompt tokens the turns sent, as the engine counts them (`usage.prompt_tokens`)."""
    kept: dict[str, float] = field(default_factory=dict)


async def _converse(url: str, conversations: int, turns: int, seed0: int, out: Chats) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:

        async def converse(seed: int) -> None:
            think = random.Random(seed)  # the user's pause before each turn: out of lockstep
            for turn in range(turns):
                await asyncio.sleep(think.uniform(0, THINK_S))
                body = {
                    "model": DEFAULT_ALIAS,
                    "messages": _messages(seed, turn),
                    "max_tokens": 8,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                started = time.monotonic()
                first = None
                usage: dict[str, Any] = {}
                async with client.stream(
                    "POST", "/v1/chat/completions", json=body, headers={"X-API-Key": "chat"}
                ) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if not line.startswith("data: {"):
                            continue
                        chunk = json.loads(line[6:])
                        usage = chunk.get("usage") or usage
                        choices = chunk.get("choices") or [{}]
                        if first is None and choices[0].get("delta", {}).get("content"):
                            first = time.monotonic()
                out.ttft_ms.append(((first or time.monotonic()) - started) * 1000)
                out.prompted += int(usage.get("prompt_tokens", 0))

        await asyncio.gather(*(converse(seed0 + c) for c in range(conversations)))


def _session_counts(stack: Stack) -> dict[str, float]:
    text = httpx.get(stack.url + "/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gpugate_session_dispatch_total{"):
            outcome = line.split('outcome="', 1)[1].split('"', 1)[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def _engine_counter(engine: Process, name: str) -> float:
    """A counter of llama-server's `/metrics` (`llamacpp:<name>`)."""
    for line in httpx.get(engine.url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"llamacpp:{name} not in the engine's /metrics")


def _chat_engine(model: Path, extra: tuple[str, ...]) -> Process:
    port = free_port()
    argv = [*llama_server_argv(model, port, 2, context_per_slot=4096), *extra]
    return start_http(f"llama-server-{port}", argv, port, "/health", status=200, timeout=60)


def part_c(conversations: int, turns: int, extra: tuple[str, ...] = ()) -> dict[str, Chats]:
    folder = Path(tempfile.mkdtemp(prefix="gpugate-bench-op-chats-"))
    model = _model(folder)
    results: dict[str, Chats] = {}
    for label, ttl, seed0 in (("no sessions", 0, 100), ("sessions", 600, 100)):
        procs: list[Process] = []
        try:
            engines = [_chat_engine(model, extra) for _ in "ab"]
            procs += engines
            fleet = [_backend(e.url, f"llama-{i}", 2) for i, e in enumerate(engines)]
            stack = start_stack(
                None,
                backends=json.dumps(fleet),
                session_ttl=ttl,
                worker_concurrency=4,
                **NO_LIMITS,
            )
            procs += stack.processes
            _wait_models(stack, 2)
            out = Chats()
            asyncio.run(_converse(stack.url, conversations, turns, seed0, out))
            out.kept = _session_counts(stack)
            out.processed = sum(_engine_counter(e, "prompt_tokens_total") for e in engines)
            results[label] = out
            print(
                f"engine chats {' '.join(extra)}, {label}: TTFT p50 "
                f"{percentile(out.ttft_ms, 50):.0f} ms, "
                f"p99 {percentile(out.ttft_ms, 99):.0f} ms, prompt tokens processed "
                f"{out.processed:.0f} of {out.prompted}, {out.kept}",
                flush=True,
            )
        finally:
            stop_all(procs)
    return results


def table_c(
    runs: dict[str, dict[str, Chats]], conversations: int, turns: int
) -> tuple[str, dict[str, tuple[float, float]]]:
    """The table of every cache setting's runs, and each one's p50 and p99 ratios."""
    lines = [
        "| llama-server | | TTFT p50 ms | TTFT p99 ms | prompt tokens processed by the "
        "engines / sent | session dispatches kept / moved / new |",
        "|---|---|---|---|---|---|",
    ]
    ratios: dict[str, tuple[float, float]] = {}
    for cache, results in runs.items():
        lines += _rows_c(cache, results)
        without, with_ = results["no sessions"], results["sessions"]
        ratios[cache] = (
            (percentile(without.ttft_ms, 50) or 0) / max(percentile(with_.ttft_ms, 50) or 0, 1e-9),
            (percentile(without.ttft_ms, 99) or 0) / max(percentile(with_.ttft_ms, 99) or 0, 1e-9),
        )
    told = "; ".join(f"{c}: p50 {r50:.2f}x, p99 {r99:.2f}x" for c, (r50, r99) in ratios.items())
    lines.append(
        f"\n{conversations} conversations of {turns} turns (a ~360-word system prompt, "
        f"unique to each conversation; a pause of up to {THINK_S:g} s before each turn), "
        f"2 llama-servers of 2 slots, 8 output tokens a turn; TTFT without sessions / with: "
        f"{told} (target on the real engine: a measured gain)."
    )
    return "\n".join(lines), ratios


def _rows_c(cache: str, results: dict[str, Chats]) -> list[str]:
    lines = []
    for label, out in results.items():
        share = out.processed / out.prompted if out.prompted else 0.0
        processed = f"{out.processed:.0f} / {out.prompted} ({share:.0%})"
        k = out.kept
        kept = f"{k.get('kept', 0):.0f} / {k.get('moved', 0):.0f} / {k.get('new', 0):.0f}"
        lines.append(
            f"| {cache} | {label} | {percentile(out.ttft_ms, 50):.0f} | "
            f"{percentile(out.ttft_ms, 99):.0f} | {processed} | {kept} |"
        )
    return lines


def describe(clients: int) -> str:
    """What the engine runs were, for the report."""
    shape = SHAPES[MODEL_SHAPE]
    return (
        f"llama.cpp `llama-server` (`make llama-server`), `-t 1`, on the {MODEL_SHAPE} "
        f"random-weight model of bench/engine_curve.py ({shape.layers} layers x "
        f"{shape.width}, F16); gpugate with `openai` backends, one worker, one API process, "
        "a private redis-server, clients, all on this machine (2 cores, shared). (a): one "
        f"llama-server, `--parallel {CEILING}`; {clients} clients in a closed loop, "
        f"non-streamed chats of {MAX_TOKENS} output tokens (`ignore_eos`); two gateways on "
        "it, one with adaptive off whose cap is set live (`PUT /admin/concurrency`), one "
        f"adaptive (ceiling {CEILING}) warmed up once; the six steps run in rounds, in turn "
        "(the second round in reverse order), each step's figures over its rounds; time per "
        "output token is the engine's own (`timings.predicted_per_token_ms`). (c): two "
        "llama-servers of 2 slots each, fresh for each run."
    )
