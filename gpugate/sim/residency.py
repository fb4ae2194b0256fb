"""Which models are loaded: Ollama's scheduler, its one loader, keep-alive and eviction."""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from gpugate.sim.config import SimConfig
from gpugate.sim.models import SimModel
from gpugate.sim.names import model_key
from gpugate.sim.stats import Stats

DEFAULT_KEEP_ALIVE_S = 300.0


REFERENCE_SIZE = 1_920_000_000
"""Bytes of a 3.2B model (llama3.2): the size that loads in `load_time_s`."""


_FOREVER = timedelta(microseconds=(2**63 - 1) // 1000)
"""Go's time.Duration(math.MaxInt64): what a negative keep_alive becomes."""


def keep_alive_delta(seconds: float) -> timedelta:
    return _FOREVER if seconds == math.inf else timedelta(seconds=seconds)


@dataclass
class Resident:
    """A loaded model: how many requests hold it, and when it unloads once idle."""

    model: SimModel
    keep_alive_s: float
    refs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    idle_until: datetime | None = None

    def expires_at(self, now: datetime) -> datetime:
        if self.refs or self.idle_until is None:
            return now + keep_alive_delta(self.keep_alive_s)
        return self.idle_until


@dataclass
class PendingLoad:
    """A model waiting for the loader, and the requests waiting for it."""

    model: SimModel
    keep_alive_s: float | None
    done: asyncio.Future[None]
    waiters: int = 0


class Residency:
    """Which models are loaded, and the one loader that loads them (Ollama's scheduler)."""

    def __init__(self, config: Callable[[], SimConfig], stats: Stats) -> None:
        self._config = config
        self._stats = stats
        self.resident: dict[str, Resident] = {}
        self._pending: dict[str, PendingLoad] = {}
        self._queue: deque[str] = deque()
        self._changed = asyncio.Event()
        self._loader: asyncio.Task[None] | None = None
        self.loading: PendingLoad | None = None  # in memory, not ready yet

    async def acquire(self, model: SimModel, keep_alive_s: float | None) -> None:
        """Hold `model` loaded for one request, loading it first if it is not."""
        key = model_key(model.name)
        self.expire()
        resident = self.resident.get(key)
        if resident is not None:
            self._attach(resident, keep_alive_s)
            return
        pending = self._pending.get(key)
        if pending is None:
            done = asyncio.get_running_loop().create_future()
            pending = self._pending[key] = PendingLoad(model, keep_alive_s, done)
            self._queue.append(key)
            self._start_loader()
        await self._join(key, pending, keep_alive_s)

    async def _join(self, key: str, pending: PendingLoad, keep_alive_s: float | None) -> None:
        pending.waiters += 1
        self._stats.load_waiting += 1
        try:
            await asyncio.shield(pending.done)
        except asyncio.CancelledError:
            if pending.done.done() and not pending.done.cancelled():
                self.release(pending.model)  # loaded, and counted us, just as we left
            else:
                pending.waiters -= 1
                self._changed.set()
            raise
        finally:
            self._stats.load_waiting -= 1
        if keep_alive_s is not None:
            self.resident[key].keep_alive_s = keep_alive_s

    def _attach(self, resident: Resident, keep_alive_s: float | None) -> None:
        resident.refs += 1
        resident.last_used = time.monotonic()
        resident.idle_until = None
        if keep_alive_s is not None:  # as in Ollama, a request's keep_alive sticks
            resident.keep_alive_s = keep_alive_s

    def release(self, model: SimModel) -> None:
        """One request is done with `model`: once idle it unloads after its keep-alive."""
        key = model_key(model.name)
        resident = self.resident.get(key)
        if resident is None:
            return
        resident.refs -= 1
        resident.last_used = time.monotonic()
        if resident.refs == 0:
            self._idle(key, resident)

    def _idle(self, key: str, resident: Resident) -> None:
        if resident.keep_alive_s <= 0:
            del self.resident[key]
        else:
            resident.idle_until = datetime.now(UTC) + keep_alive_delta(resident.keep_alive_s)
        self._changed.set()

    def unload(self, model: SimModel) -> None:
        """keep_alive 0 and no prompt: unload now if idle, else once idle (expireRunner)."""
        key = model_key(model.name)
        resident = self.resident.get(key)
        if resident is not None:
            resident.keep_alive_s = 0
            if resident.refs == 0:
                self._idle(key, resident)

    def expire(self) -> None:
        """Unload the idle models whose keep-alive has run out."""
        now = datetime.now(UTC)
        for key, resident in list(self.resident.items()):
            if not resident.refs and resident.idle_until is not None and resident.idle_until <= now:
                del self.resident[key]
                self._changed.set()

    def listed(self) -> list[tuple[datetime, SimModel]]:
        """What /api/ps shows, with when each unloads: the loaded models and, as in Ollama,
        the one loading (its runner is in the scheduler's list while it loads)."""
        self.expire()
        now = datetime.now(UTC)
        entries = [
            (resident.expires_at(now), resident.model) for resident in self.resident.values()
        ]
        if self.loading is not None:
            keep = self.loading.keep_alive_s
            expires_at = now + keep_alive_delta(DEFAULT_KEEP_ALIVE_S if keep is None else keep)
            entries.append((expires_at, self.loading.model))
        return entries

    def trim(self) -> None:
        """After `max_loaded` shrank: unload idle models down to it, and wake the loader."""
        while not self._has_room(spare=0) and (victim := self._idle_lru()) is not None:
            self._evict(victim)
        self._changed.set()

    def _has_room(self, spare: int = 1) -> bool:
        limit = self._config().max_loaded
        return limit == 0 or len(self.resident) + spare <= limit

    def _idle_lru(self) -> str | None:
        idle = [(r.last_used, key) for key, r in self.resident.items() if r.refs == 0]
        return min(idle)[1] if idle else None

    def _evict(self, key: str) -> None:
        del self.resident[key]
        self._stats.evictions += 1

    def _start_loader(self) -> None:
        if self._loader is None or self._loader.done():
            self._loader = asyncio.get_running_loop().create_task(self._load_all())

    async def _load_all(self) -> None:
        """Ollama's processPending: one pending model at a time, in order of arrival."""
        while self._queue:
            key = self._queue[0]
            pending = self._pending[key]
            loaded = await self._load(key, pending)
            self._queue.popleft()
            del self._pending[key]
            if loaded:
                pending.done.set_result(None)
            else:
                pending.done.cancel()

    async def _load(self, key: str, pending: PendingLoad) -> bool:
        """Make room, then load; False if every request for the model went away first."""
        while True:
            self.expire()
            if pending.waiters == 0:
                return False
            if self._has_room():
                break
            victim = self._idle_lru()
            if victim is not None:
                self._evict(victim)
                continue
            self._changed.clear()
            await self._changed.wait()  # until a model goes idle or a waiter leaves
        self._stats.count_load(pending.model.name)
        self.loading = pending
        try:
            await asyncio.sleep(self._config().load_time_s * pending.model.size / REFERENCE_SIZE)
        finally:
            self.loading = None
        keep = DEFAULT_KEEP_ALIVE_S if pending.keep_alive_s is None else pending.keep_alive_s
        resident = self.resident[key] = Resident(pending.model, keep, refs=pending.waiters)
        if resident.refs == 0:  # everyone left during the load: it finished anyway
            self._idle(key, resident)
        return True
