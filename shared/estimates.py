"""Wait estimates from the backlog, the GPU cap and the measured mean job time.

Jobs start at a rate of about `cap / mean_job_s`; a job with `n` jobs ahead of it starts
after about `n / cap * mean_job_s` once every slot is busy. Until the workers have measured a
job, `PRIOR_JOB_S` stands in for the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

PRIOR_JOB_S = 5.0
"""Mean job time assumed before any job was measured (a short chat reply on a GPU)."""

PRIOR_LOAD_S = 5.0
"""A model's load time on a backend before one was measured (a 7-8B model from disk)."""

SWITCH_HOLD_LOADS = 5
"""A backend switched to another model keeps it at least this many of that load's times
before a model loaded nowhere may switch it again (lib/schedule.lua): each switch then pays
for its load, and three models on two backends do not thrash."""

EWMA_WEIGHT = 0.2
"""Weight of the newest job duration in the running mean the workers keep in Redis."""


@dataclass(frozen=True)
class Backlog:
    depth: int
    running: int
    cap: int
    mean_job_ms: float | None

    @property
    def mean_job_s(self) -> float:
        return PRIOR_JOB_S if self.mean_job_ms is None else self.mean_job_ms / 1000

    def start_in_s(self, jobs_ahead: int) -> float:
        """Seconds until a job with `jobs_ahead` queued jobs before it starts."""
        cap = max(1, self.cap)
        free = max(0, cap - self.running)
        waiting_for = jobs_ahead + 1 - free
        if waiting_for <= 0:
            return 0.0
        return waiting_for * self.mean_job_s / cap

    def queue_wait_s(self) -> float:
        """Seconds a job admitted now would wait: the whole backlog starts first."""
        return self.start_in_s(self.depth)

    def room_in_s(self, limit: int) -> float:
        """Seconds until the backlog is below `limit` again (for a queue_full Retry-After)."""
        must_start = max(1, self.depth - limit + 1)
        return must_start * self.mean_job_s / max(1, self.cap)
