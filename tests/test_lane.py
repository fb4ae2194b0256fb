"""The pipelined Redis connection of the admission path (`shared/redis/lane.py`), against a
real redis-server: replies in order, scripts after a flush, the database of the URL, and
a Redis that stops answering."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis import exceptions as rx

from gpugate.testing.processes import spawn
from shared.redis.lane import Lane, _error
from tests.processes import Process, free_port, start_redis, wait_until


async def test_concurrent_commands_get_their_own_replies(redis_proc: Process) -> None:
    lane = Lane(redis_proc.url.rsplit("/", 1)[0] + "/250")
    try:
        names = [f"lane-test-{i}" for i in range(200)]
        await asyncio.gather(*(lane.execute("SET", name, name) for name in names))
        replies = await asyncio.gather(*(lane.execute("GET", name) for name in names))
        assert replies == [name.encode() for name in names]
        with redis.Redis.from_url(redis_proc.url.rsplit("/", 1)[0] + "/250") as rdb:
            assert rdb.get("lane-test-7") == b"lane-test-7"  # the URL's database
            rdb.flushdb()
    finally:
        await lane.aclose()


async def test_a_script_runs_again_after_redis_forgot_it(redis_proc: Process) -> None:
    lane = Lane(redis_proc.url)
    source = "return tonumber(ARGV[1]) + 1"
    try:
        assert await lane.script(source, [41]) == 42
        await lane.execute("SCRIPT", "FLUSH")
        assert await lane.script(source, [1]) == 2  # NOSCRIPT, then the whole script
        with pytest.raises(rx.ResponseError):
            await lane.execute("NOT-A-COMMAND")
    finally:
        await lane.aclose()


async def test_a_redis_that_stops_answering_times_out_and_is_used_again_after() -> None:
    proc = start_redis()
    lane = Lane(proc.url, timeout_s=0.5)
    try:
        assert await lane.execute("PING") == b"PONG"
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(rx.TimeoutError):
                await lane.execute("PING")
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert await lane.execute("PING") == b"PONG"  # a new connection
        proc.stop()
        with pytest.raises(rx.ConnectionError):
            await lane.execute("PING")
    finally:
        await lane.aclose()
        proc.stop()


def test_a_redis_still_loading_its_data_is_unavailable_not_an_error() -> None:
    """After a restart Redis answers LOADING until its data is read: a 503, as redis-py
    raises it (the soak found these as 500s)."""
    loading = _error(rx.ResponseError("LOADING Redis is loading the dataset in memory"))
    assert isinstance(loading, rx.BusyLoadingError)
    assert type(_error(rx.ResponseError("ERR unknown command"))) is rx.ResponseError


async def test_closing_the_lane_stops_its_wait_runner(redis_proc: Process) -> None:
    """A WAIT round in flight (no replica will ever acknowledge) ends with the lane: its
    caller hears that the lane closed, and no task is left pending."""
    lane = Lane(redis_proc.url)
    await lane.execute("SET", "lane-close", "1")
    waiting = asyncio.create_task(lane.wait_replicas(1, 5_000))
    runner = await _started(lane)
    await lane.aclose()
    assert runner.done()
    with pytest.raises(rx.ConnectionError, match="closed"):
        await waiting


async def _started(lane: Lane) -> asyncio.Task[None]:
    for _ in range(1000):
        runner = lane._round_runner
        if runner is not None:
            return runner
        await asyncio.sleep(0)
    raise AssertionError("the lane's WAIT runner did not start")


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """A redis-server that speaks only TLS, with a self-signed certificate for 127.0.0.1."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl = [
        *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
        *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
        *("-addext", "subjectAltName=IP:127.0.0.1"),
    ]
    subprocess.run(openssl, check=True, capture_output=True)
    port = free_port()
    server = [
        *("redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"),
        *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
        *("--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no", "--save", ""),
    ]
    proc = spawn("redis-tls", server)
    url = f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}"

    def answers() -> bool:
        with redis.Redis.from_url(url) as client:
            return bool(client.ping())

    try:
        wait_until(answers, timeout=10, what="the TLS redis-server to answer")
        yield port, cert
    finally:
        proc.stop()


async def test_the_lane_takes_the_tls_options_of_the_url(tls_redis: tuple[int, Path]) -> None:
    """`rediss://…?ssl_ca_certs=…` trusts that CA for the lane as for redis-py; without
    it the self-signed server is refused (verification is on by default)."""
    port, cert = tls_redis
    trusting = Lane(f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={cert}")
    default = Lane(f"rediss://127.0.0.1:{port}/0")
    try:
        assert await trusting.execute("PING") == b"PONG"
        with pytest.raises(rx.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
            await default.execute("PING")
    finally:
        await trusting.aclose()
        await default.aclose()
