"""The Lua scripts, each one atomic decision in one round trip, each called through one
typed function here: keyword arguments in, a frozen dataclass out, outcomes as a StrEnum.

A script is its own file in `lua/`; `lua/lib/` holds the helpers they share (`-- uses:`
names those a script calls; `lib/job.lua` holds `set_status`, the one writer of a job's
status). All of them are one Redis function library (`library()`, Redis 7 Functions):
each script a function, the helpers defined once when the library loads instead of on
every call, and the library kept by Redis with the data (replicated to the replicas,
persisted), so a failover finds it there.

The scripts name the keys of `shared/keys.py` (`K_JOB`: the fixed keys, and the prefixes
of per-job, per-owner and per-backend keys) and the constants of shared/jobs.py and
shared/batches.py (`S_QUEUED`, `E_WORKER_LOST`, `B_IN_PROGRESS`…); `library()` writes
each name's value into the text as a Lua string. Not as locals bound at the top: every
helper that names one would capture it as an upvalue on every call, and that binding,
with the key names sent as KEYS, cost about 100k of a script's 600-900k instructions in
redis-server (callgrind; `python -m bench commands` counts them per job). A script's
arguments travel as one JSON object in ARGV[1] (the names below are the names in Lua);
admit's request body as it came, in ARGV[2] (up to 16 MiB is not worth escaping into
JSON and decoding again); then, for the scripts that look at the fleet, the backends as
name, configured cap, kind triples. Replies are JSON objects.

A Redis that lacks the library (new, or restarted without persistence) gets it loaded
once (`store.fcall`). Redis failures, error replies included, become `RedisUnavailable`
(`store.redis_errors`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from pathlib import Path
from typing import Any

import orjson

from shared import keys
from shared.batches import BatchStatus, LineError
from shared.batches import lua_constants as batch_constants
from shared.endpoints import INFERENCE, Api
from shared.estimates import PRIOR_JOB_S, PRIOR_LOAD_S, SWITCH_HOLD_LOADS
from shared.jobs import JobStatus, RunEnd, lua_constants
from shared.redis.store import Execute, fcall, redis_errors
from shared.settings import Backend
from shared.webhooks import State

_LUA_DIR = Path(__file__).with_name("lua")
_KEYS: tuple[tuple[str, str], ...] = (
    ("K_JOB", keys.JOB),
    ("K_EVENTS", keys.EVENTS),
    ("K_INBOX", keys.INBOX),
    ("K_QUEUED", keys.QUEUED),
    ("K_OWNER_QUEUE", keys.OWNER_QUEUE),
    ("K_BACKLOG", keys.BACKLOG),
    ("K_VTC", keys.VTC),
    ("K_VTC_IDLE", keys.VTC_IDLE),
    ("K_OWNER_PRIORITY", keys.OWNER_PRIORITY),
    ("K_WAITING_MODELS", keys.WAITING_MODELS),
    ("K_LEASES", keys.LEASES),
    ("K_DEADLINES", keys.DEADLINES),
    ("K_BACKEND_RUNNING", keys.BACKEND_RUNNING),
    ("K_FLEET", keys.FLEET),
    ("K_BACKEND_FAILURES", keys.BACKEND_FAILURES),
    ("K_BACKEND_MODELS", keys.BACKEND_MODELS),
    ("K_BACKEND_LOADED", keys.BACKEND_LOADED),
    ("K_SESSION", keys.SESSION),
    ("K_METER", keys.METER),
    ("K_WAKE", keys.WAKE),
    ("K_CANCEL_CHANNEL", keys.CANCEL_CHANNEL),
    ("K_WORKERS", keys.WORKERS),
    ("K_WORKER", keys.WORKER),
    ("K_STATS", keys.STATS),
    ("K_MODEL_STATS", keys.MODEL_STATS),
    ("K_MODEL_LOADS", keys.MODEL_LOADS),
    ("K_LOAD_MS", keys.LOAD_MS),
    ("K_HISTOGRAM", keys.HISTOGRAM),
    ("K_USAGE", keys.USAGE),
    ("K_BUCKET", keys.BUCKET),
    ("K_TOKEN_BUCKET", keys.TOKEN_BUCKET),
    ("K_BUDGET", keys.BUDGET),
    ("K_OWNER_RUNNING", keys.OWNER_RUNNING),
    ("K_APIKEY", keys.APIKEY),
    ("K_APIKEY_USED", keys.APIKEY_USED),
    ("K_FILE", keys.FILE),
    ("K_FILES_OF", keys.FILES_OF),
    ("K_BATCH", keys.BATCH),
    ("K_BATCHES_OF", keys.BATCHES_OF),
    ("K_BATCH_LINES", keys.BATCH_LINES),
    ("K_BATCH_TODO", keys.BATCH_TODO),
    ("K_BATCH_MODELS", keys.BATCH_MODELS),
    ("K_BATCH_OUT", keys.BATCH_OUT),
    ("K_BATCH_ERR", keys.BATCH_ERR),
    ("K_BATCH_OWNER", keys.BATCH_OWNER),
    ("K_BATCH_BACKLOG", keys.BATCH_BACKLOG),
    ("K_BATCH_ACTIVE", keys.BATCH_ACTIVE),
    ("K_WEBHOOK", keys.WEBHOOK),
    ("K_WEBHOOK_DUE", keys.WEBHOOK_DUE),
    ("K_WEBHOOKS_OF", keys.WEBHOOKS_OF),
)

HISTOGRAMS: dict[str, tuple[float, ...]] = {
    "queue_wait_seconds": (
        0.005,
        0.01,
        0.025,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        120,
        300,
    ),
    "job_duration_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
}
"""The bucket bounds of the histograms kept in Redis (one count per observation in its
own bucket, added by the workers' tally, worker/tally.py; api/metrics.py adds them up for
Prometheus)."""


def histogram_field(bound: float) -> str:
    """The field of a histogram's bucket in Redis: the bound as Lua wrote it (`1`, `0.005`)."""
    return f"{bound:.14g}"


_OPENAI_PATHS = ", ".join(f"['{p}'] = true" for p, e in INFERENCE.items() if e.api is Api.OPENAI)
_PRELUDE = f"local OPENAI_PATHS = {{{_OPENAI_PATHS}}}\n"
"""The one local every script gets: the paths an `openai` backend runs (the others need
Ollama)."""


def _literal(value: str | int) -> str:
    if isinstance(value, int):
        return str(value)
    if not re.fullmatch(r"[\w:|*.-]*", value):
        raise ValueError(f"not a plain Lua string: {value!r}")
    return f"'{value}'"


_NAMED: tuple[tuple[str, str | int], ...] = (
    *_KEYS,
    *lua_constants().items(),
    *batch_constants().items(),
    ("WAKE_MAX", keys.WAKE_MAX),
    ("MEAN_JOB_MS", keys.MEAN_JOB_MS),
    ("MEAN_COST", keys.MEAN_COST),
    ("MASTER_FIELD", keys.MASTER_FIELD),
)
_LITERALS: dict[str, str] = {name: _literal(value) for name, value in _NAMED}
"""What each name stands for in the scripts: the keys, the job's statuses, run ends and
error codes (shared/jobs.py), the batches' statuses, the wake list's bound, the fleet's
mean fields."""
_NAMES = re.compile(r"\b(" + "|".join(sorted(_LITERALS, key=len, reverse=True)) + r")\b")

_LIBRARY = ("clock", "buckets", "fleet", "fairshare", "webhook", "batch", "job", "schedule")
"""The modules of `lua/lib/`, in the order they are included (each after what it needs)."""


@dataclass(frozen=True)
class Library:
    """Every script as one Redis function library (Redis 7 Functions), loaded once into
    each Redis (`store.fcall`) and kept there with the data: replicated, persisted, and
    not lost by a failover. Its name and its functions' carry `version`, a digest of the
    text, so processes of two releases side by side each call their own."""

    text: str
    version: str

    def function(self, script: str) -> str:
        return f"{script}_{self.version}"


_SHEBANG_FLAGS = re.compile(r"^#!lua flags=(.*)$")


def _function(name: str, version: str) -> str:
    """Script `name` as the registration of a function: its body becomes the callback (its
    `ARGV`, the function's arguments), its shebang's flags the function's."""
    body = (_LUA_DIR / f"{name}.lua").read_text()
    flags = ""
    if body.startswith("#!"):
        first, body = body.split("\n", 1)
        match = _SHEBANG_FLAGS.match(first)
        if match is None:
            raise ValueError(f"{name}.lua: a shebang other than `#!lua flags=…`")
        flags = ", ".join(f"'{flag}'" for flag in match[1].split(","))
    return (
        f"redis.register_function{{function_name = '{name}_{version}', flags = {{{flags}}},\n"
        f"callback = function(_, ARGV)\n{body}end}}\n"
    )


SCRIPTS: tuple[str, ...] = tuple(sorted(p.stem for p in _LUA_DIR.glob("*.lua")))
"""The scripts of `lua/`, each a function of the library."""


@cache
def library() -> Library:
    """The library: the modules of `lua/lib/`, then each script as a function, with the
    names of `_LITERALS` written as values."""
    modules = "".join((_LUA_DIR / "lib" / f"{m}.lua").read_text() for m in _LIBRARY)
    version = hashlib.sha1(
        "".join((_LUA_DIR / f"{n}.lua").read_text() for n in SCRIPTS).encode()
        + modules.encode()
        + repr(sorted(_LITERALS.items())).encode()
        + _PRELUDE.encode()
    ).hexdigest()[:12]
    functions = "".join(_function(name, version) for name in SCRIPTS)
    code = _NAMES.sub(lambda m: _LITERALS[m[1]], modules + functions)
    return Library(f"#!lua name=gpugate_{version}\n{_PRELUDE}{code}", version)


def fleet_argv(backends: Sequence[Backend]) -> tuple[str | int, ...]:
    """The ARGV tail of the scripts that look at the fleet: name, configured cap, kind, ..."""
    return tuple(v for b in backends for v in (b.name, b.gpu_concurrency, b.kind))


class AdmitOutcome(StrEnum):
    ADMITTED = "admitted"
    EXISTING = "existing"
    """An Idempotency-Key named a job admitted before: this is that job."""
    CONFLICT = "conflict"
    NO_WORKER = "no_worker"
    BACKEND_DOWN = "backend_down"
    RATE_LIMITED = "rate_limit_exceeded"
    TOKEN_LIMITED = "token_limit_exceeded"
    QUEUE_FULL = "queue_full"
    QUEUE_FULL_KEY = "queue_full_key"
    BUDGET_EXHAUSTED = "budget_exhausted"


@dataclass(frozen=True)
class AdmitReply:
    outcome: AdmitOutcome
    job_id: str
    rank: int
    """The job's place in the fleet's backlog (or of the key's first queued job); -1: none."""
    now_ms: int
    tokens: float
    full_in_ms: int
    next_token_ms: int
    depth: int = 0
    """The backlog's facts (depth, running, caps, mean) are read only where a wait
    estimate needs them: a queue_full refusal, the 202 of an async job."""
    running: int = 0
    cap: int = 0
    serving_cap: int = 0
    """The caps of the backends that are up and serve the request's model."""
    mean_job_ms: float | None = None
    """The measured mean job time of the model (else of any job); None before any."""
    budget: float | None = None
    """The key's tpm bucket after this decision; None when its tier has no tpm."""
    budget_full_in_ms: int = 0
    budget_ready_in_ms: int = 0
    """Until the tpm bucket is above zero and holds what the request names."""
    status: str = ""
    created_at_ms: int = 0
    budget_used: float = 0
    """budget_exhausted: the period's use (and reservations) so far."""


class FinishStatus(StrEnum):
    """A run's end as the worker reports it and finish.lua records it (shared/jobs.py)."""

    SUCCEEDED = JobStatus.SUCCEEDED.value
    FAILED = JobStatus.FAILED.value
    CANCELLED = JobStatus.CANCELLED.value
    RETRY = RunEnd.RETRY.value
    """Failed on the backend before any byte was relayed: queue it again elsewhere."""
    STALE = RunEnd.STALE.value
    """The run is no longer the job's current attempt: nothing was recorded."""


@dataclass(frozen=True)
class FinishReply:
    status: FinishStatus
    breaker_opened: bool
    ended: bool = False
    """The run ended its job (not a batch line's): the worker counts the end (its tally)."""
    waiting: bool = True
    """A job or a batch line waits for a slot: the place this run frees is worth asking
    the scheduler for (else an admission wakes an idle worker)."""


class CancelVerdict(StrEnum):
    CANCELLED = JobStatus.CANCELLED.value
    NOT_FOUND = "not_found"
    FINISHED = "finished"
    RUNNING = JobStatus.RUNNING.value
    """`only_if_queued` and the job runs: left to finish."""


@dataclass(frozen=True)
class CancelReply:
    verdict: CancelVerdict
    status: str = ""
    """The status the job had."""


@dataclass(frozen=True)
class Grant:
    """A GPU slot granted to a worker for one run (lib/schedule.lua)."""

    run_id: str
    job_id: str
    attempt: int
    endpoint: str
    body: str
    stream: bool
    backend: str
    model: str
    owner_name: str = ""
    """The key's name or fingerprint, for the worker's log lines."""
    traceparent: str = ""
    """The trace of a request admitted while the API traced; then also when it was
    queued and when it was dispatched, in Redis's clock (shared/telemetry.py)."""
    queued_at_ms: int = 0
    started_at_ms: int = 0
    cold: bool = False
    """The model was not loaded on the backend when the run was granted: its load time
    (even none) is what a load costs there (finish.lua, lib/schedule.lua `load_ms`)."""
    batch: str = ""
    """A batch's line (lib/batch.lua): its end is a line of the batch's output or error
    file, which the worker writes (`batch_line`)."""
    custom_id: str = ""
    usage_name: str = ""
    """Whose usage the run is (shared/jobs.py `usage_name`), for the worker's tally."""
    waited_ms: int | None = None
    """How long the job waited in the queue (interactive jobs; a batch line has no wait)."""
    cap: int = 0
    """The backend's cap when the run was granted (its effective cap when adaptive): the
    adaptive controller learns a cap's pace only from the runs that started under it."""


@dataclass(frozen=True)
class Ask:
    """A worker asks the scheduler for up to `want` runs (dispatch.lua, lib/schedule.lua).
    `backends`: the fleet (`fleet_argv`); `session_ttl_ms`: how long a session keeps its
    backend (0: sessions are not kept); `session_wait_ms`: how long its job may wait there
    for a slot."""

    worker: str
    want: int
    lease_ms: int
    affinity_wait_ms: int
    provisional_cost: float
    result_ttl_ms: int
    fence_ms: int
    backends: tuple[str | int, ...]
    max_owners: int = 256
    scan_per_owner: int = 16
    session_ttl_ms: int = 0
    session_wait_ms: int = 0
    load_prior_ms: int = int(PRIOR_LOAD_S * 1000)
    job_prior_ms: int = int(PRIOR_JOB_S * 1000)
    switch_hold_loads: float = SWITCH_HOLD_LOADS

    def args(self) -> dict[str, Any]:
        """The script's arguments (the fleet goes after them, in ARGV)."""
        out = dict(vars(self))
        del out["backends"]
        return out


@dataclass(frozen=True)
class HeldRun:
    run_id: str
    backend: str


@dataclass(frozen=True)
class HeartbeatReply:
    lost: list[str] = field(default_factory=list)
    """Runs the worker holds that are no longer its own: it must stop them."""
    cancelled: list[str] = field(default_factory=list)
    """Jobs the worker runs that were cancelled: it must close their Ollama calls."""
    reaped: int = 0


@dataclass(frozen=True)
class TokenReply:
    allowed: bool
    tokens: float
    next_token_ms: int


class WebhookOutcome(StrEnum):
    """What one webhook attempt came to, as the worker reports it (webhook_done.lua)."""

    DELIVERED = State.DELIVERED.value
    """A 2xx."""
    RETRY = "retry"
    """Anything else: tried again after the backoff, or failed past the retry window."""
    FAILED = State.FAILED.value
    """Nowhere to send it: its key has no webhook any more."""


@dataclass(frozen=True)
class ClaimedWebhook:
    """A delivery claimed by one worker for one attempt (webhook_claim.lua)."""

    id: str
    key: str
    """The name of the key whose webhook gets it."""
    body: str
    claim: str
    attempts: int
    """Attempts made before this one."""
    created_at_ms: int


@dataclass(frozen=True)
class WebhookDoneReply:
    state: State | None
    """None: the claim was no longer the delivery's, nothing was recorded."""
    attempts: int = 0
    next_at_ms: int | None = None


_encode = orjson.dumps
"""Arguments and replies are JSON through orjson: 1.4 µs to encode admit's arguments and
1.5 µs to decode its reply here, against 15 and 8 µs with the json module, on the path
of every request."""


def _list(value: Any) -> list[Any]:
    """cjson encodes an empty array as `{}`."""
    return value if isinstance(value, list) else []


class Scripts:
    """The scripts, run through one `execute` (a redis-py client's, or a Lane's)."""

    def __init__(self, execute: Execute) -> None:
        self._execute = execute

    async def _run(self, name: str, args: dict[str, Any], *tail: str | int) -> Any:
        with redis_errors():
            reply = await fcall(self._execute, library(), name, (_encode(args), *tail))
        return orjson.loads(reply)

    async def admit(
        self,
        *,
        owner: str,
        owner_name: str,
        usage_name: str,
        rate_per_ms: float,
        burst: int,
        tpm_per_ms: float,
        tpm_burst: int,
        reserve_tokens: int,
        max_depth: int,
        max_queued: int,
        priority: int,
        boost_ms: int,
        weight: float,
        job_id: str,
        endpoint: str,
        model: str,
        body: str,
        stream: bool,
        sync: bool,
        deadline_ms: int,
        idempotency_key: str,
        digest: str,
        result_ttl_ms: int,
        record_ttl_ms: int,
        worker_stale_ms: int,
        backends: Sequence[str | int],
        hold_ms: int = 0,
        inbox: str = "",
        traceparent: str = "",
        session: str = "",
        key_record: str = "",
        hook: str = "",
        max_running: int = 0,
        budget_tokens: int = 0,
        budget_period: int = 0,
        budget_reserve: int = 0,
        budget_ttl_ms: int = 0,
    ) -> AdmitReply:
        """`key_record`, `max_running`, `budget_*`: a known key's (api/apikeys.py): its
        record's name, its tier's max_running, its budget (the period named by its start,
        in Unix seconds; the tokens the request names, reserved). `hook`: the key whose
        webhook receives the job's end (an async job of a key that has one)."""
        args = dict(locals())
        del args["self"], args["backends"], args["body"]
        optional_args = ("traceparent", "session", "key_record", "hook", "max_running")
        for optional in (*optional_args, "budget_tokens"):
            if not args[optional]:  # only requests that need one carry it
                del args[optional]
        if not budget_tokens:
            del args["budget_period"], args["budget_reserve"], args["budget_ttl_ms"]
        raw = await self._run("admit", args, body, *backends)
        raw["outcome"] = AdmitOutcome(raw["outcome"])
        return AdmitReply(**raw)

    async def dispatch(self, ask: Ask) -> list[Grant]:
        raw = await self._run("dispatch", ask.args(), *ask.backends)
        return [Grant(**g) for g in _list(raw)]

    async def finish(
        self,
        *,
        job_id: str,
        attempt: int,
        backend: str,
        status: FinishStatus,
        http_status: int | str,
        content_type: str,
        result: str,
        error: str,
        error_code: str,
        duration_ms: float,
        input_tokens: int,
        output_tokens: int,
        model_load_ms: float,
        cold: bool = False,
        max_attempts: int,
        breaker_threshold: int,
        breaker_cooldown_ms: int,
        ewma_weight: float,
        wake: bool,
        result_ttl_ms: int,
        record_ttl_ms: int,
        batch_line: str = "",
    ) -> FinishReply:
        """`batch_line`: a batch line's output or error file line (lib/batch.lua)."""
        args = dict(locals())
        del args["self"]
        raw = await self._run("finish", args)
        return FinishReply(
            FinishStatus(raw["status"]),
            bool(raw["breaker_opened"]),
            bool(raw["ended"]),
            bool(raw["waiting"]),
        )

    async def cancel(
        self,
        *,
        job_id: str,
        owner: str,
        code: str,
        message: str,
        result_ttl_ms: int,
        only_if_queued: bool = False,
    ) -> CancelReply:
        args = dict(locals())
        del args["self"]
        raw = await self._run("cancel", args)
        return CancelReply(CancelVerdict(raw["verdict"]), raw.get("status", ""))

    async def heartbeat(
        self,
        *,
        worker: str,
        info: str,
        lease_ms: int,
        worker_stale_ms: int,
        max_runs: int,
        result_ttl_ms: int,
        record_ttl_ms: int,
        fair_share_memory_ms: int,
        held: Sequence[HeldRun],
        backends: Sequence[str | int],
    ) -> HeartbeatReply:
        args = dict(locals())
        del args["self"], args["backends"]
        args["held"] = [{"run_id": h.run_id, "backend": h.backend} for h in held]
        raw = await self._run("heartbeat", args, *backends)
        return HeartbeatReply(
            lost=_list(raw.get("lost")),
            cancelled=_list(raw.get("cancelled")),
            reaped=int(raw.get("reaped", 0)),
        )

    async def release(self, *, job_id: str) -> bool:
        """Let a job held at admission (`hold_ms`) be dispatched; False if it is gone or
        was cancelled meanwhile."""
        raw = await self._run("release", {"job_id": job_id})
        return bool(raw["released"])

    async def batch_create(
        self,
        *,
        batch_id: str,
        owner: str,
        owner_name: str,
        usage_name: str,
        hook: str,
        endpoint: str,
        input_file_id: str,
        completion_window: str,
        window_s: float,
        metadata: str,
        files_ttl_ms: int,
        weight: float,
        key_record: str,
        max_running: int,
        budget_tokens: int,
        budget_period: str,
        budget_key: str,
        total: int,
        errors: str = "",
    ) -> BatchStatus:
        """Create the batch: `failed` with `errors` (JSON text), else `in_progress` with the
        `total` lines api/batches.py wrote waiting (shared/lua/batch_create.lua)."""
        args = dict(locals())
        del args["self"]
        if not errors:
            del args["errors"]
        raw = await self._run("batch_create", args)
        return BatchStatus(raw["status"])

    async def batch_cancel(self, *, batch_id: str, owner: str) -> BatchStatus | None:
        """`cancelling` (or the status it had, if it had ended); None: not the owner's."""
        raw = await self._run("batch_cancel", {"batch_id": batch_id, "owner": owner})
        return BatchStatus(raw["status"]) if raw["status"] else None

    async def batch_step(self, *, chunk: int) -> int:
        """Expire, drain and end batches (shared/lua/batch_step.lua); how many are still
        draining lines."""
        raw = await self._run(
            "batch_step",
            {
                "chunk": chunk,
                "expired_code": LineError.EXPIRED.value,
                "cancelled_code": LineError.CANCELLED.value,
            },
        )
        return int(raw["draining"])

    async def take_token(self, *, name: str, rate_per_ms: float, burst: int) -> TokenReply:
        raw = await self._run("bucket", {"name": name, "rate_per_ms": rate_per_ms, "burst": burst})
        return TokenReply(bool(raw["allowed"]), float(raw["tokens"]), int(raw["next_token_ms"]))

    async def meter_take(self, *, backend: str, min_jobs: int) -> dict[str, float]:
        """`backend`'s measurement window, taken (emptied), once `min_jobs` jobs ended in
        it; `{}` before (shared/lua/meter_take.lua)."""
        raw = await self._run("meter_take", {"backend": backend, "min_jobs": min_jobs})
        return {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}

    async def claim_webhooks(
        self, *, worker: str, limit: int, lease_ms: int, listing_keep_ms: int
    ) -> list[ClaimedWebhook]:
        """Up to `limit` due deliveries, each claimed for `lease_ms` (webhook_claim.lua);
        `listing_keep_ms`: how long the key's /admin/webhooks listing outlives them."""
        args = dict(locals())
        del args["self"]
        raw = await self._run("webhook_claim", args)
        return [
            ClaimedWebhook(
                id=c["id"],
                key=c["key"],
                body=c["body"],
                claim=c["claim"],
                attempts=int(c["attempts"]),
                created_at_ms=int(c["created_at"]),
            )
            for c in _list(raw.get("claimed"))
        ]

    async def webhook_done(
        self,
        *,
        id: str,
        claim: str,
        outcome: WebhookOutcome,
        status: int | str,
        error: str,
        base_ms: int,
        max_ms: int,
        retry_for_ms: int,
        delivered_keep_ms: int,
        failed_keep_ms: int,
        listing_keep_ms: int,
    ) -> WebhookDoneReply:
        """Record an attempt made under `claim` (webhook_done.lua): `status` the HTTP
        status ('' when none came); a retry backs off from `base_ms` doubling to `max_ms`,
        and fails once it would come `retry_for_ms` after the event."""
        args = dict(locals())
        del args["self"]
        raw = await self._run("webhook_done", args)
        if raw["state"] == "stale":
            return WebhookDoneReply(None)
        next_at = raw.get("next_at")
        return WebhookDoneReply(
            State(raw["state"]), int(raw["attempts"]), int(next_at) if next_at else None
        )
