"""The ends of this API process's waiting synchronous calls, read with one XREAD.

A synchronous call that is not streamed waits for one thing, its job's `end` event. One
blocking XREAD per waiting call costs a Redis command and a held connection each; here
admission names this process's inbox in the job (`inbox`), the end-of-job scripts append
the end there too (lua/lib/job.lua `post_end`), and one reader task serves every waiting
call: it reads whatever ends piled up and resolves each call's future.

A call registers before its admission (the job may end before the route runs), and is
forgotten when its relay ends. While Redis is unreachable, or answers the XREAD with an
error (out of memory, an ACL), the reader fails the calls waiting (the relay answers 503
with the job id: the job is safe in Redis) and tries again; the outage is logged once.

Nothing is trimmed that the reader has not read: the scripts append without a length cap,
and the reader trims what it read, keeping the last KEEP_READ entries (an operator's
record of recent ends), so an inbox holds at most KEEP_READ entries more than its unread
ends, whatever the number of calls waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections import deque

from redis.asyncio import Redis

from api.events import Event
from shared import keys
from shared.errors import RedisUnavailable
from shared.outage import Outage, supervised
from shared.redis.store import redis_errors

log = logging.getLogger("gpugate.api")

BLOCK_MS = 5_000
READ_COUNT = 512
RETRY_S = 0.5
KEEP_READ = 1_000
"""Entries already read that an inbox keeps; older ones are trimmed, KEEP_READ at a time."""


class Inbox:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        """A client without a read timeout (the XREAD blocks)."""
        self.name = secrets.token_hex(8)
        self.key = keys.INBOX + self.name
        self._waiting: dict[str, asyncio.Future[Event]] = {}
        self._reader: asyncio.Task[None] | None = None
        self._outage = Outage(log, "Redis, for the inbox of waiting calls,")
        self._last_id = b"0-0"
        self._read_ids: deque[bytes] = deque()

    def expect(self, job_id: str) -> None:
        """Wait for `job_id`'s end from now on (before its admission)."""
        self._waiting[job_id] = asyncio.get_running_loop().create_future()

    def ended(self, job_id: str) -> asyncio.Future[Event] | None:
        """The future of `job_id`'s end, if this process expects it."""
        return self._waiting.get(job_id)

    def forget(self, job_id: str) -> None:
        self._waiting.pop(job_id, None)

    def start(self) -> None:
        self._reader = asyncio.create_task(self._read(), name="inbox")

    async def stop(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader

    async def _read(self) -> None:
        await supervised("inbox", self._read_once, self._outage, log, retry_s=RETRY_S)

    async def _read_once(self) -> float:
        """One XREAD (blocking up to BLOCK_MS), its ends handed out; read again at once."""
        try:
            with redis_errors():
                reply = await self.redis.xread(
                    {self.key: self._last_id}, block=BLOCK_MS, count=READ_COUNT
                )
        except RedisUnavailable as exc:
            self._fail_all(exc)  # the calls answer 503 with their job id at once
            raise
        self._outage.recovered()
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                self._last_id = entry_id
                self._read_ids.append(entry_id)
                future = self._waiting.pop(fields.pop(b"job").decode(), None)
                if future is not None and not future.done():
                    future.set_result(Event("end", fields))
        if len(self._read_ids) >= 2 * KEEP_READ:
            await self._trim_read()
        return 0.0

    async def _trim_read(self) -> None:
        """Drop the entries read before the last KEEP_READ (never an unread one)."""
        while len(self._read_ids) > KEEP_READ:
            self._read_ids.popleft()
        with redis_errors():
            await self.redis.xtrim(self.key, minid=self._read_ids[0])

    def _fail_all(self, error: RedisUnavailable) -> None:
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # seen: a waiter may be gone meanwhile
