"""The job: what a client submitted, where it is, how it ended. Stored as a Redis HASH of
plain strings (the request and the result as JSON text, never pickle)."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

INFERENCE_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/api/generate", "/api/chat")


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def record_ttl_ms(result_ttl_s: int) -> int:
    """A job record lives at most a week (or the result TTL), finished or not."""
    return max(7 * 86400, result_ttl_s) * 1000


def new_job_id() -> str:
    """128 random bits: unguessable."""
    return "job_" + secrets.token_hex(16)


def _text(value: bytes | str | None) -> str:
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else value


def _seconds(ms: str) -> float | None:
    return int(ms) / 1000 if ms else None


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
            started_at_ms=int(f["started_at"]) if f.get("started_at") else None,
            finished_at_ms=int(f["finished_at"]) if f.get("finished_at") else None,
            stream=f.get("stream") == "1",
            http_status=int(f["http_status"]) if f.get("http_status") else None,
            content_type=f.get("content_type", ""),
            result=f.get("result", ""),
            error=json.loads(f["error"]) if f.get("error") else None,
            worker=f.get("worker", ""),
            attempt=int(f.get("attempt") or 1),
        )

    def public(
        self, queue_position: int | None = None, estimated_start_s: float | None = None
    ) -> dict[str, Any]:
        """The job object of the API (SPEC: Async jobs)."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": "job",
            "status": self.status.value,
            "endpoint": self.endpoint,
            "created_at": self.created_at_ms / 1000,
            "started_at": _seconds(str(self.started_at_ms or "")),
            "finished_at": _seconds(str(self.finished_at_ms or "")),
        }
        if self.status is JobStatus.QUEUED:
            out["queue_position"] = queue_position
            out["estimated_start_seconds"] = estimated_start_s
        if self.status is JobStatus.SUCCEEDED:
            out["result"] = json.loads(self.result) if self.result else None
        if self.error is not None and self.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            out["error"] = self.error
        return out


def _plain(value: object) -> str:
    """arq records failures as exceptions; JSON keeps their text only."""
    return f"{type(value).__name__}: {value}"


def arq_serialize(obj: dict[str, Any]) -> bytes:
    """arq's job and result serializer: JSON, never pickle."""
    return json.dumps(obj, separators=(",", ":"), default=_plain).encode()


def arq_deserialize(data: bytes) -> dict[str, Any]:
    value = json.loads(data)
    if not isinstance(value, dict):
        raise ValueError("an arq record must be a JSON object")
    return value
