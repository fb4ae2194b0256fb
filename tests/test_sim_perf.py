"""The simulator's performance model (gpugate/sim/performance.py), held to its definition
over real HTTP: time per output token past the knee, prompt time for the uncached part of a
prompt, the slots' prompt caches, and out of memory past `max_generations`."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from gpugate.sim.performance import CALIBRATED
from tests.processes import Process, start_sim, wait_until

MODEL = "llama3.2"
TOKEN_S = 0.02
KNEE = 4
TOKENS = 25
PROMPT_TOKEN_S = 0.0003
LONG_PROMPT = " ".join(f"word{i}" for i in range(1000))  # 1,001 tokens with <s>
DEFAULTS: dict[str, Any] = {
    "tokens": TOKENS,
    "token_delay_s": TOKEN_S,
    "parallel": 16,
    "knee": KNEE,
    "prompt_token_s": 0,
    "max_generations": 0,
}


@pytest.fixture(scope="module")
def sim() -> Iterator[Process]:
    proc = start_sim("--parallel", "16", "--knee", str(KNEE), "--token-delay", str(TOKEN_S))
    yield proc
    proc.stop()


@pytest.fixture
def url(sim: Process) -> str:
    """The shared simulator, back to this module's config, idle, with zeroed counters."""
    configure(sim.url, **DEFAULTS)
    wait_until(lambda: stats(sim.url)["in_flight"] == 0, timeout=5, what="an idle simulator")
    httpx.post(sim.url + "/sim/reset").raise_for_status()
    return sim.url


def configure(url: str, **changes: Any) -> None:
    httpx.put(url + "/sim/config", json=changes).raise_for_status()


def stats(url: str) -> dict[str, Any]:
    answer = httpx.get(url + "/sim/stats")
    answer.raise_for_status()
    return dict(answer.json())


def generate(url: str, prompt: str, **body: Any) -> dict[str, Any]:
    answer = httpx.post(
        url + "/api/generate",
        json={"model": MODEL, "prompt": prompt, "stream": False, **body},
        timeout=30,
    )
    answer.raise_for_status()
    return dict(answer.json())


def run_at(url: str, concurrency: int) -> tuple[float, float]:
    """`concurrency` generations at once: (total output tokens/s, median seconds per token
    by `eval_duration / eval_count`)."""
    body = {"model": MODEL, "stream": False}

    def one(client: httpx.Client) -> dict[str, Any]:
        answer = client.post("/api/generate", json={**body, "prompt": "question"})
        answer.raise_for_status()
        return dict(answer.json())

    clients = [httpx.Client(base_url=url, timeout=30) for _ in range(concurrency)]
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(lambda c: c.get("/api/version"), clients))  # connected, threads up
        start = time.monotonic()
        answers = list(pool.map(one, clients))
        wall = time.monotonic() - start
    for client in clients:
        client.close()
    assert all(a["eval_count"] == TOKENS for a in answers)
    tpot = statistics.median(a["eval_duration"] / a["eval_count"] / 1e9 for a in answers)
    return concurrency * TOKENS / wall, tpot


@pytest.fixture(scope="module")
def curve(sim: Process) -> dict[int, tuple[float, float]]:
    configure(sim.url, **DEFAULTS)
    return {n: run_at(sim.url, n) for n in (KNEE, 2 * KNEE)}


# --- time per output token and the knee ---------------------------------------------------


def test_throughput_stops_rising_at_the_knee(curve: dict[int, tuple[float, float]]) -> None:
    at_knee, at_twice = curve[KNEE][0], curve[2 * KNEE][0]
    assert 0.8 * at_knee <= at_twice <= 1.25 * at_knee, curve
    assert at_knee >= 0.75 * KNEE / TOKEN_S, curve  # the knee's tokens/s: K / token time


def test_time_per_token_grows_with_concurrency_past_the_knee(
    curve: dict[int, tuple[float, float]],
) -> None:
    at_knee, at_twice = curve[KNEE][1], curve[2 * KNEE][1]
    assert at_knee == pytest.approx(TOKEN_S, rel=0.25), curve
    assert 1.6 <= at_twice / at_knee <= 2.4, curve


def test_below_the_knee_a_token_takes_the_token_delay(url: str) -> None:
    answer = generate(url, "alone")
    assert answer["eval_duration"] / answer["eval_count"] / 1e9 == pytest.approx(TOKEN_S, rel=0.3)
    assert answer["prompt_eval_duration"] < 0.005e9  # prompts take no time: off


# --- prompt processing and the prompt cache -------------------------------------------------


def test_a_repeated_long_prompt_is_mostly_cached(url: str) -> None:
    configure(url, prompt_token_s=PROMPT_TOKEN_S, tokens=2)
    fresh = generate(url, LONG_PROMPT)
    again = generate(url, LONG_PROMPT)
    assert fresh["prompt_eval_count"] == again["prompt_eval_count"] == 1001
    assert fresh["prompt_eval_duration"] / 1e9 == pytest.approx(1001 * PROMPT_TOKEN_S, rel=0.3)
    assert again["prompt_eval_duration"] < fresh["prompt_eval_duration"] / 10
    counters = stats(url)
    assert counters["prompt_tokens_processed"] == 1001 + 1  # the last token, again
    assert counters["prompt_tokens_cached"] == 1000 and counters["prompt_cache_hits"] == 1


def test_the_next_turn_of_a_chat_pays_only_for_its_new_message(url: str) -> None:
    configure(url, prompt_token_s=PROMPT_TOKEN_S, tokens=5)
    messages = [{"role": "system", "content": LONG_PROMPT}, {"role": "user", "content": "hi"}]
    body = {"model": MODEL, "stream": False}
    first = httpx.post(url + "/v1/chat/completions", json={**body, "messages": messages}).json()
    reply = first["choices"][0]["message"]["content"]
    messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "and so"}]
    before = stats(url)
    second = httpx.post(url + "/v1/chat/completions", json={**body, "messages": messages}).json()
    after = stats(url)
    # the reply's <|im_end|>, then <|im_start|> user \n and so <|im_end|>
    assert after["prompt_tokens_processed"] - before["prompt_tokens_processed"] == 1 + 6
    assert second["usage"]["prompt_tokens"] == first["usage"]["prompt_tokens"] + 4 + 5 + 4 + 2
    assert second["usage"]["completion_tokens"] == 5


def test_a_cache_hit_needs_a_free_slot_holding_the_prefix(url: str) -> None:
    configure(url, prompt_token_s=PROMPT_TOKEN_S, tokens=1000, parallel=2)
    short = {"options": {"num_predict": 2}}
    fresh = generate(url, LONG_PROMPT, **short)  # one slot now holds the long prompt
    holder = {"model": MODEL, "prompt": LONG_PROMPT}
    with (
        httpx.Client(base_url=url, timeout=30) as client,
        client.stream("POST", "/api/generate", json=holder) as held,
    ):
        lines = held.iter_lines()  # kept: dropping it would close the response
        next(lines)  # it took the slot with the cache, and generates
        assert stats(url)["prompt_cache_hits"] == 1
        other = generate(url, LONG_PROMPT, **short)  # only the other, empty, slot is free
    assert other["prompt_eval_duration"] > 0.7 * fresh["prompt_eval_duration"]
    wait_until(lambda: stats(url)["running"] == 0, timeout=5, what="the held stream to end")
    again = generate(url, LONG_PROMPT, **short)
    assert again["prompt_eval_duration"] < fresh["prompt_eval_duration"] / 10
    slots = httpx.get(url + "/sim/performance").json()["slots"]
    assert [slot["cached_tokens"] >= 1001 for slot in slots] == [True, True]


def test_unloading_a_model_drops_its_prompt_caches(url: str) -> None:
    configure(url, prompt_token_s=PROMPT_TOKEN_S, tokens=2)
    generate(url, LONG_PROMPT, keep_alive=0)  # unloaded once it ends
    wait_until(lambda: not httpx.get(url + "/api/ps").json()["models"], what="the unload")
    loads = stats(url)["loads"]
    generate(url, LONG_PROMPT)  # loaded again: its slots' caches are gone
    counters = stats(url)
    assert counters["loads"] == loads + 1
    assert counters["prompt_cache_hits"] == 0 and counters["prompt_tokens_processed"] == 2 * 1001


def test_a_new_conversation_takes_a_free_slot_without_overwriting_another_cache(url: str) -> None:
    configure(url, prompt_token_s=PROMPT_TOKEN_S, tokens=3, parallel=2)
    body = {"model": MODEL, "stream": False}

    def chat(messages: list[dict[str, str]]) -> str:
        answer = httpx.post(url + "/v1/chat/completions", json={**body, "messages": messages})
        answer.raise_for_status()
        return str(answer.json()["choices"][0]["message"]["content"])

    first = [{"role": "user", "content": LONG_PROMPT}]
    reply = chat(first)  # slot 1
    chat([{"role": "user", "content": "other " + LONG_PROMPT}])  # shares 3 tokens: slot 2
    before = stats(url)["prompt_tokens_processed"]
    chat([*first, {"role": "assistant", "content": reply}, {"role": "user", "content": "more"}])
    assert stats(url)["prompt_tokens_processed"] - before == 1 + 5  # its history was kept


def test_prompt_time_grows_with_concurrency_past_the_knee_too(url: str) -> None:
    configure(url, prompt_token_s=PROMPT_TOKEN_S, tokens=1, knee=1)
    alone = generate(url, "one " + LONG_PROMPT)  # no prefix in common with the others
    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda p: generate(url, p + LONG_PROMPT), ("two ", "three ")))
    slowest = max(a["prompt_eval_duration"] for a in pair)
    assert slowest > 1.4 * alone["prompt_eval_duration"], (alone, pair)


# --- out of memory ----------------------------------------------------------------------------


def test_past_max_generations_a_request_answers_503_out_of_memory(url: str) -> None:
    configure(url, max_generations=2, tokens=1000)
    body = {"model": MODEL, "prompt": "hold"}
    with httpx.Client(base_url=url, timeout=30) as client:
        with (
            client.stream("POST", "/api/generate", json=body) as one,
            client.stream("POST", "/api/generate", json=body) as two,
        ):
            lines = (one.iter_lines(), two.iter_lines())  # kept, as above
            assert all(next(each) for each in lines)  # both generate
            native = client.post("/api/generate", json={**body, "stream": False})
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
            openai = client.post("/v1/chat/completions", json=chat)
    assert native.status_code == 503 and "out of memory" in native.json()["error"]
    assert openai.status_code == 503 and "out of memory" in openai.json()["error"]["message"]
    assert stats(url)["out_of_memory"] == 2


# --- its settings -------------------------------------------------------------------------


def test_settings_are_validated_and_listed(url: str) -> None:
    for bad in ({"knee": -1}, {"prompt_token_s": "1"}, {"max_generations": -2}, {"knee": 1.5}):
        assert httpx.put(url + "/sim/config", json=bad).status_code == 400, bad
    answer = httpx.put(url + "/sim/config", json={"knee": 3, "tokens": 4}).json()
    assert answer["knee"] == 3 and answer["tokens"] == 4
    listed = httpx.get(url + "/sim/performance").json()
    assert listed["knee"] == 3 and listed["prompt_token_s"] == 0 and listed["running"] == 0


def test_calibrated_starts_with_the_values_measured_on_llama_server() -> None:
    proc = start_sim("--calibrated", "--max-generations", "32")
    try:
        listed = httpx.get(proc.url + "/sim/performance").json()
        config = httpx.get(proc.url + "/sim/stats").json()["config"]
    finally:
        proc.stop()
    assert listed["knee"] == CALIBRATED["knee"]
    assert listed["prompt_token_s"] == CALIBRATED["prompt_token_s"]
    assert listed["max_generations"] == 32
    assert config["token_delay_s"] == CALIBRATED["token_delay_s"]
