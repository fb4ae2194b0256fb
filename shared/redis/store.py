"""Redis connections, and the one place where driver errors become `RedisUnavailable`.

`connect(url)` takes `redis://`, `rediss://`, `unix://` as redis-py does, and
`redis+sentinel://…/MASTER_NAME` (`shared/redis/url.py`): the client then asks the
Sentinels for the master at every new connection and follows a failover by itself.
When the master is killed, commands fail (`ConnectionError`, 503) until the Sentinels
promote a replica, and the next connection goes to the new master. A master demoted to
a replica answers writes with READONLY: the connection is dropped, the Sentinel that
named it is asked last from then on, and the command is sent once more to the master
the Sentinels name now (a command refused with READONLY was not run, so this is safe).

`redis_errors()` is the one place where a Redis failure — no connection, a timeout, or an
error reply (OOM, READONLY, LOADING, BUSY, NOPERM…) — becomes `RedisUnavailable` with the
reason named (`unavailable()`).

Redis WAIT has one implementation, `Lane.wait_replicas` (shared/redis/lane.py), for the
admissions and the ends that GPUGATE_REDIS_MIN_REPLICAS guards; `replication()` is what
`gpugate doctor` shows of the master and its replicas.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from typing import Any, Protocol

from redis import exceptions as redis_exceptions
from redis.asyncio import Redis
from redis.asyncio.connection import Connection, ConnectionPool, RedisSSLContext, SSLConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection
from redis.backoff import NoBackoff

from shared.errors import RedisUnavailable
from shared.redis.url import SentinelURL, no_password_set, parse_sentinel

SOCKET_TIMEOUT_S = 2.0
"""A request that needs Redis fails within this bound instead of hanging while it is down."""

DRIVER_ERRORS = (
    redis_exceptions.ConnectionError,  # MasterNotFoundError and MasterDemoted among them
    redis_exceptions.TimeoutError,
    redis_exceptions.BusyLoadingError,
    OSError,
)
"""Redis could not be reached (or did not answer in time)."""

REDIS_ERRORS = (*DRIVER_ERRORS, redis_exceptions.RedisError)
"""Every failure of a Redis call: the above, and error replies (`ResponseError`)."""

_REPLY_REASONS: tuple[tuple[type[Exception], str, str], ...] = (
    # redis-py raises a class per reply prefix and drops the prefix from the message;
    # the lane (shared/redis/lane.py) raises `ResponseError` with the reply as it came.
    (redis_exceptions.OutOfMemoryError, "OOM", "out of memory"),
    (redis_exceptions.ReadOnlyError, "READONLY", "read-only"),
    (redis_exceptions.BusyLoadingError, "LOADING", "loading"),
    (redis_exceptions.NoPermissionError, "NOPERM", "denied"),
    (redis_exceptions.NoScriptError, "NOSCRIPT", "script missing"),
    (redis_exceptions.ExecAbortError, "EXECABORT", "transaction refused"),
)
_PREFIX_REASONS = {
    "BUSY": "busy",
    "MASTERDOWN": "master down",
    "NOAUTH": "denied",
    "WRONGPASS": "denied",
    "MISCONF": "cannot persist",
    "TRYAGAIN": "busy",
}


def unavailable(exc: BaseException) -> RedisUnavailable:
    """The one mapping of a Redis failure onto the error tree: why Redis cannot take
    the command, for a client's 503, `/ready` and the outage log."""
    if isinstance(exc, RedisUnavailable):
        return exc
    text = str(exc)
    reason = "error reply"
    for cls, prefix, name in _REPLY_REASONS:
        if isinstance(exc, cls) or text.startswith(prefix):
            reason = name
            break
    else:
        first = text.split(" ", 1)[0]
        if first in _PREFIX_REASONS:
            reason = _PREFIX_REASONS[first]
        elif isinstance(exc, DRIVER_ERRORS):
            reason = "unreachable"
        elif " OOM " in text or "-OOM" in text:  # a script's error carries the reply inside
            reason = "out of memory"
    error = RedisUnavailable(reason)
    error.__cause__ = exc
    return error


WAIT_BARRIER_CHANNEL = "gpugate:wait-barrier"
"""A PUBLISH here (nobody listens) is a write that replicates without touching a key: the
connection that sends it has then "written" everything the master had run before, which
is what Redis WAIT waits for (`Lane.wait_replicas`)."""


class MasterDemoted(redis_exceptions.ConnectionError):
    """The server we took for the master answered READONLY: a failover made it a replica."""


Execute = Callable[..., Awaitable[Any]]
"""Sends one Redis command and returns its reply: `Redis.execute_command`, `Lane.execute`."""


async def evalsha(
    execute: Execute, source: str, keys: Sequence[str | bytes], args: Sequence[Any]
) -> Any:
    """Run a Lua script by its SHA through `execute`; when Redis does not have it (a
    restart, a failover to a replica whose cache is empty), send it whole, once. The one
    NOSCRIPT path of gpugate, for the lane and redis-py clients alike. Failures are
    raised as the driver raised them (`redis_errors()` maps them)."""
    try:
        return await execute("EVALSHA", _sha1(source), len(keys), *keys, *args)
    except redis_exceptions.ResponseError as exc:  # redis-py: NoScriptError; the lane: as sent
        if not isinstance(exc, redis_exceptions.NoScriptError) and not str(exc).startswith(
            "NOSCRIPT"
        ):
            raise
        return await execute("EVAL", source, len(keys), *keys, *args)


class FunctionLibrary(Protocol):
    """A Redis function library (shared/scripts.py `Library`): its text, and the name of
    the function of each script."""

    @property
    def text(self) -> str: ...

    def function(self, script: str) -> str: ...


async def fcall(
    execute: Execute, library: FunctionLibrary, script: str, args: Sequence[Any]
) -> Any:
    """Call function `script` of `library` (shared/scripts.py) through `execute`; when
    Redis does not have the library (a new Redis, or one restarted without persistence),
    load it, once, and call again. Loaded by another process meanwhile is as good. The one
    such path of gpugate, for the lane and redis-py clients alike; failures are raised as
    the driver raised them (`redis_errors()` maps them)."""
    name = library.function(script)
    try:
        return await execute("FCALL", name, 0, *args)
    except redis_exceptions.ResponseError as exc:
        if "function not found" not in str(exc).lower():
            raise
    try:
        await execute("FUNCTION", "LOAD", library.text)
    except redis_exceptions.ResponseError as exc:
        if "already exists" not in str(exc):
            raise
    return await execute("FCALL", name, 0, *args)


@cache
def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()


_TLS_OPTIONS = (
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_check_hostname",
    "ssl_min_version",
    "ssl_ciphers",
)


def tls_context(options: dict[str, Any]) -> ssl.SSLContext | None:
    """The TLS of a `rediss://` URL (redis-py's `parse_url` options, its `ssl_*` query
    parameters included), built by redis-py's own `RedisSSLContext` with `SSLConnection`'s
    defaults: the lane verifies exactly as every redis-py client of the same URL does.
    None for a plain connection."""
    if options.get("connection_class") is not SSLConnection:
        return None
    tls = {name.removeprefix("ssl_"): options[name] for name in _TLS_OPTIONS if name in options}
    tls.setdefault("cert_reqs", "required")
    return RedisSSLContext(**tls).get()


def connect(url: str, *, blocking: bool = False) -> Redis:
    """A client for `url`; `blocking` clients have no read timeout (XREAD BLOCK, pub/sub)."""
    options: dict[str, Any] = {
        "socket_connect_timeout": SOCKET_TIMEOUT_S,
        "socket_timeout": None if blocking else SOCKET_TIMEOUT_S,
        "health_check_interval": 0 if blocking else 30,
        "retry_on_timeout": False,
    }
    target = parse_sentinel(url)
    if target is None:
        client: Redis = Redis.from_url(url, **options)
        return client
    return _master_for(target, options)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Turn any Redis failure, an error reply included, into `RedisUnavailable` (503 for
    a client; what every long-lived loop catches)."""
    try:
        yield
    except REDIS_ERRORS as exc:
        raise unavailable(exc) from exc


# --- what `gpugate doctor` shows ------------------------------------------------------


@dataclass(frozen=True)
class ReplicaState:
    address: str  # host:port, as the replica announced itself
    state: str  # online, wait_bgsave, send_bulk, …
    offset: int  # replication offset the replica acknowledged
    lag_bytes: int  # master_repl_offset - offset
    lag_s: int  # seconds since the replica's last acknowledgement


@dataclass(frozen=True)
class SentinelView:
    address: str
    master: str | None  # the master's host:port as this Sentinel names it
    error: str | None = None


@dataclass(frozen=True)
class Replication:
    """The master `url` leads to, its replicas (INFO replication on it) and, for a
    `redis+sentinel://` URL, what each Sentinel says the master is."""

    master: str  # host:port (or the unix socket path)
    role: str  # "master", or "slave" when a plain URL names a replica
    master_repl_offset: int
    replicas: tuple[ReplicaState, ...]
    sentinels: tuple[SentinelView, ...] = ()


async def replication(url: str) -> Replication:
    """Where `url` leads and how replication stands there; driver errors are raised."""
    target = parse_sentinel(url)
    views: tuple[SentinelView, ...] = ()
    client = connect(url)
    try:
        if target is not None:
            pool = client.connection_pool
            assert isinstance(pool, _MasterPool)
            host, port = await pool.get_master_address()  # type: ignore[no-untyped-call]
            master = f"{host}:{port}"
            views = tuple([await _sentinel_view(s, target.master_name) for s in pool.sentinels()])
        else:
            kwargs = client.connection_pool.connection_kwargs
            master = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
        info = await client.info("replication")
    finally:
        await client.aclose()
    offset = int(info.get("master_repl_offset", 0))
    replicas = tuple(
        ReplicaState(
            address=f"{entry['ip']}:{entry['port']}",
            state=str(entry.get("state", "")),
            offset=int(entry.get("offset", 0)),
            lag_bytes=offset - int(entry.get("offset", 0)),
            lag_s=int(entry.get("lag", 0)),
        )
        for name, entry in sorted(info.items())
        if name.startswith("slave") and isinstance(entry, dict)
    )
    return Replication(master, str(info.get("role")), offset, replicas, views)


async def _sentinel_view(sentinel: Redis, master_name: str) -> SentinelView:
    kwargs = sentinel.connection_pool.connection_kwargs
    address = f"{kwargs['host']}:{kwargs['port']}"
    try:
        reply = await sentinel.execute_command(  # type: ignore[no-untyped-call]
            "SENTINEL", "get-master-addr-by-name", master_name
        )
    except (OSError, redis_exceptions.RedisError) as exc:
        return SentinelView(address, None, f"{exc.__class__.__name__}: {exc}")
    if not reply:
        return SentinelView(address, None, f"does not know {master_name!r}")
    host, port = (item.decode() if isinstance(item, bytes) else str(item) for item in reply)
    return SentinelView(address, f"{host}:{port}")


# --- Sentinel plumbing ----------------------------------------------------------------


def _master_for(target: SentinelURL, options: dict[str, Any]) -> Redis:
    sentinels = Sentinels(target)
    client: Redis = sentinels.master_for(
        target.master_name,
        connection_pool_class=_MasterPool,
        connection_class=_MasterConnection,
        username=target.username,
        password=target.password,
        db=target.db,
        # One more try, only after READONLY: the command was refused, not run.
        retry=Retry(NoBackoff(), 1, supported_errors=(MasterDemoted,)),
        retry_on_error=[MasterDemoted],
        **options,
    )
    return client


class Sentinels(Sentinel):
    """redis-py's Sentinel, with our clients for the Sentinels: their own timeouts (a
    blocking master client still gives up on a silent Sentinel) and the URL's password,
    dropped for a Sentinel that has none. The one Sentinel discovery of gpugate: the
    redis-py clients' pools and the lane (shared/redis/lane.py) ask through it
    (`discover_master`, which puts the Sentinel that answered first)."""

    def __init__(self, target: SentinelURL) -> None:
        super().__init__([])  # type: ignore[no-untyped-call]  # redis-py leaves it untyped
        self.sentinels = [
            Redis.from_pool(
                ConnectionPool(
                    connection_class=_SentinelNodeConnection,
                    host=host,
                    port=port,
                    username=target.username,
                    password=target.password,
                    socket_connect_timeout=SOCKET_TIMEOUT_S,
                    socket_timeout=SOCKET_TIMEOUT_S,
                )
            )
            for host, port in target.sentinels
        ]

    def passed_over(self, sentinel: Redis) -> None:
        """`sentinel` named a master that answered READONLY: it is behind, ask it last."""
        if sentinel in self.sentinels:
            self.sentinels.remove(sentinel)
            self.sentinels.append(sentinel)

    async def aclose(self) -> None:
        for sentinel in self.sentinels:
            await sentinel.aclose()


class _SentinelNodeConnection(Connection):
    async def on_connect(self) -> None:
        try:
            await super().on_connect()
        except redis_exceptions.AuthenticationError as exc:
            if not no_password_set(str(exc)):
                raise
            self.username = self.password = None  # this Sentinel takes no password
            await super().on_connect()


class _MasterPool(SentinelConnectionPool):
    def sentinels(self) -> list[Redis]:
        found: list[Redis] = self.sentinel_manager.sentinels
        return found

    def demoted(self, address: tuple[str, int]) -> None:
        """The master at `address` answered READONLY. redis-py keeps the Sentinel that
        answered last in front: that one is behind, so ask it last from now on."""
        if self.master_address == address:
            self.sentinel_manager.passed_over(self.sentinel_manager.sentinels[0])
            self.master_address = None

    async def disconnect(self, inuse_connections: bool = True) -> None:
        await super().disconnect(inuse_connections)
        if inuse_connections:  # the client is closing, not just moving to a new master
            await self.sentinel_manager.aclose()


class _MasterConnection(SentinelManagedConnection):
    async def read_response(
        self,
        disable_decoding: bool = False,
        timeout: float | None = None,
        *,
        disconnect_on_error: float | None = True,  # sic: redis-py's annotation
        push_request: bool | None = False,
    ) -> Any:
        try:
            # redis-py's SentinelManagedConnection turns READONLY into a plain
            # ConnectionError; skip it to tell a demotion from a lost connection.
            return await Connection.read_response(
                self,
                disable_decoding=disable_decoding,
                timeout=timeout,
                disconnect_on_error=bool(disconnect_on_error),
                push_request=push_request,
            )
        except redis_exceptions.ReadOnlyError as exc:
            address = (self.host, self.port)
            await self.disconnect()
            self.connection_pool.demoted(address)
            raise MasterDemoted(f"{address[0]}:{address[1]} is a replica now") from exc
