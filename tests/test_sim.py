"""The Ollama simulator (gpugate.sim), run as a real process and driven by the official SDKs."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import httpx
import ollama
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gpugate.sim import SlotGate, Stats
from tests.processes import Process, start_sim, wait_until

MODEL = "llama3.2"
DEFAULTS = {
    "tokens": 8,
    "token_delay_s": 0.001,
    "parallel": 4,
    "fail_mode": "none",
    "load_time_s": 0,
    "max_loaded": 0,
}
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def sim() -> Iterator[Process]:
    proc = start_sim("--token-delay", "0.001")
    yield proc
    proc.stop()


@pytest.fixture
def url(sim: Process) -> str:
    """The shared simulator, back to the default config with zeroed counters."""
    configure(sim.url, **DEFAULTS)
    wait_until(lambda: stats(sim.url)["in_flight"] == 0, timeout=2, what="an idle simulator")
    httpx.post(sim.url + "/sim/reset").raise_for_status()
    return sim.url


def stats(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/sim/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def configure(url: str, **changes: Any) -> None:
    httpx.put(url + "/sim/config", json=changes).raise_for_status()


def first_line(response: httpx.Response) -> Iterator[str]:
    """Read one line; keep the iterator returned: dropping it closes the response."""
    lines = response.iter_lines()
    next(lines)
    return lines


def openai_client(url: str, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, **kwargs)


# --- the SDKs work against it -----------------------------------------------------------


def test_ollama_sdk_generate(url: str) -> None:
    with ollama.Client(host=url) as client:
        whole = client.generate(model=MODEL, prompt="Why is the sky blue?")
        parts = list(client.generate(model=MODEL, prompt="Why is the sky blue?", stream=True))
    assert whole.done and whole.done_reason == "stop"
    assert whole.eval_count == 8 and len(whole.response.split()) == 8
    assert whole.total_duration and whole.eval_duration and whole.prompt_eval_count
    assert whole.context
    assert [p.done for p in parts] == [False] * 8 + [True]
    assert "".join(p.response for p in parts) == whole.response
    assert parts[-1].done_reason == "stop" and parts[-1].eval_count == 8
    assert parts[0].model == MODEL and parts[0].created_at


def test_ollama_sdk_chat(url: str) -> None:
    with ollama.Client(host=url) as client:
        whole = client.chat(model=MODEL, messages=MESSAGES)
        parts = list(client.chat(model=MODEL, messages=MESSAGES, stream=True))
    assert whole.message.role == "assistant" and whole.done_reason == "stop"
    assert len(whole.message.content.split()) == 8
    assert "".join(p.message.content for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == 8 and parts[-1].total_duration


def test_ollama_sdk_metadata(url: str) -> None:
    with ollama.Client(host=url) as client:
        names = [m.model for m in client.list().models]
        client.generate(model="qwen2.5:0.5b", prompt="hi")
        running = [m.model for m in client.ps().models]
        shown = client.show(MODEL)
    assert names == ["llama3.2:latest", "qwen2.5:0.5b"]
    assert "qwen2.5:0.5b" in running
    assert shown.details and shown.details.family == "llama"
    assert httpx.get(url + "/api/version").json() == {"version": "0.6.0"}
    assert httpx.get(url + "/").text == "Ollama is running"


def test_openai_sdk_chat(url: str) -> None:
    with openai_client(url) as client:
        whole = client.chat.completions.create(model=MODEL, messages=MESSAGES)
        stream = client.chat.completions.create(
            model=MODEL,
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage and whole.usage.completion_tokens == 8
    content = whole.choices[0].message.content
    assert content and len(content.split()) == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage and chunks[-1].usage.total_tokens > 8
    # The same conversation gets the same reply on the native API.
    native = httpx.post(
        url + "/api/chat", json={"model": MODEL, "messages": MESSAGES, "stream": False}
    )
    assert native.json()["message"]["content"] == content


def test_openai_sdk_completions_and_models(url: str) -> None:
    with openai_client(url) as client:
        whole = client.completions.create(model=MODEL, prompt="Why is the sky blue?")
        parts = list(
            client.completions.create(model=MODEL, prompt="Why is the sky blue?", stream=True)
        )
        capped = client.completions.create(model=MODEL, prompt="Why is the sky blue?", max_tokens=3)
        models = [m.id for m in client.models.list()]
    text = whole.choices[0].text
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "stop"
    assert "".join(p.choices[0].text for p in parts) == text
    assert parts[-1].choices[0].finish_reason == "stop"
    assert capped.choices[0].finish_reason == "length"
    assert capped.choices[0].text == " ".join(text.split()[:3])
    assert models == ["llama3.2:latest", "qwen2.5:0.5b"]


def anthropic_client(url: str, **kwargs: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="x", max_retries=0, **kwargs)


def text_of(message: anthropic.types.Message) -> str:
    block = message.content[0]
    assert isinstance(block, anthropic.types.TextBlock)
    return block.text


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(value * value for value in vector))


def test_ollama_sdk_embed_and_embeddings(url: str) -> None:
    with ollama.Client(host=url) as client:
        one = client.embed(model=MODEL, input="Why is the sky blue?")
        two = client.embed(model=MODEL, input=["Why is the sky blue?", "hello"])
        other_model = client.embed(model="qwen2.5:0.5b", input="Why is the sky blue?")
        cut = client.embed(model=MODEL, input="Why is the sky blue?", dimensions=64)
        older = client.embeddings(model=MODEL, prompt="Why is the sky blue?")
        nothing = client.embed(model=MODEL, input=[])
    vector = list(one.embeddings[0])
    assert len(vector) == 384 and abs(norm(vector) - 1) < 1e-5
    assert one.model == MODEL and one.prompt_eval_count == 5
    assert one.total_duration and one.load_duration and one.total_duration >= one.load_duration
    assert list(two.embeddings[0]) == vector and list(two.embeddings[1]) != vector
    assert two.prompt_eval_count == 6
    assert list(other_model.embeddings[0]) != vector
    assert len(cut.embeddings[0]) == 64 and abs(norm(list(cut.embeddings[0])) - 1) < 1e-5
    assert max(abs(a - b) for a, b in zip(older.embedding, vector, strict=True)) < 1e-7
    assert nothing.embeddings == []  # an empty input only loads the model
    assert stats(url)["completed"] == 6


def test_openai_sdk_embeddings(url: str) -> None:
    with openai_client(url) as client:
        default = client.embeddings.create(model=MODEL, input=["Why is the sky blue?", "hi"])
        floats = client.embeddings.create(
            model=MODEL, input="Why is the sky blue?", encoding_format="float"
        )
    raw = httpx.post(url + "/v1/embeddings", json={"model": MODEL, "input": "x"}).json()
    assert isinstance(raw["data"][0]["embedding"], list)  # float unless base64 is asked
    encoded = httpx.post(
        url + "/v1/embeddings",
        json={"model": MODEL, "input": "x", "encoding_format": "base64"},
    ).json()
    assert isinstance(encoded["data"][0]["embedding"], str)
    assert [d.index for d in default.data] == [0, 1] and default.model == MODEL
    assert default.usage.prompt_tokens == default.usage.total_tokens == 6
    by_base64, by_float = default.data[0].embedding, floats.data[0].embedding
    assert len(by_base64) == 384
    assert max(abs(a - b) for a, b in zip(by_base64, by_float, strict=True)) < 1e-7
    with ollama.Client(host=url) as native:
        same = native.embed(model=MODEL, input="Why is the sky blue?").embeddings[0]
    assert max(abs(a - b) for a, b in zip(by_float, same, strict=True)) < 1e-7


def test_openai_sdk_models_retrieve(url: str) -> None:
    with openai_client(url) as client:
        model = client.models.retrieve(MODEL)
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("nope")
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "library")


def test_openai_sdk_responses(url: str) -> None:
    with openai_client(url) as client:
        whole = client.responses.create(model=MODEL, input="Why is the sky blue?")
        events = list(
            client.responses.create(model=MODEL, input="Why is the sky blue?", stream=True)
        )
        capped = client.responses.create(
            model=MODEL, input="Why is the sky blue?", max_output_tokens=3, instructions="Be brief."
        )
    assert (
        whole.object == "response" and whole.status == "completed" and whole.id.startswith("resp_")
    )
    assert len(whole.output_text.split()) == 8
    assert whole.usage and whole.usage.output_tokens == 8
    assert whole.usage.total_tokens == whole.usage.input_tokens + 8
    kinds = [event.type for event in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[4:12] == ["response.output_text.delta"] * 8
    assert kinds[12:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    done = events[-1]
    assert done.type == "response.completed" and done.response.output_text == whole.output_text
    assert done.response.usage == whole.usage
    assert len(capped.output_text.split()) == 3  # the instructions change the reply
    assert capped.instructions == "Be brief." and capped.max_output_tokens == 3
    assert capped.usage and capped.usage.output_tokens == 3


def test_anthropic_sdk_messages(url: str) -> None:
    messages: list[anthropic.types.MessageParam] = [
        {"role": "user", "content": "Why is the sky blue?"}
    ]
    with anthropic_client(url) as client:
        whole = client.messages.create(model=MODEL, max_tokens=100, messages=messages)
        events = list(
            client.messages.create(model=MODEL, max_tokens=100, messages=messages, stream=True)
        )
        capped = client.messages.create(model=MODEL, max_tokens=3, messages=messages)
        with client.messages.stream(model=MODEL, max_tokens=100, messages=messages) as stream:
            streamed = stream.get_final_message()
    assert whole.id.startswith("msg_") and whole.role == "assistant" and whole.model == MODEL
    assert whole.stop_reason == "end_turn" and whole.usage.output_tokens == 8
    text = text_of(whole)
    assert len(text.split()) == 8
    kinds = [event.type for event in events]
    assert kinds == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 8,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start, delta = events[0], events[-2]
    assert (
        start.type == "message_start"
        and start.message.usage.input_tokens == whole.usage.input_tokens
    )
    assert delta.type == "message_delta" and delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == 8
    assert text_of(streamed) == text
    assert streamed.usage.input_tokens == whole.usage.input_tokens
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 3


def test_token_counts_agree_across_apis(url: str) -> None:
    """One conversation: the same reply and the same token counts on every chat API."""
    conversation = [{"role": "user", "content": "Why is the sky blue?"}]
    native = httpx.post(
        url + "/api/chat", json={"model": MODEL, "messages": conversation, "stream": False}
    ).json()
    with openai_client(url) as oa, anthropic_client(url) as an:
        chat = oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        response = oa.responses.create(
            model=MODEL, input=[{"role": "user", "content": "Why is the sky blue?"}]
        )
        message = an.messages.create(
            model=MODEL,
            max_tokens=100,
            messages=[{"role": "user", "content": "Why is the sky blue?"}],
        )
    prompt, output = native["prompt_eval_count"], native["eval_count"]
    assert chat.usage and (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
        prompt,
        output,
    )
    assert response.usage and (response.usage.input_tokens, response.usage.output_tokens) == (
        prompt,
        output,
    )
    assert (message.usage.input_tokens, message.usage.output_tokens) == (prompt, output)
    text = native["message"]["content"]
    assert chat.choices[0].message.content == response.output_text == text
    assert text_of(message) == text


def test_errors_on_the_newer_paths(url: str) -> None:
    with openai_client(url) as oa, pytest.raises(openai.NotFoundError) as not_found:
        oa.responses.create(model="nope", input="hi")
    assert not_found.value.body == {
        "message": 'model "nope" not found, try pulling it first',
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with anthropic_client(url) as an, pytest.raises(anthropic.NotFoundError) as missing:
        an.messages.create(
            model="nope", max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    body = missing.value.body
    assert isinstance(body, dict) and body["type"] == "error"
    assert body["error"] == {
        "type": "not_found_error",
        "message": 'model "nope" not found, try pulling it first',
    }
    assert body["request_id"].startswith("req_")
    no_max = httpx.post(
        url + "/v1/messages", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    )
    assert no_max.status_code == 400
    assert no_max.json()["error"] == {
        "type": "invalid_request_error",
        "message": "max_tokens is required and must be positive",
    }
    bad_format = httpx.post(
        url + "/v1/embeddings", json={"model": MODEL, "input": "x", "encoding_format": "int8"}
    )
    assert bad_format.status_code == 400
    assert bad_format.json()["error"]["message"].startswith("Invalid value for 'encoding_format'")
    bad_input = httpx.post(url + "/api/embed", json={"model": MODEL, "input": [1, 2]})
    assert (bad_input.status_code, bad_input.json()) == (400, {"error": "invalid input type"})
    unknown = httpx.post(url + "/api/embed", json={"model": "nope", "input": "x"})
    assert unknown.json() == {"error": 'model "nope" not found, try pulling it first'}
    bad_keep_alive = httpx.post(url + "/api/generate", json={"model": MODEL, "keep_alive": "soon"})
    assert bad_keep_alive.json() == {"error": 'time: invalid duration "soon"'}
    assert stats(url)["failed"] == 7


def test_root_version_and_tags_answer_head_as_in_ollama(url: str) -> None:
    for path in ("/", "/api/version", "/api/tags"):
        head = httpx.head(url + path)
        assert head.status_code == 200 and head.content == b"", path
    assert httpx.head(url + "/api/ps").status_code == 405  # GET only, as in Gin
    wrong = httpx.get(url + "/api/generate")
    assert (wrong.status_code, wrong.text) == (405, "405 method not allowed")
    assert httpx.get(url + "/api/nothing").text == "404 page not found"
    shown = httpx.post(url + "/api/show", json={"model": "nope"})
    assert (shown.status_code, shown.json()) == (404, {"error": "model 'nope:latest' not found"})
    assert httpx.post(url + "/api/show", content=b"").json() == {"error": "missing request body"}


def test_langchain_ollama(url: str) -> None:
    import langchain_ollama

    chat = langchain_ollama.ChatOllama(model=MODEL, base_url=url, validate_model_on_init=True)
    embeddings = langchain_ollama.OllamaEmbeddings(model=MODEL, base_url=url)
    try:
        reply = chat.invoke("Why is the sky blue?")
        streamed = "".join(str(chunk.content) for chunk in chat.stream("Why is the sky blue?"))
        vector = embeddings.embed_query("hello")
    finally:  # langchain keeps its ollama.Client open; close its sockets here
        chat._client.close()
        embeddings._client.close()
    assert isinstance(reply.content, str) and len(reply.content.split()) == 8
    assert streamed == reply.content
    assert reply.usage_metadata and reply.usage_metadata["output_tokens"] == 8
    assert len(vector) == 384


# --- content, errors -------------------------------------------------------------------


def generate_text(url: str, prompt: str, model: str = MODEL, **extra: Any) -> str:
    body = {"model": model, "prompt": prompt, "stream": False, **extra}
    response = httpx.post(url + "/api/generate", json=body)
    response.raise_for_status()
    text: str = response.json()["response"]
    return text


def test_content_is_a_function_of_model_and_prompt(url: str) -> None:
    first = generate_text(url, "hello")
    assert generate_text(url, "hello") == first
    assert generate_text(url, "hello", model="llama3.2:latest") == first
    assert generate_text(url, "hello there") != first
    assert generate_text(url, "hello", model="qwen2.5:0.5b") != first
    capped = generate_text(url, "hello", options={"num_predict": 2})
    assert capped == " ".join(first.split()[:2])


def test_unknown_model_is_404_everywhere(url: str) -> None:
    with ollama.Client(host=url) as client:
        with pytest.raises(ollama.ResponseError) as caught:
            client.generate(model="nope", prompt="hi")
        assert caught.value.status_code == 404
        assert caught.value.error == 'model "nope" not found, try pulling it first'
        with pytest.raises(ollama.ResponseError) as caught:
            list(client.chat(model="nope", messages=MESSAGES, stream=True))
        assert caught.value.status_code == 404
    with openai_client(url) as oa, pytest.raises(openai.NotFoundError) as not_found:
        oa.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
    assert not_found.value.body == {
        "message": 'model "nope" not found, try pulling it first',
        "type": "api_error",
        "param": None,
        "code": None,
    }
    streamed = httpx.post(url + "/api/chat", json={"model": "nope", "messages": MESSAGES})
    assert streamed.status_code == 404
    assert streamed.headers["content-type"].startswith("application/json")


def test_bad_requests_are_400(url: str) -> None:
    missing = httpx.post(url + "/api/chat", json={"messages": MESSAGES})
    assert (missing.status_code, missing.json()) == (400, {"error": "model is required"})
    malformed = httpx.post(url + "/api/generate", content=b'{"model": ')
    assert malformed.status_code == 400 and "error" in malformed.json()
    empty = httpx.post(url + "/api/generate", content=b"")
    assert empty.json() == {"error": "missing request body"}
    v1 = httpx.post(url + "/v1/chat/completions", content=b"{oops")
    assert v1.status_code == 400 and v1.json()["error"]["type"] == "invalid_request_error"
    no_messages = httpx.post(url + "/v1/chat/completions", json={"model": MODEL, "messages": []})
    assert no_messages.json()["error"]["message"] == "[] is too short - 'messages'"
    counters = stats(url)
    assert counters["requests"] == counters["failed"] == 5


# --- concurrency, disconnects, failures -------------------------------------------------


@pytest.fixture(scope="module")
def one_slot_sim() -> Iterator[Process]:
    proc = start_sim(
        "--parallel", "1", "--token-delay", "0.05", "--tokens", "4",
        "--models", "llama3.2,tiny:1b",
    )  # fmt: skip
    yield proc
    proc.stop()


def test_cli_options(one_slot_sim: Process) -> None:
    config = stats(one_slot_sim.url)["config"]
    assert config == {
        "models": ["llama3.2", "tiny:1b"],
        "tokens": 4,
        "token_delay_s": 0.05,
        "parallel": 1,
        "fail_mode": "none",
        "load_time_s": 0.0,
        "max_loaded": 0,
    }
    names = [m["name"] for m in httpx.get(one_slot_sim.url + "/api/tags").json()["models"]]
    assert names == ["llama3.2:latest", "tiny:1b"]


def test_requests_beyond_parallel_wait_for_a_slot(one_slot_sim: Process) -> None:
    url = one_slot_sim.url
    httpx.post(url + "/sim/reset").raise_for_status()
    with ThreadPoolExecutor(2) as pool:
        texts = list(pool.map(lambda p: generate_text(url, p), ["one", "two"]))
    assert all(len(text.split()) == 4 for text in texts)
    counters = stats(url)
    assert counters["max_running"] == 1 and counters["max_in_flight"] == 2
    assert counters["completed"] == 2 and counters["in_flight"] == 0


def test_raising_parallel_lets_a_waiter_start(url: str) -> None:
    configure(url, parallel=1, token_delay_s=0.05, tokens=100)
    body = {"model": MODEL, "prompt": "hi"}

    def second_request_first_line() -> str:
        with (
            httpx.Client(base_url=url) as client,
            client.stream("POST", "/api/generate", json=body) as two,
        ):
            return next(two.iter_lines())

    with (
        httpx.Client(base_url=url) as client,
        client.stream("POST", "/api/generate", json=body) as one,
    ):
        _lines = first_line(one)
        with ThreadPoolExecutor(1) as pool:
            second = pool.submit(second_request_first_line)
            wait_until(lambda: stats(url)["waiting"] == 1, timeout=2, what="a waiter")
            assert stats(url)["running"] == 1
            configure(url, parallel=2)
            assert json.loads(second.result(timeout=2))["done"] is False
    wait_until(lambda: stats(url)["in_flight"] == 0, timeout=2, what="in_flight back to 0")
    assert stats(url)["max_running"] == 2


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/generate", {"model": MODEL, "prompt": "hi"}),
        ("/api/chat", {"model": MODEL, "messages": MESSAGES}),
        ("/v1/chat/completions", {"model": MODEL, "messages": MESSAGES, "stream": True}),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "stream": True}),
    ],
)
def test_disconnect_mid_stream_stops_the_request(url: str, path: str, body: Any) -> None:
    configure(url, token_delay_s=0.05, tokens=200)
    with httpx.Client(base_url=url) as client, client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        _lines = first_line(response)
        assert stats(url)["in_flight"] == 1
    wait_until(lambda: stats(url)["in_flight"] == 0, timeout=2, what="in_flight back to 0")
    counters = stats(url)
    assert counters["cancelled"] == 1 and counters["completed"] == 0
    assert counters["running"] == 0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/responses", {"model": MODEL, "input": "hi", "stream": True}),
        ("/v1/messages", {"model": MODEL, "max_tokens": 999, "messages": MESSAGES, "stream": True}),
        ("/api/pull", {"model": "some-model:7b"}),  # not inference: not counted, just answered
    ],
)
def test_disconnect_mid_stream_on_the_newer_apis(url: str, path: str, body: Any) -> None:
    configure(url, token_delay_s=0.05, tokens=200)
    with httpx.Client(base_url=url) as client, client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        _lines = first_line(response)
    wait_until(lambda: stats(url)["in_flight"] == 0, timeout=2, what="in_flight back to 0")
    counters = stats(url)
    inference = path.startswith("/v1/")
    assert (counters["cancelled"], counters["completed"]) == ((1, 0) if inference else (0, 0))
    assert counters["running"] == 0


def test_disconnect_while_waiting_for_a_slot(url: str) -> None:
    configure(url, parallel=1, token_delay_s=0.05, tokens=200)
    body = {"model": MODEL, "prompt": "hi"}
    with httpx.Client(base_url=url) as client:
        with client.stream("POST", "/api/generate", json=body) as holder:
            _lines = first_line(holder)
            with pytest.raises(httpx.ReadTimeout):
                client.post("/api/generate", json={**body, "stream": False}, timeout=0.3)
            wait_until(lambda: stats(url)["cancelled"] == 1, timeout=2, what="the waiter cancelled")
            assert stats(url)["in_flight"] == 1 and stats(url)["waiting"] == 0
    wait_until(lambda: stats(url)["in_flight"] == 0, timeout=2, what="in_flight back to 0")
    assert stats(url)["cancelled"] == 2


def test_fail_mode_error500(url: str) -> None:
    configure(url, fail_mode="error500")
    native = httpx.post(url + "/api/chat", json={"model": MODEL, "messages": MESSAGES})
    assert (native.status_code, native.json()) == (500, {"error": "simulated failure"})
    with ollama.Client(host=url) as client, pytest.raises(ollama.ResponseError) as caught:
        client.generate(model=MODEL, prompt="hi")
    assert (caught.value.status_code, caught.value.error) == (500, "simulated failure")
    with openai_client(url) as oa, pytest.raises(openai.InternalServerError):
        oa.completions.create(model=MODEL, prompt="hi")
    assert httpx.get(url + "/api/tags").status_code == 200
    assert stats(url)["failed"] == 3


def test_fail_mode_error500_in_each_api_shape(url: str) -> None:
    configure(url, fail_mode="error500")
    with anthropic_client(url) as an, pytest.raises(anthropic.InternalServerError) as failed:
        an.messages.create(model=MODEL, max_tokens=10, messages=[{"role": "user", "content": "hi"}])
    body = failed.value.body
    assert isinstance(body, dict)
    assert body["error"] == {"type": "api_error", "message": "simulated failure"}
    with openai_client(url) as oa, pytest.raises(openai.InternalServerError) as oa_failed:
        oa.responses.create(model=MODEL, input="hi")
    assert oa_failed.value.body == {
        "message": "simulated failure",
        "type": "api_error",
        "param": None,
        "code": None,
    }
    embed = httpx.post(url + "/api/embed", json={"model": MODEL, "input": "hi"})
    assert (embed.status_code, embed.json()) == (500, {"error": "simulated failure"})
    assert stats(url)["failed"] == 3


def test_fail_mode_hang(url: str) -> None:
    configure(url, fail_mode="hang")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/api/generate", json={"model": MODEL, "prompt": "hi"}, timeout=0.3)
    with openai_client(url, timeout=0.3) as oa, pytest.raises(openai.APITimeoutError):
        oa.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert httpx.get(url + "/v1/models").status_code == 200
    wait_until(lambda: stats(url)["in_flight"] == 0, timeout=2, what="in_flight back to 0")
    counters = stats(url)
    assert counters["cancelled"] == 2 and counters["max_in_flight"] >= 1


# --- control API ------------------------------------------------------------------------


def test_reset_zeroes_counters_and_maxima(url: str) -> None:
    generate_text(url, "hi")
    before = stats(url)
    assert before["requests"] == before["completed"] == 1 and before["max_running"] == 1
    reset = httpx.post(url + "/sim/reset").json()
    counters = {k: v for k, v in reset.items() if k not in ("config", "loads_by_model")}
    assert counters == dict.fromkeys(counters, 0)
    assert reset["loads_by_model"] == {}


def test_config_changes_are_validated(url: str) -> None:
    bad: dict[str, Any]
    for bad in ({"parallel": 0}, {"fail_mode": "explode"}, {"models": []}, {"tokens": "8"}):
        response = httpx.put(url + "/sim/config", json=bad)
        assert response.status_code == 400, bad
    response = httpx.put(url + "/sim/config", content=json.dumps({"tokens": 3}))
    assert response.json()["tokens"] == 3
    assert len(generate_text(url, "hi").split()) == 3


# --- the slot gate, in process ----------------------------------------------------------


async def test_slot_gate_is_fifo_and_skips_cancelled_waiters() -> None:
    stats = Stats()
    gate = SlotGate(lambda: 1, stats)
    await gate.acquire()
    order: list[str] = []

    async def use(name: str) -> None:
        await gate.acquire()
        order.append(name)
        gate.release()

    tasks = {name: asyncio.create_task(use(name)) for name in "abc"}
    await asyncio.sleep(0)
    assert gate.waiting == 3
    tasks["b"].cancel()
    gate.release()
    await asyncio.gather(tasks["a"], tasks["c"])
    assert order == ["a", "c"]
    assert (stats.running, stats.max_running, gate.waiting) == (0, 1, 0)


async def test_slot_gate_takes_back_a_slot_handed_to_a_cancelled_waiter() -> None:
    stats = Stats()
    gate = SlotGate(lambda: 1, stats)
    await gate.acquire()
    waiter = asyncio.create_task(gate.acquire())
    await asyncio.sleep(0)
    gate.release()  # hands the slot to `waiter`...
    waiter.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert stats.running == 0
    late = asyncio.create_task(gate.acquire())  # queues behind nobody: gets the free slot
    await asyncio.wait_for(late, timeout=1)
    assert stats.running == 1


@pytest.mark.parametrize(
    "raw",
    [
        '{"model": "llama3.2", "prompt": "\\ud800", "stream": false}',  # a lone surrogate
        '{"model": "llama3.2", "prompt": "x", "stream": false, "options": {"num_predict": 1e400}}',
    ],
)
def test_odd_but_valid_json_is_answered_not_a_500(url: str, raw: str) -> None:
    r = httpx.post(url + "/api/generate", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 200, r.text
    assert r.json()["done"] is True
