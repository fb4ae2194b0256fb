"""The batch: OpenAI's Batch object over gpugate's queue (SPEC "Batches and webhooks").

A batch is a Redis HASH at `gpugate:batch:<id>` of plain strings; its lines wait in lists of
their own (`shared/keys.py` BATCH_*), outside the interactive queue, and the scheduler (`lib/schedule.lua`)
starts one only on a slot no waiting interactive job can take. Its lifecycle:

    validating ──▶ in_progress ──(no line waits or runs)──▶ completed
        │              │  └──window passed──▶ finalizing ──(drained)──▶ expired
        ▼              └──cancel──▶ cancelling ──(drained)──▶ cancelled
      failed (the file is invalid: `errors`)

Validation happens when the batch is created (api/batches.py): a batch the caller sees is
`in_progress` or `failed`. An ending batch (cancelled, expired) starts no new line; the
worker's batch loop (worker/batches.py) moves the lines that never started to the error
file, and the batch ends once its running lines have ended too (lib/batch.lua).

| field | written by | meaning |
|---|---|---|
| id, owner, owner_name, usage_name, hook | create | who made it (secret-free); its key's name in usage; the key whose webhook hears of its end |
| endpoint, input_file_id, completion_window, metadata | create | as given (metadata as JSON text) |
| status, created_at, in_progress_at, expires_at, finalizing_at, completed_at, failed_at, expired_at, cancelling_at, cancelled_at | create, open, cancel, settle | the Batch object's status and times (Unix s) |
| expires_ms, files_ttl_ms, weight, key_record, max_running, budget_tokens, budget_period, budget_key | create; budget_key by the batch loop | what the scheduler needs to run its lines |
| total, todo, running, completed, failed | open, dispatch, finish | lines in all; waiting; running; written to the output file; to the error file |
| ending | cancel, the batch loop | `cancelled` or `expired`: it ends so once drained |
| errors | create | a failed validation's `[{"code", "message", "line"}]` (JSON text) |
| output_file_id, error_file_id | settle | its files, each once it has a line |

A line that starts becomes a job record (`batch`, `line`, `custom_id`; id `batch_req_…`,
the same for each attempt) and ends like any job; its end is written once, keyed by
`custom_id`, into `BATCH_OUT` or `BATCH_ERR`, which the output and error files read.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

MAX_LINES = 50_000
"""Lines a batch input file may hold."""


class BatchStatus(StrEnum):
    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


class LineError(StrEnum):
    """The `error.code` of an error file line of gpugate's own."""

    EXPIRED = "batch_expired"
    CANCELLED = "batch_cancelled"


def lua_constants() -> dict[str, str]:
    """The batch statuses by their names in Lua (`B_IN_PROGRESS`…), for every script."""
    return {f"B_{s.name}": s.value for s in BatchStatus}


_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def _int(value: str | None) -> int | None:
    return int(value) if value else None


def batch_object(fields: dict[str, str]) -> dict[str, Any]:
    """The Batch object of OpenAI's API, from the batch's HASH (decoded)."""
    errors = json.loads(fields["errors"]) if fields.get("errors") else None
    return {
        "id": fields["id"],
        "object": "batch",
        "endpoint": fields["endpoint"],
        "input_file_id": fields["input_file_id"],
        "completion_window": fields["completion_window"],
        "status": fields["status"],
        **{name: _int(fields.get(name)) for name in _TIMES},
        "request_counts": {
            "total": int(fields.get("total") or 0),
            "completed": int(fields.get("completed") or 0),
            "failed": int(fields.get("failed") or 0),
        },
        "output_file_id": fields.get("output_file_id") or None,
        "error_file_id": fields.get("error_file_id") or None,
        "errors": {"object": "list", "data": errors} if errors else None,
        "metadata": json.loads(fields["metadata"]) if fields.get("metadata") else None,
    }
