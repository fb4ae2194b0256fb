"""The official `openai` and `ollama` SDKs, unchanged, through the gateway: the same
content as from the simulator directly, streamed and not, and the errors they know."""

from __future__ import annotations

import ollama
import openai
import pytest

from tests.conftest import Stack
from tests.processes import Process

MESSAGES = [{"role": "user", "content": "Why is the sky blue?"}]


def openai_client(url: str, key: str = "sdk-key") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0)


def test_openai_chat_equals_the_simulator(stack: Stack, sim_proc: Process) -> None:
    with openai_client(stack.url) as gw, openai_client(sim_proc.url) as direct:
        via = gw.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        ref = direct.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
    assert via.choices[0].message.content == ref.choices[0].message.content
    assert via.choices[0].message.content
    assert via.choices[0].finish_reason == "stop"


def test_openai_chat_streamed_equals_the_simulator(stack: Stack, sim_proc: Process) -> None:
    def collect(client: openai.OpenAI) -> str:
        stream = client.chat.completions.create(
            model="llama3.2",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    with openai_client(stack.url) as gw, openai_client(sim_proc.url) as direct:
        assert collect(gw) == collect(direct) != ""


def test_openai_completions_equal_the_simulator(stack: Stack, sim_proc: Process) -> None:
    with openai_client(stack.url) as gw, openai_client(sim_proc.url) as direct:
        via = gw.completions.create(model="llama3.2", prompt="Once upon a time")
        ref = direct.completions.create(model="llama3.2", prompt="Once upon a time")
    assert via.choices[0].text == ref.choices[0].text != ""


def test_openai_models_list(stack: Stack, sim_proc: Process) -> None:
    with openai_client(stack.url) as gw, openai_client(sim_proc.url) as direct:
        assert [m.id for m in gw.models.list()] == [m.id for m in direct.models.list()]


def test_openai_unknown_model_raises_not_found(stack: Stack) -> None:
    with openai_client(stack.url) as gw, pytest.raises(openai.NotFoundError):
        gw.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]


def test_openai_sdk_sees_rate_limit_errors(stack: Stack, key: str) -> None:
    with openai_client(stack.url, key) as gw:
        for _ in range(10):
            gw.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.RateLimitError) as caught:
            gw.chat.completions.create(model="llama3.2", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.response.headers["Retry-After"]


def test_ollama_generate_equals_the_simulator(stack: Stack, sim_proc: Process) -> None:
    with ollama.Client(host=stack.url) as gw, ollama.Client(host=sim_proc.url) as direct:
        via = gw.generate(model="llama3.2", prompt="hello", stream=False)
        ref = direct.generate(model="llama3.2", prompt="hello", stream=False)
    assert via.response == ref.response != ""
    assert via.done and via.done_reason == "stop"


def test_ollama_generate_streamed_equals_the_simulator(stack: Stack, sim_proc: Process) -> None:
    def collect(host: str) -> str:
        with ollama.Client(host=host) as client:
            parts = client.generate(model="llama3.2", prompt="hello", stream=True)
            return "".join(p.response for p in parts)

    assert collect(stack.url) == collect(sim_proc.url) != ""


def test_ollama_chat_equals_the_simulator(stack: Stack, sim_proc: Process) -> None:
    with ollama.Client(host=stack.url) as gw, ollama.Client(host=sim_proc.url) as direct:
        via = gw.chat(model="llama3.2", messages=MESSAGES, stream=False)
        ref = direct.chat(model="llama3.2", messages=MESSAGES, stream=False)
    assert via.message.content == ref.message.content != ""


def test_ollama_chat_streamed_equals_the_simulator(stack: Stack, sim_proc: Process) -> None:
    def collect(host: str) -> str:
        with ollama.Client(host=host) as client:
            parts = client.chat(model="llama3.2", messages=MESSAGES, stream=True)
            return "".join(p.message.content or "" for p in parts)

    assert collect(stack.url) == collect(sim_proc.url) != ""


def test_ollama_list(stack: Stack, sim_proc: Process) -> None:
    with ollama.Client(host=stack.url) as gw, ollama.Client(host=sim_proc.url) as direct:
        via = [m.model for m in gw.list().models]
        assert via == [m.model for m in direct.list().models]
    assert "llama3.2:latest" in via or "llama3.2" in via


def test_ollama_unknown_model_raises_its_404(stack: Stack) -> None:
    for stream in (False, True):
        with ollama.Client(host=stack.url) as gw, pytest.raises(ollama.ResponseError) as caught:
            result = gw.generate(model="no-such-model", prompt="x", stream=stream)
            if stream:
                list(result)  # type: ignore[arg-type]
        assert caught.value.status_code == 404
        assert "not found" in caught.value.error
