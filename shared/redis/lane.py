"""A pipelined Redis connection for the one command every request makes (the admission
and /health bucket scripts).

redis-py's asyncio client costs about 55 µs of Python per command here (a pooled
connection taken and given back, a task per timeout); admission is one command, so that
was most of the price of a rejection. A `Lane` is one connection per process that all
requests share: each caller writes its command and awaits a future, and replies, which
Redis sends in order, resolve the futures in order. Commands of concurrent requests leave
in the same packets: the commands of one turn of the event loop are written at its end,
in one system call. hiredis packs the commands and parses the replies.

Failures look like redis-py's (`ConnectionError`, `TimeoutError`, `rx.ResponseError`), so
`shared.redis.store.redis_errors` turns them into 503 as for any other Redis call. A command
that times out closes the connection (later replies would be out of step), failing the
commands still waiting on it; the next command connects again. The timeout is one timer
per connection, armed for its oldest unanswered command, not one per command
(`asyncio.timeout` per command was 5% of a rejection's CPU).

With a `redis+sentinel://` URL, every (re)connection first asks the Sentinels where the
master is, through the same discovery as the redis-py clients (`shared.redis.store.Sentinels`);
the happy path costs nothing more. A lost connection (the master killed) fails the
commands waiting on it and the next command connects to whatever master the Sentinels
name then. A READONLY reply (the master was demoted) retires the connection: no new
command goes on it, those in flight get their replies; the Sentinel that named it is asked
last from then on, and the refused command, which Redis did not run, is sent once more to
the master named now.
A promoted replica has no scripts cached: `script()` sends the whole script once.

`wait_replicas()` is Redis WAIT for the calling task's writes. It runs on a second
connection to the same server, so that a WAIT that blocks (replicas slow or gone) does
not hold up the lane's other commands, and calls that arrive while one WAIT is out share
the next one.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections import deque
from collections.abc import Sequence
from typing import Any, overload

import hiredis
from redis import exceptions as rx
from redis.asyncio import Redis
from redis.asyncio.connection import parse_url

from shared.redis.store import (
    SOCKET_TIMEOUT_S,
    WAIT_BARRIER_CHANNEL,
    MasterDemoted,
    Sentinels,
    evalsha,
    tls_context,
)
from shared.redis.url import SentinelURL, parse_sentinel

Address = tuple[str, int] | str  # host and port, or a unix socket path
CLOSE_WAIT_S = 1.0
"""How long `aclose` waits for its sockets to close."""


class _Protocol(asyncio.Protocol):
    def __init__(self, timeout_s: float | None = None) -> None:
        self.reader = hiredis.Reader(replyError=rx.ResponseError)
        self.waiting: deque[tuple[asyncio.Future[Any], float]] = deque()
        """Commands sent and not yet answered, with when they were sent (loop time)."""
        self.timeout_s = timeout_s
        """No reply for this long fails the connection; None: the caller bounds its wait."""
        self._watchdog: asyncio.TimerHandle | None = None
        self._unsent: list[bytes] = []
        """Commands packed in this turn of the event loop, written together at its end."""
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None
        self.address: Address = ""
        self.named_by: Redis | None = None  # the Sentinel that gave `address`
        self.closed = asyncio.get_running_loop().create_future()
        """Done once the connection is closed (its socket with it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future, _ = self.waiting.popleft()
            if not future.done():  # its caller may have given up (cancelled)
                future.set_result(reply)
        if self.lost is not None and not self.waiting and self.transport is not None:
            self.transport.close()  # retired, and the last reply is in

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if not isinstance(self.lost, rx.TimeoutError):
            self.lost = rx.ConnectionError(
                f"Redis connection lost: {exc or 'closed by the server'}"
            )
        self._fail_waiting(self.lost)

    def _fail_waiting(self, error: Exception) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self.waiting:
            future, _ = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)

    def send(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        if self.lost is not None or self.transport is None:
            raise self.lost or rx.ConnectionError("Redis connection not open")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        now = loop.time()
        self.waiting.append((future, now))
        if not self._unsent:
            loop.call_soon(self._write)
        self._unsent.append(hiredis.pack_command(tuple(args)))
        if self._watchdog is None and self.timeout_s is not None:
            self._watchdog = loop.call_at(now + self.timeout_s, self._check)
        return future

    def _write(self) -> None:
        """One write (one system call) for every command of this loop turn."""
        unsent, self._unsent = self._unsent, []
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(unsent))

    def _check(self) -> None:
        """The watchdog: fail the connection if its oldest command went unanswered for
        `timeout_s`; else look again when that one's time is up."""
        self._watchdog = None
        if not self.waiting or self.timeout_s is None:
            return
        loop = asyncio.get_running_loop()
        due = self.waiting[0][1] + self.timeout_s
        if loop.time() < due:
            self._watchdog = loop.call_at(due, self._check)
            return
        self.lost = rx.TimeoutError(f"Redis did not answer within {self.timeout_s:g}s")
        self._fail_waiting(self.lost)  # later replies would be out of step
        if self.transport is not None:
            self.transport.close()

    def retire(self, reason: Exception) -> None:
        """Send nothing more here; close once the commands in flight have their replies."""
        if self.lost is None:
            self.lost = reason
        if not self.waiting and self.transport is not None:
            self.transport.close()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


_WROTE_ON: contextvars.ContextVar[tuple[Lane, _Protocol] | None] = contextvars.ContextVar(
    "lane_wrote_on", default=None
)
"""The connection that carried the current task's last command (for `wait_replicas`)."""


class Lane:
    """One pipelined connection to the Redis at `url` (redis://, rediss://, unix://, or
    the master that the Sentinels of a redis+sentinel:// URL name)."""

    def __init__(self, url: str, timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        self.sentinel: SentinelURL | None = parse_sentinel(url)
        self.options: dict[str, Any]
        if self.sentinel is None:
            self.options = dict(parse_url(url))
        else:
            self.options = {
                "username": self.sentinel.username,
                "password": self.sentinel.password,
                "db": self.sentinel.db,
            }
            self._sentinels = Sentinels(self.sentinel)
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()
        self._waiter: _Protocol | None = None  # the WAIT connection
        self._waiter_connecting = asyncio.Lock()
        self._rounds: dict[tuple[_Protocol, int, int], asyncio.Future[int]] = {}
        self._round_runner: asyncio.Task[None] | None = None

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply; a Redis error reply is raised. No reply
        within `timeout_s` raises rx.TimeoutError (the connection's watchdog)."""
        try:
            reply = await self._send(args)
            if _readonly(reply) and self.sentinel is not None:
                reply = await self._send(args)  # to the master the Sentinels name now
                if _readonly(reply):
                    raise MasterDemoted(f"the Sentinels still name a replica: {reply}")
        except OSError as exc:  # refused, unreachable
            raise rx.ConnectionError(f"Redis unreachable: {exc}") from exc
        if isinstance(reply, rx.ResponseError):
            raise _error(reply)
        return reply

    @overload
    async def script(self, source: str, args: Sequence[Any], /) -> Any: ...
    @overload
    async def script(self, source: str, keys: Sequence[str], args: Sequence[Any], /) -> Any: ...
    async def script(
        self, source: str, keys_or_args: Sequence[Any], args: Sequence[Any] | None = None, /
    ) -> Any:
        """Run a Lua script by its SHA (`script(source, args)` or `script(source, keys,
        args)`); after a Redis restart or a failover, send it whole once."""
        keys: Sequence[Any] = keys_or_args if args is not None else ()
        argv: Sequence[Any] = args if args is not None else keys_or_args
        return await evalsha(self.execute, source, keys, argv)

    async def wait_replicas(self, replicas: int, timeout_ms: int) -> int:
        """How many replicas acknowledged this task's writes through the lane (Redis
        WAIT): as soon as `replicas` did, or after `timeout_ms` with how many did.

        "This task's writes" are those up to its last `execute`/`script` call, in the same
        asyncio task (a command run in a task of its own, e.g. by `asyncio.gather`, is not
        seen: call it directly). If the connection that carried them is gone (the master
        failed), nobody can tell whether they survived: `ConnectionError`."""
        if timeout_ms < 1:
            raise ValueError("WAIT with no timeout would block for ever: give timeout_ms >= 1")
        last = _WROTE_ON.get()
        if last is None or last[0] is not self:
            raise RuntimeError("wait_replicas: this task sent no command through this lane")
        wrote_on = last[1]
        key = (wrote_on, replicas, timeout_ms)
        round_ = self._rounds.get(key)
        if round_ is None:  # nobody waits for a WAIT not yet sent: start one
            round_ = self._rounds[key] = asyncio.get_running_loop().create_future()
            round_.add_done_callback(_retrieve)
            if self._round_runner is None or self._round_runner.done():
                self._round_runner = asyncio.create_task(self._run_rounds())
        bound_s = 2 * (self.timeout_s + timeout_ms / 1000)  # the WAIT in flight, then ours
        try:
            async with asyncio.timeout(bound_s):
                return await asyncio.shield(round_)
        except TimeoutError as exc:
            raise rx.TimeoutError(f"Redis did not answer WAIT within {bound_s:g}s") from exc

    async def aclose(self) -> None:
        """Close the connections (the Sentinels' too), cancel the WAIT runner and wait
        until it has stopped and the sockets are closed: nothing is left pending (a
        transport closes its socket in a later turn of the loop, which may be the loop's
        last)."""
        runner = self._round_runner
        open_ = [p for p in (self._protocol, self._waiter) if p is not None and p.transport]
        self._close()
        if runner is not None:
            await asyncio.gather(runner, return_exceptions=True)
        if open_:
            await asyncio.wait([p.closed for p in open_], timeout=CLOSE_WAIT_S)
        if self.sentinel is not None:
            await self._sentinels.aclose()

    def _close(self) -> None:
        self._drop()
        if self._waiter is not None:
            self._waiter.close()
        self._waiter = None
        if self._round_runner is not None:
            self._round_runner.cancel()
        for round_ in self._rounds.values():
            if not round_.done():
                round_.set_exception(rx.ConnectionError("the lane was closed"))
        self._rounds.clear()

    def _drop(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
        self._protocol = None

    async def _send(self, args: Sequence[Any]) -> Any:
        protocol = await self._connected()
        reply = await protocol.send(args)
        if _readonly(reply) and self.sentinel is not None:
            self._demoted(protocol, reply)
        else:
            _WROTE_ON.set((self, protocol))
        return reply

    def _demoted(self, protocol: _Protocol, reply: rx.ResponseError) -> None:
        if protocol.lost is None and protocol.named_by is not None:
            self._sentinels.passed_over(protocol.named_by)
        protocol.retire(MasterDemoted(f"{protocol.address} is a replica now: {reply}"))

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        async with self._connecting:
            if self._protocol is None or self._protocol.lost is not None:
                try:
                    async with asyncio.timeout(self.timeout_s):
                        self._protocol = await self._connect()
                except TimeoutError as exc:
                    raise rx.TimeoutError(
                        f"Redis did not accept a connection within {self.timeout_s:g}s"
                    ) from exc
            return self._protocol

    async def _connect(self) -> _Protocol:
        if self.sentinel is None:
            opts = self.options
            address: Address = opts.get("path") or (
                opts.get("host", "localhost"),
                opts.get("port", 6379),
            )
            return await self._open(address, self.timeout_s)
        host, port = await self._sentinels.discover_master(self.sentinel.master_name)
        named_by = self._sentinels.sentinels[0]  # discovery puts the one that answered first
        protocol = await self._open((host, int(port)), self.timeout_s)
        protocol.named_by = named_by
        return protocol

    async def _open(self, address: Address, timeout_s: float | None) -> _Protocol:
        loop = asyncio.get_running_loop()
        opts = self.options
        protocol: _Protocol
        if isinstance(address, str):
            _, protocol = await loop.create_unix_connection(lambda: _Protocol(timeout_s), address)
        else:
            _, protocol = await loop.create_connection(
                lambda: _Protocol(timeout_s), *address, ssl=tls_context(opts)
            )
        protocol.address = address
        setup: list[Sequence[Any]] = []
        if opts.get("password"):
            user = opts.get("username")
            setup.append(("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"]))
        if opts.get("db"):
            setup.append(("SELECT", opts["db"]))
        try:
            for command in setup:
                reply = await protocol.send(command)
                if isinstance(reply, rx.ResponseError):
                    raise rx.ConnectionError(f"Redis refused {command[0]}: {reply}")
        except BaseException:  # refused, lost, or the caller's timeout: nothing left open
            protocol.close()
            raise
        return protocol

    # --- Redis WAIT, on a connection of its own ----------------------------------------

    async def _run_rounds(self) -> None:
        while self._rounds:
            rounds, self._rounds = self._rounds, {}
            for (wrote_on, replicas, timeout_ms), round_ in rounds.items():
                try:
                    acked = await self._wait_once(wrote_on, replicas, timeout_ms)
                except asyncio.CancelledError:  # close()
                    for left in rounds.values():
                        if not left.done():
                            left.set_exception(rx.ConnectionError("the lane was closed"))
                    raise
                except Exception as exc:
                    if not round_.done():
                        round_.set_exception(exc)
                else:
                    if not round_.done():
                        round_.set_result(acked)

    async def _wait_once(self, wrote_on: _Protocol, replicas: int, timeout_ms: int) -> int:
        """A barrier write then WAIT, on a connection to the server that ran the writes:
        the barrier's replication offset is past theirs."""
        if wrote_on.lost is not None:
            raise rx.ConnectionError(f"the connection of the writes is gone: {wrote_on.lost}")
        try:
            async with asyncio.timeout(self.timeout_s + timeout_ms / 1000):
                waiter = await self._waiter_to(wrote_on.address)
                barrier = waiter.send(("PUBLISH", WAIT_BARRIER_CHANNEL, ""))
                waited = waiter.send(("WAIT", replicas, timeout_ms))
                replies = await asyncio.gather(barrier, waited)
        except TimeoutError as exc:
            if self._waiter is not None:
                self._waiter.close()
            raise rx.TimeoutError("Redis did not answer WAIT in time") from exc
        except OSError as exc:
            raise rx.ConnectionError(f"Redis unreachable: {exc}") from exc
        for reply in replies:
            if isinstance(reply, rx.ResponseError):
                raise _error(reply)
        if wrote_on.lost is not None:  # the server may have died and come back meanwhile
            raise rx.ConnectionError(f"the connection of the writes is gone: {wrote_on.lost}")
        return int(replies[1])

    async def _waiter_to(self, address: Address) -> _Protocol:
        async with self._waiter_connecting:
            waiter = self._waiter
            if waiter is None or waiter.lost is not None or waiter.address != address:
                if waiter is not None:
                    waiter.close()
                self._waiter = waiter = await self._open(address, None)  # WAIT may block
            return waiter


def _readonly(reply: Any) -> bool:
    return isinstance(reply, rx.ResponseError) and str(reply).startswith("READONLY")


def _retrieve(future: asyncio.Future[int]) -> None:
    """Mark a WAIT round's error as seen, in case every caller gave up waiting for it."""
    if not future.cancelled():
        future.exception()


def _error(reply: rx.ResponseError) -> rx.RedisError:
    """A Redis error reply as redis-py would raise it, where the difference matters: a
    Redis still loading its data is unavailable (503), not broken."""
    message = str(reply)
    if message.startswith("LOADING"):
        return rx.BusyLoadingError(message)
    return reply
