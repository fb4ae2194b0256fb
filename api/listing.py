"""OpenAI's list object over an owner's index of ids (files, batches): newest first, a
page of `limit` after the id `after`; ids whose object has expired are dropped from the
index as they are met."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from api.state import Gate
from shared.errors import NotFound
from shared.redis.store import redis_errors


async def listing(
    gate: Gate,
    index: str,
    limit: int,
    after: str | None,
    read: Callable[[str], Awaitable[dict[str, Any]]],
) -> dict[str, Any]:
    """The page of the ZSET `index` (id -> created ms) after `after`, each id's object
    read by `read` (NotFound: expired)."""
    with redis_errors():
        ids = [i.decode() for i in await gate.redis.zrevrange(index, 0, -1)]
    if after is not None and after in ids:
        ids = ids[ids.index(after) + 1 :]
    data: list[dict[str, Any]] = []
    for object_id in ids:
        if len(data) > limit:
            break
        try:
            data.append(await read(object_id))
        except NotFound:  # expired: forget it
            with redis_errors():
                await gate.redis.zrem(index, object_id)
    page = data[:limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(data) > limit,
    }
