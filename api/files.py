"""OpenAI's Files API, for batches: a caller's JSONL input files, and the output and error
files of its batches, each visible to its owner only (404 for anyone else).

An input file is a Redis HASH (`keys.FILE`) holding its metadata and its bytes, kept
GPUGATE_FILES_TTL. An output or error file holds no bytes of its own: its content is the
lines its batch wrote (lib/batch.lua), read when it is downloaded; its size was counted
as they were written.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Any

from api.listing import listing
from api.state import Gate
from shared import keys
from shared.errors import InvalidRequest, NotFound, RequestTooLarge
from shared.redis.store import redis_errors

PURPOSE = "batch"
_NOT_FOUND = "No such file."


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


@dataclass(frozen=True)
class StoredFile:
    id: str
    owner: str
    filename: str
    purpose: str
    created_at: int
    size: int
    lines_key: str
    """An output or error file: the HASH of the lines it is made of."""

    FIELDS = ("id", "owner", "filename", "purpose", "created_at", "bytes", "lines")
    """What a file's HASH holds besides an input file's content (never read with them)."""

    @classmethod
    def from_fields(cls, values: list[bytes | None]) -> StoredFile:
        f = {name: (v or b"").decode() for name, v in zip(cls.FIELDS, values, strict=True)}
        return cls(
            id=f["id"],
            owner=f["owner"],
            filename=f["filename"],
            purpose=f["purpose"],
            created_at=int(f["created_at"]),
            size=int(f["bytes"] or 0),
            lines_key=f["lines"],
        )

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.size,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
        }


async def store_file(
    gate: Gate, owner: str, filename: str, purpose: str, content: bytes
) -> dict[str, Any]:
    """Keep an uploaded batch input file for its owner."""
    if purpose != PURPOSE:
        raise InvalidRequest(f"purpose: only {PURPOSE!r} files are accepted here")
    limit = gate.settings.max_batch_file_bytes
    if len(content) > limit:
        raise RequestTooLarge(f"The file is larger than {limit} bytes.")
    if not content.strip():
        raise InvalidRequest("file: the file is empty", status=400)
    file_id, now = new_file_id(), int(time.time())
    ttl_s = gate.settings.files_ttl
    fields = {
        "id": file_id,
        "owner": owner,
        "filename": filename[:255] or "input.jsonl",
        "purpose": purpose,
        "created_at": now,
        "bytes": len(content),
        "content": content,
    }
    with redis_errors():
        async with gate.redis.pipeline(transaction=True) as pipe:
            pipe.hset(keys.FILE + file_id, mapping=fields)
            pipe.expire(keys.FILE + file_id, ttl_s)
            pipe.zadd(keys.FILES_OF + owner, {file_id: now * 1000})
            pipe.expire(keys.FILES_OF + owner, ttl_s)
            await pipe.execute()
    return StoredFile(
        file_id, owner, str(fields["filename"]), purpose, now, len(content), ""
    ).public()


async def find_file(gate: Gate, owner: str, file_id: str) -> StoredFile:
    """The file's metadata (an input file's content is not read: it may be 64 MiB)."""
    with redis_errors():
        values = await gate.redis.hmget(keys.FILE + file_id, list(StoredFile.FIELDS))  # type: ignore[misc]
    if values[1] is None or values[1].decode() != owner:
        raise NotFound(_NOT_FOUND)
    return StoredFile.from_fields(values)


async def file_content(gate: Gate, owner: str, file_id: str) -> bytes:
    """The bytes of an input file, or the lines of an output or error file."""
    found = await find_file(gate, owner, file_id)
    with redis_errors():
        if found.lines_key:
            lines = await gate.redis.hvals(found.lines_key)  # type: ignore[misc]
            return b"".join(line + b"\n" for line in lines)
        content = await gate.redis.hget(keys.FILE + file_id, "content")  # type: ignore[misc]
    if content is None:
        raise NotFound(_NOT_FOUND)
    return bytes(content)


async def list_files(gate: Gate, owner: str, limit: int, after: str | None) -> dict[str, Any]:
    """The owner's files, newest first (OpenAI's list object)."""

    async def read(file_id: str) -> dict[str, Any]:
        return (await find_file(gate, owner, file_id)).public()

    return await listing(gate, keys.FILES_OF + owner, limit, after, read)


async def delete_file(gate: Gate, owner: str, file_id: str) -> dict[str, Any]:
    await find_file(gate, owner, file_id)
    with redis_errors():
        async with gate.redis.pipeline(transaction=True) as pipe:
            pipe.delete(keys.FILE + file_id)
            pipe.zrem(keys.FILES_OF + owner, file_id)
            await pipe.execute()
    return {"id": file_id, "object": "file", "deleted": True}
