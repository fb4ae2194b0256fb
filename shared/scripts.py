"""The Lua scripts, each one atomic decision in one round trip.

Each script is `lua/prelude.lua` (helpers, with the key names of `shared.keys` bound as
`K_*` constants) followed by its own file. redis-py runs them by SHA and reloads them
after a Redis restart.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from pathlib import Path

from redis.asyncio import Redis
from redis.commands.core import AsyncScript

from shared import keys

_LUA_DIR = Path(__file__).with_name("lua")
_CONSTANTS = {
    "K_JOB": keys.JOB,
    "K_EVENTS": keys.EVENTS,
    "K_QUEUED": keys.QUEUED,
    "K_QUEUED_BY": keys.QUEUED_BY_OWNER,
    "K_CLAIMS": keys.CLAIMS,
    "K_RUNNING": keys.RUNNING,
    "K_LEASES": keys.LEASES,
    "K_DEADLINES": keys.DEADLINES,
    "K_CAP": keys.CAP,
    "K_WORKERS": keys.WORKERS,
    "K_WORKER": keys.WORKER,
    "K_STATS": keys.STATS,
    "K_HISTOGRAM": keys.HISTOGRAM,
    "K_BREAKER": keys.BREAKER,
    "K_BUCKET": keys.BUCKET,
    "K_WAKE_CHANNEL": keys.WAKE_CHANNEL,
    "K_SLOTS_CHANNEL": keys.SLOTS_CHANNEL,
    "K_CANCEL_CHANNEL": keys.CANCEL_CHANNEL,
    "K_ARQ_QUEUE": keys.ARQ_QUEUE,
    "K_ARQ_JOB": keys.ARQ_JOB,
    "K_ARQ_IN_PROGRESS": keys.ARQ_IN_PROGRESS,
    "K_ARQ_RETRY": keys.ARQ_RETRY,
    "K_ARQ_FUNCTION": keys.ARQ_FUNCTION,
}


@cache
def source(name: str) -> str:
    """The full text of script `name` (without `.lua`), prelude included."""
    constants = "".join(f"local {k} = '{v}'\n" for k, v in _CONSTANTS.items())
    prelude = (_LUA_DIR / "prelude.lua").read_text()
    return constants + prelude + (_LUA_DIR / f"{name}.lua").read_text()


@dataclass(frozen=True)
class Scripts:
    """The scripts registered on one Redis client."""

    admit: AsyncScript
    bucket: AsyncScript
    take_slot: AsyncScript
    finish: AsyncScript
    cancel: AsyncScript
    heartbeat: AsyncScript

    @classmethod
    def register(cls, redis: Redis) -> Scripts:
        names = ("admit", "bucket", "take_slot", "finish", "cancel", "heartbeat")
        return cls(**{name: redis.register_script(source(name)) for name in names})
