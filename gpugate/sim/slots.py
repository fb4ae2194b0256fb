"""OLLAMA_NUM_PARALLEL: the slots inference requests wait for, in FIFO order."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

from gpugate.sim.stats import Stats


class SlotGate:
    """OLLAMA_NUM_PARALLEL: at most `capacity()` holders, the others wait in FIFO order."""

    def __init__(self, capacity: Callable[[], int], stats: Stats) -> None:
        self._capacity = capacity
        self._stats = stats
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return sum(1 for waiter in self._waiters if not waiter.done())

    async def acquire(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()  # a cancelled waiter whose task has not run yet
        if not self._waiters and self._stats.running < self._capacity():
            self._take()
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed over just as we were cancelled
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                self.wake()  # someone may have queued behind us while a slot was free
            raise

    def release(self) -> None:
        self._stats.running -= 1
        self.wake()

    def wake(self) -> None:
        """Hand free slots to waiters (after a release, or when `parallel` grew)."""
        while self._waiters and self._stats.running < self._capacity():
            waiter = self._waiters.popleft()
            if not waiter.done():
                self._take()
                waiter.set_result(None)

    def _take(self) -> None:
        self._stats.running += 1
        self._stats.max_running = max(self._stats.max_running, self._stats.running)
