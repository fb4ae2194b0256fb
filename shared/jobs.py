"""The job: what a client submitted, where it is, how it ended.

A job is a Redis HASH at `gpugate:job:<id>` of plain strings (the request and the result
as JSON text, never pickle). This module is the one definition of its statuses, the ways
a run ends and its error codes; `lua_constants()` writes them into every script (`S_QUEUED`,
`RUN_RETRY`, `E_WORKER_LOST`…), and `set_status` in `shared/lua/lib/job.lua` is the only
code that writes `status`. Its lifecycle, every move made inside one Lua script:

    queued ──dispatch──▶ running ──finish──▶ succeeded | failed
      │  ▲                  │  │
      │  └──reap / retry────┘  └──cancel──▶ cancelled (the worker closes the Ollama call)
      └──cancel / deadline──▶ cancelled

`queued` is admitted but not yet running on Ollama. A *run* is one attempt at the job,
named `<id>.<attempt>` (`keys.run_id`); a run whose worker died is reaped and the job is
queued again as the next attempt (or failed after GPUGATE_MAX_ATTEMPTS); a run that
failed on a backend before any byte reached its client is queued again too, avoiding that
backend (`retry`).

| field | written by | meaning |
|---|---|---|
| id, owner, owner_name, usage_name | admit | the job id; who submitted it (secret-free); its name in logs; its name in usage (the keys file's `name`, else `anonymous`) |
| endpoint, model, body, stream, sync | admit | the Ollama path, the model, the body as JSON text, 1 if streamed, 1 for a synchronous call |
| inbox | admit | the API process waiting for a synchronous call's end (not streamed): its end goes to that process's inbox too |
| created_at, score, deadline_at | admit | ms; start score (admission time in ms, to the µs, minus priority boost); ms after which it is cancelled while still queued |
| weight, reserved_tokens, tpm_rate, tpm_burst | admit | fair-share weight; tokens reserved from the tier's tpm bucket, and that bucket's refill per ms and size |
| status, attempt, runs | admit, dispatch, reap, finish, cancel | state above; current attempt; runs started |
| worker, backend, started_at, vtc_charged | dispatch | who runs it where, since when; fair-share charge made at dispatch |
| avoid | finish (retry) | backends it failed on, space-separated |
| finished_at, http_status, content_type, result, error | finish, cancel | the end: Ollama's status, content type and body verbatim, or an error `{code, message}` |
| input_tokens, output_tokens | finish | what Ollama reported it served |
| traceparent | admit | only when the API traces: the W3C trace context the worker's spans join (shared/telemetry.py) |
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


class ErrorCode(StrEnum):
    """The `error.code` of a job that failed or was cancelled (beside the backend's own)."""

    CANCELLED = "cancelled"
    """Cancelled by its owner (DELETE /v1/jobs/{id})."""
    CLIENT_DISCONNECTED = "client_disconnected"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    """Still queued when its deadline (a synchronous call's timeout) passed."""
    NOT_REPLICATED = "not_replicated"
    WORKER_LOST = "worker_lost"
    BACKEND_ERROR = "backend_error"
    """The backend was unreachable or failed with 5xx after retries (counts for the breaker)."""
    TIMEOUT = "timeout"
    """The backend did not finish within GPUGATE_JOB_TIMEOUT (counts for the breaker)."""
    OLLAMA_ERROR = "ollama_error"
    REDIS_UNAVAILABLE = "redis_unavailable"


class RunEnd(StrEnum):
    """How a run can end besides a job status (finish.lua's outcomes, shared/scripts.py)."""

    RETRY = "retry"
    """Failed on the backend before any byte was relayed: queued again elsewhere."""
    STALE = "stale"
    """No longer the job's current attempt: nothing was recorded."""


def lua_constants() -> dict[str, str]:
    """The statuses, run ends and error codes by their names in Lua (`S_QUEUED`,
    `RUN_RETRY`, `E_WORKER_LOST`…), written into every script (shared/scripts.py): the
    scripts name them, never spell them."""
    return {
        **{f"S_{s.name}": s.value for s in JobStatus},
        **{f"RUN_{r.name}": r.value for r in RunEnd},
        **{f"E_{e.name}": e.value for e in ErrorCode},
    }


def record_ttl_ms(result_ttl_s: int) -> int:
    """A job record lives at most a week (or the result TTL), finished or not."""
    return max(7 * 86400, result_ttl_s) * 1000


_ID_BYTES = 16
_random_ids: list[str] = []
os.register_at_fork(after_in_child=_random_ids.clear)  # a forked child draws its own


def new_job_id() -> str:
    """128 random bits: unguessable. The system's random bytes are drawn 256 ids at a
    time (one getrandom call instead of one per request)."""
    if not _random_ids:
        pool = secrets.token_bytes(_ID_BYTES * 256)
        _random_ids.extend(pool[i : i + _ID_BYTES].hex() for i in range(0, len(pool), _ID_BYTES))
    return "job_" + _random_ids.pop()


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _ms(value: str | None) -> int | None:
    return int(value) if value else None


@dataclass(frozen=True)
class Job:
    id: str
    owner: str
    endpoint: str
    status: JobStatus
    created_at_ms: int
    started_at_ms: int | None
    finished_at_ms: int | None
    stream: bool
    http_status: int | None
    content_type: str
    result: str
    """Ollama's response body, verbatim (JSON text), once the job has run."""
    error: dict[str, Any] | None
    worker: str
    backend: str
    attempt: int

    @classmethod
    def from_hash(cls, raw: dict[Any, Any]) -> Job:
        f = {_text(k): _text(v) for k, v in raw.items()}
        return cls(
            id=f["id"],
            owner=f["owner"],
            endpoint=f["endpoint"],
            status=JobStatus(f["status"]),
            created_at_ms=int(f["created_at"]),
            started_at_ms=_ms(f.get("started_at")),
            finished_at_ms=_ms(f.get("finished_at")),
            stream=f.get("stream") == "1",
            http_status=_ms(f.get("http_status")),
            content_type=f.get("content_type", ""),
            result=f.get("result", ""),
            error=json.loads(f["error"]) if f.get("error") else None,
            worker=f.get("worker", ""),
            backend=f.get("backend", ""),
            attempt=int(f.get("attempt") or 1),
        )

    def public(
        self, queue_position: int | None = None, estimated_start_s: float | None = None
    ) -> dict[str, Any]:
        """The job object of the API (SPEC: Async jobs)."""
        return job_object(
            self.id,
            self.status,
            self.endpoint,
            self.created_at_ms,
            started_at_ms=self.started_at_ms,
            finished_at_ms=self.finished_at_ms,
            queue_position=queue_position,
            estimated_start_s=estimated_start_s,
            result=json.loads(self.result) if self.result else None,
            error=self.error,
        )


def job_object(
    job_id: str,
    status: JobStatus,
    endpoint: str,
    created_at_ms: int,
    *,
    started_at_ms: int | None = None,
    finished_at_ms: int | None = None,
    queue_position: int | None = None,
    estimated_start_s: float | None = None,
    result: Any = None,
    error: dict[str, Any] | None = None,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": job_id,
        "object": "job",
        "status": status.value,
        "endpoint": endpoint,
        "created_at": created_at_ms / 1000,
        "started_at": None if started_at_ms is None else started_at_ms / 1000,
        "finished_at": None if finished_at_ms is None else finished_at_ms / 1000,
    }
    if status is JobStatus.QUEUED:
        out["queue_position"] = queue_position
        out["estimated_start_seconds"] = estimated_start_s
    if status is JobStatus.SUCCEEDED:
        out["result"] = result
    if error is not None and status in (JobStatus.FAILED, JobStatus.CANCELLED):
        out["error"] = error
    return out
