"""gpugate in front of a real engine: llama.cpp's `llama-server` (`make llama-server`) on a
tiny random-weight model (gpugate/testing/llama.py), one thread, 8 slots.

1. Added latency: each client alternates a direct call and a call through gpugate (an
   `openai` backend, cap 8), at 1, 4 and 8 clients. Non-streamed: time to the full answer;
   streamed: time to the first token (the first chunk with content).
2. Streamed tokens/s at 1, 4 and 8 clients, direct and through gpugate (each phase on its
   own, the clients streaming back to back): output tokens of all clients / wall time.
3. The engine's own curve, direct: total output tokens/s and the median time per output
   token (a stream's time from its first token to its last / its tokens after the first)
   against concurrency 1, 2, 4, 8, for the simulator's performance model to be calibrated on.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

from bench.report import write_section
from gpugate.testing.llama import (
    DEFAULT_ALIAS,
    llama_server_binary,
    start_llama_server,
    write_model,
)
from gpugate.testing.processes import stop_all
from gpugate.testing.stack import NO_RATE_LIMIT, start_stack
from gpugate.testing.stats import percentile

SLOTS = 8
CLIENTS = (1, 4, 8)
CURVE = (1, 2, 4, 8)
PROMPT = "Tell me a story about a gate that keeps a queue of models in order, " * 2
LATENCY_TOKENS = 16
STREAM_TOKENS = 64


def _body(tokens: int, stream: bool) -> dict[str, object]:
    return {
        "model": DEFAULT_ALIAS,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": tokens,
        "stream": stream,
    }


T = TypeVar("T")


def _again_if_closed(call: Callable[[], T]) -> T:
    """`call`, once more if the server had closed the kept-alive connection: llama-server
    now and then closes one after a stream while its headers said keep-alive, and a
    client that sends the next request on it gets no answer (about 1 in 30 streams here)."""
    try:
        return call()
    except httpx.RemoteProtocolError:
        return call()


def _full(client: httpx.Client) -> float:
    def once() -> float:
        t = time.perf_counter()
        r = client.post("/v1/chat/completions", json=_body(LATENCY_TOKENS, False))
        r.raise_for_status()
        return time.perf_counter() - t

    return _again_if_closed(once)


def _stream(client: httpx.Client, tokens: int) -> tuple[float, float, int]:
    """One streamed chat: (seconds to the first token, seconds from it to the last, tokens)."""
    return _again_if_closed(lambda: _stream_once(client, tokens))


def _stream_once(client: httpx.Client, tokens: int) -> tuple[float, float, int]:
    t = time.perf_counter()
    first = last = 0.0
    count = 0
    with client.stream("POST", "/v1/chat/completions", json=_body(tokens, True)) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if choices[0].get("delta", {}).get("content"):
                last = time.perf_counter()
                first = first or last
                count += 1
    return first - t, last - first, count


def _first_token(client: httpx.Client) -> float:
    return _stream(client, LATENCY_TOKENS)[0]


def _interleaved(
    direct: str, gate: str, call: Callable[[httpx.Client], float], clients: int, n: int
) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    lock = threading.Lock()

    def loop(i: int) -> None:
        with (
            httpx.Client(base_url=direct, timeout=60) as d,
            httpx.Client(base_url=gate, timeout=60, headers={"X-API-Key": f"b{i}"}) as g,
        ):
            call(d), call(g)  # warm connections
            for _ in range(n):
                a, b = call(d), call(g)
                with lock:
                    samples["direct"].append(a)
                    samples["gateway"].append(b)

    _threads(loop, clients)
    return samples


def _threads(loop: Callable[[int], None], clients: int) -> None:
    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _streaming(url: str, clients: int, per_client: int) -> tuple[float, list[float]]:
    """Clients streaming back to back: (output tokens/s of all, each stream's s/token)."""
    tokens = [0]
    per_token: list[float] = []
    lock = threading.Lock()

    def loop(i: int) -> None:
        with httpx.Client(base_url=url, timeout=120, headers={"X-API-Key": f"s{i}"}) as c:
            for _ in range(per_client):
                _, span, count = _stream(c, STREAM_TOKENS)
                with lock:
                    tokens[0] += count
                    if count > 1:
                        per_token.append(span / (count - 1))

    t = time.perf_counter()
    _threads(loop, clients)
    return tokens[0] / (time.perf_counter() - t), per_token


def _ms(values: list[float], q: float) -> float:
    value = percentile(values, q)
    assert value is not None
    return value * 1000


def _version(binary: Path) -> str:
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    text = (out.stdout + out.stderr).strip().splitlines()
    return next((line for line in text if line.startswith("version")), "unknown")


def run(n: int = 40) -> str:
    model = write_model(Path(tempfile.mkdtemp(prefix="gpugate-bench-engine-")) / "tiny.gguf")
    engine = start_llama_server(model, parallel=SLOTS)
    procs = [engine]
    try:
        backends = [
            {"name": "llama", "kind": "openai", "url": engine.url, "gpu_concurrency": SLOTS}
        ]
        stack = start_stack(None, backends=json.dumps(backends), **NO_RATE_LIMIT)
        procs += stack.processes
        httpx.get(stack.url + "/v1/models", timeout=10).raise_for_status()
        latency = []
        for label, call in (
            ("non-streamed, full answer", _full),
            ("streamed, first token", _first_token),
        ):
            for clients in CLIENTS:
                s = _interleaved(engine.url, stack.url, call, clients, max(5, n // clients))
                d50, d99 = _ms(s["direct"], 50), _ms(s["direct"], 99)
                g50, g99 = _ms(s["gateway"], 50), _ms(s["gateway"], 99)
                latency.append(
                    f"| {label} | {clients} | {len(s['gateway'])} | {d50:.1f} | {g50:.1f} | "
                    f"**{g50 - d50:.1f}** | {d99:.1f} | {g99:.1f} | **{g99 - d99:.1f}** |"
                )
                print(latency[-1], flush=True)
        streamed = []
        for clients in CLIENTS:
            per_client = max(3, 24 // clients)
            direct, _ = _streaming(engine.url, clients, per_client)
            gated, _ = _streaming(stack.url, clients, per_client)
            streamed.append(f"| {clients} | {direct:.0f} | {gated:.0f} | {gated / direct:.2f}x |")
            print(streamed[-1], flush=True)
        curve = []
        for concurrency in CURVE:
            rate, per_token = _streaming(engine.url, concurrency, max(3, 24 // concurrency))
            median = statistics.median(per_token) * 1000
            curve.append(f"| {concurrency} | {rate:.0f} | {median:.2f} |")
            print(curve[-1], flush=True)
    finally:
        stop_all(procs)
    size_mb = model.stat().st_size / 1e6
    return (
        f"llama.cpp `llama-server` {_version(llama_server_binary())} (built by `make "
        f"llama-server`, GGML_NATIVE off), `-t 1`, `--parallel {SLOTS}`, on a random-weight "
        f"llama GGUF of {size_mb:.1f} MB (4 layers x 128, 512-token vocabulary, F16); gpugate "
        f"with one `openai` backend at cap {SLOTS}, one worker, one API process, private "
        f"redis-server, all on the same machine. Chat requests of a ~{len(PROMPT.split())}-word "
        f"prompt; {LATENCY_TOKENS} output tokens for latency, {STREAM_TOKENS} for throughput. "
        "Times in ms.\n\n"
        "**Added latency** (each client alternates a direct call and one through gpugate):\n\n"
        "| call | clients | samples | direct p50 | gateway p50 | added p50 | direct p99 | "
        "gateway p99 | added p99 |\n|---|---|---|---|---|---|---|---|---|\n"
        + "\n".join(latency)
        + "\n\n**Streamed output tokens/s** (clients streaming back to back):\n\n"
        "| clients | direct tok/s | gateway tok/s | gateway / direct |\n|---|---|---|---|\n"
        + "\n".join(streamed)
        + "\n\n**The engine's own curve** (direct, streamed, concurrency = clients):\n\n"
        "| concurrency | output tok/s | median ms per output token |\n|---|---|---|\n"
        + "\n".join(curve)
    )


def main() -> None:
    write_section("engine", "make llama-server && python -m bench engine", run())


if __name__ == "__main__":
    main()
