"""Token buckets in this process's memory: the rate limit while Redis is unreachable.

They are used only during an outage. Each API instance then enforces every key's rate on
its own, so N instances let a key through up to N times its rate; the queue needs Redis
anyway, so what they bound during an outage is how often a client hears `503`, and the
metadata endpoints, which keep working.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from dataclasses import dataclass

OUTAGE_NOTE = "nothing is queued and rate limits are per API process until it is back"
"""What the one warning of an outage says it means."""

MAX_BUCKETS = 100_000
"""Beyond this many clients, the least recently seen bucket is dropped (it was full)."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    remaining: int
    """Whole tokens left after this request."""
    next_token_s: float
    full_in_s: float


class LocalBuckets:
    def __init__(self, max_buckets: int = MAX_BUCKETS) -> None:
        self.max_buckets = max_buckets
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, name: str, rate_per_s: float, burst: int) -> Decision:
        """Spend one token of bucket `name` if it has one."""
        now = time.monotonic()
        tokens, at = self._buckets.pop(name, (float(burst), now))
        tokens = min(float(burst), tokens + (now - at) * rate_per_s)
        allowed = tokens >= 1
        if allowed:
            tokens -= 1
        self._buckets[name] = (tokens, now)
        if len(self._buckets) > self.max_buckets:
            self._buckets.popitem(last=False)
        return Decision(
            allowed=allowed,
            remaining=math.floor(tokens),
            next_token_s=max(0.0, (1 - tokens) / rate_per_s),
            full_in_s=(burst - tokens) / rate_per_s,
        )
