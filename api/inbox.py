"""The ends of this API process's waiting synchronous calls, read with one XREAD.

A synchronous call that is not streamed waits for one thing, its job's `end` event. One
blocking XREAD per waiting call costs a Redis command and a held connection each; here
admission names this process's inbox in the job (`inbox`), the end-of-job scripts append
the end there too (prelude.lua `post_end`), and one reader task serves every waiting
call: it reads whatever ends piled up and resolves each call's future.

A call registers before its admission (the job may end before the route runs), and is
forgotten when its relay ends. While Redis is unreachable, or answers the XREAD with an
error, the reader fails the calls waiting (the relay answers 503 with the job id: the job
is safe in Redis) and tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from redis import exceptions as rx
from redis.asyncio import Redis

from api.events import Event
from shared import keys
from shared.errors import RedisUnavailable
from shared.store import DRIVER_ERRORS

log = logging.getLogger("gpugate.api")

BLOCK_MS = 5_000
READ_COUNT = 512
RETRY_S = 0.5


class Inbox:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        """A client without a read timeout (the XREAD blocks)."""
        self.name = secrets.token_hex(8)
        self.key = keys.INBOX + self.name
        self._waiting: dict[str, asyncio.Future[Event]] = {}
        self._reader: asyncio.Task[None] | None = None

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
        last_id = b"0-0"
        while True:
            try:
                reply = await self.redis.xread(
                    {self.key: last_id}, block=BLOCK_MS, count=READ_COUNT
                )
            except (*DRIVER_ERRORS, rx.RedisError) as exc:
                # also an error reply (an ACL, a wrong type): the reader must live on, or
                # every call of this process would wait out its deadline
                if not isinstance(exc, DRIVER_ERRORS):  # an outage is logged elsewhere
                    log.warning("the inbox's XREAD failed (%s); retrying", exc)
                self._fail_all(exc)
                await asyncio.sleep(RETRY_S)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    future = self._waiting.pop(fields.pop(b"job").decode(), None)
                    if future is not None and not future.done():
                        future.set_result(Event("end", fields))

    def _fail_all(self, exc: Exception) -> None:
        error = RedisUnavailable()
        error.__cause__ = exc
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(error)
                future.exception()  # seen: a waiter may be gone meanwhile
