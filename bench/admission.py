"""Requests per second of the admission decision, admitted and rejected, beside a bare
FastAPI endpoint and slowapi with Redis storage; and the Redis commands per request.
The gpugate stack holds a few thousand keys created through `/admin/keys`, and one of
them, spent, is refused too: checking a key of the API must not cost a second round trip.

Every target is one uvicorn process serving `POST /v1/jobs` with gpugate's body model,
loaded by the same wrk command in interleaved rounds (the order rotates each round) so
that the noise of the machine falls on every target alike; a target's figure is the
median of its rounds. wrk's script (`gpugate.testing.wrk`) counts every response that is
not the expected status and body, and any such response fails the benchmark.

Redis commands per request are counted, not assumed: MONITOR on the private Redis while
sequential requests are sent, keeping only the commands that arrive on the sockets of
the server process under test (found in /proc), so workers' heartbeats are not counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import limits
import redis

from bench.report import write_section
from gpugate.testing import wrk
from gpugate.testing.processes import Process, stop_all, wait_until
from gpugate.testing.stack import queue, start_redis, start_sim, start_stack, start_uvicorn
from gpugate.testing.stats import cpu_s
from shared import keys

THREADS, CONNECTIONS = 1, 32
DURATION_S, ROUNDS, WARMUP_S = 5, 3, 1
COUNTED_REQUESTS = 200
JOB = {"endpoint": "/api/generate", "body": {"model": "llama3.2", "prompt": "hi"}}
LIMIT = "1/hour"
"""Every limiter in the run: one request per key per hour (gpugate: burst 1)."""
HUGE = 10**9
ADMIN_KEY = "bench-admin-key"
API_KEYS = 3000
"""Keys created through /admin/keys on the gpugate stack before the load."""

LIMITS_LUA = Path(limits.__file__).parent / "resources" / "redis" / "lua_scripts"


@dataclass(frozen=True)
class Case:
    target: str
    name: str
    server: str
    """Which process serves it: bare, gpugate, gpugate-full or slowapi."""
    status: int
    text: str
    """A piece of the expected response body."""
    key: str
    fresh: bool = False
    """A new API key on every request (each one a first request), else `key` throughout."""

    @property
    def label(self) -> str:
        return f"{self.target}, {self.name}"


BARE = Case("bare FastAPI", "202", "bare", 202, '"queued"', "bench-bare")
ADMITTED = Case("gpugate", "admitted", "gpugate", 202, '"queued"', "bench-admit", fresh=True)
BUCKET_EMPTY = Case(
    "gpugate", "rejected: bucket empty", "gpugate", 429, '"rate_limit_exceeded"', "bench-spent"
)
QUEUE_FULL = Case(
    "gpugate", "rejected: queue full", "gpugate-full", 429, '"queue_full"', "bench-waiting"
)
SLOWAPI_ALLOWED = Case(
    "slowapi + Redis", "allowed", "slowapi", 202, '"queued"', "bench-allow", fresh=True
)
SLOWAPI_REJECTED = Case(
    "slowapi + Redis", "rejected: over limit", "slowapi", 429, "Rate limit exceeded", "bench-spent"
)
MANAGED_EMPTY = Case(
    "gpugate",
    f"rejected: bucket empty, a key of /admin/keys ({API_KEYS} keys)",
    "gpugate",
    429,
    '"rate_limit_exceeded"',
    "bench-managed",
)
CASES = (
    BARE,
    ADMITTED,
    BUCKET_EMPTY,
    MANAGED_EMPTY,
    QUEUE_FULL,
    SLOWAPI_ALLOWED,
    SLOWAPI_REJECTED,
)
COUNTED = (BUCKET_EMPTY, MANAGED_EMPTY, QUEUE_FULL, SLOWAPI_REJECTED, ADMITTED, SLOWAPI_ALLOWED)
CREATED: dict[str, str] = {}
"""The clear keys the API created, by their case's placeholder `key`."""


def key_of(case: Case) -> str:
    return CREATED.get(case.key, case.key)


def create_keys(api: Process, n: int) -> str:
    """Create `n` keys through POST /admin/keys; the last one's clear key."""
    key = ""
    with httpx.Client(base_url=api.url, timeout=30, headers={"X-Admin-Key": ADMIN_KEY}) as client:
        for i in range(n):
            r = client.post("/admin/keys", json={"name": f"bench-app-{i}"})
            expect(r, 201, '"key"', f"creating key {i}")
            key = r.json()["key"]
    return key


def stack_settings(max_queue_depth: int) -> dict[str, object]:
    """One GPU slot, a worker holding one job at most, one request per key per hour."""
    return {
        "rate_limit": LIMIT,
        "burst": 1,
        "max_queue_depth": max_queue_depth,
        "gpu_concurrency": 1,
        "worker_concurrency": 1,
        "shutdown_grace": 0,
        "admin_key": ADMIN_KEY,
    }


def post(client: httpx.Client, key: str) -> httpx.Response:
    return client.post("/v1/jobs", json=JOB, headers={"X-API-Key": key})


def expect(response: httpx.Response, status: int, text: str, what: str) -> None:
    if response.status_code != status or text not in response.text:
        raise AssertionError(
            f"{what}: expected {status} with {text!r}, got {response.status_code} "
            f"{response.text[:300]}"
        )


def park_worker(api: Process, key: str) -> None:
    """Admit one job and wait until the worker runs it: the simulator never answers it, so
    the one GPU slot and the worker's one place stay taken and nothing else leaves the queue."""
    with httpx.Client(base_url=api.url, timeout=10) as client:
        expect(post(client, key), 202, '"id"', f"parking job {key}")
    wait_until(lambda: queue(api.url)["running"] == 1, timeout=20, what="the parked job to run")


def prepare(servers: dict[str, Process]) -> None:
    """Park each stack's worker, fill the queue of gpugate-full, spend the keys that must be
    refused; then check one request of every case."""
    park_worker(servers["gpugate"], "bench-park")
    started = time.perf_counter()
    CREATED[MANAGED_EMPTY.key] = create_keys(servers["gpugate"], API_KEYS)
    print(f"{API_KEYS} keys created in {time.perf_counter() - started:.1f} s", flush=True)
    full = servers["gpugate-full"]
    park_worker(full, "bench-park")
    with httpx.Client(base_url=full.url, timeout=10) as client:
        expect(post(client, "bench-fill"), 202, '"queued"', "filling the queue")
    wait_until(lambda: queue(full.url)["queue_depth"] == 1, timeout=10, what="a full queue")
    for case in (BUCKET_EMPTY, MANAGED_EMPTY, SLOWAPI_REJECTED):
        with httpx.Client(base_url=servers[case.server].url, timeout=10) as client:
            expect(post(client, key_of(case)), 202, '"queued"', f"{case.label}: spending the key")
    for case in CASES:
        with httpx.Client(base_url=servers[case.server].url, timeout=10) as client:
            key = f"{case.key}-check" if case.fresh else key_of(case)
            expect(post(client, key), case.status, case.text, case.label)


# --- Redis commands per request --------------------------------------------------------


def script_names() -> dict[str, str]:
    """SHA-1 -> name of every Lua script `limits` (slowapi's storage) may run (gpugate's
    are functions, named in the FCALL: shared/scripts.py)."""
    return {
        hashlib.sha1(path.read_bytes()).hexdigest(): f"limits {path.stem}"
        for path in LIMITS_LUA.glob("*.lua")
    }


def local_ports(pid: int) -> set[int]:
    """Local TCP ports of the sockets process `pid` holds (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def commands_sent(redis_url: str, server: Process, send: Callable[[], None]) -> Counter[str]:
    """The commands `server` sent to Redis while `send()` ran, by name (scripts by name)."""
    names = script_names()
    marker = f"bench-marker-{uuid.uuid4().hex}"
    client = redis.Redis.from_url(redis_url, socket_timeout=30)  # never hang on MONITOR
    seen: Counter[str] = Counter()
    try:
        with client.monitor() as monitor:
            send()
            client.echo(marker)
            ports = local_ports(server.pid)
            while True:
                line = monitor.next_command()
                if marker in line["command"]:
                    break
                if line["client_type"] != "tcp" or int(line["client_port"]) not in ports:
                    continue
                parts = line["command"].split(" ")
                name = parts[0].upper()
                if name == "GET" and keys.APIKEYS_VERSION in line["command"]:
                    continue  # each API process's poll of the keys' version, off the path
                if name == "XREAD" and keys.INBOX in line["command"]:
                    continue  # its inbox reader's blocking read (api/inbox.py), off the path
                if name == "EVALSHA" and len(parts) > 1:
                    name += f" ({names.get(parts[1], 'unknown script')})"
                if name == "FCALL" and len(parts) > 1:
                    name += f" ({parts[1].strip(chr(34)).rsplit('_', 1)[0]})"
                seen[name] += 1
    finally:
        client.close()
    return seen


def count_commands(redis_url: str, server: Process, case: Case, n: int) -> Counter[str]:
    tag = uuid.uuid4().hex[:8]
    with httpx.Client(base_url=server.url, timeout=10) as client:

        def send(prefix: str, count: int) -> None:
            for i in range(count):
                key = f"{case.key}-{prefix}-{tag}-{i}" if case.fresh else key_of(case)
                expect(post(client, key), case.status, case.text, case.label)

        send("warm", 10)  # connections open, scripts loaded
        return commands_sent(redis_url, server, lambda: send("count", n))


# --- load --------------------------------------------------------------------------------


def load(url: str, case: Case, duration_s: int, tag: str) -> float:
    """Requests per second of `case` under wrk; fails on any unexpected response."""
    key = f"{case.key}-{tag}" if case.fresh else key_of(case)
    sent = wrk.Load(
        json.dumps(JOB), case.status, (case.text, ""), ("X-API-Key", key), fresh=case.fresh
    )
    run = wrk.run(
        url + "/v1/jobs", sent, duration_s=duration_s, connections=CONNECTIONS, threads=THREADS
    )
    return run.check(case.label).rate


@dataclass(frozen=True)
class Sample:
    rate: float
    """Requests per second."""
    server_cores: float
    """CPU the server process used during the run, in cores."""
    redis_cores: float


def interleaved(
    servers: dict[str, Process], redis_pid: int, duration_s: int, rounds: int
) -> dict[Case, list[Sample]]:
    for i, case in enumerate(CASES):
        load(servers[case.server].url, case, WARMUP_S, f"warm{i}")
    samples: dict[Case, list[Sample]] = {case: [] for case in CASES}
    for r in range(rounds):
        order = CASES[r % len(CASES) :] + CASES[: r % len(CASES)]
        for case in order:
            server = servers[case.server]
            t, server_s, redis_s = time.perf_counter(), cpu_s(server.pid), cpu_s(redis_pid)
            rate = load(server.url, case, duration_s, f"r{r}")
            elapsed = time.perf_counter() - t
            sample = Sample(
                rate,
                (cpu_s(server.pid) - server_s) / elapsed,
                (cpu_s(redis_pid) - redis_s) / elapsed,
            )
            samples[case].append(sample)
            print(
                f"round {r + 1}: {case.label}: {rate:.0f} req/s, server "
                f"{sample.server_cores:.2f} cores, redis {sample.redis_cores:.2f} cores",
                flush=True,
            )
    return samples


# --- the run -----------------------------------------------------------------------------


def _ratio_row(what: str, value: float, target: float | None) -> str:
    if target is None:
        return f"| {what} | {value:.2f}x | (no target) | |"
    met = "**met**" if value >= target else "**not met**"
    return f"| {what} | {value:.2f}x | ≥ {target:g}x | {met} |"


def _commands_row(case: Case, seen: Counter[str], n: int) -> str:
    detail = ", ".join(f"{name} x {count / n:.2f}" for name, count in sorted(seen.items()))
    return f"| {case.label} | {n} | {sum(seen.values()) / n:.2f} | {detail or 'none'} |"


def run(duration_s: int = DURATION_S, rounds: int = ROUNDS) -> str:
    redis_server = start_redis()
    db = f"redis://127.0.0.1:{redis_server.port}/"
    sim = start_sim("--fail-mode", "hang")
    procs: list[Process] = [redis_server, sim]
    try:
        servers: dict[str, Process] = {}
        for name, db_index, depth in (("gpugate", 1, HUGE), ("gpugate-full", 2, 1)):
            stack = start_stack(sim.url, db + str(db_index), **stack_settings(depth))
            procs += stack.processes
            servers[name] = stack.apis[0]
        servers["bare"] = start_uvicorn("bench.peers.bare:app")
        procs.append(servers["bare"])
        servers["slowapi"] = start_uvicorn(
            "bench.peers.slowapi_app:app",
            {"BENCH_SLOWAPI_REDIS_URL": db + "3", "BENCH_SLOWAPI_LIMIT": LIMIT},
        )
        procs.append(servers["slowapi"])
        prepare(servers)

        commands = {}
        for case in COUNTED:
            commands[case] = count_commands(db + "0", servers[case.server], case, COUNTED_REQUESTS)
            print(_commands_row(case, commands[case], COUNTED_REQUESTS), flush=True)

        samples = interleaved(servers, redis_server.pid, duration_s, rounds)
        piled_up = queue(servers["gpugate"].url)["queue_depth"]
    finally:
        stop_all(procs)

    median = {c: statistics.median(x.rate for x in samples[c]) for c in CASES}
    rows = [
        f"| {c.target} | {c.name} | {c.status} | **{median[c]:.0f}** | "
        + " / ".join(f"{x.rate:.0f}" for x in samples[c])
        + f" | {statistics.median(x.server_cores for x in samples[c]):.2f} | "
        f"{statistics.median(x.redis_cores for x in samples[c]):.2f} |"
        for c in CASES
    ]
    ratios = [
        _ratio_row(
            "gpugate bucket-empty rejection / bare", median[BUCKET_EMPTY] / median[BARE], 0.5
        ),
        _ratio_row(
            f"gpugate bucket-empty rejection, a key of /admin/keys ({API_KEYS} keys) / bare",
            median[MANAGED_EMPTY] / median[BARE],
            0.8,
        ),
        _ratio_row("gpugate queue-full rejection / bare", median[QUEUE_FULL] / median[BARE], 0.5),
        _ratio_row(
            "gpugate bucket-empty rejection / slowapi rejection",
            median[BUCKET_EMPTY] / median[SLOWAPI_REJECTED],
            3,
        ),
        _ratio_row(
            "gpugate queue-full rejection / slowapi rejection",
            median[QUEUE_FULL] / median[SLOWAPI_REJECTED],
            3,
        ),
        _ratio_row("gpugate admitted / bare", median[ADMITTED] / median[BARE], None),
        _ratio_row(
            "gpugate admitted / slowapi allowed", median[ADMITTED] / median[SLOWAPI_ALLOWED], None
        ),
    ]
    rejections = (BUCKET_EMPTY, MANAGED_EMPTY, QUEUE_FULL)
    one_trip = all(sum(commands[c].values()) == COUNTED_REQUESTS for c in rejections)
    setup = (
        f"`POST /v1/jobs` with `{json.dumps(JOB)}`; every target is one uvicorn process "
        "(uvloop, httptools, no access log, no proxy headers: what `gpugate api` runs), "
        f"loaded by `wrk -t{THREADS} -c{CONNECTIONS} -d{duration_s}s` in {rounds} "
        "interleaved rounds whose order rotates; a figure is the median of its rounds. wrk "
        "shares the machine's cores with the server under test, redis-server and the idle "
        "processes of the other targets, so absolute figures are lower than on a dedicated "
        "box; the ratios are the point. The CPU columns are what the server process and "
        "redis-server used during the runs (medians, in cores). wrk's script checks every "
        "response's status and body; any other answer fails the run.\n\n"
        "- **gpugate**: `gpugate api` and one `gpugate worker` per stack on a private "
        f"redis-server (a database per stack), `GPUGATE_RATE_LIMIT={LIMIT}`, "
        "`GPUGATE_BURST=1`, GPU cap 1, worker concurrency 1. Each worker holds one parked "
        "job on the simulator in `fail_mode=hang`, which never answers, so the one GPU slot "
        "stays taken, admitted jobs stay queued and the worker runs nothing during the "
        "benchmark (with its one place taken it does not even wait on the wake list). "
        f"*admitted*: `GPUGATE_MAX_QUEUE_DEPTH={HUGE}` and a new key per request "
        f"({piled_up} jobs queued at the end); *bucket empty*: the same stack, one key whose "
        "token is spent (a key no keys file or /admin/keys knows: the default tier); "
        f"*a key of /admin/keys*: the same stack holds {API_KEYS} keys created through "
        "`POST /admin/keys` before the load (each API process keeps them in memory, "
        "api/apikeys.py), and the last one, its token spent, is refused; "
        "*queue full*: a second stack with `GPUGATE_MAX_QUEUE_DEPTH=1` and "
        "one job queued behind the parked one.\n"
        "- **bare FastAPI**: the same route and pydantic body (`api.bodies.JobBody`), "
        "answering 202 at once without Redis (`bench/peers/bare.py`).\n"
        "- **slowapi + Redis**: slowapi set up as its README does, "
        f'`@limiter.limit("{LIMIT}")` keyed by `X-API-Key`, `storage_uri` on the same '
        "redis-server (`bench/peers/slowapi_app.py`; its warning log line per rejection "
        "switched off). Its limit check is a synchronous Redis call on the event loop, and "
        "the README's 429 handler is a plain function, which Starlette runs in its thread "
        "pool. *allowed*: a new key per request; *over limit*: one spent key."
    )
    results = (
        "| target | case | status | req/s (median) | req/s per round | server CPU, cores "
        "| redis-server CPU, cores |\n|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )
    ratio_table = "| ratio of medians | value | target | |\n|---|---|---|---|\n" + "\n".join(ratios)
    trips = (
        f"Redis commands sent per request, counted with MONITOR (before the load, not during "
        f"it) over {COUNTED_REQUESTS} sequential requests per case, keeping only the commands "
        "that arrived on the sockets of the server process under test; commands a Lua script "
        "runs inside Redis are not round trips and are not counted, nor is each API "
        "process's poll of the keys' version (`GET gpugate:apikeys-version`, 4 a second) "
        "and its inbox reader's blocking `XREAD` (one each 5 s when idle): both off the "
        "request path. One command is one round "
        "trip. Target: one Redis round trip per rejection: "
        f"{'**met**' if one_trip else '**not met**'}. (An admission also reads the job back, "
        "`read_job` in `api/jobs.py`, in one pipeline: the commands after its EVALSHA are one "
        "more round trip.)\n\n"
        "| case | requests | commands per request | which |\n|---|---|---|---|\n"
        + "\n".join(_commands_row(c, commands[c], COUNTED_REQUESTS) for c in COUNTED)
    )
    return "\n\n".join((setup, results, ratio_table, trips))


def main() -> None:
    write_section("admission", "make bench  # python -m bench admission", run())


if __name__ == "__main__":
    main()
