"""Reading, waiting on and cancelling jobs, for their owner only."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.events import wait_for_end
from api.snapshot import backlog_from, queue_backlog
from api.state import Gate
from shared import keys
from shared.errors import Conflict, NotFound
from shared.estimates import Backlog
from shared.jobs import ErrorCode, Job
from shared.redis.store import redis_errors
from shared.scripts import CancelVerdict

_NOT_FOUND = "No such job."


@dataclass(frozen=True)
class JobView:
    job: Job
    queue_position: int | None
    backlog: Backlog

    def public(self) -> dict[str, Any]:
        estimate = None
        if self.queue_position is not None:
            estimate = round(self.backlog.start_in_s(self.queue_position), 3)
        return self.job.public(self.queue_position, estimate)


async def read_job(gate: Gate, owner: str, job_id: str) -> JobView:
    """The job as its owner sees it; another key's job does not exist."""
    with redis_errors():
        async with gate.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(job_id))
            pipe.zrank(keys.QUEUED, job_id)
            queue_backlog(pipe, gate.settings)
            raw, rank, *backlog = await pipe.execute()
    if not raw or raw.get(b"owner", b"").decode() != owner:
        raise NotFound(_NOT_FOUND)
    return JobView(Job.from_hash(raw), rank, backlog_from(backlog, gate.settings))


async def wait_job(gate: Gate, owner: str, job_id: str, wait_s: float) -> JobView:
    """The job once it has finished, or after `wait_s` seconds, whichever comes first.

    Each wait holds a Redis connection; when `MAX_WAITERS` reads already wait in this
    process, the job is answered as it is now (reading a job costs no token)."""
    view = await read_job(gate, owner, job_id)
    if view.job.status.finished or wait_s <= 0 or gate.waiters.locked():
        return view
    async with gate.waiters:
        await wait_for_end(gate.blocking_redis, job_id, wait_s)
    return await read_job(gate, owner, job_id)


async def cancel_job(
    gate: Gate,
    owner: str,
    job_id: str,
    *,
    code: str = ErrorCode.CANCELLED,
    message: str = "Cancelled by its owner.",
    only_if_queued: bool = False,
) -> str:
    """Cancel the job; returns the status it had (`queued` or `running`).

    With `only_if_queued`, a running job is left to finish (a sync call that timed out).
    """
    reply = await gate.scripts.cancel(
        job_id=job_id,
        owner=owner,
        code=code,
        message=message,
        result_ttl_ms=gate.settings.result_ttl * 1000,
        only_if_queued=only_if_queued,
    )
    if reply.verdict is CancelVerdict.NOT_FOUND:
        raise NotFound(_NOT_FOUND)
    if reply.verdict is CancelVerdict.FINISHED:
        raise Conflict(f"The job has already finished ({reply.status}).")
    return reply.status
