"""One warning when a dependency stops answering and one when it is back, however many
requests or loop turns fail in between."""

from __future__ import annotations

import logging
import time

RETRY_S = 1.0
"""While down, one caller this often may find out whether it is back (`should_try`)."""


class Outage:
    """Tracks whether `what` (Redis, say) is down, logging each change of state once."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None
        self._next_try = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def should_try(self) -> bool:
        """False while down, but for one caller a second: a Redis that hangs instead of
        refusing then costs one caller its timeout, not every caller."""
        if self.since is None:
            return True
        now = time.monotonic()
        if now < self._next_try:
            return False
        self._next_try = now + RETRY_S
        return True

    def failed(self, exc: BaseException, consequence: str = "") -> None:
        self._next_try = time.monotonic() + RETRY_S
        if self.since is None:
            self.since = time.monotonic()
            detail = f"; {consequence}" if consequence else ""
            self.log.warning("%s is unreachable (%s)%s", self.what, exc.__class__.__name__, detail)

    def recovered(self) -> None:
        if self.since is not None:
            self.log.warning("%s is back after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None
