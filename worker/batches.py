"""The worker's side of batches (shared/batches.py): what a line's run answered, as a line
of the batch's output or error file; and the batch loop, which ends batches (expiry,
cancellation) and keeps their budget period current.

The scheduler starts batch lines (the scheduler's batch band) and finish.lua writes each
line's end once; this loop only moves what never started and ends what is done.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from shared import keys
from shared.budget import Budget, open_period
from shared.outage import supervised
from shared.redis.store import redis_errors
from shared.scripts import FinishStatus, Grant
from worker.ollama import Outcome
from worker.state import WorkerContext

log = logging.getLogger("gpugate.worker")

STEP_S = 0.5
"""How often the batch loop looks for batches to expire, drain or end."""
DRAIN_CHUNK = 1000
"""Lines that never started moved to the error file per step (one short script each)."""
BUDGET_REFRESH_S = 5.0


def output_line(grant: Grant, outcome: Outcome) -> str:
    """The run's end as OpenAI's batch output line (succeeded) or error line (else):
    `{"id", "custom_id", "response": {"status_code", "request_id", "body"}, "error"}`."""
    response: dict[str, Any] | None = None
    if outcome.http_status is not None:
        response = {
            "status_code": outcome.http_status,
            "request_id": grant.job_id,
            "body": _body(outcome.result),
        }
    line: dict[str, Any] = {"id": grant.job_id, "custom_id": grant.custom_id}
    if outcome.status is FinishStatus.SUCCEEDED:
        line.update(response=response, error=None)
    else:
        error = outcome.error or {"code": "backend_error", "message": "the line failed"}
        line.update(
            response=response,
            error={"code": str(error.get("code", "")), "message": str(error.get("message", ""))},
        )
    return orjson.dumps(line).decode()


def _body(result: str) -> Any:
    """The backend's body as JSON (one line of the file), or as text if it is not JSON."""
    try:
        return orjson.loads(result)
    except orjson.JSONDecodeError:
        return result


async def batch_loop(ctx: WorkerContext) -> None:
    """Every worker runs it; each step is one atomic script, so two workers never move the
    same line."""
    last_budget = 0.0

    async def step() -> float:
        nonlocal last_budget
        with redis_errors():
            draining = await ctx.scripts.batch_step(chunk=DRAIN_CHUNK)
            if time.monotonic() - last_budget >= BUDGET_REFRESH_S:
                last_budget = time.monotonic()
                await refresh_budgets(ctx)
        return 0.0 if draining else STEP_S

    await supervised("batches", step, ctx.redis_outage, log, retry_s=STEP_S)


async def refresh_budgets(ctx: WorkerContext) -> None:
    """Point each running batch of a key with a budget at the budget period of now (the
    counter admission and finish.lua use), so a new day's budget lets its lines run."""
    redis = ctx.redis
    active = await redis.zrange(keys.BATCH_ACTIVE, 0, -1)
    now = time.time()
    for raw in active:
        batch_id = raw.decode()
        fields = await redis.hmget(  # type: ignore[misc]
            keys.BATCH + batch_id, ["owner", "budget_tokens", "budget_period", "budget_key"]
        )
        owner, tokens, period, current = (f.decode() if f else "" for f in fields)
        if not tokens or int(tokens) <= 0 or not period:
            continue
        budget = Budget(int(tokens), period)  # type: ignore[arg-type]
        if keys.budget(owner, budget.window(now)[0]) != current:
            async with redis.pipeline(transaction=True) as pipe:
                key = open_period(pipe, owner, budget, now)
                pipe.hset(keys.BATCH + batch_id, "budget_key", key)
                await pipe.execute()
