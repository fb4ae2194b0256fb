"""Incremental streaming through the queue, and cancel on disconnect (no leaked slots)."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import httpx
import ollama
import openai
import pytest

from api.relay import JobRelay
from shared.settings import Settings
from tests.conftest import Stack, StackFactory, sim_configure, sim_stats, slow_sim_fixture
from tests.processes import Process, wait_until

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}


slow_sim = slow_sim_fixture(0.2)  # 5 tokens at 0.2 s: a reply takes about a second


@pytest.fixture
def slow_stack(make_stack: StackFactory, slow_sim: Process) -> Stack:
    return make_stack(ollama_url=slow_sim.url, gpu_concurrency=2)


def test_openai_stream_delivers_the_first_chunk_well_before_the_last(
    slow_stack: Stack, slow_sim: Process
) -> None:
    with openai.OpenAI(base_url=slow_stack.url + "/v1", api_key="s", max_retries=0) as client:
        started = time.monotonic()
        stamps, text = [], []
        for chunk in client.chat.completions.create(stream=True, **CHAT):  # type: ignore[call-overload]
            stamps.append(time.monotonic() - started)
            text.append(chunk.choices[0].delta.content or "" if chunk.choices else "")
    assert stamps[-1] - stamps[0] >= 0.6, stamps  # tokens arrived as generated, not at the end
    with openai.OpenAI(base_url=slow_sim.url + "/v1", api_key="s") as direct:
        ref = direct.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert "".join(text) == ref.choices[0].message.content


def test_ollama_stream_delivers_the_first_chunk_well_before_the_last(
    slow_stack: Stack, slow_sim: Process
) -> None:
    with ollama.Client(host=slow_stack.url) as client:
        started = time.monotonic()
        stamps, parts = [], []
        for part in client.generate(model="llama3.2", prompt="hello", stream=True):
            stamps.append(time.monotonic() - started)
            parts.append(part.response)
    assert stamps[-1] - stamps[0] >= 0.6, stamps
    with ollama.Client(host=slow_sim.url) as direct:
        assert "".join(parts) == direct.generate(model="llama3.2", prompt="hello").response


def test_relayed_chunks_equal_the_simulators_bytes_but_timestamps(
    slow_stack: Stack, slow_sim: Process
) -> None:
    body = {**CHAT, "stream": True}

    def events(url: str) -> list[str]:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            return [line for line in r.iter_lines() if line]

    via, ref = events(slow_stack.url), events(slow_sim.url)
    assert via[-1] == ref[-1] == "data: [DONE]"
    assert len(via) == len(ref)


def test_a_client_that_disconnects_mid_stream_cancels_the_job(
    slow_stack: Stack, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.2, tokens=50)
    with httpx.Client(base_url=slow_stack.url, timeout=30) as client:
        with client.stream("POST", "/api/generate", json={"model": "llama3.2", "prompt": "x"}) as r:
            job_id = r.headers["X-Gpugate-Job-Id"]
            lines = r.iter_lines()
            next(lines)
            assert sim_stats(slow_sim)["in_flight"] == 1
        # the response is closed here: the client went away
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 0, timeout=2, what="Ollama freed")
        wait_until(
            lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled",
            timeout=2,
            what="the job cancelled",
        )
        wait_until(lambda: client.get("/v1/queue").json()["running"] == 0, timeout=2, what="slot")


async def _abandon(url: str, body: dict[str, object], seconds: float) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=seconds) as client:
        try:
            await client.post("/api/generate", json=body)
        except httpx.TimeoutException:
            pass


def test_a_queued_job_whose_caller_left_never_reaches_ollama(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.3, tokens=5)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1)
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        blocker = client.post(
            "/v1/jobs",
            json={"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "b"}},
        ).json()["id"]
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 1, what="the blocker running")
        body = {"model": "llama3.2", "prompt": "never", "stream": False}
        asyncio.run(_abandon(stack.url, body, 0.3))
        client.get(f"/v1/jobs/{blocker}", params={"wait": 10})
        wait_until(lambda: client.get("/v1/queue").json()["queue_depth"] == 0, what="empty queue")
    assert sim_stats(slow_sim)["requests"] == 1


async def _cancel_many(url: str, n: int) -> None:
    body = {"model": "llama3.2", "prompt": "x"}
    await asyncio.gather(*(_abandon(url, {**body, "n": i}, 0.25) for i in range(n)))


def test_fifty_cancelled_requests_leak_no_slot(make_stack: StackFactory, slow_sim: Process) -> None:
    sim_configure(slow_sim, token_delay_s=0.1, tokens=20)
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=2, max_queue_depth=64, burst=100)
    asyncio.run(_cancel_many(stack.url, 50))
    with httpx.Client(base_url=stack.url, timeout=30) as client:

        def drained() -> bool:
            queue = client.get("/v1/queue").json()
            return queue["queue_depth"] == 0 and queue["running"] == 0

        wait_until(drained, timeout=5, what="no queued or running job left")
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 0, timeout=3, what="Ollama idle")
        sim_configure(slow_sim, token_delay_s=0.3, tokens=5)
        ids = [
            client.post(
                "/v1/jobs",
                json={"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "a"}},
                headers={"X-API-Key": f"after-{i}"},
            ).json()["id"]
            for i in range(2)
        ]
        wait_until(lambda: sim_stats(slow_sim)["in_flight"] == 2, timeout=3, what="2 at once")
        for job_id in ids:
            r = client.get(f"/v1/jobs/{job_id}", params={"wait": 10}, headers={"X-API-Key": "x"})
            assert r.status_code == 404  # owner-only: another key sees nothing


def test_the_relay_response_shows_its_known_headers_to_whoever_reads_them() -> None:
    """A middleware or hook reading `.headers` of the response a route returned must not
    raise: the relay's headers known before the job answers are there."""
    gate: Any = SimpleNamespace(settings=Settings())
    relay = JobRelay(gate, "owner", "job_1", {"X-RateLimit-Limit": "10"})
    assert relay.headers["x-gpugate-job-id"] == "job_1"
    assert relay.headers["x-ratelimit-limit"] == "10"
