"""OpenAI's Files and Batch API over the queue, end to end with the `openai` SDK against the
simulator: chat, embeddings and native batches; invalid files; cancel; expiry; a worker
killed mid-batch; the batch band below interactive work."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gpugate.testing.stack import start_redis, start_sim
from shared import keys
from tests.conftest import Stack, StackFactory, build_stack, sim_stats
from tests.processes import ROOT, Process, wait_until

CHAT = "/v1/chat/completions"


_clients: list[OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Any:
    """Every SDK client of a test is closed with it (an unclosed socket is an error here)."""
    yield
    while _clients:
        _clients.pop().close()


def sdk(stack: Stack, key: str = "batch-user") -> OpenAI:
    client = OpenAI(base_url=stack.url + "/v1", api_key=key, max_retries=0, timeout=30)
    _clients.append(client)
    return client


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def chat_line(i: int, model: str = "llama3.2") -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"say {i}"}]}
    return {"custom_id": f"req-{i}", "method": "POST", "url": CHAT, "body": body}


def upload(client: OpenAI, lines: list[dict[str, Any]] | bytes) -> str:
    data = lines if isinstance(lines, bytes) else jsonl(lines)
    return client.files.create(file=("input.jsonl", io.BytesIO(data)), purpose="batch").id


def chat_batch(client: OpenAI, lines: int, window: str = "24h") -> Any:
    """A batch of `lines` chat lines (custom_id req-0, req-1, ...), created."""
    file_id = upload(client, [chat_line(i) for i in range(lines)])
    return client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window=window)


def wait_batch(client: OpenAI, batch_id: str, statuses: set[str], timeout: float = 60) -> Any:
    found: dict[str, Any] = {}

    def ended() -> bool:
        found["batch"] = client.batches.retrieve(batch_id)
        return found["batch"].status in statuses

    wait_until(ended, timeout=timeout, what=f"batch {batch_id} in {statuses}")
    return found["batch"]


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = client.files.content(file_id).text
    return [json.loads(line) for line in text.splitlines() if line]


def test_a_chat_batch_runs_to_completed_with_each_custom_id_once(make_stack: StackFactory) -> None:
    stack = make_stack()
    client = sdk(stack)
    file_id = upload(client, [chat_line(i) for i in range(20)])
    described = client.files.retrieve(file_id)
    assert described.purpose == "batch" and described.bytes > 0
    batch = client.batches.create(
        input_file_id=file_id, endpoint=CHAT, completion_window="24h", metadata={"job": "nightly"}
    )
    assert batch.status == "in_progress" and batch.request_counts.total == 20
    assert batch.metadata == {"job": "nightly"}
    done = wait_batch(client, batch.id, {"completed"})
    assert done.request_counts.completed == 20 and done.request_counts.failed == 0
    assert done.completed_at is not None and done.error_file_id is None
    out = lines_of(client, done.output_file_id)
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(20))
    assert done.output_file_id is not None  # its size is that of what it serves
    output = client.files.retrieve(done.output_file_id)
    assert output.bytes == len(client.files.content(done.output_file_id).content) > 0
    for line in out:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        assert line["response"]["body"]["object"] == "chat.completion"
    assert [b.id for b in client.batches.list()] == [batch.id]
    # another key sees none of it
    other = sdk(stack, "someone-else")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert other.batches.list().data == []
    metrics = httpx.get(stack.url + "/metrics").text
    assert 'gpugate_batch_lines_total{outcome="completed"} 20.0' in metrics


def test_embeddings_and_native_generate_batches(make_stack: StackFactory) -> None:
    stack = make_stack()
    client = sdk(stack)
    embed = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "nomic-embed-text", "input": f"text {i}"},
        }
        for i in range(5)
    ]
    native = [
        {
            "custom_id": f"g{i}",
            "method": "POST",
            "url": "/api/generate",
            "body": {"model": "llama3.2", "prompt": f"hi {i}"},
        }
        for i in range(5)
    ]
    e = client.batches.create(
        input_file_id=upload(client, embed), endpoint="/v1/embeddings", completion_window="24h"
    )
    g = client.batches.create(
        input_file_id=upload(client, native), endpoint="/api/generate", completion_window="24h"
    )
    e_done = wait_batch(client, e.id, {"completed"})
    g_done = wait_batch(client, g.id, {"completed"})
    for line in lines_of(client, e_done.output_file_id):
        assert line["response"]["body"]["object"] == "list"
        assert isinstance(line["response"]["body"]["data"][0]["embedding"], list)
    generated = lines_of(client, g_done.output_file_id)
    assert len(generated) == 5
    for line in generated:  # Ollama's own answer, not streamed
        assert line["response"]["body"]["done"] is True and "response" in line["response"]["body"]


def test_an_invalid_file_fails_the_batch_naming_each_line(make_stack: StackFactory) -> None:
    stack = make_stack()
    client = sdk(stack)
    bad = (
        jsonl([chat_line(1)])
        + b"not json\n"
        + jsonl(
            [
                chat_line(1),  # repeated custom_id
                {**chat_line(3), "url": "/v1/embeddings"},
                {**chat_line(4), "body": {"messages": []}},
                {"method": "POST", "url": CHAT, "body": chat_line(5)["body"]},
            ]
        )
    )
    batch = client.batches.create(
        input_file_id=upload(client, bad), endpoint=CHAT, completion_window="24h"
    )
    assert batch.status == "failed" and batch.failed_at is not None
    errors = {(e.line, e.code) for e in batch.errors.data}
    assert errors == {
        (2, "invalid_json_line"),
        (3, "duplicate_custom_id"),
        (4, "mismatched_url"),
        (5, "invalid_request"),
        (6, "missing_required_parameter"),
    }
    assert stack.redis().exists(keys.BATCH_LINES + batch.id) == 0  # nothing was queued
    # refusals of the request itself create nothing
    with pytest.raises(openai.UnprocessableEntityError):
        client.batches.create(
            input_file_id=upload(client, [chat_line(1)]),
            endpoint="/v1/messages",
            completion_window="24h",
        )
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file-nope", endpoint=CHAT, completion_window="24h")
    with pytest.raises(openai.UnprocessableEntityError):
        client.files.create(file=("x.jsonl", io.BytesIO(b"{}\n")), purpose="fine-tune")
    assert [b.id for b in client.batches.list()] == [batch.id]


def test_a_file_over_the_limit_is_413(make_stack: StackFactory) -> None:
    stack = make_stack(max_batch_file_bytes=1000)
    client = sdk(stack)
    with pytest.raises(openai.APIStatusError) as refused:
        upload(client, [chat_line(i) for i in range(50)])
    assert refused.value.status_code == 413
    assert refused.value.response.json()["error"] == "request_too_large"
    assert client.files.list().data == []


@pytest.fixture
def slow_sim() -> Any:
    proc = start_sim("--tokens", "5", "--token-delay", "0.1", "--parallel", "64")
    yield proc
    proc.stop()


def test_cancel_finishes_running_lines_and_errors_the_rest(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=2)
    client = sdk(stack)
    batch = chat_batch(client, 40)
    wait_until(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 2,
        what="some lines done",
    )
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(client, batch.id, {"cancelled"})
    assert done.cancelled_at is not None and done.cancelling_at is not None
    out = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    ids = [line["custom_id"] for line in out + errors]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(40))  # each exactly once
    assert errors and all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert done.request_counts.completed == len(out) and done.request_counts.failed == len(errors)


def test_a_batch_past_its_window_expires_with_what_finished(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1)
    client = sdk(stack)
    batch = chat_batch(client, 30, window="2s")
    done = wait_batch(client, batch.id, {"expired"}, timeout=30)
    out = lines_of(client, done.output_file_id)
    errors = lines_of(client, done.error_file_id)
    assert out and errors  # some ran within 2 s, the rest did not
    assert all(e["error"]["code"] == "batch_expired" for e in errors)
    assert sorted(line["custom_id"] for line in out + errors) == sorted(
        f"req-{i}" for i in range(30)
    )
    assert done.expired_at is not None


def test_a_killed_worker_loses_no_line_and_writes_none_twice(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=2, lease_ttl=2)
    stack.add_worker()
    stack.wait_for_workers(2)
    client = sdk(stack)
    batch = chat_batch(client, 30)
    wait_until(
        lambda: client.batches.retrieve(batch.id).request_counts.completed >= 3,
        what="some lines done",
    )
    stack.workers[0].kill()
    done = wait_batch(client, batch.id, {"completed"}, timeout=90)
    out = lines_of(client, done.output_file_id)
    assert done.request_counts.completed == 30 and done.request_counts.failed == 0
    assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(30))


def test_interactive_work_goes_before_batch_lines(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    """With one slot busy with a batch, an interactive call waits for one line at most, and
    batch lines are not in the interactive backlog."""
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, max_queue_depth=1)
    client = sdk(stack)
    batch = chat_batch(client, 50)
    wait_until(
        lambda: httpx.get(stack.url + "/v1/queue").json()["batch_running"] == 1,
        what="a line running",
    )
    queue = httpx.get(stack.url + "/v1/queue").json()
    assert queue["batch_queued"] == 49 and queue["queue_depth"] == 0
    began = time.monotonic()
    reply = httpx.post(
        stack.url + "/api/generate",
        timeout=30,
        json={"model": "llama3.2", "prompt": "now", "stream": False},
    )
    waited = time.monotonic() - began
    assert reply.status_code == 200, reply.text
    # one line (5 tokens at 0.1 s) at most before it, then its own run: well under two lines
    assert waited < 1.6, waited
    assert client.batches.retrieve(batch.id).status == "in_progress"
    client.batches.cancel(batch.id)
    wait_batch(client, batch.id, {"cancelled"})


def test_the_readme_batch_example_works_as_printed(make_stack: StackFactory) -> None:
    stack = make_stack()
    text = (ROOT / "README.md").read_text()
    [block] = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "batches.create" in b]
    script = block.replace("http://127.0.0.1:8000", stack.url)
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    printed = done.stdout.splitlines()
    assert printed[0].startswith("completed ") and "completed=100" in printed[0], printed[0]
    assert len(printed) == 101 and printed[1].startswith("doc-")


def test_a_redis_restart_mid_batch_loses_no_line(slow_sim: Process) -> None:
    """Redis with its append-only file stops and starts again while lines run and wait:
    the batch completes with every line once."""
    data_dir = tempfile.mkdtemp(prefix="gpugate-redis-aof-")
    redis_proc = start_redis(data_dir=data_dir)
    stack = build_stack(redis_proc, slow_sim, gpu_concurrency=2, lease_ttl=2)
    try:
        client = sdk(stack)
        batch = chat_batch(client, 30)
        wait_until(
            lambda: client.batches.retrieve(batch.id).request_counts.completed >= 4,
            what="some lines done",
        )
        redis_proc.stop()  # SIGTERM: Redis writes its append-only file and exits
        redis_proc = start_redis(redis_proc.port, data_dir=data_dir)
        done = wait_batch(client, batch.id, {"completed"}, timeout=90)
        out = lines_of(client, done.output_file_id)
        assert done.request_counts.completed == 30 and done.request_counts.failed == 0
        assert sorted(line["custom_id"] for line in out) == sorted(f"req-{i}" for i in range(30))
    finally:
        stack.stop()
        redis_proc.stop()


def test_batch_owners_share_the_idle_slots_and_pay_in_usage(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    """Two owners' batches at once: lines alternate between them (fair share among batch
    owners), and every line counts in its key's usage."""
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1)
    first, second = sdk(stack, "owner-a"), sdk(stack, "owner-b")
    a = chat_batch(first, 20)
    b = chat_batch(second, 20)
    wait_until(
        lambda: (
            first.batches.retrieve(a.id).request_counts.completed
            + second.batches.retrieve(b.id).request_counts.completed
            >= 10
        ),
        what="ten lines done",
    )
    done_a = first.batches.retrieve(a.id).request_counts.completed
    done_b = second.batches.retrieve(b.id).request_counts.completed
    assert abs(done_a - done_b) <= 2, (done_a, done_b)  # not one batch after the other
    usage = stack.redis().hgetall(keys.USAGE)  # keys unknown to gpugate: "anonymous"
    assert int(usage[b"anonymous|requests"]) >= done_a + done_b

    def served() -> int:  # the workers add tokens to usage every 0.5 s (worker/tally.py)
        return int(stack.redis().hget(keys.USAGE, "anonymous|output_tokens") or 0)

    wait_until(lambda: served() >= 5 * (done_a + done_b), what="the lines' tokens in usage")
    first.batches.cancel(a.id)
    second.batches.cancel(b.id)
    wait_batch(first, a.id, {"cancelled"})
    wait_batch(second, b.id, {"cancelled"})


def test_a_spent_budget_holds_batch_lines_back_until_it_is_raised(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    """Batch lines count in the key's budget: once it is spent no line starts (the batch
    waits, it does not fail); an operator's bigger budget lets the rest run."""
    stack = make_stack(ollama_url=slow_sim.url, gpu_concurrency=1, admin_key="admin")
    admin = {"X-Admin-Key": "admin"}
    made = httpx.post(
        stack.url + "/admin/keys",
        json={"name": "nightly", "budget": {"tokens": 40, "period": "day"}},
        headers=admin,
    ).json()
    client = sdk(stack, made["key"])
    batch = chat_batch(client, 20)

    def held_back() -> bool:
        budget = httpx.get(stack.url + "/v1/me", headers={"X-API-Key": made["key"]}).json()
        return budget["budget"]["remaining"] == 0 and queue_of(stack)["batch_running"] == 0

    wait_until(held_back, timeout=30, what="the budget spent and no line running")
    held = client.batches.retrieve(batch.id)
    assert held.status == "in_progress" and 0 < held.request_counts.completed < 20
    assert queue_of(stack)["batch_queued"] == 20 - held.request_counts.completed
    raised = httpx.patch(
        stack.url + "/admin/keys/nightly",
        json={"budget": {"tokens": 1_000_000, "period": "day"}},
        headers=admin,
    )
    assert raised.status_code == 200, raised.text
    done = wait_batch(client, batch.id, {"completed"})
    assert done.request_counts.completed == 20


def queue_of(stack: Stack) -> dict[str, Any]:
    return dict(httpx.get(stack.url + "/v1/queue").json())


def test_lines_of_one_model_run_together() -> None:
    """A batch whose lines alternate between two models, on a backend that holds one model
    at a time: the lines of one model run before the other's, so the backend loads each
    model once, not once a line."""
    sim = start_sim(
        "--tokens",
        "2",
        "--token-delay",
        "0.01",
        "--max-loaded",
        "1",
        "--load-time",
        "0.05",
        "--parallel",
        "4",
    )
    redis_proc = start_redis()
    stack = build_stack(redis_proc, sim, gpu_concurrency=2)
    try:
        client = sdk(stack)
        models = ("llama3.2", "qwen2.5:0.5b")
        lines = [chat_line(i, model=models[i % 2]) for i in range(20)]
        batch = client.batches.create(
            input_file_id=upload(client, lines), endpoint=CHAT, completion_window="24h"
        )
        done = wait_batch(client, batch.id, {"completed"})
        assert done.request_counts.completed == 20
        loads = sim_stats(sim)["loads"]
        assert loads <= 3, loads  # each model once (a third if the first line's raced)
    finally:
        stack.stop()
        redis_proc.stop()
        sim.stop()
