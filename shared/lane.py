"""A pipelined Redis connection for the one command every request makes (the admission
and /health bucket scripts).

redis-py's asyncio client costs about 55 µs of Python per command here (a pooled
connection taken and given back, a task per timeout); admission is one command, so that
was most of the price of a rejection. A `Lane` is one connection per process that all
requests share: each caller writes its command and awaits a future, and replies, which
Redis sends in order, resolve the futures in order. Commands of concurrent requests leave
in the same packets. hiredis packs the commands and parses the replies.

Failures look like redis-py's (`ConnectionError`, `TimeoutError`, `rx.ResponseError`), so
`shared.store.redis_errors` turns them into 503 as for any other Redis call. A command
that times out closes the connection (later replies would be out of step), failing the
commands still waiting on it; the next command connects again.
"""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from collections import deque
from collections.abc import Sequence
from functools import cache
from typing import Any

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import SSLConnection, parse_url

from shared.store import SOCKET_TIMEOUT_S


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=rx.ResponseError)
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.Transport | None = None
        self.lost: Exception | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            future = self.waiting.popleft()
            if not future.done():  # its caller may have given up (cancelled)
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = rx.ConnectionError(f"Redis connection lost: {exc or 'closed by the server'}")
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(self.lost)

    def send(self, args: Sequence[Any]) -> asyncio.Future[Any]:
        if self.lost is not None or self.transport is None:
            raise self.lost or rx.ConnectionError("Redis connection not open")
        future = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        self.transport.write(hiredis.pack_command(tuple(args)))
        return future


class Lane:
    """One pipelined connection to the Redis at `url` (redis://, rediss://, unix://)."""

    def __init__(self, url: str, timeout_s: float = SOCKET_TIMEOUT_S) -> None:
        self.options = parse_url(url)
        self.timeout_s = timeout_s
        self._protocol: _Protocol | None = None
        self._connecting = asyncio.Lock()

    async def execute(self, *args: Any) -> Any:
        """Send one command and return its reply; a Redis error reply is raised."""
        try:
            async with asyncio.timeout(self.timeout_s):
                protocol = await self._connected()
                reply = await protocol.send(args)
        except TimeoutError as exc:  # Redis did not answer in time (or not at all)
            self.close()
            raise rx.TimeoutError(f"Redis did not answer within {self.timeout_s:g}s") from exc
        except OSError as exc:  # refused, unreachable
            raise rx.ConnectionError(f"Redis unreachable: {exc}") from exc
        if isinstance(reply, rx.ResponseError):
            raise _error(reply)
        return reply

    async def script(self, source: str, args: Sequence[Any]) -> Any:
        """Run a Lua script by its SHA; after a Redis restart, send it whole once."""
        try:
            return await self.execute("EVALSHA", _sha1(source), 0, *args)
        except rx.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            return await self.execute("EVAL", source, 0, *args)

    def close(self) -> None:
        if self._protocol is not None and self._protocol.transport is not None:
            self._protocol.transport.close()
        self._protocol = None

    async def _connected(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.lost is None:
            return protocol
        async with self._connecting:
            if self._protocol is None or self._protocol.lost is not None:
                self._protocol = await self._connect()
            return self._protocol

    async def _connect(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        opts = self.options
        protocol: _Protocol
        if "path" in opts:
            _, protocol = await loop.create_unix_connection(_Protocol, opts["path"])
        else:
            secure = opts.get("connection_class") is SSLConnection
            tls = ssl.create_default_context() if secure else None
            _, protocol = await loop.create_connection(
                _Protocol, opts.get("host", "localhost"), opts.get("port", 6379), ssl=tls
            )
        setup: list[Sequence[Any]] = []
        if opts.get("password"):
            user = opts.get("username")
            setup.append(("AUTH", user, opts["password"]) if user else ("AUTH", opts["password"]))
        if opts.get("db"):
            setup.append(("SELECT", opts["db"]))
        for command in setup:
            reply = await protocol.send(command)
            if isinstance(reply, rx.ResponseError):
                protocol.transport.close()  # type: ignore[union-attr]
                raise rx.ConnectionError(f"Redis refused {command[0]}: {reply}")
        return protocol


def _error(reply: rx.ResponseError) -> rx.RedisError:
    """A Redis error reply as redis-py would raise it, where the difference matters: a
    Redis still loading its data is unavailable (503), not broken."""
    message = str(reply)
    if message.startswith("LOADING"):
        return rx.BusyLoadingError(message)
    return reply


@cache
def _sha1(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()
