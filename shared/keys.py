"""Every Redis key and channel gpugate uses, in one place.

State of a job (all moves happen inside Lua scripts, so they are atomic):

    queued ──claim──▶ claimed (held by a worker, waiting for a GPU slot, still `queued`)
       │                 │
       │                 └─slot granted─▶ running ──▶ succeeded | failed | cancelled
       └── cancel / deadline ──▶ cancelled

`QUEUED` holds every job that is admitted but not yet running (what `MAX_QUEUE_DEPTH`
counts); `CLAIMS` the subset a worker holds; `RUNNING` the jobs holding a GPU slot
(its size never exceeds the cap); `LEASES` an expiry for every job a worker holds,
renewed by that worker's heartbeat, so a dead worker's jobs come back within the lease.
A *run* is one attempt at a job, named `<job id>.<attempt>`; it is also the arq job id.
A run whose worker died is reaped and the job re-queued as the next attempt.
"""

from __future__ import annotations

PREFIX = "gpugate:"

JOB = PREFIX + "job:"  # + id: HASH, the job record (JSON text in `body`, `result`, `error`)
EVENTS = PREFIX + "events:"  # + id: STREAM of head / chunk / end events for waiters
QUEUED = PREFIX + "queued"  # ZSET id -> start score (admission ms minus priority boost)
QUEUED_BY_OWNER = PREFIX + "queued-by:"  # + owner: SET of that key's queued ids
CLAIMS = PREFIX + "claims"  # ZSET run id -> start score, held by a worker, waiting for a slot
RUNNING = PREFIX + "running"  # ZSET run id -> start ms, jobs holding a GPU slot
LEASES = PREFIX + "leases"  # ZSET run id -> lease expiry ms, every run a worker holds
DEADLINES = PREFIX + "deadlines"  # ZSET id -> ms after which a still-queued job is cancelled
CAP = PREFIX + "cap"  # STRING: live GPU cap set by an operator (absent: settings)
WORKERS = PREFIX + "workers"  # ZSET worker id -> last heartbeat ms
WORKER = PREFIX + "worker:"  # + worker id: HASH host, pid, started_at, heartbeat
STATS = PREFIX + "stats"  # HASH: mean job time, counters by outcome and rejection reason
HISTOGRAM = PREFIX + "hist:"  # + name: HASH bucket -> count, plus sum and count
BUCKET = PREFIX + "bucket:"  # + owner: HASH tokens, ts (token bucket)
BREAKER = PREFIX + "breaker"  # STRING while the circuit breaker is open (Ollama down), PX
IDEMPOTENCY = PREFIX + "idem:"  # + owner + ":" + sha256(key): STRING job id + body digest

WAKE_CHANNEL = PREFIX + "wake"  # a job was enqueued: idle workers poll arq now
SLOTS_CHANNEL = PREFIX + "slots"  # a slot freed or the cap changed: waiting jobs retry
CANCEL_CHANNEL = PREFIX + "cancel"  # job id: its holder stops it

# arq's own layout (arq 0.28, see ../shared/ARQ.md). Only shared/arq_queue.py and the Lua
# scripts that enqueue a run touch these.
ARQ_QUEUE = "arq:queue"
ARQ_JOB = "arq:job:"
ARQ_IN_PROGRESS = "arq:in-progress:"
ARQ_RETRY = "arq:retry:"
ARQ_RESULT = "arq:result:"
ARQ_FUNCTION = "run_job"


def run_id(job_id: str, attempt: int) -> str:
    """One attempt at a job; also its arq job id (prelude.lua builds the same)."""
    return f"{job_id}.{attempt}"


def split_run(run: str | bytes) -> tuple[str, int]:
    """(job id, attempt) of a run id."""
    text = run.decode() if isinstance(run, bytes) else run
    job_id, attempt = text.rsplit(".", 1)
    return job_id, int(attempt)


def job(job_id: str) -> str:
    return JOB + job_id


def events(job_id: str) -> str:
    return EVENTS + job_id


def queued_by(owner: str) -> str:
    return QUEUED_BY_OWNER + owner


def bucket(owner: str) -> str:
    return BUCKET + owner


def worker(worker_id: str) -> str:
    return WORKER + worker_id


def histogram(name: str) -> str:
    return HISTOGRAM + name


def idempotency(owner: str, key_digest: str) -> str:
    return f"{IDEMPOTENCY}{owner}:{key_digest}"
