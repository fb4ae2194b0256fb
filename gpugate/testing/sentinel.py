"""A Redis Sentinel cluster for the tests and benchmarks: a master, two replicas and three
Sentinels, as real processes on free loopback ports with config files in a temp dir of
their own (Sentinel rewrites its config as it learns the cluster), stopped by PID at the end.

Sentinels declare a master down after 1 s (`down-after-milliseconds 1000`), so a killed
master is replaced within a few seconds. Everything, Sentinels included, has one
password, as `redis+sentinel://:PASSWORD@…` assumes.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import redis

from gpugate.testing.processes import Process, free_port, spawn, wait_until
from gpugate.testing.stack import redis_server_binary, wait_redis

MASTER_NAME = "gpugate"
PASSWORD = "sentinel-test-secret"
DOWN_AFTER_MS = 1000


def start_server(
    directory: Path,
    *,
    port: int | None = None,
    replica_of: int | None = None,
    password: str | None = PASSWORD,
) -> Process:
    """A redis-server with a config file in `directory` (written once; started again on
    the same file it comes back as it was last configured)."""
    port = port or free_port()
    config = directory / f"redis-{port}.conf"
    if not config.exists():
        lines = [
            f"port {port}",
            "bind 127.0.0.1",
            "daemonize no",
            f"dir {directory}",
            f"dbfilename dump-{port}.rdb",
            'save ""',
            "appendonly no",
            "databases 16",
            "repl-diskless-sync-delay 0",  # a new replica syncs now, not in 5 s
        ]
        if password:
            lines += [f"requirepass {password}", f"masterauth {password}"]
        if replica_of is not None:
            lines.append(f"replicaof 127.0.0.1 {replica_of}")
        config.write_text("\n".join(lines) + "\n")
    proc = spawn(f"redis-{port}", [redis_server_binary(), str(config)])
    proc.port = port
    proc.url = (
        f"redis://:{password}@127.0.0.1:{port}/0" if password else f"redis://127.0.0.1:{port}/0"
    )
    wait_redis(proc, password)
    return proc


def start_sentinel(
    directory: Path,
    master_port: int,
    *,
    quorum: int = 2,
    password: str | None = PASSWORD,
    auth_pass: str | None = PASSWORD,
) -> Process:
    """`redis-server --sentinel` watching the master on `master_port`, with its own
    `requirepass` when `password` is given."""
    port = free_port()
    config = directory / f"sentinel-{port}.conf"
    lines = [
        f"port {port}",
        "bind 127.0.0.1",
        "daemonize no",
        f"dir {directory}",
        "sentinel resolve-hostnames no",
        "sentinel announce-hostnames no",
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {DOWN_AFTER_MS}",
        f"sentinel failover-timeout {MASTER_NAME} 5000",
        f"sentinel parallel-syncs {MASTER_NAME} 2",
    ]
    if auth_pass:
        lines.append(f"sentinel auth-pass {MASTER_NAME} {auth_pass}")
    if password:
        lines.append(f"requirepass {password}")  # also what it sends to the other Sentinels
    config.write_text("\n".join(lines) + "\n")
    proc = spawn(f"sentinel-{port}", [redis_server_binary(), str(config), "--sentinel"])
    proc.port = port
    wait_redis(proc, password, "sentinel")
    return proc


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass
class SentinelCluster:
    directory: Path
    servers: list[Process]  # the first started as the master
    sentinels: list[Process]
    extra: list[Process] = field(default_factory=list)  # stopped with the cluster

    def url(self, db: int = 0, *, first: Iterable[int] = ()) -> str:
        """The redis+sentinel:// URL of the cluster; `first`: Sentinel ports put ahead."""
        ports = [*first, *(s.port for s in self.sentinels)]
        hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
        return f"redis+sentinel://:{PASSWORD}@{hosts}/{MASTER_NAME}/{db}"

    def sentinel_client(self, sentinel: Process, password: str | None = PASSWORD) -> redis.Redis:
        return redis.Redis(port=sentinel.port, password=password, socket_timeout=1)

    def server(self, port: int) -> Process:
        return next(proc for proc in self.servers if proc.port == port)

    def client(self, port: int, db: int = 0) -> redis.Redis:
        return redis.Redis(port=port, db=db, password=PASSWORD, socket_timeout=2)

    def named_masters(self) -> list[int | None]:
        """The master's port as each Sentinel names it (None: no answer)."""
        named: list[int | None] = []
        for sentinel in self.sentinels:
            try:
                with self.sentinel_client(sentinel) as client:
                    reply = client.execute_command(
                        "SENTINEL", "get-master-addr-by-name", MASTER_NAME
                    )
                named.append(int(reply[1]) if reply else None)
            except redis.RedisError:
                named.append(None)
        return named

    def healthy(self, replicas: int = 2) -> int | None:
        """The master's port if every Sentinel names it, sees it up, knows `replicas`
        replicas up and the other Sentinels, and the master has those replicas online."""
        named = set(self.named_masters())
        if len(named) != 1 or None in named:
            return None
        port = named.pop()
        assert port is not None
        for sentinel in self.sentinels:
            with self.sentinel_client(sentinel) as client:
                master = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
                state = dict(zip(map(_text, master[::2]), map(_text, master[1::2]), strict=True))
                if state["flags"] != "master":
                    return None
                if int(state["num-other-sentinels"]) != len(self.sentinels) - 1:
                    return None
                known = client.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
                up = [
                    r
                    for r in known
                    if dict(zip(map(_text, r[::2]), map(_text, r[1::2]), strict=True))["flags"]
                    == "slave"
                ]
                if len(up) != replicas:
                    return None
        with self.client(port) as client:
            info = client.info("replication")
        online = [k for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
        if info["role"] != "master" or len(online) != replicas:
            return None
        if any(info[k]["state"] != "online" for k in online):
            return None
        return port

    def wait_healthy(self, replicas: int = 2, timeout: float = 40) -> int:
        port = wait_until(
            lambda: self.healthy(replicas),
            timeout=timeout,
            interval=0.1,
            what=f"the Sentinels to agree on a master with {replicas} replicas up",
        )
        assert isinstance(port, int)
        return port

    def wait_promotion(self, old_port: int, timeout: float = 30) -> tuple[int, float]:
        """The port of the replica the Sentinels promoted in place of `old_port`, once
        one Sentinel names it and it answers as a master; and when (monotonic) that was."""

        def promoted() -> int | None:
            for port in self.named_masters():
                if port is not None and port != old_port:
                    with self.client(port) as client:
                        if client.info("replication")["role"] == "master":
                            return port
            return None

        port = wait_until(promoted, timeout=timeout, interval=0.02, what="a replica promoted")
        assert isinstance(port, int)
        return port, time.monotonic()

    def stop(self) -> None:
        for proc in [*self.extra, *self.sentinels, *self.servers]:
            proc.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def start_cluster() -> SentinelCluster:
    """A master, two replicas, three Sentinels (quorum 2), healthy."""
    directory = Path(tempfile.mkdtemp(prefix="gpugate-sentinel-"))
    cluster = SentinelCluster(directory, [], [])
    try:
        master = start_server(directory)
        cluster.servers.append(master)
        cluster.servers += [start_server(directory, replica_of=master.port) for _ in range(2)]
        cluster.sentinels += [start_sentinel(directory, master.port) for _ in range(3)]
        cluster.wait_healthy()
    except BaseException:
        cluster.stop()
        raise
    return cluster
