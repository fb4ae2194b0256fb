"""The simulator as one GPU of a fleet: model management and model loading, as real processes
driven by the official `ollama` SDK and plain HTTP."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import ollama
import pytest

from tests.processes import Process, start_sim, wait_until

LLAMA = "llama3.2"
QWEN = "qwen2.5:0.5b"
LOAD_TIME = 0.3  # seconds for llama3.2 (a 3.2B model); qwen2.5:0.5b takes about a sixth


def stats(url: str) -> dict[str, Any]:
    response = httpx.get(url + "/sim/stats")
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


def loaded(url: str) -> list[str]:
    return [m["name"] for m in httpx.get(url + "/api/ps").json()["models"]]


def generate(url: str, model: str, **extra: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": "Why is the sky blue?", "stream": False, **extra}
    response = httpx.post(url + "/api/generate", json=body, timeout=30)
    response.raise_for_status()
    result: dict[str, Any] = response.json()
    return result


# --- model management -------------------------------------------------------------------


@pytest.fixture(scope="module")
def manage_sim() -> Iterator[Process]:
    proc = start_sim("--token-delay", "0", "--models", "llama3.2,all-minilm")
    yield proc
    proc.stop()


def names(client: ollama.Client) -> list[str]:
    return [str(m.model) for m in client.list().models]


def test_pull_streams_progress_then_the_model_serves(manage_sim: Process) -> None:
    with ollama.Client(host=manage_sim.url) as client:
        progress = list(client.pull("smollm:135m", stream=True))
        again = client.pull("smollm:135m")
        listed = names(client)
        reply = client.generate(model="smollm:135m", prompt="hi")
        with pytest.raises(ollama.ResponseError) as invalid:
            client.pull("no good/name/at/all")
    statuses = [p.status for p in progress]
    assert statuses[0] == "pulling manifest"
    assert statuses[-3:] == ["verifying sha256 digest", "writing manifest", "success"]
    layers = progress[1:-3]
    assert layers and all(p.status == f"pulling {str(p.digest)[7:19]}" for p in layers)
    assert all(p.total and str(p.digest).startswith("sha256:") for p in layers)
    assert [p.completed for p in layers[:2]] == [None, layers[0].total]  # 0 is omitted
    assert again.status == "success"
    assert "smollm:135m" in listed and reply.done and reply.eval_count == 8
    assert (invalid.value.status_code, invalid.value.error) == (400, "invalid model name")
    raw = httpx.post(manage_sim.url + "/api/pull", json={"model": LLAMA})
    assert raw.headers["content-type"] == "application/x-ndjson"
    quiet = httpx.post(manage_sim.url + "/api/pull", json={"model": LLAMA, "stream": False})
    assert quiet.json() == {"status": "success"}


def test_create_copy_delete(manage_sim: Process) -> None:
    with ollama.Client(host=manage_sim.url) as client:
        progress = list(client.create("brief", from_=LLAMA, system="Be brief.", stream=True))
        shown = client.show("brief")
        reply = client.generate(model="brief", prompt="Why is the sky blue?")
        copied = client.copy("brief", "brief-copy")
        listed = names(client)
        deleted = client.delete("brief-copy")
        with pytest.raises(ollama.ResponseError) as gone:
            client.delete("brief-copy")
        from_unknown = [
            p.status for p in client.create("mini", from_="tinyllama:1.1b", stream=True)
        ]
        after = names(client)
    statuses = [p.status for p in progress]
    assert statuses[-2:] == ["writing manifest", "success"]
    assert any(s.startswith("using existing layer sha256:") for s in statuses)
    assert any(s.startswith("creating new layer sha256:") for s in statuses)
    assert shown.modelfile and 'SYSTEM """Be brief."""' in shown.modelfile
    assert shown.details and shown.details.parent_model == "llama3.2:latest"
    raw = httpx.post(manage_sim.url + "/api/show", json={"model": "brief"}).json()
    assert raw["system"] == "Be brief."
    assert reply.done and copied.status == deleted.status == "success"
    assert "brief:latest" in listed and "brief-copy:latest" in listed
    assert gone.value.status_code == 404 and "brief-copy:latest" not in after
    assert "pulling manifest" in from_unknown and from_unknown[-1] == "success"  # pulled first
    assert {"mini:latest", "tinyllama:1.1b"} <= set(after)
    neither = httpx.post(manage_sim.url + "/api/create", json={"model": "x"})
    assert (neither.status_code, neither.json()) == (
        400,
        {"error": "neither 'from' or 'files' was specified"},
    )
    bad_copy = httpx.post(manage_sim.url + "/api/copy", json={"source": "nope", "destination": "x"})
    assert (bad_copy.status_code, bad_copy.json()) == (404, {"error": 'model "nope" not found'})


def test_push_and_blobs(manage_sim: Process, tmp_path: Path) -> None:
    url = manage_sim.url
    blob = tmp_path / "model.gguf"
    blob.write_bytes(b"GGUF" + bytes(range(256)) * 4)
    digest = "sha256:" + hashlib.sha256(blob.read_bytes()).hexdigest()
    with ollama.Client(host=url) as client:
        pushed = [p.status for p in client.push(LLAMA, stream=True)]
        with pytest.raises(ollama.ResponseError) as unknown:
            client.push("nope")
        assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 404
        assert client.create_blob(blob) == digest
        made = client.create("from-files", files={"model.gguf": digest})
        listed = names(client)
    assert pushed[0] == "retrieving manifest" and pushed[-2:] == ["pushing manifest", "success"]
    assert any(status.startswith("pushing ") for status in pushed[1:-2])
    assert unknown.value.status_code == 500 and "no such file or directory" in unknown.value.error
    assert httpx.head(f"{url}/api/blobs/{digest}").status_code == 200
    assert httpx.post(f"{url}/api/blobs/{digest}", content=b"again").status_code == 200  # exists
    other = "sha256:" + "0" * 64
    mismatch = httpx.post(f"{url}/api/blobs/{other}", content=b"data")
    assert mismatch.status_code == 400 and mismatch.json()["error"].startswith("digest mismatch")
    assert httpx.head(f"{url}/api/blobs/not-a-digest").status_code == 400
    assert made.status == "success" and "from-files:latest" in listed


def test_embedding_models_embed_but_do_not_generate(manage_sim: Process) -> None:
    with ollama.Client(host=manage_sim.url) as client:
        shown = client.show("all-minilm")
        vectors = client.embed(model="all-minilm", input="hello")
        with pytest.raises(ollama.ResponseError) as refused:
            client.generate(model="all-minilm", prompt="hi")
    assert shown.capabilities == ["embedding"]
    assert len(vectors.embeddings[0]) == 384
    assert (refused.value.status_code, refused.value.error) == (
        400,
        '"all-minilm" does not support generate',
    )


# --- model loading ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_sim() -> Iterator[Process]:
    """One GPU that holds one model at a time, and takes LOAD_TIME to load llama3.2."""
    proc = start_sim(
        "--models", f"{LLAMA},{QWEN}", "--max-loaded", "1", "--load-time", str(LOAD_TIME),
        "--token-delay", "0.02", "--tokens", "4",
    )  # fmt: skip
    yield proc
    proc.stop()


@pytest.fixture
def gpu(gpu_sim: Process) -> str:
    """The GPU with nothing loaded, the default config and zeroed counters."""
    url = gpu_sim.url
    config = {"max_loaded": 1, "load_time_s": LOAD_TIME, "tokens": 4, "token_delay_s": 0.02}
    httpx.put(url + "/sim/config", json=config).raise_for_status()
    wait_until(lambda: stats(url)["in_flight"] == 0, timeout=5, what="an idle simulator")
    for model in (LLAMA, QWEN):  # an empty prompt with keep_alive 0 unloads the model
        httpx.post(url + "/api/generate", json={"model": model, "keep_alive": 0}).raise_for_status()
    wait_until(lambda: loaded(url) == [], timeout=5, what="no model loaded")
    httpx.post(url + "/sim/reset").raise_for_status()
    return url


def test_the_first_request_loads_the_model(gpu: str) -> None:
    first = generate(gpu, LLAMA)
    second = generate(gpu, LLAMA)
    assert first["load_duration"] >= LOAD_TIME * 0.9e9
    assert first["total_duration"] > first["load_duration"]
    assert second["load_duration"] < LOAD_TIME * 0.5e9  # already loaded
    counters = stats(gpu)
    assert counters["loads"] == 1 and counters["loads_by_model"] == {"llama3.2:latest": 1}
    entries = httpx.get(gpu + "/api/ps").json()["models"]
    assert [m["name"] for m in entries] == ["llama3.2:latest"]
    expires_at = datetime.fromisoformat(entries[0]["expires_at"])
    assert expires_at > datetime.now(UTC)


def test_a_load_waits_while_the_loaded_model_is_busy(gpu: str) -> None:
    httpx.put(gpu + "/sim/config", json={"tokens": 1000}).raise_for_status()
    body = {"model": LLAMA, "prompt": "hold the GPU"}
    with (
        httpx.Client(base_url=gpu, timeout=30) as client,
        client.stream("POST", "/api/generate", json=body) as holder,
        ThreadPoolExecutor(1) as pool,
    ):
        lines = holder.iter_lines()
        next(lines)  # llama3.2 is loaded and busy
        waiting = pool.submit(generate, gpu, QWEN, options={"num_predict": 2})
        wait_until(lambda: stats(gpu)["load_waiting"] == 1, timeout=5, what="qwen waiting")
        seen_waiting = time.monotonic()
        # Requests for the loaded model go on meanwhile; the other model is not loaded.
        meanwhile = generate(gpu, LLAMA, options={"num_predict": 2})
        assert meanwhile["eval_count"] == 2 and not waiting.done()
        assert loaded(gpu) == ["llama3.2:latest"]
        holder.close()  # the holder goes away: llama3.2 is idle, so it can be unloaded
        released = time.monotonic()
        qwen = waiting.result(timeout=10)
    assert qwen["eval_count"] == 2
    assert qwen["load_duration"] >= (released - seen_waiting) * 1e9
    assert loaded(gpu) == ["qwen2.5:0.5b"]
    counters = stats(gpu)
    assert counters["evictions"] == 1 and counters["load_waiting"] == 0
    assert counters["loads_by_model"] == {"llama3.2:latest": 1, "qwen2.5:0.5b": 1}


def test_a_request_that_leaves_while_its_model_waits_cancels_the_load(gpu: str) -> None:
    httpx.put(gpu + "/sim/config", json={"tokens": 1000}).raise_for_status()
    body = {"model": LLAMA, "prompt": "hold the GPU"}
    with (
        httpx.Client(base_url=gpu, timeout=30) as client,
        client.stream("POST", "/api/generate", json=body) as holder,
    ):
        lines = holder.iter_lines()
        next(lines)
        with pytest.raises(httpx.ReadTimeout):
            waiter = {"model": QWEN, "prompt": "hi", "stream": False}
            httpx.post(gpu + "/api/generate", json=waiter, timeout=0.5)
        wait_until(lambda: stats(gpu)["cancelled"] == 1, timeout=5, what="the waiter cancelled")
        assert stats(gpu)["load_waiting"] == 0
    wait_until(lambda: stats(gpu)["in_flight"] == 0, timeout=5, what="the holder gone")
    assert loaded(gpu) == ["llama3.2:latest"]  # the load never began
    assert stats(gpu)["loads_by_model"] == {"llama3.2:latest": 1}


def test_requests_for_a_loading_model_join_its_load(gpu: str) -> None:
    with ThreadPoolExecutor(3) as pool:
        pending = [pool.submit(generate, gpu, LLAMA) for _ in range(3)]
        # /api/ps lists the model while it loads (seen before requests stopped waiting).
        wait_until(
            lambda: loaded(gpu) == ["llama3.2:latest"] and stats(gpu)["load_waiting"] > 0,
            timeout=5,
            what="llama3.2 listed while it loads",
        )
        replies = [future.result(timeout=10) for future in pending]
    assert all(reply["eval_count"] == 4 for reply in replies)
    assert stats(gpu)["loads"] == 1
    assert max(reply["load_duration"] for reply in replies) >= LOAD_TIME * 0.9e9


def test_keep_alive_and_live_max_loaded(gpu: str) -> None:
    generate(gpu, QWEN, keep_alive=0)  # unloads once the request is done
    assert loaded(gpu) == []
    httpx.put(gpu + "/sim/config", json={"max_loaded": 2}).raise_for_status()
    generate(gpu, LLAMA)
    generate(gpu, QWEN, keep_alive=-1)  # stays loaded for good
    entries = httpx.get(gpu + "/api/ps").json()["models"]
    assert [m["name"] for m in entries] == ["qwen2.5:0.5b", "llama3.2:latest"]  # longest first
    assert datetime.fromisoformat(entries[0]["expires_at"]).year > 2100
    httpx.put(gpu + "/sim/config", json={"max_loaded": 1}).raise_for_status()
    assert loaded(gpu) == ["qwen2.5:0.5b"]  # the least recently used idle one went
    counters = stats(gpu)
    assert counters["loads"] == 3 and counters["evictions"] == 1
    bad = httpx.put(gpu + "/sim/config", json={"max_loaded": -1})
    assert bad.status_code == 400


def test_two_instances_are_two_gpus(gpu_sim: Process, manage_sim: Process) -> None:
    """Each instance serves its own models, loads them itself and counts its own loads."""
    generate(gpu_sim.url, QWEN)
    unknown = httpx.post(manage_sim.url + "/api/generate", json={"model": QWEN, "prompt": "hi"})
    assert unknown.status_code == 404
    generate(manage_sim.url, LLAMA)
    assert "qwen2.5:0.5b" in loaded(gpu_sim.url)
    assert "qwen2.5:0.5b" not in loaded(manage_sim.url) and "llama3.2:latest" in loaded(
        manage_sim.url
    )
