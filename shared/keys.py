"""Every Redis key gpugate uses, in one place, all under the prefix `gpugate:`.

The job record and its state machine are in `shared/jobs.py`; the scripts that move jobs
between the sets below are in `shared/lua/`, each called through `shared/scripts.py`.

A job waits in its owner's queue (`OWNER_QUEUE`), and the owner waits in `BACKLOG`,
ordered by its fair-share counter. `QUEUED` holds every waiting job of the fleet (what
`GPUGATE_MAX_QUEUE_DEPTH` counts). The dispatch script moves a job from waiting to
running on one backend: its run enters that backend's `BACKEND_RUNNING` (whose size never
exceeds the backend's cap) and `LEASES`, the fleet's runs, each with a lease renewed by
its worker's heartbeat, so a dead worker's runs come back within the lease.
"""

from __future__ import annotations

PREFIX = "gpugate:"

# jobs
JOB = PREFIX + "job:"  # + id: HASH, the job record (shared/jobs.py)
EVENTS = PREFIX + "events:"  # + id: STREAM of head / chunk / end events for waiters
INBOX = PREFIX + "inbox:"  # + API process: STREAM of the ends of its waiting sync calls
IDEMPOTENCY = PREFIX + "idem:"  # + owner + ":" + sha256(key): STRING "job id digest"

# waiting: the fair-share order (shared/lua/lib/schedule.lua)
QUEUED = PREFIX + "queued"  # ZSET id -> start score (admission ms minus priority boost)
OWNER_QUEUE = PREFIX + "q:"  # + owner: ZSET that owner's waiting ids -> start score
BACKLOG = PREFIX + "backlog"  # ZSET owner -> fair-share counter, owners with jobs waiting
VTC = PREFIX + "vtc"  # ZSET owner -> fair-share counter (virtual tokens served / weight)
VTC_IDLE = PREFIX + "vtc-idle"  # ZSET owner -> ms since it has had nothing waiting (VTC kept)
OWNER_PRIORITY = PREFIX + "priority"  # HASH owner -> tier priority, while it has jobs waiting
WAITING_MODELS = PREFIX + "waiting-models"  # HASH model -> jobs waiting for it

# running: GPU slots, leases, the fleet
LEASES = PREFIX + "leases"  # ZSET run id -> lease expiry ms, every run holding a GPU slot
DEADLINES = PREFIX + "deadlines"  # ZSET id -> ms after which a still-queued job is cancelled
BACKEND_RUNNING = PREFIX + "running:"  # + backend: ZSET run id -> start ms on that backend
FLEET = PREFIX + "fleet"  # HASH the backends' state dispatch reads, in one HGETALL: fields
# cap:<backend>, the live cap an operator set (absent: config); effective:<backend>, what
# adaptive concurrency found (adaptive backends only); down:<backend>, until when (ms) its
# breaker is open; models:<backend>, present once BACKEND_MODELS lists what it serves;
# switched:<backend>, "<ms> <model>" of its last grant that loaded a model; MASTER_FIELD
MASTER_FIELD = "granted-on"  # of FLEET: "<run id> <ms>", the Redis master the grants were
# made on, and until when no slot is granted after a failover (lib/schedule.lua)
BACKEND_FAILURES = PREFIX + "failures"  # HASH backend -> failures in a row
BACKEND_MODELS = PREFIX + "models:"  # + backend: SET of the models it serves (FLEET models:)
SESSION = PREFIX + "session:"  # + session digest: STRING the backend of its last job, PX
METER = PREFIX + "meter:"  # + backend: HASH what its jobs did since the controller last read
ADAPTIVE = PREFIX + "adaptive:"  # + backend: HASH the controller's state (worker/adaptive.py)
BACKOFF = PREFIX + "backoff:"  # + backend: STRING, PX: its cap was just halved (503, OOM)
BACKEND_LOADED = PREFIX + "loaded:"  # + backend: ZSET model -> ms last seen loaded there
WAKE = PREFIX + "wake"  # LIST: one entry wakes one idle worker (admission, freed slots)
WAKE_MAX = 16  # entries the wake list holds at most (the scripts' wake_one, a cap change)
CANCEL_CHANNEL = PREFIX + "cancel"  # pub/sub, job id: its holder stops it

# workers and what operators see
WORKERS = PREFIX + "workers"  # ZSET worker id -> last heartbeat ms
WORKER = PREFIX + "worker:"  # + worker id: HASH info, heartbeat
STATS = PREFIX + "stats"  # HASH: means, counters by outcome and rejection reason
MODEL_STATS = PREFIX + "model-ms"  # HASH model -> mean job ms (EWMA); and the fleet's:
MEAN_JOB_MS = "*"  # its field: the mean job ms of any model
MEAN_COST = "*cost"  # its field: the mean job cost (fair-share units)
MODEL_LOADS = PREFIX + "loads"  # HASH "backend|model" -> model loads seen
LOAD_MS = PREFIX + "load-ms"  # HASH "backend|model" -> mean load time (EWMA), from load_duration
HISTOGRAM = PREFIX + "hist:"  # + name: HASH bucket -> count, plus sum
READY_PROBE = PREFIX + "ready-probe"  # STRING, PX: /ready checks that Redis takes writes
USAGE = PREFIX + "usage"  # HASH "name|requests|input_tokens|output_tokens|gpu_ms" -> count

# limits
BUCKET = PREFIX + "rate:"  # + owner: STRING "<tokens> <ms>" (requests; lib/buckets.lua)
TOKEN_BUCKET = PREFIX + "tpm:"  # + owner: STRING "<tokens> <ms>" (tier tpm; may go below 0)
BUDGET = PREFIX + "budget:"  # + owner + ":" + period start (s): STRING tokens used and reserved
OWNER_RUNNING = PREFIX + "owner-running:"  # + owner: ZSET run id -> start ms (named keys)

# keys managed through /admin/keys (api/apikeys.py); only what verifies a key is stored
APIKEY = PREFIX + "apikey:"  # + name: HASH, the key's record
APIKEY_NAMES = PREFIX + "apikeys"  # ZSET name -> created ms
APIKEY_DIGESTS = PREFIX + "apikey-digests"  # HASH sha256 -> name: current and in-grace keys
APIKEY_REVOKED = PREFIX + "apikey-revoked"  # HASH sha256 -> name: deleted or rotated keys
APIKEY_USED = PREFIX + "apikey-used"  # HASH name -> ms of its last admission
APIKEYS_VERSION = PREFIX + "apikeys-version"  # STRING, INCR on every change: caches reload
AUDIT = PREFIX + "audit"  # LIST of JSON events, newest first, the last 10,000

# batches (api/batches.py, shared/lua/lib/batch.lua): files, the batch band of dispatch
FILE = PREFIX + "file:"  # + file id: HASH metadata and, for an input file, its content
FILES_OF = PREFIX + "files:"  # + owner: ZSET file id -> created ms (listing)
BATCH = PREFIX + "batch:"  # + batch id: HASH the Batch object's fields and its bookkeeping
BATCHES_OF = PREFIX + "batches:"  # + owner: ZSET batch id -> created ms (listing)
BATCH_LINES = PREFIX + "batch-lines:"  # + batch id: HASH line n -> {"custom_id","model","body"}
BATCH_TODO = PREFIX + "batch-todo:"  # + batch id + ":" + model: LIST line numbers not started
BATCH_MODELS = PREFIX + "batch-models:"  # + batch id: HASH model -> lines not started
BATCH_OUT = PREFIX + "batch-out:"  # + batch id: HASH custom_id -> output file line
BATCH_ERR = PREFIX + "batch-err:"  # + batch id: HASH custom_id -> error file line
BATCH_OWNER = PREFIX + "batch-owner:"  # + owner: ZSET its batches with lines to run -> created ms
BATCH_BACKLOG = PREFIX + "batch-backlog"  # ZSET owner -> fair-share counter among batch owners
BATCH_ACTIVE = PREFIX + "batch-active"  # ZSET batch id -> expires ms: batches not yet ended

# webhooks (shared/lua/lib/webhook.lua emits, worker/webhooks.py delivers)
WEBHOOK = PREFIX + "webhook:"  # + event id: HASH the delivery: key, type, body, attempts...
WEBHOOK_DUE = PREFIX + "webhook-due"  # ZSET event id -> ms of its next attempt (pending only)
WEBHOOKS_OF = PREFIX + "webhooks:"  # + key name: ZSET event id -> created ms (/admin/webhooks)
WEBHOOK_FILE_KEY = (
    PREFIX + "webhook-file:"
)  # + key name: HASH webhook_url, webhook_secret (keys file)

# arq's own names (arq 0.28), for worker/arq_adapter.py: the queue name its Worker (and
# its health-check key) is named by, and the name of the one job function.
ARQ_QUEUE = "arq:queue"
ARQ_FUNCTION = "run_job"

DEFAULT_BACKEND = "default"


def run_id(job_id: str, attempt: int) -> str:
    """One attempt at a job, `<job id>.<attempt>`; also its arq job id. The scripts build
    the same in `lua/lib/clock.lua`'s `run_of`."""
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


def owner_queue(owner: str) -> str:
    return OWNER_QUEUE + owner


def bucket(owner: str) -> str:
    return BUCKET + owner


def token_bucket(owner: str) -> str:
    return TOKEN_BUCKET + owner


def apikey(name: str) -> str:
    return APIKEY + name


def budget(owner: str, period_start_s: int) -> str:
    return f"{BUDGET}{owner}:{period_start_s}"


def owner_running(owner: str) -> str:
    return OWNER_RUNNING + owner


def worker(worker_id: str) -> str:
    return WORKER + worker_id


def histogram(name: str) -> str:
    return HISTOGRAM + name


def idempotency(owner: str, key_digest: str) -> str:
    return f"{IDEMPOTENCY}{owner}:{key_digest}"


def cap_field(backend: str) -> str:
    """Of FLEET: the live cap an operator set for `backend`."""
    return "cap:" + backend


def effective_field(backend: str) -> str:
    """Of FLEET: `backend`'s effective cap (worker/adaptive.py)."""
    return "effective:" + backend


def down_field(backend: str) -> str:
    """Of FLEET: until when (ms) `backend`'s breaker is open."""
    return "down:" + backend


def models_field(backend: str) -> str:
    """Of FLEET: present once BACKEND_MODELS lists what `backend` serves."""
    return "models:" + backend


def backend_running(backend: str) -> str:
    return BACKEND_RUNNING + backend


def backend_models(backend: str) -> str:
    return BACKEND_MODELS + backend


def backend_loaded(backend: str) -> str:
    return BACKEND_LOADED + backend
