"""The API's side of webhooks: the keys file's webhooks, mirrored into Redis for the
workers (a key of /admin/keys has its own in its record), and `/admin/webhooks`, a key's
deliveries not delivered (shared/webhooks.py has the record; worker/webhooks.py delivers).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from redis.asyncio import Redis

from api.tiers import Keyring
from shared import keys
from shared.errors import NotFound, RedisUnavailable
from shared.outage import Outage, supervised
from shared.redis.store import REDIS_ERRORS, redis_errors
from shared.webhooks import State

log = logging.getLogger("gpugate.webhooks")

MIRROR_S = 10.0
"""How often each API process writes the keys file's webhooks again (a Redis that came
back without its data has them again within this)."""
LISTED_MAX = 1000
"""The newest deliveries `/admin/webhooks` shows of a key."""
_FIELDS = ("id", "type", "data_id", "created_at", "attempts", "state", "last_status")
_MORE = ("last_error", "next_at")


class FileKeyMirror:
    """Keeps `keys.WEBHOOK_FILE_KEY` + name = {webhook_url, webhook_secret} for each key of
    the keys file that has a webhook, and none for the others: the workers read a key's
    webhook there when it has no /admin/keys record."""

    def __init__(self, redis: Redis, keyring: Keyring) -> None:
        self.redis = redis
        self.keyring = keyring
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage(log, "Redis (keys file webhooks)")
        self._swept = False

    async def start(self) -> None:
        """Write them now (a Redis down at start-up is the loop's to retry), then again
        every MIRROR_S."""
        with contextlib.suppress(RedisUnavailable, *REDIS_ERRORS):
            await self.write()
        self._task = asyncio.create_task(
            supervised("keys file webhooks", self._write_turn, self._outage, log, retry_s=MIRROR_S)
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _write_turn(self) -> float:
        await self.write()
        return MIRROR_S

    async def write(self) -> None:
        file_keys = self.keyring.keys or []
        with redis_errors():
            if not self._swept:  # once: keys taken out of the file since the last start
                names = {k.name for k in file_keys}
                async for found in self.redis.scan_iter(match=keys.WEBHOOK_FILE_KEY + "*"):
                    if found.decode().removeprefix(keys.WEBHOOK_FILE_KEY) not in names:
                        await self.redis.delete(found)
            async with self.redis.pipeline(transaction=True) as pipe:
                for key in file_keys:
                    name = keys.WEBHOOK_FILE_KEY + key.name
                    if key.webhook_url and key.webhook_secret:
                        mapping = {"webhook_url": key.webhook_url}
                        mapping["webhook_secret"] = key.webhook_secret
                        pipe.hset(name, mapping=mapping)
                    else:
                        pipe.delete(name)
                await pipe.execute()
        self._swept = True
        self._outage.recovered()


async def deliveries(redis: Redis, keyring: Keyring, name: str) -> list[dict[str, Any]]:
    """The pending and failed deliveries of key `name`, newest first (delivered ones leave
    the list when they are delivered); 404 for a name that is no key."""
    with redis_errors():
        async with redis.pipeline(transaction=False) as pipe:
            pipe.exists(keys.apikey(name))
            pipe.zrevrange(keys.WEBHOOKS_OF + name, 0, LISTED_MAX - 1)
            known, ids = await pipe.execute()
        if not known and not any(k.name == name for k in keyring.keys or []):
            raise NotFound(f"No API key named {name!r}.")
        if not ids:
            return []
        async with redis.pipeline(transaction=False) as pipe:
            for event_id in ids:
                pipe.hmget(keys.WEBHOOK + event_id.decode(), [*_FIELDS, *_MORE])
            records: list[list[bytes | None]] = await pipe.execute()
    out = []
    for values in records:
        record = {
            f: v.decode() if v is not None else None
            for f, v in zip((*_FIELDS, *_MORE), values, strict=True)
        }
        if record["state"] in (State.PENDING, State.FAILED):  # None: expired meanwhile
            out.append(_public(record))
    return out


def _public(record: dict[str, str | None]) -> dict[str, Any]:
    status, next_at = record["last_status"], record["next_at"]
    return {
        "id": record["id"],
        "type": record["type"],
        "data": {"id": record["data_id"]},
        "created_at": int(float(record["created_at"] or 0)) // 1000,
        "attempts": int(record["attempts"] or 0),
        "state": record["state"],
        "last_status": int(float(status)) if status else None,
        "last_error": record["last_error"] or None,
        "next_attempt_at": int(float(next_at)) // 1000 if next_at else None,
    }
