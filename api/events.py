"""Reading a job's event stream (written by the worker and by the end-of-job scripts).

Events, in order: `head` (Ollama answered a streamed call: status, content type), `chunk`s
(raw bytes as Ollama sent them, several of its chunks to an event when they came faster
than the worker could write; a sequence number each), and one `end` (final status, and for
a synchronous call the outcome itself). Readers block on the stream (XREAD BLOCK): a
waiter is woken by the event itself, never by polling, and takes whatever has piled up
in one read.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from redis.asyncio import Redis

from shared import keys
from shared.redis.store import redis_errors

BLOCK_SLICE_MS = 5_000
"""Longest single XREAD BLOCK; a waiter re-issues it until its own deadline."""
READ_COUNT = 512


@dataclass(frozen=True)
class Event:
    kind: str
    fields: dict[bytes, bytes]

    def text(self, name: str) -> str:
        return self.fields.get(name.encode(), b"").decode()


class StreamGap(Exception):
    """Chunks were trimmed away before they were read: the relay cannot be complete."""


class JobEvents:
    """The job's events from the first, in batches (what one read returned), until `end`
    or the monotonic `deadline`. The deadline may be lifted (set to None) while
    iterating, e.g. once a stream began."""

    def __init__(self, redis: Redis, job_id: str, deadline: float | None) -> None:
        self.redis = redis
        self.key = keys.events(job_id)
        self.deadline = deadline

    def _block_ms(self) -> int:
        if self.deadline is None:
            return BLOCK_SLICE_MS
        remaining_ms = int((self.deadline - time.monotonic()) * 1000)
        return min(BLOCK_SLICE_MS, remaining_ms)

    async def __aiter__(self) -> AsyncIterator[list[Event]]:
        last_id = b"0-0"
        seq = 0
        while (block_ms := self._block_ms()) > 0:
            with redis_errors():
                reply = await self.redis.xread(
                    {self.key: last_id}, block=block_ms, count=READ_COUNT
                )
            batch: list[Event] = []
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    last_id = entry_id
                    event = Event(fields[b"type"].decode(), fields)
                    if event.kind == "chunk":
                        seq += 1
                        if int(fields[b"seq"]) != seq:
                            raise StreamGap(f"expected chunk {seq}, got {int(fields[b'seq'])}")
                    batch.append(event)
                    if event.kind == "end":
                        yield batch
                        return
            if batch:
                yield batch


async def wait_for_end(redis: Redis, job_id: str, timeout_s: float) -> bool:
    """True once the job has ended, False if `timeout_s` passed first."""
    async for batch in JobEvents(redis, job_id, time.monotonic() + timeout_s):
        if batch[-1].kind == "end":
            return True
    return False
