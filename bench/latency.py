"""Added latency of the gateway: the same requests sent to the simulator directly and
through gpugate, interleaved in one run, at 1 client and at GPU_CONCURRENCY clients.

Non-streamed calls: time to the full response. Streamed calls: time to the first chunk.
The simulator answers with zero time per token, so what remains is the gateway's hop:
admission, the queue, the worker, Redis and the relay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import httpx

from bench.report import write_section
from gpugate.testing.processes import stop_all
from gpugate.testing.stack import NO_RATE_LIMIT, start_sim, start_stack
from gpugate.testing.stats import percentile

GPU_CONCURRENCY = 2
BODY = {"model": "llama3.2", "prompt": "hello"}


def _full(client: httpx.Client) -> float:
    t = time.perf_counter()
    r = client.post("/api/generate", json={**BODY, "stream": False})
    r.raise_for_status()
    return time.perf_counter() - t


def _first_chunk(client: httpx.Client) -> float:
    t = time.perf_counter()
    with client.stream("POST", "/api/generate", json={**BODY, "stream": True}) as r:
        r.raise_for_status()
        chunks = r.iter_raw()
        next(chunks)
        elapsed = time.perf_counter() - t
        for _ in chunks:
            pass
    return elapsed


def _ms(values: list[float], q: float) -> float:
    seconds = percentile(values, q)
    assert seconds is not None
    return seconds * 1000


def measure(
    direct_url: str, gateway_url: str, call: Callable[[httpx.Client], float], clients: int, n: int
) -> dict[str, list[float]]:
    """Each client alternates direct and gateway calls, so both see the same noise."""
    samples: dict[str, list[float]] = {"direct": [], "gateway": []}
    lock = threading.Lock()

    def loop(i: int) -> None:
        headers = {"X-API-Key": f"bench-{i}"}
        with (
            httpx.Client(base_url=direct_url, timeout=30) as d,
            httpx.Client(base_url=gateway_url, timeout=30, headers=headers) as g,
        ):
            for _ in range(5):  # warm connections
                call(d), call(g)
            for _ in range(n):
                a, b = call(d), call(g)
                with lock:
                    samples["direct"].append(a)
                    samples["gateway"].append(b)

    threads = [threading.Thread(target=loop, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return samples


def run(n: int = 300) -> str:
    sim = start_sim("--tokens", "5", "--token-delay", "0", "--parallel", "64")
    procs = [sim]
    rows = []
    try:
        stack = start_stack(sim.url, gpu_concurrency=GPU_CONCURRENCY, **NO_RATE_LIMIT)
        procs += stack.processes
        calls = (("non-streamed, full response", _full), ("streamed, first chunk", _first_chunk))
        for label, call in calls:
            for clients in (1, GPU_CONCURRENCY):
                s = measure(sim.url, stack.url, call, clients, n // clients)
                d50, d99 = _ms(s["direct"], 50), _ms(s["direct"], 99)
                g50, g99 = _ms(s["gateway"], 50), _ms(s["gateway"], 99)
                rows.append(
                    f"| {label} | {clients} | {len(s['gateway'])} | {d50:.2f} | {g50:.2f} | "
                    f"**{g50 - d50:.2f}** | {d99:.2f} | {g99:.2f} | **{g99 - d99:.2f}** |"
                )
                print(rows[-1], flush=True)
    finally:
        stop_all(procs)
    return (
        "Simulator at 0 s per token (5 tokens), GPU cap "
        f"{GPU_CONCURRENCY}, one worker, one API process, private redis-server; each client "
        "alternates a direct call and a gateway call. Times in ms. Target: p50 added ≤ 10 ms, "
        "p99 added ≤ 30 ms.\n\n"
        "| call | clients | samples | direct p50 | gateway p50 | added p50 | direct p99 | "
        "gateway p99 | added p99 |\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def main() -> None:
    write_section("latency", "make bench  (python -m bench latency)", run())


if __name__ == "__main__":
    main()
