"""Keys managed live (/admin/keys): changes on every API process within a second, model
allow-lists, budgets, max_running across the fleet, the audit trail, no secret stored."""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from gpugate.testing.keys import Key, write_keys_file
from gpugate.testing.stack import start_redis, start_stack
from shared import keys
from tests.conftest import Stack, StackFactory, sim_configure, sim_stats, slow_sim_fixture
from tests.processes import Process, wait_until

ADMIN = {"X-Admin-Key": "admin-secret"}
GEN = {"model": "llama3.2", "prompt": "hello", "stream": False}

# 5 tokens at 100 ms: a job holds its slot for about half a second.
slow_sim = slow_sim_fixture(0.1)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def create(url: str, **fields: Any) -> dict[str, Any]:
    r = httpx.post(url + "/admin/keys", json=fields, headers=ADMIN, timeout=10)
    assert r.status_code == 201, r.text
    return dict(r.json())


def generate(url: str, key: str, model: str = "llama3.2", **extra: Any) -> httpx.Response:
    body = {**GEN, "model": model, **extra}
    return httpx.post(url + "/api/generate", json=body, headers=bearer(key), timeout=30)


def test_a_key_created_on_one_api_is_used_and_revoked_on_another_within_a_second(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(admin_key="admin-secret", unknown_keys="refuse")
    first = stack.url
    second = stack.add_api().url
    stack.wait_for_workers()

    made = create(first, name="team-a-app")
    key = made["key"]
    assert key.startswith("gg_") and len(key) >= 35
    assert made["source"] == "api" and made["fingerprint"] == keys_digest(key)[:8]

    started = time.monotonic()
    wait_until(
        lambda: generate(second, key).status_code == 200,
        timeout=1.5,
        what="the key created on the first API accepted by the second",
    )
    assert time.monotonic() - started < 1.5

    r = httpx.delete(second + "/admin/keys/team-a-app", headers=ADMIN, timeout=10)
    assert r.status_code == 200 and r.json()["name"] == "team-a-app"
    started = time.monotonic()
    wait_until(
        lambda: generate(first, key).status_code == 401,
        timeout=1.5,
        what="the key revoked on the second API refused by the first",
    )
    assert time.monotonic() - started < 1.5
    refused = generate(first, key)
    assert refused.json()["error"] == "invalid_api_key"
    # a key once known never falls back to the default tier, whatever the setting
    assert httpx.get(first + "/admin/keys/team-a-app", headers=ADMIN).status_code == 404


def keys_digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_revoked_disabled_expired_and_past_grace_keys_get_401_even_with_default_tier(
    make_stack: StackFactory,
) -> None:
    stack = make_stack(admin_key="admin-secret", unknown_keys="default_tier")
    url = stack.url
    # an unknown key is on the default tier here
    assert generate(url, "some-unknown-key").status_code == 200

    disabled = create(url, name="disabled")
    r = httpx.patch(url + "/admin/keys/disabled", json={"disabled": True}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["disabled"] is True
    assert generate(url, disabled["key"]).status_code == 401
    r = httpx.patch(url + "/admin/keys/disabled", json={"disabled": False}, headers=ADMIN)
    assert generate(url, disabled["key"]).status_code == 200

    past = (datetime.now(UTC) - timedelta(seconds=1)).isoformat()
    expired = create(url, name="expired", expires_at=past)
    assert generate(url, expired["key"]).status_code == 401

    rotated = create(url, name="rotated")
    r = httpx.post(url + "/admin/keys/rotated/rotate", json={"grace_seconds": 2}, headers=ADMIN)
    assert r.status_code == 200
    new_key = r.json()["key"]
    assert new_key != rotated["key"]
    assert generate(url, rotated["key"]).status_code == 200  # in its grace
    assert generate(url, new_key).status_code == 200
    wait_until(
        lambda: httpx.get(url + "/v1/me", headers=bearer(rotated["key"])).status_code == 401,
        timeout=10,
        interval=0.05,
        what="the old key refused once its grace is over",
    )
    assert generate(url, rotated["key"]).status_code == 401
    assert generate(url, new_key).status_code == 200

    revoked = create(url, name="revoked")
    httpx.delete(url + "/admin/keys/revoked", headers=ADMIN).raise_for_status()
    body = generate(url, revoked["key"]).json()
    assert body["error"] == "invalid_api_key"


def test_admin_keys_api_validates_and_conflicts(make_stack: StackFactory, tmp_path: Path) -> None:
    keys_file = write_keys_file(
        tmp_path / "keys.toml",
        [Key("file-key", "file-secret", "pro")],
        {"pro": {"rate": "600/minute", "burst": 50, "max_running": 2, "budget": "1000/day"}},
    )
    stack = make_stack(admin_key="admin-secret", keys_file=str(keys_file))
    url = stack.url
    listed = httpx.get(url + "/admin/keys", headers=ADMIN).json()["keys"]
    (file_key,) = [k for k in listed if k["name"] == "file-key"]
    assert file_key["source"] == "file" and file_key["tier"] == "pro"
    assert file_key["max_running"] == 2
    assert file_key["budget"] == {"tokens": 1000, "period": "day"}
    assert httpx.patch(url + "/admin/keys/file-key", json={}, headers=ADMIN).status_code == 409
    assert httpx.delete(url + "/admin/keys/file-key", headers=ADMIN).status_code == 409
    assert (
        httpx.post(url + "/admin/keys", json={"name": "file-key"}, headers=ADMIN).status_code == 409
    )

    create(url, name="pro-app", tier="pro", models=["llama3.2", "qwen2.5:*"])
    again = httpx.post(url + "/admin/keys", json={"name": "pro-app"}, headers=ADMIN)
    assert again.status_code == 409 and again.json()["error"] == "conflict"
    for bad, field in (
        ({"name": "x", "tier": "gold"}, "tier"),
        ({"name": "bad name!"}, "name"),
        ({"name": "x", "budget": {"tokens": 0, "period": "day"}}, "budget"),
        ({"name": "x", "max_running": 0}, "max_running"),
        ({"name": "x", "colour": "red"}, "colour"),
    ):
        r = httpx.post(url + "/admin/keys", json=bad, headers=ADMIN)
        assert r.status_code == 422, (bad, r.text)
        assert r.json()["error"] == "invalid_request" and field in r.json()["message"]
    assert httpx.post(url + "/admin/keys", json={"name": "x"}).status_code == 403
    assert httpx.get(url + "/admin/keys/nope", headers=ADMIN).status_code == 404

    # the keys file's tier applies to a key of the API; an unknown key is refused here
    assert generate(url, "not-a-key").status_code == 401
    assert generate(url, "file-secret").status_code == 200


def test_a_disallowed_model_is_refused_at_the_edge_and_hidden_from_metadata(
    make_stack: StackFactory, sim_proc: Process
) -> None:
    stack = make_stack(admin_key="admin-secret")
    url = stack.url
    key = create(url, name="llama-only", models=["llama3.2"])["key"]
    sim_configure(sim_proc)

    for path, body in (
        ("/api/generate", {**GEN, "model": "qwen2.5:7b"}),
        (
            "/v1/chat/completions",
            {"model": "qwen2.5:7b", "messages": [{"role": "user", "content": "hi"}]},
        ),
        ("/v1/jobs", {"endpoint": "/api/generate", "body": {**GEN, "model": "qwen2.5:7b"}}),
    ):
        r = httpx.post(url + path, json=body, headers=bearer(key), timeout=30)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"] == "model_not_allowed"
        assert "qwen2.5:7b" in r.json()["message"]
    assert sim_stats(sim_proc)["requests"] == 0, "a refused model reached the backend"
    assert generate(url, key, "llama3.2:latest").status_code == 200
    assert sim_stats(sim_proc)["requests"] == 1

    every = {m["name"] for m in httpx.get(url + "/api/tags").json()["models"]}
    assert len(every) > 1
    tags = httpx.get(url + "/api/tags", headers=bearer(key)).json()["models"]
    assert {m["name"] for m in tags} == {"llama3.2:latest"}
    models = httpx.get(url + "/v1/models", headers=bearer(key)).json()["data"]
    assert {m["id"] for m in models} == {"llama3.2:latest"}
    other = sorted(every - {"llama3.2:latest"})[0]
    assert httpx.get(url + f"/v1/models/{other}").status_code == 200
    assert httpx.get(url + f"/v1/models/{other}", headers=bearer(key)).status_code == 404
    shown = httpx.post(url + "/api/show", json={"model": other}, headers=bearer(key))
    assert shown.status_code == 404 and "not found" in shown.json()["error"]
    assert (
        httpx.post(url + "/api/show", json={"model": "llama3.2"}, headers=bearer(key)).status_code
        == 200
    )

    # the allow-list changes live
    r = httpx.patch(url + "/admin/keys/llama-only", json={"models": None}, headers=ADMIN)
    assert r.status_code == 200 and r.json()["models"] is None
    assert generate(url, key, "qwen2.5:7b").status_code != 403


def seconds_to_midnight() -> float:
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (midnight - now).total_seconds()


def test_a_used_up_budget_is_budget_exhausted_until_midnight_and_never_reaches_the_backend(
    make_stack: StackFactory, sim_proc: Process
) -> None:
    stack = make_stack(admin_key="admin-secret")
    url = stack.url
    key = create(url, name="small", budget={"tokens": 5, "period": "day"})["key"]
    me = httpx.get(url + "/v1/me", headers=bearer(key)).json()
    assert me["name"] == "small"
    assert me["budget"]["tokens"] == 5 and me["budget"]["used"] == 0

    sim_configure(sim_proc)
    # a request naming more than the budget holds is refused at once
    assert generate(url, key, options={"num_predict": 100}).status_code == 429
    assert generate(url, key).status_code == 200  # some input tokens + 5 output: over 5
    used = httpx.get(url + "/v1/me", headers=bearer(key)).json()["budget"]
    assert used["used"] > 5 and used["remaining"] == 0
    served = sim_stats(sim_proc)["requests"]

    refused = generate(url, key)
    assert refused.status_code == 429
    body = refused.json()
    assert body["error"] == "budget_exhausted"
    midnight = datetime.now(UTC).date() + timedelta(days=1)
    assert body["resets_at"] == f"{midnight.isoformat()}T00:00:00Z"
    retry_after = int(refused.headers["Retry-After"])
    assert retry_after == body["retry_after"]
    assert abs(retry_after - math.ceil(seconds_to_midnight())) <= 2
    jobs = httpx.post(
        url + "/v1/jobs", json={"endpoint": "/api/generate", "body": GEN}, headers=bearer(key)
    )
    assert jobs.status_code == 429 and jobs.json()["error"] == "budget_exhausted"
    assert sim_stats(sim_proc)["requests"] == served, "a request over budget reached the backend"

    record = httpx.get(url + "/admin/keys/small", headers=ADMIN).json()
    assert record["usage"]["budget_used"] > 5 and record["usage"]["budget_remaining"] == 0
    metrics = httpx.get(url + "/metrics").text
    assert 'gpugate_key_budget_used_tokens{key="small"}' in metrics
    assert 'gpugate_rejections_total{reason="budget_exhausted"} 3.0' in metrics

    # a bigger budget takes effect at once
    r = httpx.patch(
        url + "/admin/keys/small",
        json={"budget": {"tokens": 1000, "period": "month"}},
        headers=ADMIN,
    )
    assert r.status_code == 200
    assert generate(url, key).status_code == 200


def _job_windows(stack: Stack, ids: list[str]) -> list[tuple[int, int]]:
    """Each job's start and end on its GPU slot, in Redis's ms (the job records)."""
    rdb = stack.redis()
    try:
        windows = []
        for job_id in ids:
            status, started, finished = rdb.hmget(
                keys.job(job_id), ["status", "started_at", "finished_at"]
            )
            assert status == b"succeeded", (job_id, status)
            windows.append((int(started), int(finished)))
    finally:
        rdb.close()
    return sorted(windows)


def _submit(url: str, key: str, n: int) -> list[str]:
    ids = []
    for _ in range(n):
        r = httpx.post(
            url + "/v1/jobs", json={"endpoint": "/api/generate", "body": GEN}, headers=bearer(key)
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["id"])
    return ids


def _all_done(url: str, key: str, ids: list[str]) -> bool:
    return all(
        httpx.get(f"{url}/v1/jobs/{i}", headers=bearer(key)).json()["status"] == "succeeded"
        for i in ids
    )


def test_a_key_with_max_running_one_never_runs_two_jobs_while_other_keys_run(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    stack = make_stack(
        ollama_url=slow_sim.url, admin_key="admin-secret", gpu_concurrency=3, workers=2
    )
    url = stack.url
    one = create(url, name="one-at-a-time", max_running=1)["key"]
    other = create(url, name="other")["key"]
    mine = _submit(url, one, 4)
    theirs = _submit(url, other, 4)
    wait_until(lambda: _all_done(url, one, mine), timeout=30, what="the limited key's jobs")
    wait_until(lambda: _all_done(url, other, theirs), timeout=30, what="the other key's jobs")

    limited = _job_windows(stack, mine)
    for (_, end), (start, _) in itertools.pairwise(limited):
        assert start >= end, f"two jobs of a max_running=1 key overlapped: {limited}"
    free = _job_windows(stack, theirs)
    alongside = [(s, e) for s, e in free if any(s < le and ls < e for ls, le in limited)]
    assert alongside, "the other key's jobs should have run alongside the limited key's"
    # the free key was not held to one: some of its jobs overlapped each other
    assert any(s2 < e1 for (_, e1), (s2, _) in itertools.pairwise(free)), free


def test_no_clear_key_or_secret_in_redis_or_any_log(make_stack: StackFactory) -> None:
    stack = make_stack(admin_key="admin-secret", log_level="info")
    url = stack.url
    made = create(url, name="hooked", webhook_url="https://hooks.example/gpugate")
    secret = made["webhook_secret"]
    assert secret.startswith("whsec_")
    assert "webhook_secret" not in httpx.get(url + "/admin/keys/hooked", headers=ADMIN).json()
    rotated = httpx.post(url + "/admin/keys/hooked/rotate", headers=ADMIN).json()["key"]
    clear = [made["key"], rotated]
    for key in clear:
        generate(url, key)
    events = httpx.get(url + "/admin/audit", headers=ADMIN).json()["events"]
    assert [e["action"] for e in events] == ["rotate", "create"]
    assert events[1]["key"] == "hooked" and events[1]["by"] == "127.0.0.1"

    rdb = stack.redis()
    try:
        dump = []
        for name in rdb.scan_iter("*"):
            kind = rdb.type(name)
            if kind == b"string":
                dump.append(rdb.get(name))
            elif kind == b"hash":
                values = rdb.hgetall(name)
                dump += list(values.keys()) + [
                    v for f, v in values.items() if f != b"webhook_secret"
                ]
            elif kind == b"list":
                dump += rdb.lrange(name, 0, -1)
            elif kind == b"zset":
                dump += rdb.zrange(name, 0, -1)
            elif kind == b"set":
                dump += list(rdb.smembers(name))
            elif kind == b"stream":
                dump += [str(e).encode() for e in rdb.xrange(name)]
            dump.append(name)
        text = b"\n".join(d for d in dump if d)
    finally:
        rdb.close()
    logs = "\n".join(p.log() for p in stack.processes)
    assert "audit" in logs and "hooked" in logs
    for value in [*clear, secret]:
        assert value.encode() not in text, "a clear key or secret is stored in Redis"
        assert value not in logs, "a clear key or secret is in a log"


@pytest.mark.parametrize("unknown", ["refuse", "default_tier"])
def test_unknown_keys_setting(make_stack: StackFactory, unknown: str) -> None:
    stack = make_stack(admin_key="admin-secret", unknown_keys=unknown)
    status = generate(stack.url, "never-created").status_code
    assert status == (401 if unknown == "refuse" else 200)
    me = httpx.get(stack.url + "/v1/me", headers=bearer("never-created"))
    if unknown == "refuse":
        assert me.status_code == 401
    else:
        assert me.json()["name"] == "anonymous" and me.json()["budget"] is None


def gpugate_keys(url: str, *args: str, ok: bool = True) -> str:
    env = {**os.environ, "GPUGATE_ADMIN_KEY": "admin-secret"}
    argv = [sys.executable, "-m", "gpugate", "keys", "--url", url, *args]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert (done.returncode == 0) == ok, (args, done.stdout, done.stderr)
    return done.stdout + done.stderr


def _printed_key(out: str) -> str:
    (line,) = [line for line in out.splitlines() if line.startswith("key: ")]
    return line.removeprefix("key: ")


def test_the_cli_creates_lists_sets_rotates_and_revokes(make_stack: StackFactory) -> None:
    stack = make_stack(admin_key="admin-secret")
    url = stack.url
    out = gpugate_keys(
        url,
        "create",
        "cli-app",
        "--models",
        "llama3.2,qwen2.5:*",
        "--max-running",
        "2",
        "--budget",
        "1000/day",
        "--expires",
        "2099-01-01",
    )
    key = _printed_key(out)
    assert "budget: 1000/day" in out and "expires_at: 2099-01-01T00:00:00Z" in out
    assert generate(url, key).status_code == 200
    listed = gpugate_keys(url, "list")
    assert "cli-app" in listed and "1000/day" in listed and "llama3.2,qwen2.5:*" in listed

    assert "disabled: true" in gpugate_keys(url, "set", "cli-app", "--disable")
    assert generate(url, key).status_code == 401
    out = gpugate_keys(url, "set", "cli-app", "--enable", "--budget", "", "--models", "")
    assert "disabled: false" in out and "budget: -" in out and "models: -" in out
    assert generate(url, key, "qwen2.5:7b").status_code == 404  # allowed; the sim lacks it

    new_key = _printed_key(gpugate_keys(url, "rotate", "cli-app"))
    assert generate(url, key).status_code == 401
    assert generate(url, new_key).status_code == 200
    assert "revoked cli-app" in gpugate_keys(url, "revoke", "cli-app")
    assert generate(url, new_key).status_code == 401
    assert "404" in gpugate_keys(url, "show", "cli-app", ok=False)

    r = httpx.put(url + "/admin/concurrency", json={"gpu_concurrency": 3}, headers=ADMIN)
    assert r.status_code == 200
    events = httpx.get(url + "/admin/audit?limit=3", headers=ADMIN).json()["events"]
    assert [e["action"] for e in events] == ["concurrency", "delete", "rotate"]
    assert events[0]["changes"]["gpu_concurrency"] == 3


def test_a_queued_job_cancelled_gives_its_budget_reservation_back(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    sim_configure(slow_sim, token_delay_s=0.6)  # the first job holds the one slot for 3 s
    stack = make_stack(ollama_url=slow_sim.url, admin_key="admin-secret", gpu_concurrency=1)
    url = stack.url
    key = create(url, name="reserving", budget={"tokens": 1000, "period": "week"})["key"]
    job = {"endpoint": "/api/generate", "body": GEN}
    first = httpx.post(url + "/v1/jobs", json=job, headers=bearer(key)).json()["id"]
    big = {"endpoint": "/api/generate", "body": {**GEN, "options": {"num_predict": 300}}}
    queued = httpx.post(url + "/v1/jobs", json=big, headers=bearer(key)).json()
    assert queued["status"] == "queued"

    def used() -> int:
        budget = httpx.get(url + "/v1/me", headers=bearer(key)).json()["budget"]
        assert budget["period"] == "week"
        return int(budget["used"])

    assert used() >= 300
    r = httpx.delete(f"{url}/v1/jobs/{queued['id']}", headers=bearer(key))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert used() < 300
    wait_until(lambda: _all_done(url, key, [first]), timeout=20, what="the first job's end")
    assert 0 < used() < 300


def test_keys_survive_a_redis_restart_with_persistence_and_a_new_api_process(
    sim_proc: Process, tmp_path: Path
) -> None:
    data = str(tmp_path / "redis-data")
    Path(data).mkdir()
    redis_server = start_redis(data_dir=data)
    stack = start_stack(
        sim_proc.url, redis_server.url, admin_key="admin-secret", unknown_keys="refuse"
    )
    try:
        kept = create(stack.url, name="kept")["key"]
        gone = create(stack.url, name="gone")["key"]
        httpx.delete(stack.url + "/admin/keys/gone", headers=ADMIN).raise_for_status()
        redis_server.stop()
        redis_server = start_redis(redis_server.port, data_dir=data)
        stack.api.stop()  # a new API process knows only what Redis kept
        stack.apis.clear()
        stack.add_api()
        stack.wait_for_workers()
        assert generate(stack.url, kept).status_code == 200
        assert generate(stack.url, gone).status_code == 401
        names = [
            k["name"] for k in httpx.get(stack.url + "/admin/keys", headers=ADMIN).json()["keys"]
        ]
        assert names == ["kept"]
    finally:
        stack.stop()
        redis_server.stop()


def test_max_running_of_a_keys_file_tier_holds_too(
    make_stack: StackFactory, slow_sim: Process, tmp_path: Path
) -> None:
    keys_file = write_keys_file(
        tmp_path / "keys.toml",
        [Key("one-lane", "one-lane-secret", "single")],
        {"single": {"rate": "600/minute", "burst": 50, "max_running": 1}},
    )
    stack = make_stack(ollama_url=slow_sim.url, keys_file=str(keys_file), gpu_concurrency=3)
    ids = _submit(stack.url, "one-lane-secret", 3)
    wait_until(
        lambda: _all_done(stack.url, "one-lane-secret", ids), timeout=30, what="the jobs' end"
    )
    windows = _job_windows(stack, ids)
    for (_, end), (start, _) in itertools.pairwise(windows):
        assert start >= end, f"two jobs of a max_running=1 tier overlapped: {windows}"
