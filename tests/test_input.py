"""Hostile and absurd input: enormous headers, strange job ids and waits, bodies that never
end, forged forwarding headers, the /metrics token, keys stored as digests.

What tests/test_errors.py already covers (malformed JSON, non-UTF-8, missing or mistyped
fields, a small oversized body) is not repeated here.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.app import create_app
from shared.settings import Settings
from tests.conftest import Stack, StackFactory
from tests.processes import Process, free_port

CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
GEN = {"model": "llama3.2", "prompt": "hello"}
SOCKET_TIMEOUT_S = 10.0


def assert_error(r: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return dict(body)


def rss_kb(proc: Process) -> int:
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {proc.pid}")


def assert_still_serving(stack: Stack) -> None:
    assert stack.api is not None and stack.api.alive(), "the API process died"
    assert httpx.get(stack.url + "/health", timeout=5).status_code == 200


def raw_exchange(port: int, request: bytes) -> bytes:
    """Send raw bytes, read until the server closes. A reset counts as a close (a server may
    refuse before reading everything); silence for SOCKET_TIMEOUT_S fails as a hang."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(request)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError(f"no answer in {SOCKET_TIMEOUT_S}s: {received[:200]!r}") from None
    return received


def status_of(raw: bytes) -> int | None:
    if not raw:
        return None
    return int(raw.split(b" ", 2)[1])


# --- headers -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param(b"X-Filler: " + b"a" * 100_000 + b"\r\n", id="one-100KB-header"),
        pytest.param(b"X-API-Key: " + b"k" * 100_000 + b"\r\n", id="a-100KB-api-key"),
        pytest.param(b"".join(b"X-H-%d: %s\r\n" % (i, b"v" * 50) for i in range(2000)), id="2000"),
    ],
)
def test_enormous_headers_get_a_clean_answer_and_the_api_keeps_serving(
    stack: Stack, headers: bytes
) -> None:
    assert stack.api is not None
    request = (
        b"GET /v1/queue HTTP/1.1\r\nHost: gpugate\r\n" + headers + b"Connection: close\r\n\r\n"
    )
    raw = raw_exchange(stack.api.port, request)
    # uvicorn's parser decides: httptools serves it, h11 refuses it with 400; never a 5xx.
    assert status_of(raw) in (None, 200, 400, 431), raw[:300]
    assert_still_serving(stack)


# --- job ids and ?wait= --------------------------------------------------------------


@pytest.mark.parametrize(
    "job_id",
    [
        "job_" + "0" * 32,
        "x" * 5000,
        "*",  # a glob character, should a lookup ever use one
        "job_%00",
        "%C3%BC",
        "job_" + "f" * 32 + "%0D%0AX-Injected:%201",
    ],
)
def test_unknown_job_ids_are_404_to_read_wait_on_and_cancel(
    stack: Stack, key: str, job_id: str
) -> None:
    with stack.client(key) as client:
        started = time.monotonic()
        waited = client.get(f"/v1/jobs/{job_id}", params={"wait": 30})
        assert time.monotonic() - started < 5, "?wait= held a request for a job that is not there"
        assert_error(waited, 404, "not_found")
        assert_error(client.delete(f"/v1/jobs/{job_id}"), 404, "not_found")
        assert "X-Injected" not in waited.headers


@pytest.mark.parametrize(
    "wait", ["0", "-1", "-0.5", "60.001", "61", "1e309", "inf", "-inf", "nan", "abc", "", "0x10"]
)
def test_wait_outside_0_to_60_or_not_a_number_is_422_naming_wait(
    stack: Stack, key: str, wait: str
) -> None:
    with stack.client(key) as client:
        r = client.get("/v1/jobs/job_" + "0" * 32, params={"wait": wait})  # checked before the id
    assert "wait" in str(assert_error(r, 422, "invalid_request")["message"])


def test_wait_at_its_bounds_on_a_finished_job_answers_at_once(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        job_id = client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": GEN}).json()[
            "id"
        ]
        assert client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()["status"] == "succeeded"
        for wait in ("60", "0.001", "1e-300"):
            started = time.monotonic()
            r = client.get(f"/v1/jobs/{job_id}", params={"wait": wait})
            assert r.status_code == 200 and r.json()["status"] == "succeeded", (wait, r.text)
            assert time.monotonic() - started < 5, f"wait={wait} held a finished job"


# --- Idempotency-Key (the plain reuse with another body is in tests/test_jobs.py) -----


def test_an_idempotency_key_replays_a_reordered_body_but_not_another_endpoint(
    stack: Stack, key: str
) -> None:
    headers = {"Idempotency-Key": "order-7"}
    with stack.client(key) as client:
        first = client.post(
            "/v1/jobs",
            json={"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "p"}},
            headers=headers,
        )
        reordered = client.post(
            "/v1/jobs",
            content=b'{"body": {"prompt": "p", "model": "llama3.2"}, "endpoint": "/api/generate"}',
            headers={**headers, "content-type": "application/json"},
        )
        elsewhere = client.post(
            "/v1/jobs",
            json={"endpoint": "/v1/completions", "body": {"model": "llama3.2", "prompt": "p"}},
            headers=headers,
        )
    assert first.status_code == reordered.status_code == 202
    assert reordered.json()["id"] == first.json()["id"]
    assert_error(elsewhere, 409, "conflict")


def test_an_overlong_idempotency_key_is_422(stack: Stack, key: str) -> None:
    with stack.client(key) as client:
        r = client.post(
            "/v1/jobs",
            json={"endpoint": "/api/generate", "body": GEN},
            headers={"Idempotency-Key": "k" * 257},
        )
    assert "idempotency-key" in str(assert_error(r, 422, "invalid_request")["message"]).lower()


# --- a body that never ends ----------------------------------------------------------


def stream_chunked(port: int, total_bytes: int) -> tuple[bytes, int]:
    """POST a chunked body (no Content-Length) of up to `total_bytes`, stopping as soon as the
    server answers; returns (what the server sent, body bytes sent)."""
    head = (
        b"POST /api/generate HTTP/1.1\r\nHost: gpugate\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nX-API-Key: chunked-streamer\r\n\r\n"
    )
    piece = b"x" * 65536
    opening = b'{"model": "llama3.2", "prompt": "'
    sent = 0
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        sock.sendall(head + b"%x\r\n%s\r\n" % (len(opening), opening))
        try:
            while sent < total_bytes:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break  # the server has answered (or closed) mid-body
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                sent += len(piece)
            while chunk := sock.recv(65536):
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            while True:  # what arrived before the reset is still readable
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                received += chunk
        except TimeoutError:
            raise AssertionError(f"the server neither read nor answered after {sent} B") from None
    return received, sent


def test_an_endless_chunked_body_is_413_at_the_limit_and_memory_stays_flat(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(max_body_bytes=1_048_576)
    assert stack.api is not None
    stream_chunked(stack.api.port, 2 * 1_048_576)  # warm up whatever the first one allocates
    before = rss_kb(stack.api)
    raw, sent = stream_chunked(stack.api.port, 50 * 1024 * 1024)
    after = rss_kb(stack.api)
    body = raw.partition(b"\r\n\r\n")[2]
    assert status_of(raw) == 413, raw[:300]
    assert b'"error":"request_too_large"' in body, body
    assert sent < 50 * 1024 * 1024, "the whole 50 MB went in: the limit was not applied as it came"
    assert after - before < 20 * 1024, f"API RSS grew {after - before} kB for one refused body"
    assert_still_serving(stack)


# --- X-Forwarded-For (an untrusted client's forgery is in tests/test_ratelimit.py) ---


def test_behind_a_trusted_proxy_a_forged_left_most_hop_buys_no_new_bucket(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(trusted_proxies="127.0.0.0/8")
    with stack.client() as client:
        statuses = [
            client.post(
                "/v1/chat/completions",
                json=CHAT,
                # the client forges a hop; the proxy appends the address it saw
                headers={"X-Forwarded-For": f"203.0.113.{i}, 198.51.100.7"},
            ).status_code
            for i in range(10)
        ]
        split = client.post(
            "/v1/chat/completions",
            json=CHAT,
            headers=[("X-Forwarded-For", "203.0.113.99"), ("X-Forwarded-For", "198.51.100.7")],
        )
    assert statuses == [200] * 10
    assert_error(split, 429, "rate_limit_exceeded")


# --- /metrics ------------------------------------------------------------------------


def test_metrics_are_open_without_a_token(stack: Stack) -> None:
    r = httpx.get(stack.url + "/metrics", timeout=10)
    assert r.status_code == 200 and "gpugate_queue_depth" in r.text


def test_metrics_need_the_bearer_token_when_one_is_set(make_stack: StackFactory) -> None:
    stack = make_stack(workers=0, metrics_token="scrape-secret")
    with httpx.Client(base_url=stack.url, timeout=10) as client:
        refused = [
            client.get("/metrics"),
            client.get("/metrics", headers={"Authorization": "Bearer wrong"}),
            client.get("/metrics", headers={"Authorization": "Basic scrape-secret"}),
            client.get("/metrics", headers={"X-API-Key": "scrape-secret"}),
        ]
        ok = client.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
    for r in refused:
        assert_error(r, 401, "invalid_api_key")
        assert "gpugate_" not in r.text
    assert ok.status_code == 200 and "gpugate_queue_depth" in ok.text
    assert ok.headers["content-type"].startswith("text/plain")


# --- the keys file holds SHA-256 digests ---------------------------------------------


@pytest.fixture
def keys_file(tmp_path: Path) -> tuple[Path, str, str]:
    """A keys file with one proper digest and one clear hex key pasted in by mistake."""
    key = "gk-" + secrets.token_urlsafe(24)
    pasted_clear = secrets.token_hex(32)  # 64 hex digits: it passes for a digest
    path = tmp_path / "keys.toml"
    path.write_text(
        f'[[keys]]\nname = "good"\nsha256 = "{hashlib.sha256(key.encode()).hexdigest()}"\n'
        f'[[keys]]\nname = "pasted"\nsha256 = "{pasted_clear}"\n'
    )
    return path, key, pasted_clear


def test_keys_authenticate_by_digest_only(
    make_stack: StackFactory, keys_file: tuple[Path, str, str]
) -> None:
    path, key, pasted_clear = keys_file
    stack = make_stack(keys_file=path)
    digest = hashlib.sha256(key.encode()).hexdigest()
    with stack.client(key) as good, stack.client(digest) as stolen, stack.client(pasted_clear) as p:
        assert good.post("/v1/chat/completions", json=CHAT).status_code == 200
        # whoever reads the file learns digests, and a digest is not a key
        assert_error(stolen.post("/v1/chat/completions", json=CHAT), 401, "invalid_api_key")
        # a clear key written where its digest belongs never matches itself
        assert_error(p.post("/v1/chat/completions", json=CHAT), 401, "invalid_api_key")


def test_a_keys_file_entry_that_is_not_a_digest_stops_start_up(
    tmp_path: Path, redis_proc: Process
) -> None:
    path = tmp_path / "keys.toml"
    path.write_text('[[keys]]\nname = "team-a"\nsha256 = "my-clear-secret-key"\n')
    env = {
        "GPUGATE_KEYS_FILE": str(path),
        "GPUGATE_REDIS_URL": redis_proc.url,  # never the default Redis, should it start
        "GPUGATE_PORT": str(free_port()),
    }
    run = subprocess.run(
        [sys.executable, "-m", "gpugate", "api"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("GPUGATE_")}, **env},
    )
    assert run.returncode != 0
    assert "keys[0].sha256 must be 64 hex digits" in run.stderr, run.stderr
    assert "my-clear-secret-key" not in run.stderr + run.stdout


async def test_under_a_root_path_blob_uploads_pass_the_body_limit_and_the_rest_do_not(
    make_stack: StackFactory,
) -> None:
    """Behind a path prefix the body limit sees the same paths as the routes: a model
    blob over GPUGATE_MAX_BODY_BYTES streams through to Ollama, an inference body does not."""
    stack = make_stack()
    settings = Settings(
        redis_url=stack.redis_url,
        ollama_url=stack.ollama_url,
        max_body_bytes=1024,
        admin_key="admin-secret",
    )
    app = create_app(settings)
    blob = b"GGUF" + os.urandom(4096)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    transport = httpx.ASGITransport(app=app, root_path="/gw")
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://gpugate") as client,
    ):
        uploaded = await client.post(
            f"/gw/api/blobs/{digest}", content=blob, headers={"X-Admin-Key": "admin-secret"}
        )
        too_large = await client.post(
            "/gw/api/generate", content=b'{"model": "llama3.2", "prompt": "' + b"x" * 2048 + b'"}'
        )
    assert uploaded.status_code in (200, 201), uploaded.text
    assert too_large.status_code == 413, too_large.text
    assert too_large.json()["error"] == "request_too_large"
