"""Adaptive concurrency: each adaptive backend's effective cap, found from what its jobs do.

A GPU has a best concurrency: below it, another running request costs the others almost
nothing (each one's time per output token, TPOT, stays flat, so by Little's law the card's
tokens per second grow with the concurrency); past it, every request only gets slower and
the card delivers no more tokens per second. The control law is Vegas-like, on TPOT:

- More concurrency still buys throughput, with the backend saturated (every slot busy or
  work waiting): its TPOT within LOW (x1.1) of the best TPOT seen, or its tokens/s at least
  GAIN (5 %) above the best measured at any lower cap — double while nothing has pushed
  back yet (slow start) or while TPOT has already grown, else one more; from a plateau
  (a cap no better than the ones below), past a cap known to deliver no more, the next
  power of two (so a plateau from 1 to 2 does not hide the rise from 4), but never past
  it from a knee (a cap that gained, the next one up not; that one is measured again
  when it delivered STALE (10 %) less than the knee now does); never within PROBE_AFTER
  windows of a step down (each probe past the knee costs its window a slower TPOT);
- a cap measured to deliver nearly the peak tokens/s (within GAIN) below the cap: down to
  the lowest such cap; none at or below it: up to that cap (after a halving or a probe
  below, the cap goes back where it delivered, in one window);
- TPOT beyond HIGH (x1.2) of the best without that gain, and no lower cap measured yet:
  the card is past its knee — come down in one step to where TPOT would be TARGET (x1.1)
  of the best, assuming TPOT grows with the concurrency past the knee (`cap x TARGET /
  ratio`); at least one lower, at most halved. (Once lower caps are measured, the rule
  above decides, saturated or not: a burst's last window, every slot no longer busy,
  does not throw away where the cap was);
- with TPOT above its best at the peak: probe one lower every PROBE_AFTER windows;
- otherwise: hold. What was measured at each cap is forgotten when a cap delivers
  CHANGED (30 %) less or more than it did (a bigger or a smaller model). The first
  window after a step down is not kept (its runs started beside the more granted before,
  each slower); a cap never measured is held one window more, to measure it.

Both signals matter: a GPU's TPOT is flat up to its knee, but an engine batching on a CPU
(llama-server with one thread) slows every stream from the second one on while its
tokens/s keep rising to 16; on TPOT alone the law held such a backend at 1-2, half of its
throughput (BENCHMARKS.md, operating point). The tokens/s of each cap are a moving mean
of the saturated windows measured there (`tps:<cap>` in the controller's state), each by
Little's law over the runs that started under that cap (`Window.of_runs`), and when it
was last measured (`at:<cap>`): a probe up treats a measure older than REMEASURE_S (ten
minutes) as none, so a knee that moved up (the cap's own tokens/s unchanged) is found
again, at the cost of one window's probe every ten minutes.
- A 503, a 429 or an out-of-memory failure from the backend halves the cap at once (at
  most once a second: BACKOFF_MS), and forgets what the caps above delivered.

The best TPOT drifts up by DRIFT a window, so a backend that changes (a bigger model)
is measured again. Why this law and not AIMD or a gradient (Netflix's concurrency-limits):
AIMD saw-tooths around the knee by design (it must exceed it to see loss), and the
gradient's queue allowance (√limit) sits past the knee on a card whose TPOT grows past
it; a TPOT band settles at the knee, within a step.

Fleet-wide: every worker adds what its runs did to the backend's meter in Redis, per the
cap each run was granted under (a flush every FLUSH_S); the worker whose turn it is (a
short SET NX lease per backend) takes a window of at least MIN_JOBS jobs (meter_take.lua)
every CONTROL_S and decides once MIN_JOBS of them started under today's cap; the
effective cap is a field of `gpugate:fleet`, which the scheduler reads with the caps
(lib/fleet.lua `read_backends`): several workers and API processes agree on one cap.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

from redis.asyncio import Redis

from shared import keys
from shared.outage import supervised
from shared.redis.store import redis_errors
from shared.settings import Backend
from worker.meter import PACE_FIELDS
from worker.state import WorkerContext

log = logging.getLogger("gpugate.worker.adaptive")

LOW, HIGH, TARGET = 1.1, 1.2, 1.1
GAIN = 0.05
STALE = 0.1
CHANGED = 0.3
DRIFT = 0.002
PROBE_AFTER = 4
REMEASURE_S = 600
MIN_JOBS = 4
CONTROL_S = 2.0
FLUSH_S = 0.5
BACKOFF_MS = 1_000


@dataclass(frozen=True)
class Window:
    """What the runs that started under a backend's cap and ended in one measurement
    window did."""

    jobs: int
    tpot_ms: float
    """Mean time per output token of the window's jobs."""
    tokens_per_s: float
    """The backend's output tokens a second at that cap, by Little's law (`of_runs`)."""

    @classmethod
    def of_runs(
        cls, cap: int, jobs: float, tokens: float, tpot_sum: float, busy_ms: float
    ) -> Window:
        """A saturated backend runs `cap` jobs at all times, so it serves `cap` x tokens /
        run time a second. Only runs that started under `cap` count: one that started
        under a lower cap ran partly at that cap's pace, and counting the jobs that ended
        in the window instead undercounts a step up by a job's length (a third of a 2-s
        window for llama-server's 0.7-s jobs), which hid real gains."""
        jobs_n = int(jobs)
        return cls(
            jobs=jobs_n,
            tpot_ms=tpot_sum / jobs_n if jobs_n else 0.0,
            tokens_per_s=cap * tokens * 1000 / busy_ms if busy_ms > 0 else 0.0,
        )


@dataclass(frozen=True)
class Decision:
    cap: int
    best_tpot_ms: float
    reason: str
    forget: bool = False
    """The backend changed (its cap delivered far less or far more than it did, twice in a
    row): the tokens/s measured at each cap are forgotten."""
    strikes: int = 0
    """Windows in a row that the cap delivered far from what it had."""
    tps_at: Mapping[int, float] = field(default_factory=dict)
    """The tokens/s measured at each cap, this window included (what the controller keeps)."""
    kept: bool = False
    """This window's tokens/s were kept at its cap (the controller notes when: `at:<cap>`)."""


def decide(
    cap: int,
    ceiling: int,
    window: Window,
    best_tpot_ms: float | None,
    *,
    saturated: bool,
    slow_start: bool,
    since_down: int = PROBE_AFTER,
    tps_at: Mapping[int, float] | None = None,
    strikes: int = 0,
    old: Collection[int] = (),
) -> Decision:
    """The next effective cap of a backend at `cap` (ceiling `ceiling`) after `window`;
    `since_down`: windows since the cap last came down; `tps_at`: the tokens/s measured
    at other caps while saturated; `strikes`: the windows in a row before this one that
    delivered far from what their cap had; `old`: the caps last measured more than
    REMEASURE_S ago (a probe up treats them as never measured)."""
    best = (
        window.tpot_ms if best_tpot_ms is None else min(best_tpot_ms * (1 + DRIFT), window.tpot_ms)
    )
    ratio = window.tpot_ms / best if best > 0 else 1.0
    tps = window.tokens_per_s
    # The first window after a step down is not a measure of the new cap: its runs started
    # while the more granted before were still running, each slower (read as the lower
    # cap's, it drew the cap back up above the knee).
    settling = since_down == 0
    measured = saturated and not settling
    known, off, forget, strikes = _remember(dict(tps_at or {}), cap, tps, measured, strikes)
    facts = (
        f"time per output token {window.tpot_ms:.1f} ms, {ratio:.2f}x its best; "
        f"{tps:.1f} tokens/s, {window.jobs} jobs"
    )
    if (off and not forget) or (settling and cap not in known):
        # measure again before acting on it; a new cap is measured in the next window
        return Decision(min(cap, ceiling), best, facts, strikes=strikes, tps_at=known)
    kept = measured and (forget or not off)

    def to(new_cap: int, reason: str = "") -> Decision:
        return Decision(new_cap, best, reason + facts, forget, strikes, known, kept)

    below = {c: v for c, v in known.items() if c < cap}
    gained = saturated and bool(below) and tps >= max(below.values()) * (1 + GAIN)
    if gained:
        facts += f" ({tps / max(below.values()):.2f}x the best below cap {cap})"
    peak = max(known.values(), default=0.0)
    # (what saturated windows measured: known also when this window is not saturated)
    near = [c for c, v in known.items() if v >= (1 - GAIN) * peak]
    if near and (min(near) > cap or (min(near) < cap and not gained)):
        # down to the lowest cap that delivered as much, or back up to one that delivered
        # more (after a halving, or a probe below)
        better = "as much" if min(near) < cap else "more"
        reason = f"cap {min(near)} delivered {better}: "
        return to(min(near), reason)
    if ratio > HIGH and not gained and not below:
        # at most halved: on an engine whose TPOT grows from the second stream on, the
        # formula would send it to 1 at once
        lower = max(1, cap // 2, min(cap - 1, math.floor(cap * TARGET / ratio)))
        return to(lower, "past the knee: ")
    may_probe = slow_start or since_down >= PROBE_AFTER
    if saturated and cap < ceiling and may_probe and (ratio <= LOW or gained):
        # TPOT flat: one more (a GPU below its knee); else throughput still rising with a
        # slower TPOT (an engine batching on a CPU): double, as its gains come in steps
        step = cap * 2 if slow_start or ratio > HIGH else cap + 1
        current = {c: v for c, v in known.items() if c not in old}
        higher = _worth_probing(min(ceiling, step), ceiling, current, tps, past_flat=not gained)
        if higher is not None:
            return to(higher, "more concurrency still buys throughput: ")
    if saturated and ratio > HIGH and may_probe and cap > 1:
        return to(cap - 1, "TPOT above its best: probing one lower: ")
    return to(min(cap, ceiling))


def _worth_probing(
    higher: int, ceiling: int, known: Mapping[int, float], tps: float, *, past_flat: bool
) -> int | None:
    """`higher`, or None if it is known to deliver no more than `tps`. With `past_flat` (a
    cap that gained nothing over the ones below, on a plateau from the bottom), past a cap
    known to deliver no more: the next power of two, and so on up to the ceiling (an
    engine's tokens/s can be flat from 1 to 2 and rise again from 4; powers of two are
    what slow start measured). A cap that gained over the ones below and whose next one
    up delivers no more is the knee: nothing past it is probed (probing 12 and 16 from a
    knee at 5 cost a window of triple TPOT each), unless that next cap delivered STALE
    (10 %) less than this one does now: no card serves less with one more request
    running, so it was measured on another state of the backend (a bigger model, another
    tenant), and it is measured again."""
    while known.get(higher, math.inf) < tps * (1 + GAIN):
        if not past_flat:
            return higher if known[higher] < tps * (1 - STALE) else None
        if higher >= ceiling:
            return None
        higher = min(ceiling, 1 << higher.bit_length())
    return higher


def _remember(
    known: dict[int, float], cap: int, tps: float, saturated: bool, strikes: int
) -> tuple[dict[int, float], bool, bool, int]:
    """`known` with this window's tokens/s at `cap` (a mean with what it had), and whether
    the window was far off what the cap had delivered, whether that has held long enough
    (two windows) to forget everything measured, and the windows off in a row."""
    before = known.get(cap)
    off = (
        saturated
        and before is not None
        and not ((1 - CHANGED) * before <= tps <= (1 + CHANGED) * before)
    )
    if off:
        strikes += 1
    elif before is not None:  # a cap that delivered what it had: the backend is the same
        strikes = 0
    forget = strikes >= 2  # one window far off is noise (a ramp after a change of cap)
    if forget:
        return {cap: tps}, off, True, 0
    if saturated and not off:
        known[cap] = tps if before is None else (before + tps) / 2
    return known, off, False, strikes


async def configure(ctx: WorkerContext) -> None:
    """Adaptive backends start at 1 (slow start) unless a cap is known; the others have none."""
    settings = ctx.settings
    with redis_errors():
        async with ctx.redis.pipeline(transaction=False) as pipe:
            for backend in settings.backends:
                if settings.adaptive_on(backend):
                    pipe.hsetnx(keys.FLEET, keys.effective_field(backend.name), "1")
                else:
                    pipe.hdel(keys.FLEET, keys.effective_field(backend.name))
            await pipe.execute()


async def backoff(ctx: WorkerContext, backend: Backend, why: str) -> None:
    """Halve `backend`'s effective cap now: it answered 503 or 429, or ran out of memory."""
    redis = ctx.redis
    with redis_errors():
        if not await redis.set(keys.BACKOFF + backend.name, 1, nx=True, px=BACKOFF_MS):
            return  # halved within the last second already
        raw = await redis.hget(keys.FLEET, keys.effective_field(backend.name))  # type: ignore[misc]
        cap = int(raw) if raw else await _ceiling(redis, backend)
        halved = max(1, cap // 2)
        await redis.hset(keys.FLEET, keys.effective_field(backend.name), str(halved))  # type: ignore[misc]
        state_key = keys.ADAPTIVE + backend.name
        await redis.hset(state_key, mapping={"pushed_back": 1, "since_down": 0})  # type: ignore[misc]
        # what the caps above delivered no longer draws the cap back up to them
        measured = await redis.hkeys(state_key)  # type: ignore[misc]
        above = [
            f
            for f in measured
            if f.startswith((b"tps:", b"at:")) and int(f.split(b":")[1]) > halved
        ]
        if above:
            await redis.hdel(state_key, *above)  # type: ignore[misc]
    if halved != cap:
        log.warning(
            "backend %s: effective concurrency %d -> %d (%s)", backend.name, cap, halved, why
        )


async def _ceiling(redis: Redis, backend: Backend) -> int:
    live = await redis.hget(keys.FLEET, keys.cap_field(backend.name))  # type: ignore[misc]
    return int(live) if live else backend.gpu_concurrency


async def control_once(ctx: WorkerContext, backend: Backend) -> None:
    """One decision for `backend`, if it is this worker's turn and a window is full."""
    redis, name = ctx.redis, backend.name
    turn = f"{keys.PREFIX}turn:adaptive:{name}"
    if not await redis.set(turn, ctx.worker_id, nx=True, px=int(CONTROL_S * 1000)):
        return
    taken = await ctx.scripts.meter_take(backend=name, min_jobs=MIN_JOBS)
    if not taken:
        return
    state_key = keys.ADAPTIVE + name
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(state_key)
        pipe.hget(keys.FLEET, keys.effective_field(name))
        pipe.hget(keys.FLEET, keys.cap_field(name))
        pipe.zcard(keys.backend_running(name))
        pipe.zcard(keys.QUEUED)
        raw_state, cap_raw, live, running, queued = await pipe.execute()
    state = {k.decode(): v.decode() for k, v in raw_state.items()}
    best_raw = state.get("best_tpot_ms")
    pushed, since_raw = state.get("pushed_back"), state.get("since_down")
    strikes = int(state.get("strikes", "0"))
    tps_at = {int(k[4:]): float(v) for k, v in state.items() if k.startswith("tps:")}
    measured_at = {int(k[3:]): float(v) for k, v in state.items() if k.startswith("at:")}
    now_ms = time.time() * 1000
    old = {c for c in tps_at if now_ms - measured_at.get(c, 0.0) > REMEASURE_S * 1000}
    ceiling = int(live) if live else backend.gpu_concurrency
    cap = min(int(cap_raw) if cap_raw else 1, ceiling)
    window = Window.of_runs(cap, *(taken.get(f"{part}:{cap}", 0.0) for part in PACE_FIELDS))
    if window.jobs < MIN_JOBS:
        return  # the cap changed within the window: its runs are measured in the next
    saturated = int(running) >= cap or int(queued) > 0
    decision = decide(
        cap,
        ceiling,
        window,
        float(best_raw) if best_raw else None,
        saturated=saturated,
        slow_start=not pushed,
        since_down=int(since_raw) if since_raw else PROBE_AFTER,
        tps_at=tps_at,
        strikes=strikes,
        old=old,
    )
    async with redis.pipeline(transaction=False) as pipe:
        fields: dict[str, float | int] = {"best_tpot_ms": decision.best_tpot_ms}
        fields["strikes"] = decision.strikes
        if decision.forget:
            pipe.hdel(state_key, *(f"{part}:{c}" for c in tps_at for part in ("tps", "at")))
        for measured_cap, tps in decision.tps_at.items():
            fields[f"tps:{measured_cap}"] = tps
        if decision.kept:
            fields[f"at:{cap}"] = int(now_ms)
        fields["since_down"] = 0 if decision.cap < cap else int(since_raw or PROBE_AFTER) + 1
        if decision.cap < cap:
            fields["pushed_back"] = 1
        pipe.hset(state_key, mapping=fields)
        pipe.hset(keys.FLEET, keys.effective_field(name), str(decision.cap))
        await pipe.execute()
    if decision.cap != cap:
        log.warning(
            "backend %s: effective concurrency %d -> %d (%s)",
            name,
            cap,
            decision.cap,
            decision.reason,
        )


async def adaptive_loop(ctx: WorkerContext) -> None:
    """Flush this worker's meter, and decide for the adaptive backends whose turn it is."""
    settings = ctx.settings
    adaptive = [b for b in settings.backends if settings.adaptive_on(b)]
    configured = False
    last_control = 0.0

    async def turn() -> float:
        nonlocal configured, last_control
        if not configured:
            await configure(ctx)
            configured = True
        with redis_errors():
            await ctx.meter.flush(ctx.redis)
            if adaptive and time.monotonic() - last_control >= CONTROL_S:
                last_control = time.monotonic()
                for backend in adaptive:
                    await control_once(ctx, backend)
        return FLUSH_S

    await supervised("adaptive", turn, ctx.redis_outage, log, retry_s=FLUSH_S)
