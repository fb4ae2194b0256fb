"""Batches on the GPUs' idle time (issue 25): `python -m bench batch`.

One backend with one GPU slot (the simulator: 5 tokens at 20 ms). Interactive jobs arrive
at random (Poisson, 3 a second: the slot is busy about a third of the time) through
`/v1/jobs`; each one's wait is its `started_at - created_at`, as gpugate recorded it.

1. No batch: the interactive jobs alone.
2. The same arrivals while a batch of 1,000 lines (same model, same size) is in progress.

Reported: the interactive wait p50/p99 in both runs, against one batch line's duration
(target: p99 with the batch within one line's duration of p99 without), and the share of
the slot's idle time the batch filled: /v1/queue sampled every 20 ms, the samples where no
interactive job ran, and among them those where a batch line ran (target >= 95 %).
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import time
from typing import Any

import httpx
from openai import OpenAI

from bench.report import arguments, is_quick, publish, verdict
from gpugate.testing.stack import start_sim, start_stack
from gpugate.testing.stats import percentile

RATE_PER_S = 3.0
LINES = 1000
SAMPLE_S = 0.02
NO_LIMITS: dict[str, object] = {
    "rate_limit": "1000000/second",
    "burst": 1_000_000,
    "max_queue_depth": 5_000,
}
JOB = {"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "hi"}}
HEADERS = {"X-API-Key": "interactive"}


async def _interactive(url: str, seconds: float, seed: int) -> list[dict[str, Any]]:
    """Jobs arriving at random for `seconds`; each one's record once it has ended."""
    rng = random.Random(seed)
    ended: list[dict[str, Any]] = []
    async with httpx.AsyncClient(base_url=url, timeout=120, headers=HEADERS) as client:

        async def one() -> None:
            r = await client.post("/v1/jobs", json=JOB)
            r.raise_for_status()
            job = (await client.get(f"/v1/jobs/{r.json()['id']}", params={"wait": 60})).json()
            assert job["status"] == "succeeded", job
            ended.append(job)

        tasks = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(rng.expovariate(RATE_PER_S))
        await asyncio.gather(*tasks)
    return ended


async def _sample(url: str, stop: asyncio.Event) -> list[tuple[int, int]]:
    """(interactive running, batch lines running), every SAMPLE_S."""
    samples: list[tuple[int, int]] = []
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while not stop.is_set():
            q = (await client.get("/v1/queue")).json()
            samples.append((q["running"] - q["batch_running"], q["batch_running"]))
            await asyncio.sleep(SAMPLE_S)
    return samples


async def _measure(
    url: str, seconds: float, seed: int
) -> tuple[list[dict[str, Any]], list[tuple[int, int]]]:
    stop = asyncio.Event()
    sampler = asyncio.create_task(_sample(url, stop))
    jobs = await _interactive(url, seconds, seed)
    stop.set()
    return jobs, await sampler


def _waits_ms(jobs: list[dict[str, Any]]) -> list[float]:
    return [(j["started_at"] - j["created_at"]) * 1000 for j in jobs]


def _batch(url: str) -> str:
    client = OpenAI(base_url=url + "/v1", api_key="nightly", max_retries=0)
    lines = b"".join(
        json.dumps(
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": "/api/generate",
                "body": {"model": "llama3.2", "prompt": f"line {i}"},
            }
        ).encode()
        + b"\n"
        for i in range(LINES)
    )
    file = client.files.create(file=("night.jsonl", io.BytesIO(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=file.id, endpoint="/api/generate", completion_window="24h"
    )
    return batch.id


def main() -> None:
    args = arguments("batch", __doc__).parse_args([])
    quick = is_quick(args, "batch")
    seconds = 10.0 if quick else 40.0
    sim = start_sim("--tokens", "5", "--token-delay", "0.02", "--parallel", "8")
    stack = start_stack(sim.url, gpu_concurrency=1, worker_concurrency=4, **NO_LIMITS)
    try:
        alone, _ = asyncio.run(_measure(stack.url, seconds, seed=1))
        batch_id = _batch(stack.url)
        with_batch, samples = asyncio.run(_measure(stack.url, seconds, seed=1))
        client = OpenAI(base_url=stack.url + "/v1", api_key="nightly", max_retries=0)
        counts = client.batches.retrieve(batch_id).request_counts
        client.batches.cancel(batch_id)
    finally:
        stack.stop()
        sim.stop()
    line_ms = percentile([(j["finished_at"] - j["started_at"]) * 1000 for j in alone], 50) or 0
    a, b = _waits_ms(alone), _waits_ms(with_batch)
    a50, a99 = percentile(a, 50) or 0, percentile(a, 99) or 0
    b50, b99 = percentile(b, 50) or 0, percentile(b, 99) or 0
    idle = [s for s in samples if s[0] == 0]
    filled = sum(1 for s in idle if s[1] > 0)
    share = filled / len(idle) if idle else 0.0
    wait_ok = b99 <= a99 + line_ms
    share_ok = share >= 0.95
    text = "\n".join(
        [
            f"One slot; interactive jobs at random, {RATE_PER_S:g}/s for {seconds:g} s in each run "
            f"(5 tokens at 20 ms; one job or line runs {line_ms:.0f} ms, p50); the batch has "
            f"{LINES} lines of the same size.",
            "",
            "| run | interactive jobs | wait p50 ms | wait p99 ms |",
            "|---|---|---|---|",
            f"| no batch | {len(a)} | {a50:.1f} | {a99:.1f} |",
            f"| batch of {LINES} lines in progress | {len(b)} | {b50:.1f} | {b99:.1f} |",
            "",
            f"- p99 with the batch - p99 without: {b99 - a99:.1f} ms, against one line's "
            f"{line_ms:.0f} ms (target: within one line): {verdict(wait_ok)}.",
            f"- Idle slot time the batch filled: {share:.1%} of {len(idle)} samples with no "
            f"interactive job running (every {SAMPLE_S * 1000:.0f} ms; target >= 95 %): "
            f"{verdict(share_ok)}.",
            f"- Batch lines completed during the run: {counts.completed} of {counts.total}.",
        ]
    )
    print(text, flush=True)
    publish("batch", text, quick=quick)
