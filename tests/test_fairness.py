"""Who gets the GPU next, through the real stack: tier priority over every waiting job
(whatever the worker settings), fair share between keys (VTC), token limits, the
rate-limit headers, and usage."""

from __future__ import annotations

import hashlib
from pathlib import Path

import http_sfv
import httpx
import pytest

from tests.conftest import Stack, StackFactory, sim_stats, slow_sim_fixture
from tests.processes import Process, wait_until

slow_sim = slow_sim_fixture(0.05)  # 5 tokens: a job holds its slot for about 0.25 s

GEN = {"model": "llama3.2", "prompt": "hi"}


def keys_file(tmp_path: Path, tiers: str, names: dict[str, str]) -> Path:
    entries = "".join(
        f'[[keys]]\nname = "{name}"\nsha256 = "{hashlib.sha256(name.encode()).hexdigest()}"\n'
        f'tier = "{tier}"\n'
        for name, tier in names.items()
    )
    path = tmp_path / "keys.toml"
    path.write_text(tiers + entries)
    return path


def submit(client: httpx.Client, key: str, body: dict[str, object] | None = None) -> str:
    r = client.post(
        "/v1/jobs",
        json={"endpoint": "/api/generate", "body": body or GEN},
        headers={"X-API-Key": key},
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def finished(client: httpx.Client, key: str, job_id: str) -> dict[str, object]:
    def done() -> dict[str, object] | None:
        job = client.get(
            f"/v1/jobs/{job_id}", params={"wait": 10}, headers={"X-API-Key": key}
        ).json()
        return job if job["status"] in ("succeeded", "failed", "cancelled") else None

    job = wait_until(done, timeout=60, what=f"job {job_id} to finish")
    assert isinstance(job, dict)
    return job


def start_order(client: httpx.Client, jobs: list[tuple[str, str]]) -> list[str]:
    """The keys of `jobs` (key, id) in the order their jobs started on Ollama."""
    started = []
    for key, job_id in jobs:
        job = finished(client, key, job_id)
        assert job["status"] == "succeeded", job
        started.append((float(job["started_at"]), key))  # type: ignore[arg-type]
    return [key for _, key in sorted(started)]


TIERS = """
[tiers.free]
rate = "6000/minute"
burst = 100
max_queued = 40
[tiers.pro]
rate = "6000/minute"
burst = 100
max_queued = 40
priority = 10
[tiers.heavy]
rate = "6000/minute"
burst = 100
max_queued = 40
weight = 4
"""


def occupy(client: httpx.Client, stack_sim: Process, key: str) -> tuple[str, str]:
    """A long job holding the only slot, so that what follows all waits."""
    job = submit(client, key, {**GEN, "options": {"num_predict": 5}})
    wait_until(lambda: sim_stats(stack_sim)["in_flight"] == 1, what="the first job running")
    return key, job


@pytest.mark.parametrize("workers", [1, 2])
def test_a_pro_job_starts_before_every_free_job_waiting(
    make_stack: StackFactory, slow_sim: Process, tmp_path: Path, workers: int
) -> None:
    """Issue 13's case: default GPUGATE_WORKER_CONCURRENCY (4), cap 1; the workers have
    room for the free jobs, and still the pro job, queued last, starts first."""
    path = keys_file(tmp_path, TIERS, {"free-a": "free", "pro-a": "pro"})
    stack = make_stack(workers=workers, ollama_url=slow_sim.url, gpu_concurrency=1, keys_file=path)
    with stack.client() as client:
        first = occupy(client, slow_sim, "free-a")
        waiting = [("free-a", submit(client, "free-a")) for _ in range(3)]
        waiting.append(("pro-a", submit(client, "pro-a")))
        order = start_order(client, [first, *waiting])
    assert order[:2] == ["free-a", "pro-a"], order


def test_a_flood_and_a_later_trickle_alternate(make_stack: StackFactory, slow_sim: Process) -> None:
    """The SPEC's example: with one slot, a key that queued 20 jobs and a key that then
    queued 4 alternate; the second key's 4 all start before the first key's 10th."""
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, burst=100)
    with stack.client() as client:
        flood = [("flood", submit(client, "flood")) for _ in range(20)]
        trickle = [("trickle", submit(client, "trickle")) for _ in range(4)]
        order = start_order(client, flood + trickle)
    tenth_flood = [i for i, key in enumerate(order) if key == "flood"][9]
    last_trickle = max(i for i, key in enumerate(order) if key == "trickle")
    assert last_trickle < tenth_flood, order


def test_weights_shift_the_shares(
    make_stack: StackFactory, slow_sim: Process, tmp_path: Path
) -> None:
    path = keys_file(tmp_path, TIERS, {"light": "free", "heavy": "heavy"})
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, keys_file=path)
    with stack.client() as client:
        first = occupy(client, slow_sim, "light")
        jobs = []
        for _ in range(12):
            jobs += [("light", submit(client, "light")), ("heavy", submit(client, "heavy"))]
        order = start_order(client, [first, *jobs])[1:]
    assert order[:10].count("heavy") >= 7, order  # weight 4 against 1: about 4 of every 5


def test_a_key_that_was_idle_earns_no_credit(make_stack: StackFactory, slow_sim: Process) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, burst=100)
    with stack.client() as client:
        alone = [("busy", submit(client, "busy")) for _ in range(8)]
        start_order(client, alone)  # "busy" was served while "idle" asked for nothing
        first = occupy(client, slow_sim, "busy")
        both = []
        for _ in range(6):
            both += [("busy", submit(client, "busy")), ("idle", submit(client, "idle"))]
        order = start_order(client, [first, *both])[1:]
    assert order[:6].count("busy") >= 2, f"the idle key took the GPU for its idle time: {order}"


TPM_TIERS = """
[tiers.free]
rate = "6000/minute"
burst = 100
tpm = "10/minute"
"""


def test_a_small_token_limit_refuses_the_third_call_and_it_never_reaches_ollama(
    make_stack: StackFactory, sim_proc: Process, tmp_path: Path
) -> None:
    stack = make_stack(keys_file=keys_file(tmp_path, TPM_TIERS, {"tiny": "free"}))
    with stack.client("tiny") as client:
        answers = [client.post("/api/generate", json={**GEN, "stream": False}) for _ in range(2)]
        assert [a.status_code for a in answers] == [200, 200]
        served = sum(a.json()["prompt_eval_count"] + a.json()["eval_count"] for a in answers)
        assert served > 10  # the two calls spent more than the bucket holds
        before = sim_stats(sim_proc)["requests"]
        third = client.post("/api/generate", json={**GEN, "stream": False})
        named = client.post("/api/generate", json={**GEN, "options": {"num_predict": 50}})
        assert sim_stats(sim_proc)["requests"] == before
    body = third.json()
    assert third.status_code == 429 and body["error"] == "rate_limit_exceeded", body
    assert body["limit"] == "tokens"
    overdrawn = served - 10  # tokens below zero, refilled at 10 a minute
    assert int(third.headers["Retry-After"]) == min(120, -(-overdrawn * 6 // 1))
    assert third.headers["X-RateLimit-Remaining-Tokens"] == "0"
    assert third.headers["X-RateLimit-Remaining"] != "0", "a token refusal spent a request token"
    assert named.status_code == 429 and named.json()["limit"] == "tokens"


def test_rate_limit_headers_are_structured_fields_that_agree(
    make_stack: StackFactory, tmp_path: Path
) -> None:
    tiers = '[tiers.free]\nrate = "60/minute"\nburst = 10\ntpm = "6000/minute"\n'
    stack = make_stack(keys_file=keys_file(tmp_path, tiers, {"k": "free"}))
    with stack.client("k") as client:
        for stream in (False, True):
            with client.stream("POST", "/api/generate", json={**GEN, "stream": stream}) as r:
                assert r.status_code == 200
                headers = r.headers
        refused = [client.post("/api/generate", json={**GEN, "stream": False}) for _ in range(9)]
    for h in (headers, refused[-1].headers):
        policy, state = http_sfv.List(), http_sfv.List()
        policy.parse(h["RateLimit-Policy"].encode())
        state.parse(h["RateLimit"].encode())
        policies = {item.value: dict(item.params) for item in policy}
        states = {item.value: dict(item.params) for item in state}
        assert policies["requests"] == {"q": int(h["X-RateLimit-Limit"]), "w": 10}
        assert states["requests"]["r"] == int(h["X-RateLimit-Remaining"])
        assert policies["tokens"] == {"q": int(h["X-RateLimit-Limit-Tokens"]), "w": 60}
        assert states["tokens"]["r"] == int(h["X-RateLimit-Remaining-Tokens"])
        assert 0 < states["requests"]["t"] <= 10
    assert refused[-1].status_code == 429 and states["requests"]["r"] == 0


def test_admin_usage_is_what_ollama_reported(make_stack: StackFactory, tmp_path: Path) -> None:
    tiers = '[tiers.free]\nrate = "6000/minute"\nburst = 100\n'
    stack = make_stack(keys_file=keys_file(tmp_path, tiers, {"team-a": "free"}), admin_key="adm")
    stack_usage = _usage(stack)
    assert "team-a" not in stack_usage
    inputs = outputs = 0
    with stack.client("team-a") as client:
        for prompt in ("hi", "tell me more", "and more again please"):
            r = client.post("/api/generate", json={**GEN, "prompt": prompt, "stream": False})
            inputs += r.json()["prompt_eval_count"]
            outputs += r.json()["eval_count"]
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "llama3.2", "messages": [{"role": "user", "content": "x"}]},
        ).json()
        inputs += chat["usage"]["prompt_tokens"]
        outputs += chat["usage"]["completion_tokens"]

    def counted() -> dict[str, float] | None:
        usage = _usage(stack).get("team-a")
        done = usage and usage["requests"] == 4 and usage["output_tokens"] == outputs
        return usage if done else None  # the workers add tokens every 0.5 s

    usage = wait_until(counted, what="four requests and their tokens in /admin/usage")
    assert isinstance(usage, dict)
    assert (usage["input_tokens"], usage["output_tokens"]) == (inputs, outputs)
    assert usage["gpu_seconds"] > 0
    metrics = httpx.get(stack.url + "/metrics").text
    assert f'gpugate_key_tokens_total{{key="team-a",kind="output"}} {float(outputs)}' in metrics


def _usage(stack: Stack) -> dict[str, dict[str, float]]:
    r = httpx.get(stack.url + "/admin/usage", headers={"X-Admin-Key": "adm"}, timeout=10)
    assert r.status_code == 200, r.text
    return dict(r.json()["keys"])
