"""One warning when a dependency stops answering and one when it is back, however many
requests or loop turns fail in between; and `supervised`, the one way a long-lived loop
runs: turn after turn, ending only by cancellation."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from shared.errors import RedisUnavailable
from shared.redis.store import REDIS_ERRORS, unavailable

RETRY_S = 1.0
"""While down, one caller this often may find out whether it is back (`should_try`)."""


class Outage:
    """Tracks whether `what` (Redis, say) is down, logging each change of state once."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None
        self.error: BaseException | None = None
        """What failed last (while down)."""
        self._next_try = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def should_try(self) -> bool:
        """False while unreachable, but for one caller a second: a Redis that hangs instead
        of refusing then costs one caller its timeout, not every caller. A Redis that
        answers with an error (out of memory, read-only) answers at once: every caller
        tries, so the first request after it recovers is served."""
        if self.since is None or not _unreachable(self.error):
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_S
        return True

    def failed(self, exc: BaseException, consequence: str = "") -> None:
        self._next_try = time.monotonic() + RETRY_S
        self.error = exc
        if self.since is None:
            self.since = time.monotonic()
            detail = f"; {consequence}" if consequence else ""
            self.log.warning("%s is %s%s", self.what, _describe(exc), detail)

    def recovered(self) -> None:
        if self.since is not None:
            self.log.warning("%s is back after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None
            self.error = None


def _unreachable(exc: BaseException | None) -> bool:
    """No answer at all (a refused connection, a timeout), as opposed to an error reply."""
    return not isinstance(exc, RedisUnavailable) or exc.reason == "unreachable"


def _describe(exc: BaseException) -> str:
    """`unreachable (ConnectionError)`, or `unavailable (out of memory: OutOfMemoryError …)`."""
    cause = exc.__cause__ if isinstance(exc, RedisUnavailable) else exc
    name = (cause or exc).__class__.__name__
    if not isinstance(exc, RedisUnavailable) or _unreachable(exc):
        return f"unreachable ({name})"
    return f"unavailable ({exc.reason}: {name} {str(cause)[:200]})"


async def supervised(
    name: str,
    turn: Callable[[], Awaitable[float]],
    outage: Outage,
    log: logging.Logger,
    *,
    retry_s: float,
) -> None:
    """Run `turn` for ever, pausing between two turns the seconds it returns (0: go on at
    once). A Redis failure of any kind (no connection, a timeout, an error reply such as
    OOM) is the outage's: logged once, the next turn `retry_s` later. Any other exception
    is a bug: logged with its traceback once per kind in a row, and retried too.

    Only cancellation ends it, even one a library lost. redis-py can answer a cancel in
    the middle of a read with a timeout or a lost connection; and Python 3.11's
    `asyncio.wait_for`, through which redis-py writes every command, returns the write's
    result when the write ends as the cancel comes, and drops the cancel (CPython
    gh-86296). Either way the task still counts the cancel (`cancelling()`): a turn that
    ends while it is cancelling ends the loop, or whoever cancelled it would wait for
    ever."""
    last_bug: type[BaseException] | None = None
    while True:
        try:
            pause = await turn()
            last_bug = None
        except (RedisUnavailable, *REDIS_ERRORS) as exc:
            end_if_cancelled()
            outage.failed(unavailable(exc), "waiting for it")
            pause = retry_s
        except Exception as exc:
            end_if_cancelled()
            if type(exc) is not last_bug:
                log.exception("the %s loop failed; it goes on", name)
            last_bug = type(exc)
            pause = retry_s
        end_if_cancelled()
        await asyncio.sleep(pause)


def end_if_cancelled() -> None:
    """Raise CancelledError if the running task is being cancelled: after an await in
    which a library may have lost a cancel (a redis-py write, see `supervised`)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
