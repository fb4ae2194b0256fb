"""The clients people point at Ollama, unchanged but for their base URL, through the
gateway to the simulator: the openai, ollama and anthropic SDKs, LiteLLM's providers,
langchain-ollama, and the README's curl examples as printed. Plus what every new path
owes the gate: embeddings under the cap, metadata that never waits for a slot, model
management only for those allowed, bad bodies refused before anything is created."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time
import warnings
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest

from shared import keys
from tests.conftest import Stack, StackFactory, sim_stats
from tests.processes import ROOT, Process, start_sim, wait_until

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network at import

MODEL = "llama3.2"
EMBED_MODEL = MODEL  # Ollama embeds with any model; the simulator too
ADMIN_KEY = "clients-admin"


@pytest.fixture(scope="module")
def gate(redis_proc: Process, sim_proc: Process) -> Iterator[Stack]:
    from tests.conftest import build_stack

    stack = build_stack(
        redis_proc,
        sim_proc,
        rate_limit="100000/minute",
        burst=10000,
        health_rate_limit="100000/minute",
        admin_key=ADMIN_KEY,
        gpu_concurrency=4,
    )
    yield stack
    stack.stop()


def test_openai_sdk_every_inference_call(gate: Stack) -> None:
    with openai.OpenAI(base_url=gate.url + "/v1", api_key="sk-openai") as client:
        _openai_calls(client)


def _openai_calls(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content
    streamed = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    completion = client.completions.create(model=MODEL, prompt="hi")
    assert completion.choices[0].text
    vectors = client.embeddings.create(model=EMBED_MODEL, input=["a", "b"])
    assert len(vectors.data) == 2 and len(vectors.data[0].embedding) > 10
    assert client.models.retrieve(MODEL).id == MODEL
    assert MODEL + ":latest" in [m.id for m in client.models.list()]
    response = client.responses.create(model=MODEL, input="hi")
    assert response.output_text
    events = [e.type for e in client.responses.create(model=MODEL, input="hi", stream=True)]
    assert events[0] == "response.created" and events[-1] == "response.completed"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_ollama_sdk_every_call_of_a_local_server(gate: Stack) -> None:
    client = ollama.Client(host=gate.url, headers={"X-Admin-Key": ADMIN_KEY})
    try:
        _ollama_calls(client)
    finally:
        client._client.close()


def _ollama_calls(client: ollama.Client) -> None:
    assert client.generate(model=MODEL, prompt="hi").response
    assert "".join(p.response for p in client.generate(model=MODEL, prompt="hi", stream=True))
    assert client.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}]).message.content
    assert len(client.embed(model=EMBED_MODEL, input=["a", "b"]).embeddings) == 2
    assert len(client.embeddings(model=EMBED_MODEL, prompt="a").embedding) > 10
    assert client.show(MODEL).modelfile is not None
    assert MODEL + ":latest" in [m.model for m in client.list().models]
    client.ps()
    progress = [p.status for p in client.pull("tinyllama", stream=True)]
    assert progress[-1] == "success"
    assert client.create(model="mine", from_="tinyllama").status == "success"
    assert client.copy("mine", "mine-too").status == "success"
    assert client.delete("mine-too").status == "success"
    assert "mine:latest" in [m.model for m in client.list().models]
    with pytest.raises(ollama.ResponseError) as unknown:
        client.generate(model="nope", prompt="x")
    assert unknown.value.status_code == 404


def test_ollama_sdk_without_the_admin_key_cannot_manage_models(
    gate: Stack, sim_proc: Process
) -> None:
    client = ollama.Client(host=gate.url)
    with pytest.raises(ollama.ResponseError) as refused:
        client.pull("never-pulled")
    client._client.close()
    assert refused.value.status_code == 403
    names = [m["name"] for m in httpx.get(sim_proc.url + "/api/tags").json()["models"]]
    assert not any(n.startswith("never-pulled") for n in names)


def test_anthropic_sdk_messages(gate: Stack) -> None:
    with anthropic.Anthropic(base_url=gate.url, api_key="sk-ant") as client:
        message = client.messages.create(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
        assert message.content[0].text  # type: ignore[union-attr]
        with client.messages.stream(
            model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join(stream.text_stream)
    assert text


def test_litellm_providers(gate: Stack) -> None:
    import litellm

    messages = [{"role": "user", "content": "hi"}]
    try:
        for model in (f"ollama/{MODEL}", f"ollama_chat/{MODEL}"):
            reply = litellm.completion(model=model, messages=messages, api_base=gate.url)
            assert reply.choices[0].message.content
            chunks = litellm.completion(
                model=model, messages=messages, api_base=gate.url, stream=True
            )
            assert "".join(c.choices[0].delta.content or "" for c in chunks)
        via_openai = litellm.completion(
            model=f"openai/{MODEL}", messages=messages, api_base=gate.url + "/v1", api_key="sk"
        )
        assert via_openai.choices[0].message.content
        vectors = litellm.embedding(model=f"ollama/{EMBED_MODEL}", input=["a"], api_base=gate.url)
        assert len(vectors.data[0]["embedding"]) > 10
    finally:
        close_litellm_leftovers(litellm)


def close_litellm_leftovers(litellm: Any) -> None:
    """LiteLLM keeps its clients for the life of the process, and its openai/ route sets an
    event loop in the main thread that it never closes: close them, or their sockets and
    the loop are left to the garbage collector (a ResourceWarning, an error here) in
    whichever test runs next."""
    cache = litellm.in_memory_llm_clients_cache
    for client in list(cache.cache_dict.values()):
        if isinstance(client, openai.OpenAI | litellm.llms.custom_httpx.http_handler.HTTPHandler):
            client.close()
    cache.flush_cache()
    with warnings.catch_warnings():  # Python 3.12+ warns when this creates the loop instead
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # none set (after an asyncio.run() in this thread, LiteLLM sets none)
            return
    loop.close()
    asyncio.set_event_loop(None)


def test_langchain_ollama(gate: Stack) -> None:
    from langchain_ollama import ChatOllama, OllamaEmbeddings, OllamaLLM

    chat = ChatOllama(model=MODEL, base_url=gate.url)
    llm = OllamaLLM(model=MODEL, base_url=gate.url)
    embeddings = OllamaEmbeddings(model=EMBED_MODEL, base_url=gate.url)
    try:
        assert chat.invoke("hi").content
        assert "".join(str(c.content) for c in chat.stream("hi"))
        assert llm.invoke("hi")
        assert len(embeddings.embed_query("hi")) > 10
    finally:  # langchain keeps its ollama.Client open; close its sockets here
        for client in (chat, llm, embeddings):
            client._client.close()  # type: ignore[union-attr]


def readme_curl_blocks() -> list[str]:
    """Every shell block of the README that calls the API with curl, as printed."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [b for b in blocks if "curl " in b and "http://127.0.0.1:8000" in b]


def test_every_readme_curl_example_works_as_printed(make_stack: StackFactory) -> None:
    """Each block runs in bash against a stack with the default limits (the 429 example
    counts on them), the admin key in GPUGATE_ADMIN_KEY as the README says to set."""
    stack = make_stack(admin_key=ADMIN_KEY)
    blocks = readme_curl_blocks()
    assert len(blocks) >= 5, blocks
    env = {**os.environ, "GPUGATE_ADMIN_KEY": ADMIN_KEY}
    for block in blocks:
        script = "set -euo pipefail\n" + block.replace("http://127.0.0.1:8000", stack.url)
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=120
        )
        assert done.returncode == 0, f"{block}\n-> {done.stdout[-500:]} {done.stderr[-500:]}"
        if "seq 11" in block:  # the 429 example: ten served, then refused
            assert sorted(done.stdout.split()) == ["200"] * 10 + ["429"], done.stdout
        elif "-X DELETE" in block:  # the job example: its read succeeded, the cancel 409
            assert '"status":"succeeded"' in done.stdout, done.stdout
            assert done.stdout.rstrip().endswith(
                '"error":"conflict","message":"The job has already finished (succeeded)."}'
            )
        else:
            assert '"error"' not in done.stdout, f"{block}\n-> {done.stdout[-800:]}"


def readme_key_session() -> list[str]:
    """The commands of the README's console session that manages keys: its `$ ` lines,
    with the lines that continue a quote they opened (the others are what they print)."""
    text = (ROOT / "README.md").read_text()
    (block,) = [b for b in re.findall(r"```console\n(.*?)```", text, re.S) if "team-a-app" in b]
    commands: list[str] = []
    for line in block.splitlines():
        if line.startswith("$ "):
            commands.append(line[2:])
        elif commands and commands[-1].count("'") % 2 == 1:
            commands[-1] += "\n" + line
    return commands


def test_the_readme_key_session_works_as_printed(make_stack: StackFactory) -> None:
    """Each command as printed, in order; its two assignments set what they say (the admin
    key for `...`, the key the create showed for `gg_...`). No answer is an error."""
    stack = make_stack(admin_key=ADMIN_KEY)
    commands = readme_key_session()
    assert len(commands) >= 8, commands
    env = {**os.environ, "GPUGATE_ADMIN_KEY": ADMIN_KEY, "A": f"X-Admin-Key: {ADMIN_KEY}"}
    answers = []
    for command in commands:
        if command.startswith(("export ", "KEY=")):
            continue  # the variables are set here as the lines say
        script = "set -euo pipefail\n" + command.replace("localhost:8000", stack.url)
        done = subprocess.run(
            ["bash", "-c", script], capture_output=True, text=True, env=env, timeout=60
        )
        assert done.returncode == 0, f"{command}\n-> {done.stderr[-500:]}"
        assert '"error"' not in done.stdout, f"{command}\n-> {done.stdout[-800:]}"
        answers.append(json.loads(done.stdout))
        if "KEY" not in env:
            env["KEY"] = answers[0]["key"]  # shown this once
    created, me = answers[0], answers[1]
    assert created["name"] == "team-a-app" and created["key"].startswith("gg_"), created
    assert me["name"] == "team-a-app" and me["max_running"] == 2, me
    assert answers[-1]["events"], answers[-1]  # the audit names the changes


def test_embeddings_at_three_times_the_cap_never_exceed_it(make_stack: StackFactory) -> None:
    slow = start_sim("--tokens", "5", "--token-delay", "0.05", "--parallel", "64")
    try:
        stack = make_stack(ollama_url=slow.url, gpu_concurrency=2, burst=100)

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=stack.url, timeout=60) as client:
                bodies = [{"model": EMBED_MODEL, "input": f"text {i}"} for i in range(6)]
                answers = await asyncio.gather(
                    *(
                        client.post(p, json=b)
                        for p in ("/api/embed", "/v1/embeddings")
                        for b in bodies
                    )
                )
            return [a.status_code for a in answers]

        assert asyncio.run(burst()) == [200] * 12
        assert sim_stats(slow)["max_in_flight"] == 2
    finally:
        slow.stop()


def test_metadata_answers_while_every_slot_is_busy_and_the_queue_is_full(
    make_stack: StackFactory,
) -> None:
    slow = start_sim("--tokens", "40", "--token-delay", "0.1", "--parallel", "64")
    try:
        stack = make_stack(ollama_url=slow.url, gpu_concurrency=1, max_queue_depth=2, burst=100)
        with stack.client("busy") as client:
            for _ in range(3):
                r = client.post(
                    "/v1/jobs",
                    json={"endpoint": "/api/generate", "body": {"model": MODEL, "prompt": "go"}},
                )
                assert r.status_code == 202
            wait_until(
                lambda: client.get("/v1/queue").json()["queue_depth"] == 2, what="a full queue"
            )
            full = client.post("/api/generate", json={"model": MODEL, "prompt": "go"})
            assert full.status_code == 429 and full.json()["error"] == "queue_full"
            for method, path, body in (
                ("GET", "/", None),
                ("HEAD", "/", None),
                ("HEAD", "/api/version", None),
                ("HEAD", "/api/tags", None),
                ("GET", "/api/tags", None),
                ("POST", "/api/show", {"model": MODEL}),
                ("GET", f"/v1/models/{MODEL}", None),
                ("GET", "/api/ps", None),
            ):
                started = time.monotonic()
                r = client.request(method, path, json=body)
                assert r.status_code == 200, (path, r.text)
                assert time.monotonic() - started < 2, path
            assert client.get("/").text == "Ollama is running"
    finally:
        slow.stop()


BAD_BODIES = {
    "/api/embed": ({"model": MODEL}, "input"),
    "/api/embeddings": ({"model": MODEL}, "prompt"),
    "/v1/embeddings": ({"input": "x"}, "model"),
    "/v1/responses": ({"model": MODEL, "input": 3}, "input"),
    "/v1/messages": ({"model": MODEL}, "messages"),
}


def test_bad_bodies_on_the_new_paths_are_422_and_create_nothing(gate: Stack) -> None:
    with gate.client("bad-bodies") as client, gate.redis() as rdb:
        before = rdb.hget(keys.STATS, "jobs_admitted")
        for path, (body, field) in BAD_BODIES.items():
            for content_type in ("application/json", None, "text/plain"):
                headers = {"content-type": content_type} if content_type else {}
                r = client.post(
                    path, content=httpx.Request("POST", "/", json=body).content, headers=headers
                )
                assert r.status_code == 422, (path, r.text)
                assert r.json()["error"] == "invalid_request" and field in r.json()["message"]
        assert rdb.hget(keys.STATS, "jobs_admitted") == before


@pytest.mark.parametrize(
    "content_type", [None, "application/x-www-form-urlencoded", "text/plain", "text/html"]
)
def test_a_json_body_is_read_whatever_the_content_type(
    gate: Stack, content_type: str | None
) -> None:
    body = b'{"model": "llama3.2", "prompt": "hi", "stream": false}'
    headers = {"content-type": content_type} if content_type else {}
    with gate.client("any-type") as client:
        plain = client.post(
            "/api/generate", content=body, headers={"content-type": "application/json"}
        )
        other = client.post("/api/generate", content=body, headers=headers)
    assert other.status_code == plain.status_code == 200
    assert other.json()["response"] == plain.json()["response"]


def test_an_admin_body_is_read_whatever_the_content_type(gate: Stack) -> None:
    with gate.client() as client:
        r = client.put(
            "/admin/concurrency",
            content=b'{"gpu_concurrency": 5}',
            headers={"X-Admin-Key": ADMIN_KEY, "content-type": "application/x-www-form-urlencoded"},
        )
        assert r.status_code == 200, r.text
        assert client.get("/v1/queue").json()["gpu_concurrency"] == 5
        client.put(
            "/admin/concurrency", json={"gpu_concurrency": 4}, headers={"X-Admin-Key": ADMIN_KEY}
        )
