"""Tiny jobs through gpugate at two revisions, in one run: `python -m bench before-after`.

This machine is shared and noisy, so a change to the hot path is judged on ratios taken
in one run: the simulator direct, gpugate as it is, and gpugate at an earlier revision
(`python -m bench.before_after --before REV`, default BEFORE; its API and worker run from
`git archive REV`), each loaded by wrk in interleaved rounds (the order rotates), with
the CPU each component used per job. The cases and the load are those of
`python -m bench throughput` (tiny jobs, 32 connections, GPU cap 32).
"""

from __future__ import annotations

import time
from typing import Any

from bench import throughput
from bench.report import arguments, is_quick, publish
from bench.throughput import NATIVE, OPENAI, TINY_CONNECTIONS, Case, Plan, Target
from gpugate.testing.processes import Process, stop_all
from gpugate.testing.revision import tree_at

BEFORE = "3acce73"
"""gpugate before this session's cuts of the Redis commands per job (issue 21)."""
ROUNDS = 5
COMPONENTS = ("api", "worker", "redis")


def run(plan: Plan, before_rev: str = BEFORE) -> str:
    tree = tree_at(before_rev)
    if tree is None:
        raise SystemExit(f"bench before-after needs a git checkout that has {before_rev}")
    sim = throughput.start_model_sim(throughput.TINY_TOKENS)
    procs: list[Process] = [sim]
    try:
        today = throughput.start_gateway(sim, 1, 1)
        procs += today.processes
        before = throughput.start_gateway(sim, 1, 1, tree=tree)
        procs += before.processes
        targets = [
            Target("direct", [sim.url], "Bearer bench-before-after", {"sim": [sim.pid]}),
            throughput.target("gpugate today", today, sim),
            throughput.target(f"gpugate at {before_rev}", before, sim),
        ]
        cases = [
            Case("tiny", t, route, TINY_CONNECTIONS, route.path)
            for route in (NATIVE, OPENAI)
            for t in targets
        ]
        for case in cases:
            throughput.check_once(case)
        throughput.warm_up(cases, plan)
        stacks = {targets[1].name: today, targets[2].name: before}
        for stack in stacks.values():
            with stack.redis() as rdb:
                rdb.config_resetstat()
        throughput.interleaved(cases, plan)
        scripts = {}
        for name, stack in stacks.items():
            with stack.redis() as rdb:
                scripts[name] = rdb.info("commandstats")
    finally:
        stop_all(procs)
    return report(cases, plan, before_rev) + "\n" + script_table(cases, scripts)


def report(cases: list[Case], plan: Plan, before_rev: str) -> str:
    direct = {c.route.label: throughput.median_rate(c) for c in cases if c.target.name == "direct"}
    rows = []
    for case in cases:
        if case.target.name == "direct":
            continue
        rate = throughput.median_rate(case)
        cpu = [throughput.us_per_unit(case, name) for name in COMPONENTS]
        rows.append(
            f"| {case.route.label} | {case.target.name} | **{rate:.0f}** | "
            f"{' / '.join(f'{s.rate:.0f}' for s in case.samples)} | "
            f"{rate / direct[case.route.label]:.2f}x | "
            + " | ".join(f"{v:.0f}" if v is not None else "-" for v in cpu)
            + " |"
        )
    head = (
        "| call | gpugate | req/s (median) | req/s per round | / direct | API µs/job | "
        "worker µs/job | redis-server µs/job |\n|---|---|---|---|---|---|---|---|\n"
    )
    direct_text = ", ".join(f"{label} {rate:.0f} req/s" for label, rate in direct.items())
    return (
        f"Tiny jobs (5 tokens at zero time per token), `wrk -c{TINY_CONNECTIONS}`, "
        f"{plan.tiny_s} s a run, {plan.rounds} interleaved rounds; gpugate today and at "
        f"`{before_rev}` (one API, one worker, a private redis-server each, the same "
        f"simulator); a figure is the median of the rounds. Direct: {direct_text}.\n\n"
        + head
        + "\n".join(rows)
        + "\n"
    )


def script_table(cases: list[Case], stats: dict[str, dict[str, Any]]) -> str:
    """Where redis-server's time per job went (INFO commandstats over the rounds)."""
    rows = []
    calls = ("cmdstat_evalsha", "cmdstat_eval", "cmdstat_fcall")  # scripts, then functions
    for name, raw in stats.items():
        jobs = sum(s.units for c in cases if c.target.name == name for s in c.samples)
        n = sum(raw.get(k, {}).get("calls", 0) for k in calls)
        usec = sum(raw.get(k, {}).get("usec", 0) for k in calls)
        other = sum(v["usec"] for k, v in raw.items() if k not in calls)
        rows.append(
            f"| {name} | {n / jobs:.2f} | {usec / max(n, 1):.1f} | {usec / jobs:.0f} | "
            f"{other / jobs:.0f} |"
        )
    return (
        "Inside redis-server, over the rounds (INFO commandstats: Redis's own accounting of "
        "the time in each command, less than its CPU time; a script's time includes the "
        "commands it calls, which are also counted one by one in the last column, beside "
        "what the processes send themselves: XREAD, BLPOP, pipelines):\n\n"
        "| gpugate | scripts a job | µs a script | scripts' µs a job | "
        "single commands' µs a job |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = arguments("before_after", __doc__)
    parser.add_argument("--before", default=BEFORE, help=f"the earlier revision ({BEFORE})")
    args = parser.parse_args(argv or [])
    quick = is_quick(args, "before_after")
    started = time.monotonic()
    plan = Plan(
        rounds=1 if quick else ROUNDS, tiny_s=1 if quick else 3, stream_s=0, warmup_s=1, backlog=0
    )
    text = run(plan, args.before)
    print(text, flush=True)
    publish(
        "before-after",
        text + f"\nThe whole run took {time.monotonic() - started:.0f} s.",
        quick=quick,
        command="python -m bench before-after",
    )


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
