"""A real inference engine behind the gate: llama.cpp's `llama-server` (built and cached by
`make llama-server`) serving a tiny random-weight model generated here, as an `openai`
backend. End to end: chat and completions streamed and not, embeddings, the openai SDK and
LiteLLM as clients; the gate's cap below and above the server's own slots (`/slots`);
cancel on disconnect; failover to a second engine and back; usage from the engine's
counts; and a mixed fleet with the simulator as the Ollama backend.

llama-server answers whatever `model` says and random weights rarely stop: every request
names a small `max_tokens`.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from gpugate.testing.llama import (
    DEFAULT_ALIAS,
    busy_slots,
    start_llama_server,
    write_model,
)
from gpugate.testing.processes import Process, wait_until
from tests.conftest import Stack, StackFactory, sim_stats
from tests.test_clients import close_litellm_leftovers

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

MODEL = DEFAULT_ALIAS
ENGINE_KEY = "engine-secret-4711"
"""The main engine's --api-key: the gate must send it (and never show it)."""
PARALLEL = 4
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture(scope="module")
def model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("engine") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def engine(model_file: Path) -> Iterator[Process]:
    """One llama-server of PARALLEL slots, behind an api key."""
    proc = start_llama_server(model_file, parallel=PARALLEL, api_key=ENGINE_KEY)
    yield proc
    proc.stop()


def backend(name: str, proc: Process, cap: int, **extra: object) -> dict[str, object]:
    return {"name": name, "kind": "openai", "url": proc.url, "gpu_concurrency": cap, **extra}


def engine_stack(make_stack: StackFactory, *entries: dict[str, object], **settings: Any) -> Stack:
    stack = make_stack(backends=json.dumps(list(entries)), **settings)
    wait_until(lambda: _serves(stack, MODEL), timeout=20, what=f"the gate to list {MODEL}")
    return stack


def _serves(stack: Stack, model: str) -> bool:
    listed = httpx.get(stack.url + "/v1/models", timeout=5).json()
    return model in {m["id"] for m in listed.get("data", [])}


@pytest.fixture
def gate(make_stack: StackFactory, engine: Process) -> Stack:
    """A gate whose one backend is the engine, at the engine's own parallelism."""
    return engine_stack(
        make_stack, backend("llama", engine, PARALLEL, api_key=ENGINE_KEY), admin_key="adm"
    )


def sse_events(text: str) -> list[Any]:
    """The data of each SSE event: parsed JSON, or the string `[DONE]`."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        line = block.strip()
        if line.startswith("data:"):
            data = line[5:].strip()
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def engine_metric(proc: Process, name: str) -> float:
    """A counter of the engine's `/metrics` (`llamacpp:<name>`)."""
    text = httpx.get(
        proc.url + "/metrics", headers={"authorization": f"Bearer {ENGINE_KEY}"}, timeout=5
    ).text
    for line in text.splitlines():
        if line.startswith(f"llamacpp:{name} "):
            return float(line.split()[1])
    raise AssertionError(f"llamacpp:{name} not in the engine's /metrics:\n{text[:2000]}")


def test_chat_completions_and_embeddings_through_the_gate(gate: Stack, engine: Process) -> None:
    with gate.client("k-basic") as client:
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 8})
        assert r.status_code == 200, r.text
        reply = r.json()
        assert reply["object"] == "chat.completion"
        assert reply["choices"][0]["finish_reason"] in ("length", "stop")
        assert 1 <= reply["usage"]["completion_tokens"] <= 8

        # Greedy (temperature 0) where the text itself is asserted: the random model's
        # sampled tokens can all be pieces of a UTF-8 character, which llama-server
        # withholds (1 of 200 sampled 6-token answers, streamed direct, had no content).
        completion = {"model": MODEL, "prompt": "a b", "max_tokens": 6, "temperature": 0}
        r = client.post("/v1/completions", json=completion)
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "text_completion" and r.json()["choices"][0]["text"]

        # streamed, the client not asking for usage: the usage chunk gpugate asked for is gone
        for path, body in (
            ("/v1/chat/completions", {**CHAT, "max_tokens": 6, "temperature": 0}),
            ("/v1/completions", completion),
        ):
            r = client.post(path, json={**body, "stream": True})
            assert r.status_code == 200 and r.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = sse_events(r.text)
            assert events[-1] == "[DONE]" and len(events) >= 3
            assert not [e for e in events[:-1] if e.get("choices") == []], events[-3:]

        # the client asks: it gets the engine's usage chunk, as the engine sent it
        r = client.post(
            "/v1/chat/completions",
            json={
                **CHAT,
                "max_tokens": 5,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        events = sse_events(r.text)
        usage = [e for e in events[:-1] if e.get("usage") and e.get("choices") == []]
        assert len(usage) == 1 and usage[0]["usage"]["completion_tokens"] == 5

        r = client.post(
            "/v1/responses", json={"model": MODEL, "input": "hi", "max_output_tokens": 4}
        )
        assert r.status_code == 200, r.text
        assert r.json()["object"] == "response" and r.json()["usage"]["output_tokens"] == 4

        r = client.post("/v1/embeddings", json={"model": MODEL, "input": ["one", "two words"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert len(data) == 2 and len(data[0]["embedding"]) == 128

        # Ollama-native calls need Ollama: this fleet has none
        r = client.post("/api/chat", json={**CHAT, "stream": False})
        assert r.status_code == 404
        assert r.json() == {"error": f'model "{MODEL}" not found, try pulling it first'}
        assert client.get("/api/tags").json() == {"models": []}


def test_the_engine_key_is_sent_and_never_shown(gate: Stack, engine: Process) -> None:
    # the engine refuses calls without its key: what worked above carried it
    assert httpx.get(engine.url + "/v1/models", timeout=5).status_code == 401
    status = httpx.get(gate.url + "/admin/status", headers={"X-Admin-Key": "adm"}, timeout=5)
    assert status.status_code == 200
    (shown,) = status.json()["backends"]
    assert shown["kind"] == "openai" and shown["healthy"] is True
    assert shown["loaded_models"] == [MODEL]
    doctor = subprocess.run(
        [sys.executable, "-m", "gpugate", "doctor"],
        env={**os.environ, **gate.env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(doctor.stdout)
    (facts,) = report["ollama"]
    assert facts["kind"] == "openai" and facts["models"] == [MODEL] and facts["healthy"]
    assert facts["api_key"] == "********"
    for text in (status.text, doctor.stdout, doctor.stderr, *(p.log() for p in gate.processes)):
        assert ENGINE_KEY not in text


def test_openai_sdk_and_litellm_as_clients(gate: Stack) -> None:
    client = openai.OpenAI(base_url=gate.url + "/v1", api_key="k-sdk", max_retries=0)
    with client:
        chat = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
        assert chat.choices[0].message.content is not None
        assert chat.usage is not None and chat.usage.completion_tokens == 5
        stream = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            temperature=0,  # the text is asserted: greedy (see the test above)
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        # byte tokens that are not whole UTF-8 characters yet wait for the next: fewer
        # deltas than tokens, but every token counted in the usage the client asked for
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5
        completion = client.completions.create(
            model=MODEL, prompt="x y", max_tokens=4, temperature=0
        )
        assert completion.choices[0].text
        vectors = client.embeddings.create(model=MODEL, input="hello")
        assert len(vectors.data[0].embedding) == 128

    import litellm

    try:
        messages = [{"role": "user", "content": "hi"}]
        args = {"api_base": gate.url + "/v1", "api_key": "k-litellm", "max_tokens": 5}
        args["temperature"] = 0  # its streamed text is asserted: greedy
        reply = litellm.completion(model=f"openai/{MODEL}", messages=messages, **args)
        assert reply.choices[0].message.content is not None
        chunks = litellm.completion(model=f"openai/{MODEL}", messages=messages, stream=True, **args)
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 1
        vectors = litellm.embedding(
            model=f"openai/{MODEL}", input=["a"], api_base=gate.url + "/v1", api_key="k-litellm"
        )
        assert len(vectors.data[0]["embedding"]) == 128
    finally:
        close_litellm_leftovers(litellm)


class SlotWatch:
    """Polls an engine's /slots in a thread of its own: the most slots seen processing."""

    def __init__(self, engine: Process) -> None:
        self.engine = engine
        self.polls: list[int] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self.polls.append(busy_slots(self.engine, ENGINE_KEY))
            except httpx.HTTPError as exc:
                self.errors.append(exc)
            time.sleep(0.005)

    def __enter__(self) -> SlotWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def most(self) -> int:
        return max(self.polls, default=0)


@pytest.mark.parametrize("cap", [2, 6], ids=["cap-below-parallel", "cap-above-parallel"])
def test_the_engine_never_runs_more_than_the_cap(
    make_stack: StackFactory, engine: Process, cap: int
) -> None:
    stack = engine_stack(make_stack, backend("llama", engine, cap, api_key=ENGINE_KEY))
    wait_until(lambda: busy_slots(engine, ENGINE_KEY) == 0, what="an idle engine")
    body = {**CHAT, "max_tokens": 768}  # a few tenths of a second each: /slots sees them
    with (
        SlotWatch(engine) as watch,
        ThreadPoolExecutor(8) as pool,
        stack.client("k-cap") as client,
    ):
        replies = list(pool.map(lambda _: client.post("/v1/chat/completions", json=body), range(8)))
    assert [r.status_code for r in replies] == [200] * 8
    assert all(r.json()["usage"]["completion_tokens"] == 768 for r in replies)
    # with the cap below its slots the engine runs exactly the cap; above, all its slots
    assert watch.most == min(cap, PARALLEL), (watch.polls, watch.errors)


def test_cancel_on_disconnect_frees_the_engines_slot(
    make_stack: StackFactory, model_file: Path
) -> None:
    # one slot of a long context: 30,000 tokens take the engine seconds, not milliseconds
    engine = start_llama_server(model_file, parallel=1, context_per_slot=32768, api_key=ENGINE_KEY)
    try:
        gate = engine_stack(make_stack, backend("llama", engine, 1, api_key=ENGINE_KEY))
        _cancel_frees_the_slot(gate, engine)
    finally:
        engine.stop()


def _cancel_frees_the_slot(gate: Stack, engine: Process) -> None:
    body = {**CHAT, "max_tokens": 30000, "stream": True}
    with httpx.Client(base_url=gate.url, timeout=30) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            assert busy_slots(engine, ENGINE_KEY) == 1
            disconnected = time.monotonic()
        # leaving the block closed the connection mid-stream
    wait_until(lambda: busy_slots(engine, ENGINE_KEY) == 0, timeout=5, what="the slot freed")
    freed_s = time.monotonic() - disconnected
    assert freed_s < 2.0, freed_s
    queue = wait_until(
        lambda: (q := httpx.get(gate.url + "/v1/queue").json())["running"] == 0 and q,
        what="the gate's slot freed",
    )
    assert queue["queue_depth"] == 0


def test_failover_to_a_second_engine_and_back(make_stack: StackFactory, model_file: Path) -> None:
    first = start_llama_server(model_file, parallel=2)
    second = start_llama_server(model_file, parallel=2)
    try:
        stack = engine_stack(
            make_stack, backend("llama-a", first, 2), backend("llama-b", second, 2)
        )
        conversations = itertools.count()
        with stack.client("k-failover") as client:

            def answered() -> None:
                # a new conversation each time: no session keeps it on the backend it had
                content = f"conversation {next(conversations)}"
                body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
                r = client.post("/v1/chat/completions", json={**body, "max_tokens": 4})
                assert r.status_code == 200, r.text

            answered()
            first.kill()
            for _ in range(6):  # each tries llama-a first (listed first), then llama-b
                answered()
            assert health(stack) == {"llama-a": False, "llama-b": True}
            assert engine_metric(second, "tokens_predicted_total") >= 6 * 4

            first = start_llama_server(model_file, parallel=2, port=first.port)
            wait_until(
                lambda: all(health(stack).values()), timeout=15, what="llama-a back in dispatch"
            )
            for _ in range(3):  # llama-a first again
                answered()
            assert engine_metric(first, "tokens_predicted_total") == 3 * 4
    finally:
        first.stop()
        second.stop()


def health(stack: Stack) -> dict[str, bool]:
    backends = httpx.get(stack.url + "/v1/queue", timeout=5).json()["backends"]
    return {b["name"]: b["healthy"] for b in backends}


def _keys_file(path: Path, names: list[str]) -> Path:
    entries = "".join(
        f'[[keys]]\nname = "{n}"\nsha256 = "{hashlib.sha256(n.encode()).hexdigest()}"\n'
        for n in names
    )
    path.write_text('[tiers.default]\nrate = "6000/minute"\nburst = 100\n' + entries)
    return path


def test_usage_is_charged_from_the_engines_counts(
    make_stack: StackFactory, engine: Process, tmp_path: Path
) -> None:
    stack = engine_stack(
        make_stack,
        backend("llama", engine, PARALLEL, api_key=ENGINE_KEY),
        admin_key="adm",
        keys_file=_keys_file(tmp_path / "keys.toml", ["team-a"]),
    )
    inputs = outputs = 0
    with stack.client("team-a") as client:
        for n in (3, 7):
            r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": n})
            inputs += r.json()["usage"]["prompt_tokens"]
            outputs += r.json()["usage"]["completion_tokens"]
        prompt_tokens = r.json()["usage"]["prompt_tokens"]  # the same messages each time
        # streamed without include_usage: the client sees no usage, the gate still counts it
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 9, "stream": True})
        assert not [e for e in sse_events(r.text)[:-1] if "usage" in e]
        inputs += prompt_tokens
        outputs += 9
        r = client.post("/v1/embeddings", json={"model": MODEL, "input": "four words in here"})
        inputs += r.json()["usage"]["prompt_tokens"]

    def counted() -> dict[str, float] | None:
        keys = httpx.get(stack.url + "/admin/usage", headers={"X-Admin-Key": "adm"}).json()
        usage = keys["keys"].get("team-a")
        # the workers add tokens every 0.5 s; the embedding's are input tokens only, so
        # the output count alone does not say that its run was added
        done = (
            usage
            and usage["requests"] == 4
            and usage["output_tokens"] == outputs
            and usage["input_tokens"] >= inputs
        )
        return usage if done else None

    usage = wait_until(counted, what="four requests and their tokens in /admin/usage")
    assert (usage["input_tokens"], usage["output_tokens"]) == (inputs, outputs)


def test_a_mixed_fleet(make_stack: StackFactory, engine: Process, sim_proc: Process) -> None:
    stack = engine_stack(
        make_stack,
        {"name": "sim", "url": sim_proc.url, "gpu_concurrency": 4},
        backend("llama", engine, PARALLEL, api_key=ENGINE_KEY),
    )
    sim_model = "llama3.2"
    with stack.client("k-mixed") as client:
        before = sim_stats(sim_proc)["requests"]
        r = client.post(
            "/api/chat", json={"model": sim_model, "messages": CHAT["messages"], "stream": False}
        )
        assert r.status_code == 200 and r.json()["done"] is True
        assert sim_stats(sim_proc)["requests"] == before + 1

        # the engine's model by the native path: Ollama's unknown-model 404 (from the sim)
        r = client.post("/api/chat", json={**CHAT, "stream": False})
        assert r.status_code == 404
        assert "not found" in r.json()["error"] and MODEL in r.json()["error"]
        r = client.post("/api/generate", json={"model": MODEL, "prompt": "x"})
        assert r.status_code == 404

        engine_before = engine_metric(engine, "tokens_predicted_total")
        r = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert engine_metric(engine, "tokens_predicted_total") > engine_before
        r = client.post(
            "/v1/chat/completions", json={"model": sim_model, "messages": CHAT["messages"]}
        )
        assert r.status_code == 200 and r.json()["model"] == sim_model

        listed = {m["id"].removesuffix(":latest") for m in client.get("/v1/models").json()["data"]}
        assert {MODEL, sim_model} <= listed
        tags = {m["name"] for m in client.get("/api/tags").json()["models"]}
        assert MODEL not in tags and any(t.startswith(sim_model) for t in tags)
