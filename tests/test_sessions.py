"""Sessions (api/sessions.py, dispatch.lua; SPEC "The operating point"): a conversation's
turns stay on the backend that ran its last one, so that backend's prompt cache serves
the common prefix again; a session whose backend stays busy past GPUGATE_SESSION_WAIT
moves. Two simulators behind one gate, both with the model loaded."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import Stack, StackFactory, sim_configure
from tests.processes import Process, start_sim, wait_until

SIM = ("--tokens", "3", "--token-delay", "0.01", "--parallel", "64")


@pytest.fixture
def two_sims() -> Iterator[tuple[Process, Process]]:
    a, b = (start_sim(*SIM) for _ in range(2))
    yield a, b
    a.stop()
    b.stop()


def _fleet(a: Process, b: Process, cap: int) -> str:
    return json.dumps(
        [
            {"name": "gpu-a", "url": a.url, "gpu_concurrency": cap},
            {"name": "gpu-b", "url": b.url, "gpu_concurrency": cap},
        ]
    )


def _chat(turns: int, system: str = "You are terse.") -> dict[str, object]:
    messages: list[dict[str, str]] = [{"role": "system", "content": system}]
    for i in range(turns):
        messages.append({"role": "user", "content": f"question {i}"})
        messages.append({"role": "assistant", "content": f"answer {i}"})
    messages.append({"role": "user", "content": f"question {turns}"})
    return {"model": "llama3.2", "messages": messages, "stream": False}


def _backend_of(stack: Stack, reply: httpx.Response) -> str:
    assert reply.status_code == 200, reply.text
    with stack.redis() as rdb:
        backend = rdb.hget(f"gpugate:job:{reply.headers['x-gpugate-job-id']}", "backend")
    assert backend is not None
    return backend.decode()


def _session_counts(stack: Stack) -> dict[str, float]:
    text = httpx.get(stack.url + "/metrics", timeout=5).text
    counts = {}
    for line in text.splitlines():
        if line.startswith("gpugate_session_dispatch_total{"):
            outcome = line.split('outcome="')[1].split('"')[0]
            counts[outcome] = float(line.rsplit(" ", 1)[1])
    return counts


def test_a_conversation_stays_on_its_backend(
    make_stack: StackFactory, two_sims: tuple[Process, Process]
) -> None:
    """Twenty turns of one chat (no header: its model, system prompt and first question
    name it), and twenty of another, interleaved, both backends free: every turn of each
    goes where its first went."""
    stack = make_stack(backends=_fleet(*two_sims, cap=4), burst=100, rate_limit="6000/minute")
    with stack.client("chatter") as client:
        seen: dict[str, set[str]] = {"one": set(), "two": set()}
        for turn in range(20):
            for name, system in (("one", "You are terse."), ("two", "You are verbose.")):
                reply = client.post("/v1/chat/completions", json=_chat(turn, system))
                seen[name].add(_backend_of(stack, reply))
    assert all(len(backends) == 1 for backends in seen.values()), seen
    counts = _session_counts(stack)
    assert counts["new"] == 2 and counts["kept"] == 38 and counts["moved"] == 0, counts


def test_the_session_header_names_a_session_on_any_api(
    make_stack: StackFactory, two_sims: tuple[Process, Process]
) -> None:
    stack = make_stack(backends=_fleet(*two_sims, cap=4), burst=100, rate_limit="6000/minute")
    with stack.client("header") as client:
        backends = {
            _backend_of(
                stack,
                client.post(
                    "/api/generate",
                    json={"model": "llama3.2", "prompt": f"part {i}", "stream": False},
                    headers={"X-Session-Id": "doc-42"},
                ),
            )
            for i in range(10)
        }
    assert len(backends) == 1, backends


def test_a_session_whose_backend_stays_busy_moves(
    make_stack: StackFactory, two_sims: tuple[Process, Process]
) -> None:
    """Cap 1 on each backend; the session's backend is held by a long turn of its own: the
    next turn waits GPUGATE_SESSION_WAIT for that slot, then runs on the other backend."""
    stack = make_stack(
        backends=_fleet(*two_sims, cap=1), session_wait=0.3, burst=100, rate_limit="6000/minute"
    )
    for sim in two_sims:  # the model loaded on both: moving costs no load
        httpx.post(sim.url + "/api/generate", json=_generate("warm"), timeout=10)
    wait_until(
        lambda: all(
            b["loaded_models"] for b in httpx.get(stack.url + "/v1/queue").json()["backends"]
        ),
        what="the model loaded on both backends",
    )
    with stack.client("mover") as client:
        home = _backend_of(
            stack, client.post("/api/generate", json=_generate("first"), headers=_SESSION)
        )
        sim = two_sims[0] if home == "gpu-a" else two_sims[1]
        sim_configure(sim, reset=False, token_delay_s=1.0)  # its next turn takes 3 s
        long_job = threading.Thread(
            target=lambda: client.post(
                "/api/generate",
                json=_generate("long"),
                headers=_SESSION,
            )
        )
        long_job.start()
        wait_until(
            lambda: httpx.get(sim.url + "/sim/stats", timeout=5).json()["in_flight"] == 1,
            what=f"the long job running on {home}",
        )
        moved = _backend_of(
            stack, client.post("/api/generate", json=_generate("second"), headers=_SESSION)
        )
        long_job.join(timeout=30)
    assert moved != home
    assert _session_counts(stack)["moved"] == 1


_SESSION = {"X-Session-Id": "moving-conversation"}


def _generate(prompt: str) -> dict[str, object]:
    return {"model": "llama3.2", "prompt": prompt, "stream": False}
