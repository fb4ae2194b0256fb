"""Webhooks: a key's job events POSTed to its webhook_url, signed as Standard Webhooks
says (checked with the `standardwebhooks` reference library, as a receiver would), at
least once with backoff and the same webhook-id, listed in /admin/webhooks until
delivered; the keys file's keys too; nothing for synchronous calls or keys without one."""

from __future__ import annotations

import base64
import io
import itertools
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import standardwebhooks
from openai import OpenAI
from redis.asyncio import Redis

from api.tiers import DEFAULT_TIER, Tier, load_keys_file
from gpugate.testing.keys import Key, write_keys_file
from shared import keys
from shared.scripts import Scripts, WebhookOutcome
from shared.settings import Rate
from shared.webhooks import State
from tests.conftest import Stack, StackFactory, slow_sim_fixture
from tests.processes import Process, free_port, wait_until

ADMIN = {"X-Admin-Key": "admin-secret"}
GEN = {"model": "llama3.2", "prompt": "hello"}

# 5 tokens at 200 ms: a job holds the one slot for about a second, so the next one queues.
slow_sim = slow_sim_fixture(0.2)


@dataclass
class Delivery:
    path: str
    headers: dict[str, str]
    body: bytes

    def verify(self, secret: str) -> dict[str, Any]:
        """The body, once the reference library accepts its signature."""
        return dict(standardwebhooks.Webhook(secret).verify(self.body, self.headers))


@dataclass
class Receiver:
    """A webhook receiver on a free port: it records every POST and answers each path
    with its `answers` in turn (the last one for ever after), else 200."""

    port: int = field(default_factory=free_port)
    answers: dict[str, list[int]] = field(default_factory=dict)
    received: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.received if d.path == path]

    def answer(self, path: str) -> int:
        with self.lock:
            statuses = self.answers.get(path) or [200]
            return statuses.pop(0) if len(statuses) > 1 else statuses[0]


def _handler(receiver: Receiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            with receiver.lock:
                receiver.received.append(
                    Delivery(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                )
            self.send_response(receiver.answer(self.path))
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    receiver = Receiver()
    server = ThreadingHTTPServer(("127.0.0.1", receiver.port), _handler(receiver))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield receiver
    server.shutdown()
    server.server_close()
    thread.join()


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def create_key(url: str, name: str, **fields: Any) -> dict[str, Any]:
    r = httpx.post(url + "/admin/keys", json={"name": name, **fields}, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(stack: Stack, key: str, body: dict[str, Any] | None = None) -> str:
    with stack.client(key) as client:
        r = client.post("/v1/jobs", json={"endpoint": "/api/generate", "body": body or GEN})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def finished(stack: Stack, key: str, job_id: str) -> dict[str, Any]:
    with stack.client(key) as client:
        job = client.get(f"/v1/jobs/{job_id}", params={"wait": 20}).json()
    assert job["status"] in ("succeeded", "failed", "cancelled"), job
    return dict(job)


def listed(stack: Stack, name: str) -> list[dict[str, Any]]:
    r = httpx.get(stack.url + "/admin/webhooks", params={"key": name}, headers=ADMIN, timeout=10)
    assert r.status_code == 200, r.text
    return list(r.json()["webhooks"])


def records(stack: Stack) -> list[dict[str, str]]:
    """Every webhook delivery in the stack's Redis."""
    rdb = stack.redis()
    try:
        found: list[bytes] = list(rdb.scan_iter(match=keys.WEBHOOK + "*"))
        raw: list[dict[bytes, bytes]] = [rdb.hgetall(n.decode()) for n in found]  # type: ignore[misc]
        return [{k.decode(): v.decode() for k, v in r.items()} for r in raw]
    finally:
        rdb.close()


def test_an_async_job_of_a_key_with_a_webhook_gets_a_signed_job_succeeded(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    stack = make_stack(admin_key="admin-secret")
    made = create_key(stack.url, "hooked", webhook_url=receiver.url("/hooks"))
    key, secret = made["key"], made["webhook_secret"]

    job_id = submit(stack, key)
    assert finished(stack, key, job_id)["status"] == "succeeded"
    (delivery,) = wait_until(lambda: receiver.at("/hooks"), what="the job.succeeded webhook")

    event = delivery.verify(secret)
    assert event["type"] == "job.succeeded" and event["object"] == "event"
    assert event["data"] == {"id": job_id}
    assert event["id"].startswith("evt_") and delivery.headers["webhook-id"] == event["id"]
    assert abs(int(delivery.headers["webhook-timestamp"]) - time.time()) < 60
    assert abs(event["created_at"] - time.time()) < 60
    assert delivery.headers["content-type"] == "application/json"
    with pytest.raises(standardwebhooks.webhooks.WebhookVerificationError):
        standardwebhooks.Webhook(new_secret()).verify(delivery.body, delivery.headers)

    # delivered: no longer listed, nothing due
    wait_until(
        lambda: [r["state"] for r in records(stack)] == [State.DELIVERED],
        what="the delivery recorded as delivered",
    )
    assert listed(stack, "hooked") == []


def test_only_async_jobs_of_keys_with_a_webhook_make_events(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    stack = make_stack(admin_key="admin-secret")
    hooked = create_key(stack.url, "hooked", webhook_url=receiver.url("/hooks"))["key"]
    plain = create_key(stack.url, "plain")["key"]

    with stack.client(hooked) as client:  # a synchronous call: its caller has the answer
        r = client.post("/api/generate", json={**GEN, "stream": False})
        assert r.status_code == 200, r.text
    plain_job = submit(stack, plain)
    assert finished(stack, plain, plain_job)["status"] == "succeeded"
    hooked_job = submit(stack, hooked)  # the one event, after both others ended
    assert finished(stack, hooked, hooked_job)["status"] == "succeeded"

    wait_until(lambda: receiver.at("/hooks"), what="the async job's webhook")
    assert [json.loads(d.body)["data"]["id"] for d in receiver.received] == [hooked_job]
    assert [(r["key"], r["data_id"]) for r in records(stack)] == [("hooked", hooked_job)]
    assert listed(stack, "plain") == []


def test_a_failed_delivery_is_retried_with_the_same_id_and_body(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    stack = make_stack(admin_key="admin-secret")
    receiver.answers["/flaky"] = [500, 200]
    made = create_key(stack.url, "flaky", webhook_url=receiver.url("/flaky"))

    job_id = submit(stack, made["key"])
    wait_until(
        lambda: len(receiver.at("/flaky")) >= 2,
        timeout=15,
        what="the webhook answered 500, then retried",
    )
    first, second = receiver.at("/flaky")
    assert first.headers["webhook-id"] == second.headers["webhook-id"]
    assert first.body == second.body
    for delivery in (first, second):
        assert delivery.verify(made["webhook_secret"])["data"] == {"id": job_id}
    wait_until(
        lambda: [(r["state"], r["attempts"]) for r in records(stack)] == [("delivered", "2")],
        what="the delivery recorded as delivered on its second attempt",
    )
    assert len(receiver.at("/flaky")) == 2  # a 2xx ends it


def test_admin_webhooks_shows_a_failing_delivery_and_its_failure(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    stack = make_stack(admin_key="admin-secret")
    receiver.answers["/down"] = [503]
    made = create_key(stack.url, "down", webhook_url=receiver.url("/down"))
    job_id = submit(stack, made["key"])

    (shown,) = wait_until(
        lambda: [w for w in listed(stack, "down") if w["attempts"] >= 2],
        timeout=15,
        what="two failed attempts in /admin/webhooks",
    )
    assert shown["id"].startswith("evt_") and shown["type"] == "job.succeeded"
    assert shown["data"] == {"id": job_id} and shown["state"] == "pending"
    assert shown["last_status"] == 503 and shown["last_error"] == "HTTP 503"
    assert shown["next_attempt_at"] >= shown["created_at"]
    # the backoff doubles from a second: the 2nd attempt a second after the 1st
    times = [int(d.headers["webhook-timestamp"]) for d in receiver.at("/down")]
    assert 0 <= times[1] - times[0] <= 3, times

    # the key's webhook removed: its next attempt fails for good, and stays listed
    r = httpx.patch(
        stack.url + "/admin/keys/down", json={"webhook_url": None}, headers=ADMIN, timeout=10
    )
    assert r.status_code == 200, r.text
    (failed,) = wait_until(
        lambda: [w for w in listed(stack, "down") if w["state"] == "failed"],
        timeout=15,
        what="the delivery failed once its key had no webhook",
    )
    assert failed["last_error"] == "no webhook configured" and failed["last_status"] is None
    assert failed["next_attempt_at"] is None

    unknown = httpx.get(stack.url + "/admin/webhooks", params={"key": "nobody"}, headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"] == "not_found"
    forbidden = httpx.get(stack.url + "/admin/webhooks", params={"key": "down"})
    assert forbidden.status_code == 403


def test_a_keys_file_key_gets_job_failed_and_job_cancelled(
    make_stack: StackFactory, slow_sim: Process, receiver: Receiver, tmp_path: Path
) -> None:
    secret = new_secret()
    keys_file = write_keys_file(
        tmp_path / "keys.toml",
        [Key("filed", "file-secret", webhook_url=receiver.url("/file"), webhook_secret=secret)],
    )
    stack = make_stack(
        ollama_url=slow_sim.url,
        admin_key="admin-secret",
        keys_file=str(keys_file),
        gpu_concurrency=1,
    )
    # no such model: the backend's 404 fails the job
    failed = submit(stack, "file-secret", {**GEN, "model": "no-such-model"})
    assert finished(stack, "file-secret", failed)["status"] == "failed"
    running = submit(stack, "file-secret")
    queued = submit(stack, "file-secret")
    with stack.client("file-secret") as client:
        r = client.delete(f"/v1/jobs/{queued}")
        assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert finished(stack, "file-secret", running)["status"] == "succeeded"

    def events() -> dict[str, str]:
        bodies = [d.verify(secret) for d in receiver.at("/file")]
        return {e["data"]["id"]: e["type"] for e in bodies}

    wait_until(lambda: len(events()) == 3, what="three webhooks of the keys file's key")
    assert events() == {failed: "job.failed", queued: "job.cancelled", running: "job.succeeded"}
    assert listed(stack, "filed") == []
    # the secret is in Redis for the workers, and nowhere an API shows it
    shown = httpx.get(stack.url + "/admin/keys/filed", headers=ADMIN).json()
    assert secret not in json.dumps(shown) and shown["webhook_url"] == receiver.url("/file")


def test_a_batch_of_a_key_with_a_webhook_gets_batch_completed_and_nothing_per_line(
    make_stack: StackFactory, receiver: Receiver
) -> None:
    stack = make_stack(admin_key="admin-secret")
    made = create_key(stack.url, "nightly", webhook_url=receiver.url("/batches"))
    with OpenAI(  # closed with the test: an unclosed socket fails the session at its end
        base_url=stack.url + "/v1", api_key=made["key"], max_retries=0, timeout=30
    ) as client:
        lines = [
            {
                "custom_id": f"req-{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "model": "llama3.2",
                    "messages": [{"role": "user", "content": f"say {i}"}],
                },
            }
            for i in range(3)
        ]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        file_id = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch").id
        batch = client.batches.create(
            input_file_id=file_id, endpoint="/v1/chat/completions", completion_window="24h"
        )

        (delivery,) = wait_until(
            lambda: receiver.at("/batches"), timeout=60, what="the batch.completed webhook"
        )
        event = delivery.verify(made["webhook_secret"])
        assert event["type"] == "batch.completed" and event["data"] == {"id": batch.id}
        assert client.batches.retrieve(batch.id).status == "completed"
    assert [r["type"] for r in records(stack)] == ["batch.completed"]  # none for its lines


def test_a_keys_file_webhook_without_a_valid_secret_is_refused_naming_the_key(
    tmp_path: Path,
) -> None:
    default = Tier(DEFAULT_TIER, Rate.parse("60/minute"), 10, 10, priority=0)
    url = "https://hooks.example/gpugate"
    no_secret = write_keys_file(tmp_path / "a.toml", [Key("team-a", "s1", webhook_url=url)])
    with pytest.raises(ValueError, match=r"'team-a'.*webhook_url needs a webhook_secret"):
        load_keys_file(no_secret, default)
    for bad in ("whsec_not base64!", "whsec_" + base64.b64encode(b"short").decode(), "hunter2" * 5):
        path = write_keys_file(
            tmp_path / "b.toml", [Key("team-b", "s2", webhook_url=url, webhook_secret=bad)]
        )
        with pytest.raises(ValueError, match=r"'team-b'.*webhook_secret is not valid") as raised:
            load_keys_file(path, default)
        assert bad not in str(raised.value)
    good = write_keys_file(
        tmp_path / "c.toml", [Key("team-c", "s3", webhook_url=url, webhook_secret=new_secret())]
    )
    (key,) = load_keys_file(good, default).keys or []
    assert key.webhook_url == url and key.webhook_secret and key.webhook_secret not in repr(key)


# --- the delivery scripts on their own, against the suite's redis-server ---------------

_databases = itertools.count(190)


@pytest.fixture
async def redis(redis_proc: Process) -> AsyncIterator[Redis]:
    client = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/{next(_databases) % 10 + 190}")
    await client.flushdb()
    yield client
    await client.aclose()


async def pending(redis: Redis, event_id: str, created_at_ms: int) -> None:
    """A delivery as shared/lua/lib/webhook.lua emits it."""
    await redis.hset(  # type: ignore[misc]
        keys.WEBHOOK + event_id,
        mapping={
            "id": event_id,
            "key": "k",
            "type": "job.succeeded",
            "data_id": "j",
            "created_at": created_at_ms,
            "body": '{"id":"' + event_id + '"}',
            "attempts": 0,
            "state": "pending",
            "next_at": created_at_ms,
        },
    )
    await redis.zadd(keys.WEBHOOK_DUE, {event_id: created_at_ms})
    await redis.zadd(keys.WEBHOOKS_OF + "k", {event_id: created_at_ms})


async def done(scripts: Scripts, claim: Any, outcome: WebhookOutcome, **policy: int) -> Any:
    args = {
        "base_ms": 1000,
        "max_ms": 3_600_000,
        "retry_for_ms": 86_400_000,
        "delivered_keep_ms": 60_000,
        "failed_keep_ms": 120_000,
        "listing_keep_ms": 300_000,
        **policy,
    }
    return await scripts.webhook_done(
        id=claim.id, claim=claim.claim, outcome=outcome, status=500, error="HTTP 500", **args
    )


async def claim(scripts: Scripts, worker: str = "w1") -> list[Any]:
    return await scripts.claim_webhooks(
        worker=worker, limit=8, lease_ms=30_000, listing_keep_ms=300_000
    )


async def test_a_claimed_delivery_is_no_other_workers_and_backs_off_doubling(redis: Redis) -> None:
    scripts = Scripts(redis.execute_command)
    now_ms = int(time.time() * 1000)
    await pending(redis, "evt_a", now_ms - 1000)
    (mine,) = await claim(scripts, "w1")
    assert (mine.id, mine.attempts, mine.body) == ("evt_a", 0, '{"id":"evt_a"}')
    assert await claim(scripts, "w2") == []  # claimed: not due for another worker

    delays = []
    for _ in range(14):
        reply = await done(scripts, mine, WebhookOutcome.RETRY)
        assert reply.state is State.PENDING
        delays.append(round((reply.next_at_ms - time.time() * 1000) / 1000))
        await redis.zadd(keys.WEBHOOK_DUE, {"evt_a": 0})  # due now, whatever the backoff
        (mine,) = await claim(scripts)
    assert delays[:5] == [1, 2, 4, 8, 16] and delays[-2:] == [3600, 3600], delays

    # a claim that lapsed and was taken again records nothing
    await redis.zadd(keys.WEBHOOK_DUE, {"evt_a": 0})
    (again,) = await claim(scripts, "w2")
    assert (await done(scripts, mine, WebhookOutcome.DELIVERED)).state is None
    delivered = await done(scripts, again, WebhookOutcome.DELIVERED)
    assert delivered.state is State.DELIVERED and delivered.attempts == 15
    assert await redis.zcard(keys.WEBHOOK_DUE) == 0
    assert await redis.zcard(keys.WEBHOOKS_OF + "k") == 0
    assert 0 < await redis.pttl(keys.WEBHOOK + "evt_a") <= 60_000


async def test_a_retry_past_the_window_fails_and_stays_listed(redis: Redis) -> None:
    scripts = Scripts(redis.execute_command)
    now_ms = int(time.time() * 1000)
    await pending(redis, "evt_b", now_ms - 5000)
    (mine,) = await claim(scripts)
    # a window of 5.5 s from the event: the next attempt (in 1 s) would come after it
    reply = await done(scripts, mine, WebhookOutcome.RETRY, retry_for_ms=5_500)
    assert reply.state is State.FAILED and reply.next_at_ms is None
    record = await redis.hgetall(keys.WEBHOOK + "evt_b")  # type: ignore[misc]
    assert record[b"state"] == b"failed" and record[b"last_error"] == b"HTTP 500"
    assert await redis.zcard(keys.WEBHOOK_DUE) == 0
    assert await redis.zrange(keys.WEBHOOKS_OF + "k", 0, -1) == [b"evt_b"]
    assert 60_000 < await redis.pttl(keys.WEBHOOK + "evt_b") <= 120_000
    assert await claim(scripts) == []
