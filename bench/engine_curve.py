"""The real engine's curve, and the simulator's performance model against it.

llama.cpp's `llama-server` (`make llama-server`) with `--parallel 16` and `-t 1`, on the
tiny random-weight model of gpugate/testing/llama.py and on a "small" one of the same kind
(8 layers x 512, 52 MB), and one simulator (`gpugate sim --calibrated --parallel 16`), under
the same load (each step on every server in turn), streamed OpenAI chat requests:

1. **The curve**: at concurrency 1, 2, 4, 8, 16 (clients streaming back to back, each
   request `max_tokens` 64, no `stop`, so that it runs to `max_tokens`): total output
   tokens/s (all clients' output tokens / wall time) and the median time per output token
   (a stream's first token to its last / its tokens after the first).
2. **The prompt cache**: time to first token for a ~1,000-token prompt sent fresh (words in
   a new order: no prefix in common with any slot) and the same prompt again (one client,
   alternating), and the prompt tokens the engine says it processed (`timings.prompt_n`).

From the engine's figures it fits the simulator's parameters as the performance model
defines them (gpugate/sim/performance.py): `token_delay_s` = the time per output token at
concurrency 1; `knee` = the best total tokens/s x that time (the concurrency where
n / token_delay_s meets the plateau); `prompt_token_s` = a fresh prompt's engine time /
its tokens. It prints them beside the simulator's documented `CALIBRATED` defaults, which
were set from such a run on the small model (the tiny one's fraction of a millisecond a
token measures the Python clients more than the engine), and runs the simulator with them.

`python -m bench engine-curve` (writes its section of BENCHMARKS.md; `--quick`: a smoke
run that writes nothing).
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.report import ROOT, arguments, is_quick, publish
from gpugate.sim.performance import CALIBRATED
from gpugate.testing.llama import (
    DEFAULT_ALIAS,
    ModelShape,
    llama_server_binary,
    start_llama_server,
    write_model,
)
from gpugate.testing.processes import Process, stop_all
from gpugate.testing.stack import start_sim

SLOTS = 16
CONCURRENCY = (1, 2, 4, 8, 16)
MAX_TOKENS = 64
TRIES = 2
"""Each step is run this many times on each server, and the best kept: the machine is shared."""
PROMPT_TOKENS = 1000
SIM_MODEL = "llama3.2"
SHAPES = {
    "tiny": ModelShape(),
    "small": ModelShape(layers=8, width=512, heads=8, kv_heads=8, feed_forward=1376),
}
"""The tiny model of the tests, and one 30x its size whose time per token the Python
clients and the simulator can follow (the tiny one's is a fraction of a millisecond)."""
_WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at "
    "which but have an they you were her she there one all we their has been if more when"
).split()


@dataclass
class Point:
    """One concurrency's figures."""

    concurrency: int
    tokens_per_s: float
    tpot_ms: float
    server_tpot_ms: float | None = None  # the engine's own (`timings.predicted_per_token_ms`)


@dataclass
class Prompts:
    """Time to first token of a long prompt, fresh and repeated (ms), and its token count."""

    tokens: int
    fresh_ms: float
    repeated_ms: float
    fresh_processed: int | None = None  # prompt tokens the engine says it processed
    repeated_processed: int | None = None
    prompt_ms: float | None = None  # the engine's own prompt time, fresh (`timings`)


def _body(model: str, prompt: str, max_tokens: int) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,  # llama-server's: random weights must not end a reply early
    }


def _stream(
    client: httpx.Client, model: str, prompt: str, max_tokens: int
) -> tuple[float, float, int, dict[str, object]]:
    """One streamed chat: (s to the first token, s from it to the last, tokens, the
    engine's `timings` if it sends them)."""
    start = time.perf_counter()
    first = last = 0.0
    count = 0
    timings: dict[str, object] = {}
    body = _body(model, prompt, max_tokens)
    with client.stream("POST", "/v1/chat/completions", json=body) as answer:
        answer.raise_for_status()
        for line in answer.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            timings = chunk.get("timings") or timings
            choices = chunk.get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
                count += 1
    return first - start, last - first, count, timings


def _client(url: str) -> httpx.Client:
    """A client that opens a connection per request: llama-server may close an idle
    keep-alive connection just as the next request goes out."""
    return httpx.Client(base_url=url, timeout=300, limits=httpx.Limits(max_keepalive_connections=0))


def curve_point(url: str, model: str, concurrency: int, rounds: int) -> Point:
    """`concurrency` clients streaming `rounds` requests each, back to back."""
    tokens = [0]
    per_token: list[float] = []
    server: list[float] = []
    lock = threading.Lock()
    ready = threading.Barrier(concurrency + 1)
    clients = [_client(url) for _ in range(concurrency)]

    def loop(i: int) -> None:
        client = clients[i]
        ready.wait()
        for r in range(rounds):
            _, span, count, timings = _stream(
                client, model, f"client {i} round {r}: go on", MAX_TOKENS
            )
            with lock:
                tokens[0] += count
                if isinstance(timings.get("predicted_per_token_ms"), float | int):
                    server.append(float(str(timings["predicted_per_token_ms"])))
                if count > 1:
                    per_token.append(span / (count - 1))

    for client in clients:  # connected before the clock starts
        _stream(client, model, "warm up", 2)
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    ready.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    for client in clients:
        client.close()
    median = statistics.median
    server_ms = median(server) if server else None
    return Point(concurrency, tokens[0] / wall, median(per_token) * 1000, server_ms)


def long_prompt(seed: int, words: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(_WORDS) for _ in range(words))


def prompt_cache(url: str, model: str, words: int, pairs: int) -> Prompts:
    """Alternately a fresh long prompt and the same again: median times to first token."""
    ttft: dict[str, list[float]] = {"fresh": [], "repeated": []}
    processed: dict[str, list[int]] = {"fresh": [], "repeated": []}
    prompt_ms: list[float] = []
    with _client(url) as client:
        _stream(client, model, "warm up", 2)
        for pair in range(pairs):
            prompt = long_prompt(1000 + pair, words)
            for kind in ("fresh", "repeated"):
                first, _, _, timings = _stream(client, model, prompt, 2)
                ttft[kind].append(first * 1000)
                if isinstance(timings.get("prompt_n"), int):
                    processed[kind].append(int(str(timings["prompt_n"])))
                if kind == "fresh" and isinstance(timings.get("prompt_ms"), float | int):
                    prompt_ms.append(float(str(timings["prompt_ms"])))
        counted = _prompt_tokens(client, model, long_prompt(1000, words))

    def median(values: list[int]) -> int | None:
        return int(statistics.median(values)) if values else None

    return Prompts(
        tokens=counted,
        fresh_ms=statistics.median(ttft["fresh"]),
        repeated_ms=statistics.median(ttft["repeated"]),
        fresh_processed=median(processed["fresh"]),
        repeated_processed=median(processed["repeated"]),
        prompt_ms=statistics.median(prompt_ms) if prompt_ms else None,
    )


def _prompt_tokens(client: httpx.Client, model: str, prompt: str) -> int:
    """The prompt's tokens as the server counts them (`usage.prompt_tokens`)."""
    body = {**_body(model, prompt, 1), "stream": False}
    del body["stream_options"]
    answer = client.post("/v1/chat/completions", json=body)
    answer.raise_for_status()
    return int(answer.json()["usage"]["prompt_tokens"])


def engine_words(url: str) -> int:
    """How many of our words make a ~PROMPT_TOKENS-token prompt on the engine."""
    probe = PROMPT_TOKENS // 4  # words are several tokens each: a probe that fits
    with _client(url) as client:
        counted = _prompt_tokens(client, DEFAULT_ALIAS, long_prompt(0, probe))
    return max(1, round(probe * PROMPT_TOKENS / counted))


@dataclass
class Run:
    """One server's figures."""

    label: str
    points: list[Point]
    prompts: Prompts


@dataclass
class Server:
    """A server under test, and the words that make its ~1,000-token prompt."""

    label: str
    url: str
    model: str
    words: int


def measure(servers: list[Server], quick: bool) -> list[Run]:
    """Each concurrency on every server in turn (so that they see the same machine), then
    the prompt cache on each."""
    points: dict[str, list[Point]] = {server.label: [] for server in servers}
    for concurrency in CONCURRENCY:
        rounds = 1 if quick else max(2, 16 // concurrency)
        tries: dict[str, list[Point]] = {server.label: [] for server in servers}
        for _ in range(1 if quick else TRIES):
            for server in servers:
                p = curve_point(server.url, server.model, concurrency, rounds)
                tries[server.label].append(p)
                print(
                    f"{server.label:<24} {concurrency:>2}: {p.tokens_per_s:7.0f} tok/s  "
                    f"{p.tpot_ms:6.2f} ms/token (server {p.server_tpot_ms})",
                    flush=True,
                )
        for label, points_tried in tries.items():
            points[label].append(max(points_tried, key=lambda p: p.tokens_per_s))
    runs = []
    for server in servers:
        prompts = prompt_cache(server.url, server.model, server.words, 2 if quick else 4)
        print(f"{server.label:<24} prompt: {prompts}", flush=True)
        runs.append(Run(server.label, points[server.label], prompts))
    return runs


def fitted(run: Run) -> dict[str, float]:
    """The performance model's parameters that reproduce an engine's figures: its time per
    token alone, the knee where n / that time meets its best tokens/s, and its prompt time
    per token (the engine's `timings.prompt_ms`, else time to first token less one token)."""
    alone = run.points[0]
    base_s = (alone.server_tpot_ms or alone.tpot_ms) / 1000
    best = max(point.tokens_per_s for point in run.points)
    prompts = run.prompts
    processed = prompts.fresh_processed or prompts.tokens
    prompt_s = (
        prompts.prompt_ms / 1000
        if prompts.prompt_ms is not None
        else max(0.0, prompts.fresh_ms / 1000 - base_s)
    ) / processed
    return {
        "token_delay_s": round(base_s, 4),
        "knee": max(1, round(best * base_s)),
        "prompt_token_s": round(prompt_s, 6),
    }


def model_point(concurrency: int) -> Point:
    """What the performance model says with the CALIBRATED parameters."""
    base_s = float(CALIBRATED["token_delay_s"])
    tpot_s = base_s * max(1.0, concurrency / float(CALIBRATED["knee"]))
    return Point(concurrency, concurrency / tpot_s, tpot_s * 1000)


def _version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    lines = (out.stdout + out.stderr).strip().splitlines()
    return next((line for line in lines if line.startswith("version")), "unknown")


def run(quick: bool) -> tuple[list[Run], str]:
    folder = Path(tempfile.mkdtemp(prefix="gpugate-bench-curve-"))
    servers: list[Server] = []
    sizes: dict[str, float] = {}
    procs: list[Process] = []
    try:
        for name, shape in SHAPES.items():
            model = write_model(folder / f"{name}.gguf", shape)
            sizes[name] = model.stat().st_size / 1e6
            engine = start_llama_server(model, parallel=SLOTS)
            procs.append(engine)
            words = engine_words(engine.url)
            servers.append(Server(f"engine, {name} model", engine.url, DEFAULT_ALIAS, words))
        sim = start_sim("--calibrated", "--parallel", str(SLOTS), "--tokens", "10000")
        procs.append(sim)
        # the simulator's tokens are words: 4 of them frame the one chat message
        servers.append(Server("simulator --calibrated", sim.url, SIM_MODEL, PROMPT_TOKENS - 4))
        runs = measure(servers, quick)
    finally:
        stop_all(procs)
    fits = {run.label: fitted(run) for run in runs[:-1]}
    for label, fit in fits.items():
        print(f"fitted on the {label}: {fit}", flush=True)
    print(f"calibrated (the sim's defaults): {CALIBRATED}", flush=True)
    return runs, report(runs, fits, sizes)


def _cell(p: Point) -> str:
    own = "" if p.server_tpot_ms is None else f" ({p.server_tpot_ms:.2f})"
    return f"{p.tokens_per_s:.0f} | {p.tpot_ms:.2f}{own}"


def _table(runs: list[Run]) -> str:
    head = (
        "| concurrency | "
        + " | ".join(f"{run.label} tok/s | ms/token" for run in runs)
        + " | model tok/s | ms/token |"
    )
    rule = "|---" * (2 * len(runs) + 3) + "|"
    rows = []
    for i, concurrency in enumerate(CONCURRENCY):
        cells = [_cell(run.points[i]) for run in runs]
        m = model_point(concurrency)
        cells.append(f"{m.tokens_per_s:.0f} | {m.tpot_ms:.2f}")
        rows.append(f"| {concurrency} | " + " | ".join(cells) + " |")
    return "\n".join([head, rule, *rows])


def _prompt_table(runs: list[Run]) -> str:
    def shown(value: int | None) -> str:
        return "-" if value is None else str(value)

    rows = [
        "| server | prompt tokens | fresh TTFT ms | repeated TTFT ms | fresh / repeated | "
        "tokens processed fresh / repeated |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        p = run.prompts
        rows.append(
            f"| {run.label} | {p.tokens} | {p.fresh_ms:.1f} | {p.repeated_ms:.1f} | "
            f"{p.fresh_ms / p.repeated_ms:.0f}x | {shown(p.fresh_processed)} / "
            f"{shown(p.repeated_processed)} |"
        )
    return "\n".join(rows)


def report(runs: list[Run], fits: dict[str, dict[str, float]], sizes: dict[str, float]) -> str:
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    shapes = "; ".join(
        f"{name}: {shape.layers} layers x {shape.width}, feed-forward {shape.feed_forward}, "
        f"{sizes[name]:.1f} MB"
        for name, shape in SHAPES.items()
    )
    fitted_text = "; ".join(
        f"{label}: " + ", ".join(f"`{k}` {v}" for k, v in fit.items())
        for label, fit in fits.items()
    )
    calibrated = ", ".join(f"`{k}` {v}" for k, v in CALIBRATED.items())
    return (
        f"llama.cpp `llama-server` {_version(llama_server_binary())} (`make llama-server`), "
        f"`-t 1`, `--parallel {SLOTS}`, on random-weight llama GGUFs (F16) written by "
        f"gpugate/testing/llama.py ({shapes}); then `gpugate sim --calibrated --parallel "
        f"{SLOTS}` ({calibrated}). Streamed OpenAI chat requests of {MAX_TOKENS} output "
        "tokens (`ignore_eos`, no `stop`), clients streaming back to back; clients and "
        f"server on one machine (load average at the end: {load}).\n\n"
        "**Total output tokens/s and median time per output token (ms)** against "
        f"concurrency, the best of {TRIES} runs of each step, the servers in turn (time per "
        "token as the client sees it: first token to last; in parentheses the engine's own "
        "`timings.predicted_per_token_ms`; model: the performance model's formula with the "
        "calibrated parameters):\n\n"
        + _table(runs)
        + "\n\n**Time to first token of a ~1,000-token prompt** (one client, a fresh prompt "
        "then the same again, median of the pairs; the simulator counts words):\n\n"
        + _prompt_table(runs)
        + f"\n\nParameters fitted on this run's engine figures: {fitted_text}."
    )


def differences(runs: list[Run]) -> str:
    """Where the engine's curve and the simulator's differ, from this run's figures."""
    tiny, small, sim = runs
    e, s = small.points, sim.points
    base_ms = float(CALIBRATED["token_delay_s"]) * 1000
    knee = int(CALIBRATED["knee"])
    best_e = max(p.tokens_per_s for p in e)
    best_s = max(p.tokens_per_s for p in s)
    growth = ", ".join(f"x{p.tpot_ms / e[0].tpot_ms:.1f} at {p.concurrency}" for p in e[1:])
    fit = fitted(small)
    return (
        "**Where they differ.** (1) *Shape*: on one CPU thread the engine has no flat part: "
        f"its time per token grows from the second stream on ({growth} its time alone) and "
        "its tokens/s approach their plateau gradually, where the model's time per token is "
        f"flat up to the knee ({knee}) and then grows in proportion, a GPU's sharp knee. "
        "The knee is fitted so that the plateau matches (knee = best tokens/s x time "
        f"alone: {fit['knee']} on this run); past it the two times per token grow alike, "
        "below it the model is faster than this engine. (2) *Speed*: the engine's absolute "
        "speed follows the machine's other load (this run: best "
        f"{best_e:.0f} tok/s, {e[0].server_tpot_ms or e[0].tpot_ms:.1f} ms a token alone, "
        f"{fit['prompt_token_s'] * 1000:.2f} ms a prompt token; the defaults come from a "
        "quieter run: 6.2 ms, ~300 tok/s, 1.75 ms), the simulator's does not (best "
        f"{best_s:.0f} tok/s). (3) *The simulator's own cost*: alone it takes "
        f"{s[0].tpot_ms:.2f} ms a token for a modelled {base_ms:.2f} (event loop, SSE, the "
        "client); sleeps round up, never down. (4) *Prompts*: both reuse a free slot's "
        "cache and process one token of a repeated prompt (fresh / repeated time to first "
        f"token: {small.prompts.fresh_ms / small.prompts.repeated_ms:.0f}x on the engine, "
        f"{sim.prompts.fresh_ms / sim.prompts.repeated_ms:.0f}x on the simulator); the "
        "engine's prompt time also grows with attention over the prompt, the model's is "
        "linear in the uncached tokens. The simulator's tokens are words, the engine's its "
        "tokenizer's (our words are ~2.5 tokens each on the random models' vocabulary): the "
        "prompts were sized to ~1,000 tokens on each. (5) *The tiny model*: at "
        f"{tiny.points[0].server_tpot_ms or tiny.points[0].tpot_ms:.2f} ms a token alone "
        "(its own timing) its curve "
        f"({', '.join(f'{p.tokens_per_s:.0f}' for p in tiny.points)} tok/s) measures the "
        "Python clients and the shared cores, not the engine, so the defaults come from "
        "the small model, whose pace the clients and the simulator can follow."
    )


PLOT = ROOT / "bench" / "engine_curve.png"


def plot(runs: list[Run], path: Path) -> None:
    """Tokens/s and time per token against concurrency: the small model's engine, the
    simulator, and the performance model's formula."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, pace) = plt.subplots(1, 2, figsize=(10, 4))
    model = [model_point(c) for c in CONCURRENCY]
    lines = [(run.label, run.points, "o-") for run in runs[1:]]
    lines.append(("model (calibrated)", model, "k--"))
    for label, points, style in lines:
        rate.plot(CONCURRENCY, [p.tokens_per_s for p in points], style, label=label)
        pace.plot(CONCURRENCY, [p.tpot_ms for p in points], style, label=label)
    for ax, title in ((rate, "total output tokens/s"), (pace, "median ms per output token")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent streams", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=7)
    rate.legend(fontsize=7)
    fig.suptitle(
        f"llama-server (-t 1, --parallel {SLOTS}, small random model) and gpugate sim --calibrated",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    quick = is_quick(arguments("engine_curve", __doc__).parse_args(argv or []), "engine_curve")
    runs, text = run(quick)
    path = Path(tempfile.mkdtemp(prefix="gpugate-curve-")) / "engine_curve.png" if quick else PLOT
    plot(runs, path)
    print(f"plot: {path}", flush=True)
    figure = "![tokens/s and time per token against concurrency](bench/engine_curve.png)"
    publish(
        "engine-curve",
        text + "\n\n" + figure + "\n\n" + differences(runs),
        quick=quick,
        command="make llama-server && python -m bench engine-curve",
    )


if __name__ == "__main__":
    main(sys.argv[1:])
