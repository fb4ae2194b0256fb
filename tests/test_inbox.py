"""A synchronous call that is not streamed waits for its job's end in its API process's
inbox (api/inbox.py): one XREAD per process for all such calls, fed by the end-of-job
scripts. Streamed calls keep reading their job's own event stream."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.conftest import Stack, StackFactory, slow_sim_fixture
from tests.processes import Process, wait_until

GENERATE = {"model": "llama3.2", "prompt": "hi", "stream": False}

slow_sim = slow_sim_fixture(0.3)  # 5 tokens at 0.3 s: a reply takes about 1.5 s


def _call(stack: Stack, key: str, body: dict[str, object]) -> httpx.Response:
    with stack.client(key) as client:
        return client.post("/api/generate", json=body)


def test_concurrent_synchronous_calls_get_their_ends_through_one_inbox(stack: Stack) -> None:
    with ThreadPoolExecutor(16) as pool:
        replies = list(pool.map(lambda i: _call(stack, f"inbox-{i}", GENERATE), range(32)))
    assert all(r.status_code == 200 and r.json()["done"] is True for r in replies), [
        (r.status_code, r.text[:200]) for r in replies if r.status_code != 200
    ]
    job_ids = [r.headers["x-gpugate-job-id"] for r in replies]
    with stack.redis() as rdb:
        inboxes = {rdb.hget(f"gpugate:job:{job_id}", "inbox") for job_id in job_ids}
        assert len(inboxes) == 1 and b"" not in inboxes and None not in inboxes, inboxes
        (inbox,) = inboxes
        assert inbox is not None
        delivered = {
            fields[b"job"].decode()
            for _, fields in rdb.xrange(b"gpugate:inbox:" + inbox)
            if fields[b"type"] == b"end"
        }
    assert set(job_ids) <= delivered


def test_a_streamed_call_reads_its_own_event_stream_not_the_inbox(stack: Stack) -> None:
    reply = _call(stack, "inbox-stream", {**GENERATE, "stream": True})
    assert reply.status_code == 200 and reply.text.count("\n") >= 2
    with stack.redis() as rdb:
        assert rdb.hget(f"gpugate:job:{reply.headers['x-gpugate-job-id']}", "inbox") == b""


def test_a_waiting_call_whose_running_job_is_cancelled_gets_its_409(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(ollama_url=slow_sim.url)
    answer: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answer.append(_call(stack, "inbox-c", GENERATE)))
    caller.start()
    with stack.redis() as rdb:

        def running_job() -> str | None:
            for key in rdb.scan_iter("gpugate:job:*"):
                if rdb.hget(key, "status") == b"running":
                    return key.decode().removeprefix("gpugate:job:")
            return None

        job_id = wait_until(running_job, timeout=10, interval=0.02, what="the job running")
    cancelled_at = time.monotonic()
    with stack.client("inbox-c") as client:
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 200
    caller.join(timeout=10)
    assert answer and answer[0].status_code == 409, answer and answer[0].text
    assert answer[0].json()["job_id"] == job_id
    assert time.monotonic() - cancelled_at < 5


def test_the_inbox_reader_outlives_a_redis_error_reply(make_stack: StackFactory) -> None:
    """A Redis error that is not a lost connection (here: XREAD denied by an ACL) must not
    end the reader: once XREAD is allowed again, waiting calls get their ends at once, not
    at their sync deadline."""
    stack = make_stack()
    assert _call(stack, "inbox-acl", GENERATE).status_code == 200
    with stack.redis() as rdb:
        rdb.acl_log_reset()
        rdb.execute_command("ACL", "SETUSER", "default", "-xread")
        try:
            # the reader's XREAD in flight returns with this call's end; its next is denied
            assert _call(stack, "inbox-acl", GENERATE).status_code == 200

            def denied() -> bool:
                return any(e.get("object") == "xread" for e in rdb.acl_log())

            wait_until(denied, timeout=10, what="the inbox's XREAD denied")
        finally:
            rdb.execute_command("ACL", "SETUSER", "default", "+xread")
    started = time.monotonic()
    reply = _call(stack, "inbox-acl", GENERATE)
    assert reply.status_code == 200, reply.text
    assert time.monotonic() - started < 5


async def test_a_thousand_synchronous_callers_at_once_each_get_their_answer(
    make_stack: StackFactory,
) -> None:
    """SPEC "Invariants": every synchronous caller gets its answer, whatever the number
    waiting at once. A thousand calls wait together on one API process's inbox."""
    callers = 1_000
    stack = make_stack(
        gpu_concurrency=8,
        worker_concurrency=8,
        max_queue_depth=callers,
        burst=callers,
        rate_limit="100000/minute",
    )
    limits = httpx.Limits(max_connections=callers, max_keepalive_connections=callers)
    async with httpx.AsyncClient(
        base_url=stack.url, timeout=120, limits=limits, headers={"X-API-Key": "many"}
    ) as client:
        replies = await asyncio.gather(
            *(client.post("/api/generate", json=GENERATE) for _ in range(callers))
        )
    codes = [r.status_code for r in replies]
    assert codes.count(200) == callers, {c: codes.count(c) for c in set(codes)}
    assert all(r.json()["done"] is True for r in replies)
    assert len({r.headers["x-gpugate-job-id"] for r in replies}) == callers
