"""`redis+sentinel://` URLs (`shared/redis/store.py`, `shared/redis/lane.py`, `shared/redis/url.py`)
against a real cluster (`tests/sentinel.py`): a master, two replicas, three Sentinels.

The clients find the master through the Sentinels, pass over a Sentinel that names a
replica (READONLY), follow a `kill -9` of the master to the promoted replica with no
restart, and lose nothing that WAIT saw acknowledged. The failover test prints its
timeline (`pytest -s`) and records it as a property of the test (junit XML).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis
from arq.connections import ArqRedis
from redis.asyncio.connection import ConnectionPool

from shared import keys
from shared.errors import RedisUnavailable
from shared.redis import store
from shared.redis.lane import Lane
from shared.redis.url import SentinelURL, parse_sentinel
from shared.scripts import Scripts
from tests.processes import Process
from tests.sentinel import (
    MASTER_NAME,
    PASSWORD,
    SentinelCluster,
    start_cluster,
    start_sentinel,
    start_server,
)

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


@pytest.fixture(scope="module")
def cluster() -> Iterator[SentinelCluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop()


def _arq(url: str) -> ArqRedis:
    """arq's client as the worker builds it, on the pool of `store.connect`."""
    return ArqRedis(
        store.connect(url).connection_pool,
        job_serializer=lambda job: json.dumps(job).encode(),
        job_deserializer=json.loads,
    )


def test_a_sentinel_url_names_the_sentinels_the_master_and_the_database() -> None:
    assert parse_sentinel("redis+sentinel://:p%40ss@10.0.0.1:26380,sentinel-b/main/3") == (
        SentinelURL((("10.0.0.1", 26380), ("sentinel-b", 26379)), "main", 3, None, "p@ss")
    )
    assert parse_sentinel("redis+sentinel://[::1]:5000/main") == SentinelURL(
        (("::1", 5000),), "main"
    )
    assert parse_sentinel("redis://127.0.0.1:6379/0") is None
    for bad in (
        "redis+sentinel://h:1",
        "redis+sentinel://h:1/",
        "redis+sentinel://h:1/main/x",
        "redis+sentinel://h:port/main",
        "redis+sentinel://h:1,/main",
        "redis+sentinel://h:1/main?db=1",
    ):
        with pytest.raises(ValueError):
            parse_sentinel(bad)


def test_plain_redis_urls_are_unchanged(redis_proc: Process) -> None:
    client = store.connect(redis_proc.url)
    blocking = store.connect(redis_proc.url, blocking=True)
    assert type(client.connection_pool) is ConnectionPool
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["port"], kwargs["socket_timeout"], kwargs["health_check_interval"]) == (
        redis_proc.port,
        store.SOCKET_TIMEOUT_S,
        30,
    )
    assert blocking.connection_pool.connection_kwargs["socket_timeout"] is None
    assert Lane(redis_proc.url).sentinel is None


async def test_clients_reach_the_master_through_the_sentinels(cluster: SentinelCluster) -> None:
    master = cluster.wait_healthy()
    url = cluster.url(db=4)
    client, blocking, lane, arq = (
        store.connect(url),
        store.connect(url, blocking=True),
        Lane(url),
        _arq(url),
    )
    try:
        await client.set("reach:redis", "1")
        await blocking.set("reach:blocking", "1")
        assert await lane.execute("SET", "reach:lane", "1") == b"OK"
        assert await lane.script(INCR, ["reach:script"], [5]) == 5
        assert await lane.script("return ARGV[1]", ["old call"]) == b"old call"
        assert await client.register_script(INCR)(keys=["reach:script"], args=[1]) == 6
        assert await arq.enqueue_job("noop", _job_id="reach") is not None
        assert await blocking.xread({"reach:stream": "$"}, block=50) == []
        async with blocking.pubsub() as pubsub:
            await pubsub.subscribe("reach:channel")
            assert await client.publish("reach:channel", "hello") == 1
            message = None
            while message is None or message["type"] != "message":
                message = await pubsub.get_message(timeout=2)
                assert message is not None, "nothing published reached the subscriber"
            assert message["data"] == b"hello"
    finally:
        await client.aclose()
        await blocking.aclose()
        await arq.aclose(close_connection_pool=True)
        await lane.aclose()
    with cluster.client(master, db=4) as direct:
        assert direct.mget("reach:redis", "reach:blocking", "reach:lane") == [b"1"] * 3
        assert direct.get("reach:script") == b"6"
        assert direct.exists("arq:job:reach")


async def test_doctor_reports_the_master_its_replicas_and_the_sentinels(
    cluster: SentinelCluster,
) -> None:
    master = cluster.wait_healthy()
    report = await store.replication(cluster.url())
    assert report.master == f"127.0.0.1:{master}"
    assert report.role == "master"
    replica_ports = {p.port for p in cluster.servers if p.port != master}
    assert {r.address for r in report.replicas} == {f"127.0.0.1:{p}" for p in replica_ports}
    assert all(r.state == "online" and r.lag_bytes >= 0 for r in report.replicas)
    assert [view.master for view in report.sentinels] == [f"127.0.0.1:{master}"] * 3


async def test_wait_counts_the_replicas_that_acknowledged(cluster: SentinelCluster) -> None:
    master = cluster.wait_healthy()
    replicas = [proc for proc in cluster.servers if proc.port != master]
    url = cluster.url(db=2)
    lane, client = Lane(url), store.connect(url)
    stopped: list[Process] = []
    try:
        await lane.execute("SET", "wait:all", "1")
        assert await lane.wait_replicas(2, 1000) == 2
        await client.set("wait:all", "2")  # another client's write: the lane's WAIT covers it
        assert await lane.wait_replicas(2, 1000) == 2

        os.kill(replicas[0].pid, signal.SIGSTOP)
        stopped.append(replicas[0])
        await lane.execute("SET", "wait:one", "1")
        assert await lane.wait_replicas(1, 1000) == 1
        started = time.monotonic()
        assert await lane.wait_replicas(2, 300) == 1  # the whole 300 ms, then 1
        assert time.monotonic() - started >= 0.29

        os.kill(replicas[1].pid, signal.SIGSTOP)
        stopped.append(replicas[1])
        await lane.execute("SET", "wait:none", "1")
        assert await lane.wait_replicas(1, 300) == 0
        await client.set("wait:none", "2")
        assert await lane.wait_replicas(1, 300) == 0

        # A WAIT that blocks holds up nothing else on the lane, and WAITs asked for
        # at once share rounds instead of queueing one after the other.
        async def admit_and_wait(i: int) -> int:
            await lane.execute("SET", f"wait:many:{i}", "1")
            return await lane.wait_replicas(1, 300)

        started = time.monotonic()
        waits = asyncio.gather(*(admit_and_wait(i) for i in range(50)))
        await asyncio.sleep(0)
        assert await lane.execute("PING") == b"PONG"
        assert time.monotonic() - started < 0.2, "a WAIT held up the lane"
        assert await waits == [0] * 50
        assert time.monotonic() - started < 1.5, "50 WAITs did not share rounds"
    finally:
        for proc in stopped:
            os.kill(proc.pid, signal.SIGCONT)
        await client.aclose()
        await lane.aclose()
    cluster.wait_healthy()


async def test_a_sentinel_that_names_a_replica_is_passed_over(cluster: SentinelCluster) -> None:
    """A Sentinel behind the others (here: one watching a replica under the master's
    name, and with no password of its own) sends the clients to a replica; its READONLY
    makes them ask the next Sentinel and send the command again, to the real master."""
    master = cluster.wait_healthy()
    upstream = start_server(cluster.directory)
    replica = start_server(cluster.directory, replica_of=upstream.port)
    stale = start_sentinel(cluster.directory, replica.port, quorum=1, password=None)
    cluster.extra += [stale, replica, upstream]
    url = cluster.url(db=3, first=[stale.port])
    client, lane, script_lane = store.connect(url), Lane(url), Lane(url)
    try:
        with cluster.sentinel_client(stale, password=None) as sentinel:
            named = sentinel.execute_command("SENTINEL", "get-master-addr-by-name", MASTER_NAME)
            assert int(named[1]) == replica.port
        await client.set("stale:redis", "1")
        assert await lane.execute("SET", "stale:lane", "1") == b"OK"
        assert await script_lane.script(INCR, ["stale:script"], [1]) == 1
        with cluster.client(replica.port) as direct:
            refused = direct.info("errorstats")["errorstat_READONLY"]["count"]
        assert refused == 3, "each client was sent to the replica once"
        await client.set("stale:redis", "2")  # now straight to the master
        assert await lane.execute("SET", "stale:lane", "2") == b"OK"
        with cluster.client(replica.port) as direct:
            assert direct.info("errorstats")["errorstat_READONLY"]["count"] == refused
        with cluster.client(master, db=3) as direct:
            assert direct.mget("stale:redis", "stale:lane", "stale:script") == [b"2", b"2", b"1"]
    finally:
        await client.aclose()
        await lane.aclose()
        await script_lane.aclose()
        for proc in (stale, replica, upstream):
            proc.stop()
            cluster.extra.remove(proc)


async def test_a_killed_master_is_replaced_and_every_client_follows(
    cluster: SentinelCluster, record_property: Callable[[str, object], None]
) -> None:
    master = cluster.wait_healthy()
    url = cluster.url(db=5)
    client, blocking, lane, arq = (
        store.connect(url),
        store.connect(url, blocking=True),
        Lane(url),
        _arq(url),
    )
    py_script = client.register_script(INCR)
    scripts = Scripts(lane.execute)  # gpugate's own: a function library (FCALL)
    try:
        # Written, scripts cached on the master, acknowledged by a replica (WAIT 1).
        await client.set("before:redis", "1")
        assert (await scripts.take_token(name="before", rate_per_ms=1e-6, burst=5)).allowed
        await blocking.set("before:blocking", "1")
        await lane.execute("SET", "before:lane", "1")
        assert await lane.script(INCR, ["before:lane-script"], [1]) == 1
        assert await py_script(keys=["before:py-script"], args=[1]) == 1
        assert await arq.enqueue_job("noop", _job_id="before") is not None
        assert await lane.wait_replicas(1, 1000) >= 1
        for proc in cluster.servers:
            if proc.port != master:  # a promoted replica has no script cached...
                with cluster.client(proc.port) as replica:
                    assert replica.script_exists(py_script.sha) == [False]
                    # ...but has gpugate's functions: a library replicates like the data
                    listed = replica.execute_command("FUNCTION", "LIST", "LIBRARYNAME", "gpugate_*")
                    assert len(listed) == 1

        ops: dict[str, Callable[[], Awaitable[Any]]] = {
            "store.connect": lambda: client.set("after:redis", "1"),
            "store.connect(blocking=True)": lambda: blocking.set("after:blocking", "1"),
            "Lane.execute": lambda: lane.execute("SET", "after:lane", "1"),
            "Lane.script (EVALSHA)": lambda: lane.script(INCR, ["after:lane-script"], [1]),
            "register_script": lambda: py_script(keys=["after:py-script"], args=[1]),
            "Scripts (FCALL)": lambda: scripts.take_token(name="after", rate_per_ms=1e-6, burst=5),
            "arq enqueue_job": lambda: arq.enqueue_job("noop", _job_id="after"),
        }
        killed_at = time.monotonic()
        cluster.server(master).kill()
        deadline = killed_at + 30 + 15
        promotion = asyncio.create_task(asyncio.to_thread(cluster.wait_promotion, master, 30))
        firsts = await asyncio.gather(*(_first_success(n, op, deadline) for n, op in ops.items()))
        new_master, promoted_at = await promotion
        with pytest.raises(redis.ConnectionError):  # this task's writes died with the master
            await lane.wait_replicas(1, 100)
    finally:
        await client.aclose()
        await blocking.aclose()
        await arq.aclose(close_connection_pool=True)
        await lane.aclose()

    lines = [
        f"failover timeline, seconds after kill -9 of the master :{master}",
        f"  promotion seen (:{new_master} named by a Sentinel, answers as master): "
        f"{promoted_at - killed_at:.2f}",
    ]
    for name, (at, failures) in zip(ops, firsts, strict=True):
        lines.append(
            f"  first success, {name}: {at - killed_at:.2f} "
            f"({at - promoted_at:+.2f} after the promotion, {failures} failed tries before)"
        )
    print("\n" + "\n".join(lines))
    record_property("failover_timeline", "\n".join(lines))
    for name, (at, _) in zip(ops, firsts, strict=True):
        assert at - promoted_at <= 15, f"{name} came back {at - promoted_at:.1f}s after promotion"

    with cluster.client(new_master, db=5) as direct:
        before = ["before:redis", "before:blocking", "before:lane"]
        assert direct.mget(before) == [b"1"] * 3, "a write acknowledged by WAIT was lost"
        assert direct.mget("before:lane-script", "before:py-script") == [b"1", b"1"]
        assert direct.exists("arq:job:before", "arq:job:after") == 2
        assert direct.mget("after:redis", "after:blocking", "after:lane") == [b"1"] * 3
        assert direct.mget("after:lane-script", "after:py-script") == [b"1", b"1"]
        assert direct.exists(keys.BUCKET + "before", keys.BUCKET + "after") == 2


async def _first_success(
    name: str, op: Callable[[], Awaitable[Any]], deadline: float
) -> tuple[float, int]:
    """When `op` first succeeded (monotonic), and how many tries failed before, retrying
    every 50 ms; a driver error (gpugate's scripts: mapped, `RedisUnavailable`) is the only
    failure expected."""
    failures, last_error = 0, None
    while time.monotonic() < deadline:
        try:
            await op()
        except (*store.DRIVER_ERRORS, RedisUnavailable) as exc:
            failures, last_error = failures + 1, exc
        else:
            return time.monotonic(), failures
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}: no success before the deadline (last error {last_error!r})")


async def test_the_killed_master_comes_back_as_a_replica_and_takes_no_writes(
    cluster: SentinelCluster,
) -> None:
    dead = next((proc for proc in cluster.servers if not proc.alive()), None)
    if dead is None:  # run on its own: kill the master here, as the failover test does
        dead = cluster.server(cluster.wait_healthy())
        dead.kill()
        cluster.wait_promotion(dead.port)
    cluster.servers.remove(dead)
    # Its config still says master: the Sentinels turn it into a replica of the new one.
    cluster.servers.append(start_server(cluster.directory, port=dead.port))
    master = cluster.wait_healthy(replicas=2, timeout=60)
    assert master != dead.port
    with cluster.client(dead.port) as old, pytest.raises(redis.ReadOnlyError):
        old.set("rejoined", "1")
    url = cluster.url(db=6)
    client, lane = store.connect(url), Lane(url)
    try:
        await client.set("rejoined:redis", "1")
        await lane.execute("SET", "rejoined:lane", "1")
        assert await lane.wait_replicas(2, 1000) == 2
    finally:
        await client.aclose()
        await lane.aclose()
    with cluster.client(dead.port, db=6) as old:
        assert old.mget("rejoined:redis", "rejoined:lane") == [b"1", b"1"]  # replicated to it


def test_the_cluster_password_is_used(cluster: SentinelCluster) -> None:
    """Every process of the cluster wants the password the URL carries."""
    with (
        redis.Redis(port=cluster.sentinels[0].port) as anonymous,
        pytest.raises(redis.AuthenticationError),
    ):
        anonymous.ping()
    assert PASSWORD in cluster.url()
