"""One warning when a dependency stops answering and one when it is back, however many
requests or loop turns fail in between."""

from __future__ import annotations

import logging
import time


class Outage:
    """Tracks whether `what` (Redis, say) is down, logging each change of state once."""

    def __init__(self, log: logging.Logger, what: str) -> None:
        self.log = log
        self.what = what
        self.since: float | None = None

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, exc: BaseException, consequence: str = "") -> None:
        if self.since is None:
            self.since = time.monotonic()
            detail = f"; {consequence}" if consequence else ""
            self.log.warning("%s is unreachable (%s)%s", self.what, exc.__class__.__name__, detail)

    def recovered(self) -> None:
        if self.since is not None:
            self.log.warning("%s is back after %.1fs", self.what, time.monotonic() - self.since)
            self.since = None
