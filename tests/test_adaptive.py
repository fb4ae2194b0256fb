"""Adaptive concurrency (worker/adaptive.py, SPEC "The operating point"): the control law
on a model of a GPU, then the whole loop on real processes — the workers' meter, the
controller's decisions, dispatch filling the effective cap, and the back-off on a 503."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import httpx
import pytest
from redis.asyncio import Redis

from shared import keys
from shared.scripts import Scripts
from shared.settings import Backend, Settings
from tests.conftest import StackFactory, sim_configure, sim_stats, slow_sim_fixture
from tests.processes import Process, start_sim, wait_until
from worker.adaptive import PROBE_AFTER, Window, decide
from worker.meter import PACE_FIELDS, Meter

JOB = {"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "hi"}}

slow_sim = slow_sim_fixture(0.05)


def _window(concurrency: int, tpot_ms: float) -> Window:
    """A window of a saturated backend: `concurrency` streams at `tpot_ms` each deliver
    concurrency / tpot tokens a second (Little's law)."""
    return Window(
        jobs=max(4, concurrency), tpot_ms=tpot_ms, tokens_per_s=concurrency * 1000 / tpot_ms
    )


def _gpu(knee: int, concurrency: int, base_ms: float = 20.0) -> Window:
    """A window of a card whose time per token is flat up to `knee` and grows past it."""
    return _window(concurrency, base_ms * max(1.0, concurrency / knee))


ENGINE_RUNS = (
    {1: 111.0, 2: 131.0, 4: 140.0, 8: 184.0, 16: 233.0},
    {1: 140.0, 2: 141.0, 4: 163.0, 8: 197.0, 16: 248.0},
    {1: 248.0, 2: 233.0, 4: 249.0, 8: 287.0, 16: 383.0},
)
"""llama-server on one CPU thread, tokens/s at caps 1-16 (bench operating-point,
BENCHMARKS.md): every stream slows from the second one on, yet tokens/s rise up to 16.
The second run is flat from 1 to 2, the third from 1 to 4: a law that only looks one
step up stops there."""


def _cpu_engine(concurrency: int, measured: dict[int, float] = ENGINE_RUNS[0]) -> Window:
    """A window of llama-server at `concurrency`, between the measured caps."""
    below = max(c for c in measured if c <= concurrency)
    above = min((c for c in measured if c >= concurrency), default=16)
    share = 0 if above == below else (concurrency - below) / (above - below)
    tps = measured[below] + share * (measured[above] - measured[below])
    return _window(concurrency, concurrency * 1000 / tps)


def _run(
    knees: list[int], base_ms: float = 20.0, card: Callable[[int, int], Window] | None = None
) -> list[int]:
    """The caps the law picks, window after window, on a card with knee `knees[i]` in
    window i (ceiling 16, from slow start at 1 as a new backend starts), keeping what each
    cap delivered as the controller does."""
    cap, best, pushed, since_down, strikes = 1, None, False, PROBE_AFTER, 0
    tps_at: dict[int, float] = {}
    caps = []
    for knee in knees:
        window = card(knee, cap) if card else _gpu(knee, cap, base_ms)
        decision = decide(
            cap,
            16,
            window,
            best,
            saturated=True,
            slow_start=not pushed,
            since_down=since_down,
            tps_at=tps_at,
            strikes=strikes,
        )
        strikes, tps_at = decision.strikes, dict(decision.tps_at)
        since_down = 0 if decision.cap < cap else since_down + 1
        pushed = pushed or decision.cap < cap
        cap, best = decision.cap, decision.best_tpot_ms
        caps.append(cap)
    return caps


def _assert_at_the_knee(caps: list[int], knee: int) -> None:
    """≥ 90 % of the best throughput (knee / TPOT) at a median TPOT ≤ 1.25x the best."""
    throughput = [n / (20.0 * max(1.0, n / knee)) for n in caps]
    tpots = [20.0 * max(1.0, n / knee) for n in caps]
    assert min(throughput) >= 0.9 * knee / 20.0, caps
    assert statistics.median(tpots) <= 1.25 * 20.0, caps


@pytest.mark.parametrize("knee", [1, 2, 4, 6, 12, 16])
def test_the_law_settles_at_the_knee_without_being_told_it(knee: int) -> None:
    """From slow start, within ten windows (20 s at CONTROL_S), and it stays there."""
    caps = _run([knee] * 40)
    _assert_at_the_knee(caps[10:], knee)
    assert all(1 <= n <= 16 for n in caps)


def test_the_law_follows_a_knee_that_moves_down() -> None:
    """A bigger model on the same card: the knee falls from 8 to 2; within five windows
    the cap is back at the new knee."""
    caps = _run([8] * 20 + [2] * 30)
    _assert_at_the_knee(caps[10:20], 8)
    _assert_at_the_knee(caps[25:], 2)


@pytest.mark.parametrize("measured", ENGINE_RUNS)
def test_on_an_engine_whose_tokens_per_second_keep_rising_the_cap_follows_them(
    measured: dict[int, float],
) -> None:
    """llama-server on one CPU thread: time per token grows from the second stream on,
    throughput up to 16. On TPOT alone the law held it at 1-2 (half its throughput); with
    throughput it climbs past the plateaus, settling within 15 windows (30 s; the issue
    asks 60 s) at >= 90 % of the best fixed cap's tokens/s."""
    caps = _run([0] * 40, card=lambda _, n: _cpu_engine(n, measured))
    settled = [_cpu_engine(n, measured).tokens_per_s for n in caps[15:]]
    assert min(settled) >= 0.9 * measured[16], caps


async def test_a_cap_is_measured_by_the_runs_that_started_under_it(redis_proc: Process) -> None:
    """Right after a step up from 4 to 8, runs granted under 4 still end (faster: fewer ran
    beside them); the window at 8 is its own runs only, by Little's law: 8 slots x 128
    tokens / 2.8 s of runs. Counting the tokens that ended in the window instead would read
    the step up as a loss for the first window (what held llama-server at 1)."""
    redis = Redis.from_url(f"redis://127.0.0.1:{redis_proc.port}/0")
    try:
        await redis.flushdb()
        meter = Meter()
        for _ in range(4):
            meter.record("gpu", 4, 32, 400.0)
            meter.record("gpu", 8, 32, 700.0)
        meter.record("gpu", 8, 0, 50.0)  # an embedding: no pace
        await meter.flush(redis)
        taken = await Scripts(redis.execute_command).meter_take(backend="gpu", min_jobs=4)
        window = Window.of_runs(8, *(taken[f"{part}:8"] for part in PACE_FIELDS))
        assert window.jobs == 4
        assert window.tpot_ms == pytest.approx(700 / 32)
        assert window.tokens_per_s == pytest.approx(8 * 128 * 1000 / 2800)
        assert await redis.exists(keys.METER + "gpu") == 0  # taken: the next window is new
    finally:
        await redis.aclose()


def test_the_cap_stays_or_goes_back_where_it_delivered_the_most() -> None:
    """llama-server, every cap measured: a burst's last window (not saturated, every
    stream slow) leaves the cap at 16, where it delivered the most (it was halved there,
    and each burst began at half its throughput); brought down to 8 (a 503's halving, a
    probe below), the first saturated window takes it back to 16."""
    measured = ENGINE_RUNS[2]
    best_tpot = 1000 / measured[1]
    idle = decide(
        16,
        16,
        _cpu_engine(16, measured),
        best_tpot,
        saturated=False,
        tps_at=measured,
        slow_start=False,
    )
    assert idle.cap == 16, idle
    back = decide(
        8,
        16,
        _cpu_engine(8, measured),
        best_tpot,
        saturated=True,
        tps_at=measured,
        slow_start=False,
        since_down=0,
    )
    assert back.cap == 16, back


THROUGH_THE_GATE = {2: 194.0, 4: 388.0, 5: 414.0, 6: 400.0, 8: 399.0}
"""The knee test's card (knee 4, 10-ms tokens, 10 a job) as the controller measured it
through the gate (2026-12-07): 5 delivers ~6 % more than 4 (a slot idles while a job's
answer goes back and the next is granted), no cap above 5 more than 5."""


def test_from_the_knee_the_law_probes_one_above_and_no_further() -> None:
    """At 5, which gained over the caps below, with 6 and 8 known to deliver no more: the
    knee. No probe past it (from a knee at 5 it probed 12 and then 16, a window of triple
    time per token each)."""
    at_5 = Window(jobs=80, tpot_ms=12.1, tokens_per_s=THROUGH_THE_GATE[5])
    held = decide(5, 16, at_5, 10.3, saturated=True, slow_start=False, tps_at=THROUGH_THE_GATE)
    assert held.cap == 5, held
    unprobed = {c: v for c, v in THROUGH_THE_GATE.items() if c != 6}
    probe = decide(5, 16, at_5, 10.3, saturated=True, slow_start=False, tps_at=unprobed)
    assert probe.cap == 6, probe  # one above, not yet measured


def test_a_cap_above_the_knee_that_delivered_less_than_it_is_measured_again() -> None:
    """6 measured at 300 tokens/s, and 5 now delivers 414 (the card serves a smaller model,
    or another tenant left): one more request running cannot serve less, so 6 is probed
    again (it was held at 5 for good, whatever the card became)."""
    stale = {**THROUGH_THE_GATE, 6: 300.0}
    at_5 = Window(jobs=80, tpot_ms=12.1, tokens_per_s=THROUGH_THE_GATE[5])
    probe = decide(5, 16, at_5, 10.3, saturated=True, slow_start=False, tps_at=stale)
    assert probe.cap == 6, probe


def test_a_knee_measured_long_ago_is_probed_again() -> None:
    """The knee moved up while cap 5 delivers what it did (a model of the same pace and a
    smaller footprint): 6 is known no better, but measured more than REMEASURE_S ago, so
    it is probed again; the window at 5 is kept (the controller dates it)."""
    at_5 = Window(jobs=80, tpot_ms=12.1, tokens_per_s=THROUGH_THE_GATE[5])
    probe = decide(
        5, 16, at_5, 10.3, saturated=True, slow_start=False, tps_at=THROUGH_THE_GATE, old={6, 8}
    )
    assert (probe.cap, probe.kept) == (6, True), probe


def test_the_first_window_after_a_step_down_does_not_measure_the_new_cap() -> None:
    """Down from 8 to 4: the first runs under 4 started while up to 8 still ran, each
    slower; read as cap 4's, they drew the cap back up to 8. That window is not kept,
    and a cap never measured is held a window to measure it."""
    slowed = Window(jobs=72, tpot_ms=14.0, tokens_per_s=300.0)
    known = {c: v for c, v in THROUGH_THE_GATE.items() if c in (2, 4, 8)}
    first = decide(
        4, 16, slowed, 10.3, saturated=True, slow_start=False, since_down=0, tps_at=known
    )
    assert (first.cap, first.tps_at[4], first.kept) == (4, 388.0, False), first
    new = {c: v for c, v in known.items() if c != 4}
    held = decide(4, 16, slowed, 10.3, saturated=True, slow_start=False, since_down=0, tps_at=new)
    assert held.cap == 4 and 4 not in held.tps_at, held
    measured = decide(
        4, 16, slowed, 10.3, saturated=True, slow_start=False, since_down=1, tps_at=new
    )
    assert measured.tps_at[4] == 300.0, measured


def test_the_law_holds_when_the_backend_is_not_saturated() -> None:
    window = _gpu(knee=8, concurrency=2)
    assert decide(2, 16, window, 20.0, saturated=False, slow_start=False).cap == 2
    assert decide(2, 16, window, 20.0, saturated=True, slow_start=False).cap == 3
    assert decide(2, 16, window, 20.0, saturated=True, slow_start=True).cap == 4


def test_adaptive_is_per_backend_or_global() -> None:
    one = Backend(name="a", url="http://a", gpu_concurrency=4)
    off = Backend(name="b", url="http://b", gpu_concurrency=4, adaptive=False)
    settings = Settings(adaptive=True)
    assert settings.adaptive_on(one) and not settings.adaptive_on(off)
    assert not Settings().adaptive_on(one)


def _backend(url: str) -> dict[str, object]:
    backends: list[dict[str, object]] = httpx.get(url + "/v1/queue", timeout=5).json()["backends"]
    return backends[0]


def _submit(client: httpx.Client, n: int) -> None:
    for _ in range(n):
        assert client.post("/v1/jobs", json=JOB).status_code == 202


def test_a_flat_pace_climbs_to_the_ceiling_and_never_past_it(
    make_stack: StackFactory, slow_sim: Process
) -> None:
    """A backend whose time per token does not change with concurrency (the simulator runs
    8 at once): the effective cap climbs from 1 to its ceiling, and no more ever run."""
    sim_configure(slow_sim, parallel=8, token_delay_s=0.05)
    stack = make_stack(
        ollama_url=slow_sim.url,
        gpu_concurrency=6,
        adaptive="true",
        max_queue_depth=500,
        burst=500,
        rate_limit="100000/minute",
    )
    assert _backend(stack.url)["effective_concurrency"] == 1
    with stack.client("adaptive") as client:
        _submit(client, 200)
        wait_until(
            lambda: _backend(stack.url)["effective_concurrency"] == 6,
            timeout=60,
            interval=0.2,
            what="the effective cap to climb to the ceiling (6)",
        )
    assert sim_stats(slow_sim)["max_in_flight"] <= 6
    metrics = httpx.get(stack.url + "/metrics", timeout=5).text
    assert 'gpugate_backend_effective_concurrency{backend="default"} 6.0' in metrics
    logs = "".join(w.log() for w in stack.workers)
    assert "effective concurrency 1 -> 2" in logs, logs[-2000:]


def test_a_503_halves_the_cap_at_once(make_stack: StackFactory, slow_sim: Process) -> None:
    sim_configure(slow_sim, parallel=8, token_delay_s=0.02)
    stack = make_stack(
        ollama_url=slow_sim.url,
        gpu_concurrency=8,
        adaptive="true",
        max_queue_depth=500,
        burst=500,
        rate_limit="100000/minute",
        log_level="info",
    )
    with stack.client("backoff") as client:
        _submit(client, 300)
        wait_until(
            lambda: int(_backend(stack.url)["effective_concurrency"]) >= 4,  # type: ignore[call-overload]
            timeout=60,
            interval=0.2,
            what="the effective cap to climb to 4 or more",
        )
        before = int(_backend(stack.url)["effective_concurrency"])  # type: ignore[call-overload]
        sim_configure(slow_sim, reset=False, fail_mode="error503")
        wait_until(
            lambda: int(_backend(stack.url)["effective_concurrency"]) <= before // 2,  # type: ignore[call-overload]
            timeout=10,
            interval=0.05,
            what=f"the cap halved from {before}",
        )
        sim_configure(slow_sim, reset=False, fail_mode="none")
    logs = "".join(w.log() for w in stack.workers)
    assert "it answered 503" in logs or "failed with 503" in logs, logs[-2000:]


def test_on_a_card_with_a_knee_the_cap_settles_there(make_stack: StackFactory) -> None:
    """SPEC "The operating point": a backend whose throughput stops rising at concurrency 4
    (the simulator's performance model), ceiling 16: within 60 s the effective cap is at
    the knee, and stays there. Through the gate the knee may read as 4 or 5 (a cap of 4
    leaves a slot idle while a job's answer goes back and the next is granted), and the
    law probes one above where it sits, once: for twelve seconds (more than a probe's
    period, PROBE_AFTER windows) the cap is 4-6 and mostly 4-5, and no more than 6 run at
    once. (It used to jump to 8, 12, 16 from there.)

    Tokens of 25 ms: the simulator's own cost, 0.3-0.7 ms a token on a busy machine, was
    7 % of a 10-ms token at 4 streams and 1 % of the 20-ms token at 8, so that card
    delivered 5-6 % more at 8 than at 4 (a rise, by the law's measure: it settled at 8)."""
    sim = start_sim("--tokens", "10", "--token-delay", "0.025", "--parallel", "16", "--knee", "4")
    try:
        stack = make_stack(
            ollama_url=sim.url,
            gpu_concurrency=16,
            worker_concurrency=16,
            adaptive="true",
            max_queue_depth=2000,
            burst=5000,
            rate_limit="1000000/minute",
        )
        with stack.client("knee") as client:
            _submit(client, 1500)

            def settled() -> bool:  # past slow start (it overshoots once, then steps down)
                with stack.redis() as rdb:
                    pushed_back = rdb.hget("gpugate:adaptive:default", "pushed_back") == b"1"
                return pushed_back and _backend(stack.url)["effective_concurrency"] in (4, 5)

            wait_until(
                settled,
                timeout=60,
                interval=0.2,
                what="the effective cap to settle at the knee (4)",
            )
            # runs granted just before, under a higher cap, may still be running: the
            # count starts once they ended
            wait_until(
                lambda: sim_stats(sim)["in_flight"] <= 5,
                timeout=10,
                interval=0.02,
                what="the runs granted above the knee to end",
            )
            sim_configure(sim, reset=True)  # max_in_flight from here on
            seen, watched_until = [], time.monotonic() + 12
            while time.monotonic() < watched_until:
                seen.append(int(_backend(stack.url)["effective_concurrency"]))  # type: ignore[call-overload]
            stats = sim_stats(sim)
        assert all(4 <= n <= 6 for n in seen), sorted(set(seen))
        assert statistics.median(seen) <= 5, seen
        assert stats["max_in_flight"] <= 6, stats
    finally:
        sim.stop()
