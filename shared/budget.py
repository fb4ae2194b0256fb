"""Token budgets: N input + output tokens per UTC calendar day, week or month.

A day starts at 00:00 UTC, a week on Monday 00:00 UTC, a month on the 1st at 00:00 UTC.
The period's use is one Redis counter per key and period (`shared/keys.py` BUDGET), named
by the period's start: admission (admit.lua) reserves what a request names and refuses
once the use reaches N; the end of the job (finish.lua) settles the real usage.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from redis.asyncio.client import Pipeline

from shared import keys

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")
_TEXT = re.compile(r"^\s*(\d+)\s*/\s*(day|week|month)\s*$")
KEEP_AFTER_S = 86_400
"""A period's counter outlives the period this long: a job admitted just before the
reset still settles into the period that reserved for it."""


@dataclass(frozen=True)
class Budget:
    tokens: int
    period: Period

    @classmethod
    def parse(cls, text: str) -> Budget:
        """`1000000/day` (a tier's `budget`, the CLI's `--budget`)."""
        match = _TEXT.match(text)
        if match is None or int(match.group(1)) < 1:
            raise ValueError(f"{text!r} is not a budget like '1000000/day' (day|week|month)")
        return cls(int(match.group(1)), match.group(2))  # type: ignore[arg-type]

    @classmethod
    def from_json(cls, raw: Any) -> Budget | None:
        if not isinstance(raw, dict):
            return None
        return cls(int(raw["tokens"]), raw["period"])

    def public(self) -> dict[str, Any]:
        return {"tokens": self.tokens, "period": self.period}

    def __str__(self) -> str:
        return f"{self.tokens}/{self.period}"

    def window(self, now_s: float) -> tuple[int, int]:
        """The period holding `now_s`: its start and end, in Unix seconds."""
        now = datetime.fromtimestamp(now_s, UTC)
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        if self.period == "day":
            start, end = day, day + timedelta(days=1)
        elif self.period == "week":
            start = day - timedelta(days=day.weekday())
            end = start + timedelta(days=7)
        else:
            start = day.replace(day=1)
            end = (start + timedelta(days=32)).replace(day=1)
        return int(start.timestamp()), int(end.timestamp())


def iso(ts_s: float | None) -> str | None:
    """Unix seconds as `2027-01-01T00:00:00Z` (None stays None)."""
    if ts_s is None:
        return None
    return datetime.fromtimestamp(ts_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def open_period(pipe: Pipeline, owner: str, budget: Budget, now_s: float) -> str:
    """Queue on `pipe` the creation of `owner`'s counter for the period holding `now_s` (0,
    unless it exists; kept KEEP_AFTER_S past the period's end), and return its key: batch
    lines are charged there by finish.lua, which charges only a counter that exists."""
    start, end = budget.window(now_s)
    key = keys.budget(owner, start)
    pipe.set(key, 0, nx=True)
    pipe.expire(key, int(end - now_s + KEEP_AFTER_S))
    return key
