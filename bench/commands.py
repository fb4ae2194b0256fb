"""Redis commands and instructions per tiny job, script by script: `python -m bench commands`.

One synchronous tiny job's three scripts (admit, dispatch, finish), each run alone against
a private redis-server, counted with INFO commandstats (the commands a script calls are
counted there one by one); then the same jobs against a redis-server under valgrind's
callgrind, which counts the instructions redis-server runs inside each script call (its
work for the call, without the network's or its timers'). Both are deterministic: the
same code gives the same figures whatever else the machine does, so these are the
figures to compare before and after a change to the scripts. Measured alone, each
dispatch grants one run; under load one dispatch grants several and its fixed part (the
failover fence, the fleet's state, the backlog) is shared.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from bench.report import write_section
from gpugate.testing.stack import start_redis, start_sim, start_stack
from shared import keys
from shared.jobs import new_job_id
from shared.scripts import Ask, FinishReply, FinishStatus, Grant, Scripts
from worker.tally import FLUSH_S, Tally

FLEET = ("gpu-a", 1, "ollama")
ASK = Ask(
    worker="w1",
    want=1,
    lease_ms=10_000,
    affinity_wait_ms=30_000,
    provisional_cost=1,
    result_ttl_ms=60_000,
    fence_ms=2_000,
    backends=FLEET,
)
USAGE = {"input_tokens": 3, "output_tokens": 5}
JOBS = 30
WARM = 3
OWNERS = 3
SCRIPTS = ("admit", "dispatch", "finish")
NOT_COUNTED = ("cmdstat_fcall", "cmdstat_function", "cmdstat_config", "cmdstat_info")
"""The call of the script itself and the measurement's own commands (Redis 7 counts a
subcommand apart, `cmdstat_config|resetstat`: prefixes)."""


async def _heartbeat(scripts: Scripts) -> None:
    await scripts.heartbeat(
        worker="w1",
        info="{}",
        lease_ms=10_000,
        worker_stale_ms=30_000,
        max_runs=3,
        result_ttl_ms=60_000,
        record_ttl_ms=600_000,
        fair_share_memory_ms=10_000,
        held=[],
        backends=FLEET,
    )


async def _admit(scripts: Scripts, owner: str) -> None:
    await scripts.admit(
        owner=owner,
        owner_name=owner,
        usage_name="anonymous",
        rate_per_ms=1.0,
        burst=100,
        tpm_per_ms=0,
        tpm_burst=0,
        reserve_tokens=0,
        max_depth=100,
        max_queued=100,
        priority=0,
        boost_ms=0,
        weight=1,
        job_id=new_job_id(),
        endpoint="/api/generate",
        model="llama3.2",
        body='{"model": "llama3.2", "prompt": "hi"}',
        stream=False,
        sync=True,
        deadline_ms=0,
        idempotency_key="",
        digest="",
        result_ttl_ms=60_000,
        record_ttl_ms=600_000,
        worker_stale_ms=30_000,
        backends=FLEET,
        inbox="api-1",
    )


async def _dispatch(scripts: Scripts) -> Grant:
    (grant,) = await scripts.dispatch(ASK)
    return grant


async def _finish(scripts: Scripts, grant: Grant) -> FinishReply:
    return await scripts.finish(
        job_id=grant.job_id,
        attempt=grant.attempt,
        backend=grant.backend,
        status=FinishStatus.SUCCEEDED,
        http_status=200,
        content_type="application/json",
        result='{"done": true}',
        error="",
        error_code="",
        duration_ms=12.0,
        **USAGE,
        model_load_ms=0,
        max_attempts=3,
        breaker_threshold=5,
        breaker_cooldown_ms=10_000,
        ewma_weight=0.2,
        wake=False,
        result_ttl_ms=60_000,
        record_ttl_ms=600_000,
    )


async def _counted(redis: Redis, step: Awaitable[Any]) -> tuple[int, Any]:
    await redis.config_resetstat()
    result = await step
    stats = await redis.info("commandstats")
    counted = (v["calls"] for k, v in stats.items() if not k.startswith(NOT_COUNTED))
    return sum(counted), result


Count = Callable[[Redis, Awaitable[Any]], Awaitable[tuple[int, Any]]]


async def _jobs(redis: Redis, count: Count) -> dict[str, float]:
    """Each part's `count` per job over JOBS jobs (and the tally's flush for them)."""
    scripts = Scripts(redis.execute_command)
    await _heartbeat(scripts)
    for _ in range(WARM):  # the scripts loaded (compiled) before anything is counted
        await _admit(scripts, "warm")
        await _finish(scripts, await _dispatch(scripts))
        await redis.delete(keys.WAKE)
    totals = dict.fromkeys((*SCRIPTS, "tally flush"), 0)
    tally = Tally()
    for i in range(JOBS):
        await _heartbeat(scripts)  # a live worker, however slow the count (callgrind)
        n, _ = await count(redis, _admit(scripts, f"key:{i % OWNERS}"))
        totals["admit"] += n
        n, grant = await count(redis, _dispatch(scripts))
        totals["dispatch"] += n
        tally.dispatched(grant)
        n, reply = await count(redis, _finish(scripts, grant))
        totals["finish"] += n
        tally.finished(grant, reply, error_code="", duration_ms=12.0, **USAGE)
        await redis.delete(keys.WAKE)  # what an idle worker's BLPOP takes (its own command)
    totals["tally flush"], _ = await count(redis, tally.flush(redis))
    return {name: total / JOBS for name, total in totals.items()}


async def measure() -> dict[str, float]:
    """Commands per job of each script, and of the worker's tally flush (worker/tally.py)
    when one flush carries the JOBS jobs (as at JOBS / FLUSH_S jobs a second)."""
    proc = start_redis()
    redis = Redis(port=proc.port)
    try:
        return await _jobs(redis, _counted)
    finally:
        await redis.aclose()
        proc.stop()


async def instructions() -> dict[str, float]:
    """Instructions redis-server runs inside the script calls of each part, per job
    (callgrind, collecting only within FCALL; `callgrind_control` zeroes the counts before
    a part and dumps them after)."""
    out = Path(tempfile.mkdtemp(prefix="gpugate-callgrind-")) / "callgrind.out"
    under = ("valgrind", "--tool=callgrind", "--toggle-collect=fcallCommand",
             f"--callgrind-out-file={out}")  # fmt: skip
    proc = start_redis(under=under)
    redis = Redis(port=proc.port)

    def control(option: str) -> None:
        subprocess.run(["callgrind_control", option, str(proc.pid)], check=True,
                       capture_output=True)  # fmt: skip

    async def counted(redis: Redis, step: Awaitable[Any]) -> tuple[int, Any]:
        control("-z")
        result = await step
        control("-d")
        dumps = [p for p in out.parent.iterdir() if p.name != out.name]
        total = sum(_totals(p) for p in dumps)
        for p in dumps:
            p.unlink()
        return total, result

    try:
        return await _jobs(redis, counted)
    finally:
        await redis.aclose()
        proc.stop()


SEQUENTIAL = 60
"""Synchronous tiny jobs one after the other through a live stack (`live`)."""


def live() -> tuple[dict[str, float], float]:
    """A live stack (one API, one worker, the simulator answering one token): what Redis
    received while SEQUENTIAL synchronous jobs ran one after the other, per job: the script
    calls by function, and every command (those the scripts ran included, and the
    processes' own: BLPOP, XREAD, the heartbeats, the tally's flush)."""
    sim = start_sim("--tokens", "1", "--token-delay", "0")
    stack = start_stack(sim.url, worker_concurrency=4, burst=1000, rate_limit="1000/second")
    seen: list[list[str]] = []
    try:
        body = {"model": "llama3.2", "prompt": "hi", "stream": False}
        with stack.client() as client, stack.redis() as redis:
            for _ in range(5):  # warm: the library loaded, the clients connected
                client.post("/api/generate", json=body).raise_for_status()
            with redis.monitor() as monitor:
                done = threading.Event()

                def watch() -> None:
                    while not done.is_set():
                        seen.append(monitor.next_command()["command"].split(" ", 3)[:3])

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                for _ in range(SEQUENTIAL):
                    client.post("/api/generate", json=body).raise_for_status()
                done.set()
                redis.ping()  # one last command for the watcher to return on
                watcher.join(timeout=10)
    finally:
        stack.stop()
        sim.stop()
    calls: dict[str, float] = {}
    for command in seen:
        if command[0].upper() == "FCALL":
            name = command[1].rsplit("_", 1)[0]
            calls[name] = calls.get(name, 0) + 1 / SEQUENTIAL
    return dict(sorted(calls.items())), len(seen) / SEQUENTIAL


def _totals(dump: Path) -> int:
    """The instructions a callgrind dump counted (its `totals:` line)."""
    for line in dump.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise ValueError(f"{dump}: no totals")


def main() -> None:
    started = time.monotonic()
    per = asyncio.run(measure())
    cost = asyncio.run(instructions()) if shutil.which("valgrind") else None
    rows = "\n".join(
        f"| {name} | {value:.2f} | {f'{cost[name]:,.0f}' if cost else 'no valgrind'} |"
        for name, value in per.items()
    )
    total = f"{sum(cost.values()):,.0f}" if cost else ""
    calls, commands = live()
    by_function = ", ".join(f"{name} {n:.2f}" for name, n in calls.items())
    body = (
        f"Redis commands of one tiny synchronous job ({JOBS} jobs of {OWNERS} keys, one "
        "backend, each script alone; INFO commandstats), and the instructions redis-server "
        "ran inside each script call (callgrind, counting only within FCALL: the script's "
        "work, without the network's). The wake list is emptied after each job, as an idle "
        "worker's BLPOP would (its own command, not the script's). "
        "The worker's tally (worker/tally.py: usage, jobs by outcome, the histograms) is "
        f"added every {FLUSH_S} s in one pipeline: counted here as one flush for the "
        f"{JOBS} jobs, as at {JOBS / FLUSH_S:.0f} jobs a second; a lone job's flush is "
        "one round trip of eight commands (not a script: no instructions counted).\n\n"
        "| part | commands per job | redis-server instructions per job |\n|---|---|---|\n"
        f"{rows}\n| **per job** | **{sum(per.values()):.2f}** | **{total}** |\n\n"
        f"Through a live stack (one API, one worker, the simulator answering one token), "
        f"{SEQUENTIAL} synchronous jobs one after the other, everything Redis received "
        f"(MONITOR), per job: script calls {by_function}; {commands:.1f} commands in all "
        "(the scripts' included, and the processes' own: BLPOP, XREAD, the heartbeats, the "
        "tally's flush, the API's poll of the keys' version).\n"
    )
    print(body)
    write_section("commands", "python -m bench commands", body)
    print(f"({time.monotonic() - started:.1f}s)")


if __name__ == "__main__":
    main()
