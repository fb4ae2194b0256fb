"""Throughput: tiny jobs per second and streamed chunks per second, direct to the simulator,
through gpugate and through LiteLLM's proxy, in one run of interleaved rounds; the CPU each
process spends per job and per chunk; and the API's memory under a deep backlog.

- **Tiny jobs**: non-streamed calls with a 5-token answer at zero time per token, loaded by
  `wrk` (32 connections) for a few seconds per target and round; wrk's script checks every
  response's status and two pieces of its body. Ollama's native route (`POST /api/generate`)
  direct and through gpugate; the OpenAI route (`POST /v1/chat/completions`) direct,
  through gpugate and through LiteLLM (`/chat/completions`), the one route LiteLLM has for
  this, so the gpugate/LiteLLM ratio compares the same request and the same answer format.
  gpugate also with 1 or 2 API processes and 1 or 2 workers (two API processes: two wrk
  processes of 16 connections, one on each).
- **Streams**: 8 and 32 concurrent streams of 1,000 tokens, NDJSON (`/api/generate`) and
  SSE (`/v1/chat/completions`, `stream: true`; LiteLLM's `/chat/completions`), counted by
  a small asyncio client on raw sockets (uvloop): each connection runs the same number of
  streams back to back, chunks/s = NDJSON lines or SSE `data:` events received / wall time.
  Every stream is checked whole: status, content type, that every line or event is one,
  the first and last ones, and the exact count of chunks. That the client is not the
  bottleneck is measured, not assumed: direct to the simulator, the same streams are
  also counted by wrk (C), whose figure the client's must match.
- **CPU**: user + system time (/proc/PID/stat) of every process of the target, before and
  after each run, per job or per chunk; from Redis's share, the ceiling of one Redis core.
- **Memory under a backlog**: BACKLOG synchronous callers at once on a stack with GPU cap 1
  and a slow simulator, so all of them wait; the API's RSS before and while they wait, and
  then every one of them must get its 200 once the cap is raised.

`python -m bench throughput` runs it all and writes its section of BENCHMARKS.md;
`python -m bench.throughput --quick` (or THROUGHPUT_QUICK=1) is a smoke run: one short round
and a smaller backlog, printed, nothing written.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import resource
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import redis

from bench.report import arguments, is_quick, publish
from gpugate.testing import wrk
from gpugate.testing.processes import Process, free_port, spawn, stop_all, wait_http
from gpugate.testing.stack import NO_RATE_LIMIT, Stack, sim_configure, start_sim, start_stack
from gpugate.testing.stats import children_cpu_s, cpu_s, rss_mb

MODEL = "llama3.1"
"""Served by the simulator and in LiteLLM's bundled cost map (see peers/litellm_config.yaml)."""
TINY_TOKENS, STREAM_TOKENS = 5, 1000
TINY_CONNECTIONS = 32
STREAMS = (8, 32)
GPU_CAP = 32
SIM_PARALLEL = 512
"""Far above every cap here: only gpugate limits what runs at once."""
LITELLM_CONFIG = Path(__file__).with_name("peers") / "litellm_config.yaml"
BACKLOG_DEPTH = 5000
BACKLOG_TOKENS, BACKLOG_TOKEN_DELAY_S = 2, 2.0
"""While the backlog fills, a job holds the one GPU slot for 4 s."""
ADMIN_KEY = "bench-throughput-admin"


@dataclass(frozen=True)
class Plan:
    rounds: int
    tiny_s: int
    """wrk's duration per tiny-job run (whole seconds: wrk's -d)."""
    stream_s: float
    """About how long one stream run lasts: each connection's stream count is set from the
    warm-up so that it does; at least one stream per connection."""
    warmup_s: int
    backlog: int


FULL = Plan(rounds=3, tiny_s=3, stream_s=2.0, warmup_s=1, backlog=2000)
QUICK = Plan(rounds=1, tiny_s=1, stream_s=0.5, warmup_s=1, backlog=500)

# --- what is measured ----------------------------------------------------------------------


@dataclass(eq=False)
class Target:
    name: str
    urls: list[str]
    """One per API process; load is split evenly between them."""
    auth: str
    """The Authorization header."""
    procs: dict[str, list[int]]
    """Component (api, worker, redis, proxy, sim) -> PIDs whose CPU is counted."""


@dataclass(frozen=True)
class Route:
    label: str
    path: str
    body: dict[str, Any]
    texts: tuple[str, str]
    """Two pieces every good response body contains (for wrk's check)."""
    stream: str = ""
    """"ndjson" or "sse" for streamed routes."""


NATIVE = Route(
    "native /api/generate",
    "/api/generate",
    {"model": MODEL, "prompt": "hi", "stream": False},
    ('"done":true', '"response":"'),
)
OPENAI = Route(
    "OpenAI chat completions",
    "/v1/chat/completions",
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    ('"object":"chat.completion"', '"content":"'),
)
NDJSON = Route(
    "NDJSON",
    "/api/generate",
    {"model": MODEL, "prompt": "hi", "stream": True},
    ('"done":true', '"response":'),
    stream="ndjson",
)
SSE = Route(
    "SSE",
    "/v1/chat/completions",
    {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ("data: [DONE]", "chat.completion.chunk"),
    stream="sse",
)


@dataclass(eq=False)
class Case:
    workload: str
    """"tiny", "stream" or "check" (direct streams counted by wrk)."""
    target: Target
    route: Route
    concurrency: int
    path: str = ""
    """The target's path for the route (LiteLLM has no /v1 prefix)."""
    streams: int = 1
    """Streams per connection (asyncio client), set after the warm-up."""
    chunks: int = 0
    """Chunks in every stream of this case, learnt from the first one; then must be equal."""
    ref: Case | None = None
    """For a "check" case: the asyncio client's case of the same streams."""
    warm_rate: float = 0.0
    samples: list[Sample] = field(default_factory=list)

    @property
    def label(self) -> str:
        c = f", {self.concurrency} streams" if self.workload != "tiny" else ""
        client = ", wrk" if self.workload == "check" else ""
        return f"{self.target.name}, {self.route.label}{c}{client}"


@dataclass(frozen=True)
class Sample:
    rate: float
    units: int
    """Jobs or chunks."""
    cpu_s: dict[str, float]
    client_cpu_s: float


def cpu_of(target: Target) -> dict[str, float]:
    return {name: sum(cpu_s(pid) for pid in pids) for name, pids in target.procs.items()}


def us_per_unit(case: Case, component: str) -> float | None:
    """Median over the rounds of CPU µs per job or chunk of one component."""
    if component not in case.target.procs:
        return None
    return statistics.median(s.cpu_s[component] / s.units * 1e6 for s in case.samples)


def median_rate(case: Case) -> float:
    return statistics.median(s.rate for s in case.samples)


# --- load: wrk -----------------------------------------------------------------------------


def load(case: Case, duration_s: int) -> wrk.Result:
    """One wrk process per URL of the target, connections split evenly, run at once;
    fails on any unexpected response or socket error."""
    urls, route = case.target.urls, case.route
    sent = wrk.Load(
        json.dumps(route.body),
        200,
        route.texts,
        ("Authorization", case.target.auth),
        pattern={"ndjson": "\n", "sse": "data: "}.get(route.stream, ""),
        count=case.chunks,
        window_after=case.concurrency,
    )
    connections = case.concurrency // len(urls)
    procs = [
        wrk.start(
            url + case.path, sent, duration_s=duration_s, connections=connections, timeout_s=30
        )
        for url in urls
    ]
    results = [wrk.finish(proc, case.label, duration_s + 120).check(case.label) for proc in procs]
    return wrk.Result(
        requests=sum(r.requests for r in results),
        duration_s=max(r.duration_s for r in results),
        unexpected=0,
        chunks=sum(r.chunks for r in results),
        window_chunks=sum(r.window_chunks for r in results),
        window_s=max(r.window_s for r in results),
        socket_errors=(0, 0, 0, 0),
        p50_ms=max(r.p50_ms for r in results),
        p99_ms=max(r.p99_ms for r in results),
        statuses=sum((r.statuses for r in results), Counter()),
    )


# --- load: the asyncio client ----------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    headers: dict[bytes, bytes]
    body: bytes


LAST_CHUNK = b"\r\n0\r\n\r\n"
"""How a chunked body ends (these servers send no trailers, and their bodies hold no CR)."""


class _HttpProtocol(asyncio.Protocol):
    """Collects one response at a time. The bytes are only appended as they arrive (one
    callback per read, from uvloop's C loop) and parsed once the response is complete: the
    client's cost per chunk stays a small part of a server's."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiter: asyncio.Future[Response] | None = None
        self.buf = bytearray()
        self.body_at = -1
        self.length: int | None = None
        self.headers: dict[bytes, bytes] = {}
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def begin(self, request: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.buf.clear()
        self.body_at, self.length, self.headers = -1, None, {}
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.body_at < 0 and not self._parse_head():
            return
        if self.length is not None:
            done = len(buf) - self.body_at >= self.length
        else:
            empty = len(buf) - self.body_at == len(LAST_CHUNK) - 2  # b"0\r\n\r\n" alone
            done = buf.endswith(LAST_CHUNK) or (empty and buf.endswith(LAST_CHUNK[2:]))
        if done and self.waiter is not None and not self.waiter.done():
            body = bytes(buf[self.body_at :])
            if self.length is None:
                body = unchunk(body)
            self.waiter.set_result(Response(self.status, self.headers, body))

    def _parse_head(self) -> bool:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return False
        status_line, *lines = bytes(self.buf[:end]).split(b"\r\n")
        self.status = int(status_line.split(b" ", 2)[1])
        for line in lines:
            name, _, value = line.partition(b":")
            self.headers[name.strip().lower()] = value.strip()
        self.body_at = end + 4
        if b"content-length" in self.headers:
            self.length = int(self.headers[b"content-length"])
        elif self.headers.get(b"transfer-encoding", b"").lower() != b"chunked":
            raise AssertionError(f"neither Content-Length nor chunked: {self.headers}")
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ConnectionError(f"connection lost mid-response: {exc}"))


def unchunk(raw: bytes) -> bytes:
    """The body of a complete chunked message body (chunk framing removed)."""
    parts, pos = [], 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(parts)
        parts.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 4 + size


class Connection:
    """HTTP/1.1 on one keep-alive socket, just enough for these servers (Content-Length
    or chunked bodies; no pipelining)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.protocol: _HttpProtocol | None = None

    def request(self, method: str, path: str, body: Any = None, **headers: str) -> bytes:
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        lines += [f"{k.replace('_', '-')}: {v}" for k, v in headers.items()]
        if body is not None:
            lines += ["Content-Type: application/json", f"Content-Length: {len(payload)}"]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    async def exchange(self, request: bytes) -> Response:
        if self.protocol is None or self.protocol.transport is None:
            loop = asyncio.get_running_loop()
            _, self.protocol = await loop.create_connection(_HttpProtocol, self.host, self.port)
        response = await self.protocol.begin(request)
        if response.headers.get(b"connection", b"").lower() == b"close":
            self.close()
        return response

    def close(self) -> None:
        if self.protocol is not None and self.protocol.transport is not None:
            self.protocol.transport.close()
        self.protocol = None


def count_chunks(route: Route, response: Response, what: str) -> int:
    """Checks a whole streamed answer; returns its NDJSON lines or SSE events."""
    ctype = response.headers.get(b"content-type", b"")
    if route.stream == "ndjson":
        lines = response.body.split(b"\n")
        if lines and not lines[-1]:
            lines.pop()
        good = (
            b"ndjson" in ctype
            and bool(lines)
            and route.texts[1].encode() in lines[0]
            and route.texts[0].encode() in lines[-1]
            and all(line.startswith(b"{") for line in lines)
        )
    else:
        lines = response.body.replace(b"\r\n", b"\n").split(b"\n\n")
        if lines and not lines[-1].strip():
            lines.pop()
        good = (
            b"text/event-stream" in ctype
            and bool(lines)
            and route.texts[1].encode() in lines[0]
            and lines[-1].strip() == route.texts[0].encode()
            and all(line.startswith(b"data: ") for line in lines)
        )
    if response.status != 200 or not good:
        raise AssertionError(
            f"{what}: unexpected answer {response.status} {ctype!r}: {response.body[:300]!r}"
            f" ... {response.body[-300:]!r}"
        )
    return len(lines)


async def stream_client(case: Case) -> tuple[int, float]:
    """Every connection runs `case.streams` streams back to back; (chunks, wall seconds)."""
    conns = [
        Connection(case.target.urls[i % len(case.target.urls)]) for i in range(case.concurrency)
    ]
    request = conns[0].request("POST", case.path, case.route.body, Authorization=case.target.auth)
    total = 0

    async def loop(conn: Connection) -> None:
        nonlocal total
        try:
            for _ in range(case.streams):
                n = count_chunks(case.route, await conn.exchange(request), case.label)
                if case.chunks and n != case.chunks:
                    raise AssertionError(f"{case.label}: {n} chunks, expected {case.chunks}")
                case.chunks = case.chunks or n
                total += n
        finally:
            conn.close()

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for conn in conns:
            group.create_task(loop(conn))
    return total, time.perf_counter() - start


def run_async(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


# --- one measurement -------------------------------------------------------------------------


def measure(case: Case, plan: Plan) -> Sample:
    before, client_before = cpu_of(case.target), time.process_time() + children_cpu_s()
    if case.workload == "stream":
        units, elapsed = run_async(stream_client(case))
        rate = units / elapsed
    else:
        result = load(case, plan.tiny_s)
        units, rate = result.requests, result.requests / result.duration_s
    after, client_after = cpu_of(case.target), time.process_time() + children_cpu_s()
    return Sample(
        rate, units, {k: after[k] - before[k] for k in before}, client_after - client_before
    )


# --- the processes -----------------------------------------------------------------------------


GATEWAY: dict[str, object] = {
    "gpu_concurrency": GPU_CAP,
    "worker_concurrency": GPU_CAP,
    "max_queue_depth": 100000,
    "shutdown_grace": 0,
    **NO_RATE_LIMIT,
}


def start_model_sim(tokens: int) -> Process:
    """The simulator serving MODEL: `tokens` tokens at zero time per token."""
    args = ["--models", MODEL, "--tokens", str(tokens), "--token-delay", "0"]
    return start_sim(*args, "--parallel", str(SIM_PARALLEL))


def start_gateway(
    sim: Process, apis: int, workers: int, tree: Path | None = None, **settings: object
) -> Stack:
    """One gpugate: its own redis-server, `apis` API processes and `workers` workers (run
    from another revision's files: `tree`)."""
    return start_stack(
        sim.url, apis=apis, workers=workers, ready_timeout=30, tree=tree, **{**GATEWAY, **settings}
    )


def target(name: str, stack: Stack, sim: Process) -> Target:
    assert stack.redis_server is not None
    return Target(
        name,
        [api.url for api in stack.apis],
        "Bearer bench-throughput",
        {
            "api": [a.pid for a in stack.apis],
            "worker": [w.pid for w in stack.workers],
            "redis": [stack.redis_server.pid],
            "sim": [sim.pid],
        },
    )


def spawn_litellm(sim: Process, key: str) -> Process:
    """LiteLLM's proxy as its docs start it: `litellm --config ... --num_workers 1`. Returns
    at once (it takes seconds to start); `wait_http(proc, "/health/liveliness", ...)` waits."""
    port = free_port()
    binary = Path(sys.executable).with_name("litellm")
    if not binary.exists():
        found = shutil.which("litellm")
        if found is None:
            raise RuntimeError("litellm is not installed: pip install 'litellm[proxy]'")
        binary = Path(found)
    env = {
        "BENCH_OLLAMA_URL": sim.url,
        "LITELLM_MASTER_KEY": key,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "WARNING",  # no access log line per request (gpugate has none)
        "NO_DOCS": "True",
    }
    argv = [str(binary), "--config", str(LITELLM_CONFIG), "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--num_workers", "1"]
    proc = spawn("litellm", argv, env, cwd=Path(tempfile.mkdtemp(prefix="gpugate-litellm-")))
    proc.url, proc.port = f"http://127.0.0.1:{port}", port
    return proc


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


# --- the throughput phases ---------------------------------------------------------------------


@dataclass
class Setup:
    direct: Target
    gpugate: Target
    litellm: Target
    scaling: list[tuple[int, int, Target]]
    sim: Process


def tiny_cases(s: Setup) -> list[Case]:
    cases = [
        Case("tiny", s.direct, NATIVE, TINY_CONNECTIONS, NATIVE.path),
        Case("tiny", s.gpugate, NATIVE, TINY_CONNECTIONS, NATIVE.path),
        Case("tiny", s.direct, OPENAI, TINY_CONNECTIONS, OPENAI.path),
        Case("tiny", s.gpugate, OPENAI, TINY_CONNECTIONS, OPENAI.path),
        Case("tiny", s.litellm, OPENAI, TINY_CONNECTIONS, "/chat/completions"),
    ]
    cases += [
        Case("tiny", target, NATIVE, TINY_CONNECTIONS, NATIVE.path)
        for apis, workers, target in s.scaling
        if (apis, workers) != (1, 1)
    ]
    return cases


def stream_cases(s: Setup) -> list[Case]:
    cases = []
    for n in STREAMS:
        for route in (NDJSON, SSE):
            direct = Case("stream", s.direct, route, n, route.path)
            cases += [
                direct,
                Case("check", s.direct, route, n, route.path, ref=direct),
                Case("stream", s.gpugate, route, n, route.path),
            ]
        cases.append(Case("stream", s.litellm, SSE, n, "/chat/completions"))
    return cases


def check_once(case: Case) -> None:
    """One request of the case before any load, so a wrong answer fails with its body."""
    with httpx.Client(timeout=60) as client:
        r = client.post(
            case.target.urls[0] + case.path,
            json=case.route.body,
            headers={"Authorization": case.target.auth},
        )
    if r.status_code != 200 or not all(text in r.text for text in case.route.texts):
        raise AssertionError(f"{case.label}: {r.status_code} {r.text[:500]}")


def warm_up(cases: list[Case], plan: Plan) -> None:
    """A short run of every case. For streams: one stream on every connection at the
    smallest concurrency, all at once; from its rate, how many streams per connection make a
    run last about stream_s, at every concurrency."""
    for case in cases:
        if case.workload == "tiny":
            load(case, plan.warmup_s)
        elif case.workload == "stream" and case.concurrency == min(STREAMS):
            case.streams = 1
            chunks, elapsed = run_async(stream_client(case))
            case.warm_rate = chunks / elapsed
            print(f"  warm-up {case.label}: {case.warm_rate:.0f} chunks/s", flush=True)
    for case in cases:
        if case.workload == "stream":
            small = next(
                c
                for c in cases
                if c.workload == "stream"
                and c.target is case.target
                and c.route is case.route
                and c.concurrency == min(STREAMS)
            )
            case.chunks, case.warm_rate = small.chunks, small.warm_rate
            per_batch_s = case.concurrency * case.chunks / case.warm_rate
            case.streams = max(1, round(plan.stream_s / per_batch_s))


def interleaved(cases: list[Case], plan: Plan) -> None:
    """Every case once per round; the order rotates from round to round."""
    for r in range(plan.rounds):
        shift = r * len(cases) // max(plan.rounds, 1)
        for case in cases[shift:] + cases[:shift]:
            sample = measure_check(case, plan) if case.ref else measure(case, plan)
            case.samples.append(sample)
            unit = "req/s" if case.workload == "tiny" else "chunks/s"
            print(f"round {r + 1}: {case.label}: {sample.rate:.0f} {unit}", flush=True)


def measure_check(case: Case, plan: Plan) -> Sample:
    """wrk on the direct streams, run long enough for 2.5 batches of streams at the rate
    the asyncio client saw in the warm-up; its rate is taken over whole streams only."""
    assert case.ref is not None
    case.chunks = case.ref.chunks
    batch_s = case.concurrency * case.chunks / max(case.ref.warm_rate, 1.0)
    duration = max(2, math.ceil(2.5 * batch_s + 1))
    before, client_before = cpu_of(case.target), children_cpu_s()
    result = load(case, duration)
    after, client_after = cpu_of(case.target), children_cpu_s()
    if not result.window_s:
        raise AssertionError(f"{case.label}: too few streams for a window in {duration} s")
    return Sample(
        result.window_chunks / result.window_s,
        result.chunks,
        {k: after[k] - before[k] for k in before},
        client_after - client_before,
    )


def throughput(plan: Plan) -> tuple[Setup, list[Case], list[Case], str]:
    sim = start_model_sim(TINY_TOKENS)
    procs: list[Process] = [sim]
    key = "sk-" + secrets.token_hex(32)
    try:
        litellm = spawn_litellm(sim, key)
        procs.append(litellm)
        stacks, names = {}, {}
        for apis, workers in ((1, 1), (1, 2), (2, 1), (2, 2)):
            name = "gpugate" if (apis, workers) == (1, 1) else f"gpugate {apis} API/{workers} w"
            stacks[apis, workers] = start_gateway(sim, apis, workers)
            names[apis, workers] = name
            procs += stacks[apis, workers].processes
        wait_http(litellm, "/health/liveliness", timeout=180, interval=0.2, status=200)
        scaling = [(a, w, target(names[a, w], stack, sim)) for (a, w), stack in stacks.items()]
        setup = Setup(
            direct=Target("direct", [sim.url], "Bearer bench-throughput", {"sim": [sim.pid]}),
            gpugate=scaling[0][2],
            litellm=Target(
                "LiteLLM",
                [litellm.url],
                f"Bearer {key}",
                {"proxy": [litellm.pid], "sim": [sim.pid]},
            ),
            scaling=scaling,
            sim=sim,
        )
        tiny = tiny_cases(setup)
        for case in tiny:
            check_once(case)
        print("== tiny jobs", flush=True)
        warm_up(tiny, plan)
        interleaved(tiny, plan)

        sim_configure(sim, reset=False, tokens=STREAM_TOKENS)
        streams = stream_cases(setup)
        print("== streams", flush=True)
        warm_up(streams, plan)
        interleaved(streams, plan)
        versions = litellm_version()
    finally:
        stop_all(procs)
    return setup, tiny, streams, versions


def litellm_version() -> str:
    try:
        return metadata.version("litellm")
    except metadata.PackageNotFoundError:
        return "unknown"


# --- memory under a deep backlog -------------------------------------------------------------


@dataclass
class Backlog:
    callers: int
    fill_s: float = 0.0
    drain_s: float = 0.0
    peak_waiting: int = 0
    rss_before: dict[str, float] = field(default_factory=dict)
    rss_waiting: dict[str, float] = field(default_factory=dict)
    rss_after: dict[str, float] = field(default_factory=dict)
    redis_before: dict[str, int] = field(default_factory=dict)
    redis_waiting: dict[str, int] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)


async def one_caller(url: str, request: bytes) -> str:
    conn = Connection(url)
    try:
        r = await conn.exchange(request)
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        return f"error {exc.__class__.__name__}"
    finally:
        conn.close()
    return "200" if r.status == 200 and b'"done":true' in r.body else f"{r.status} {r.body[:80]!r}"


async def get_json(conn: Connection, method: str, path: str, body: Any = None, **h: str) -> Any:
    r = await conn.exchange(conn.request(method, path, body, **h))
    if r.status != 200:
        raise AssertionError(f"{method} {path}: {r.status} {r.body[:300]!r}")
    return json.loads(r.body)


def redis_figures(rdb: redis.Redis) -> dict[str, int]:
    memory, clients = rdb.info("memory"), rdb.info("clients")
    return {
        "used_memory": int(memory["used_memory"]),
        "mem_clients_normal": int(memory.get("mem_clients_normal", 0)),
        "connected_clients": int(clients["connected_clients"]),
    }


async def fill_and_drain(stack: Stack, sim: Process, b: Backlog) -> None:
    api, worker = stack.apis[0], stack.workers[0]
    rdb = stack.redis()
    probe = Connection(api.url)
    request = probe.request(
        "POST", NATIVE.path, NATIVE.body, Authorization="Bearer bench-backlog", Connection="close"
    )
    b.redis_before = redis_figures(rdb)
    started = time.perf_counter()
    calls = [asyncio.create_task(one_caller(api.url, request)) for _ in range(b.callers)]
    deadline = started + 120
    while True:
        q = await get_json(probe, "GET", "/v1/queue")
        answered = sum(c.done() for c in calls)
        b.peak_waiting = max(b.peak_waiting, q["queue_depth"] + q["running"])
        if q["queue_depth"] + q["running"] + answered >= b.callers:
            break
        if time.perf_counter() > deadline:
            raise AssertionError(f"backlog: only {q} after 120 s, {answered} answered")
        await asyncio.sleep(0.1)
    b.fill_s = time.perf_counter() - started
    await asyncio.sleep(0.5)  # let the last admissions settle into their waits
    b.rss_waiting = {"api": rss_mb(api.pid), "worker": rss_mb(worker.pid)}
    b.redis_waiting = redis_figures(rdb)
    rdb.close()
    released = time.perf_counter()
    sim_conn = Connection(sim.url)
    await get_json(sim_conn, "PUT", "/sim/config", {"token_delay_s": 0.0})
    sim_conn.close()
    await get_json(
        probe, "PUT", "/admin/concurrency", {"gpu_concurrency": GPU_CAP}, X_Admin_Key=ADMIN_KEY
    )
    probe.close()
    done, pending = await asyncio.wait(calls, timeout=240)
    for task in pending:
        task.cancel()
    b.drain_s = time.perf_counter() - released
    b.statuses = Counter(t.result() for t in done)
    b.statuses["not answered in 240 s"] += len(pending)
    b.statuses -= Counter()  # drop zero counts


def backlog(callers: int) -> Backlog:
    """`callers` synchronous calls at once on a stack with GPU cap 1 and a job time of 4 s,
    so that they all wait; then the cap goes up and the simulator speeds up, and every call
    must get its 200."""
    sim = start_model_sim(BACKLOG_TOKENS)
    procs: list[Process] = [sim]
    b = Backlog(callers)
    try:
        stack = start_gateway(
            sim, 1, 1, gpu_concurrency=1, max_queue_depth=BACKLOG_DEPTH, admin_key=ADMIN_KEY
        )
        procs += stack.processes
        api, worker = stack.apis[0], stack.workers[0]
        with httpx.Client(base_url=api.url, timeout=30) as client:
            for _ in range(100):  # warm: imports, pools, scripts loaded
                r = client.post(NATIVE.path, json=NATIVE.body, headers={"X-API-Key": "warm"})
                if r.status_code != 200:
                    raise AssertionError(f"backlog warm-up: {r.status_code} {r.text[:300]}")
        sim_configure(sim, reset=False, token_delay_s=BACKLOG_TOKEN_DELAY_S)
        time.sleep(1)
        b.rss_before = {"api": rss_mb(api.pid), "worker": rss_mb(worker.pid)}
        run_async(fill_and_drain(stack, sim, b))
        time.sleep(1)
        b.rss_after = {"api": rss_mb(api.pid), "worker": rss_mb(worker.pid)}
    finally:
        stop_all(procs)
    return b


# --- the report --------------------------------------------------------------------------------

GATEWAY_PARTS = ("api", "worker", "redis", "proxy")


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}" if value >= 10 else f"{value:.1f}"


def _per_round(case: Case) -> str:
    return " / ".join(f"{s.rate:.0f}" for s in case.samples)


def _gateway_us(case: Case) -> float | None:
    parts = [us_per_unit(case, p) for p in GATEWAY_PARTS if p in case.target.procs]
    return sum(x for x in parts if x is not None) if parts else None


def _client_us(case: Case) -> float:
    return statistics.median(s.client_cpu_s / s.units * 1e6 for s in case.samples)


def _ceiling(case: Case) -> str:
    redis_us = us_per_unit(case, "redis")
    return "-" if not redis_us else f"{1e6 / redis_us:,.0f}"


def _cpu_cells(case: Case) -> str:
    api = us_per_unit(case, "api") if "api" in case.target.procs else us_per_unit(case, "proxy")
    cells = [api, us_per_unit(case, "worker"), us_per_unit(case, "redis"), _gateway_us(case)]
    cells.append(us_per_unit(case, "sim"))
    return " | ".join(_us(x) for x in cells)


def _find(cases: list[Case], target: Target, route: Route, n: int = 0, wl: str = "") -> Case:
    return next(
        c
        for c in cases
        if c.target is target
        and c.route is route
        and (not n or c.concurrency == n)
        and (not wl or c.workload == wl)
    )


def tiny_table(s: Setup, tiny: list[Case]) -> str:
    rows = []
    for case in tiny[:5]:
        direct = _find(tiny, s.direct, case.route)
        rows.append(
            f"| {case.route.label} | {case.target.name} | **{median_rate(case):.0f}** | "
            f"{_per_round(case)} | {median_rate(case) / median_rate(direct):.2f}x | "
            f"{_cpu_cells(case)} | {_us(_client_us(case))} |"
        )
    return (
        "| route | target | req/s (median) | per round | vs direct | API or proxy µs/job | "
        "worker µs/job | redis µs/job | gateway total µs/job | simulator µs/job | wrk µs/job |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def stream_table(s: Setup, streams: list[Case]) -> str:
    rows = []
    for case in streams:
        if case.workload == "check":
            continue
        direct = _find(streams, s.direct, case.route, case.concurrency, "stream")
        rows.append(
            f"| {case.route.label} | {case.concurrency} | {case.target.name} | "
            f"**{median_rate(case):.0f}** | {_per_round(case)} | "
            f"{median_rate(case) / median_rate(direct):.2f}x | {_cpu_cells(case)} | "
            f"{_us(_client_us(case))} | {case.chunks} |"
        )
    return (
        "| format | streams | target | chunks/s (median) | per round | vs direct | "
        "API or proxy µs/chunk | worker µs/chunk | redis µs/chunk | gateway total µs/chunk | "
        "simulator µs/chunk | client µs/chunk | chunks per stream |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def scaling_table(s: Setup, tiny: list[Case]) -> str:
    base = median_rate(_find(tiny, s.gpugate, NATIVE))
    rows = []
    for apis, workers, target in s.scaling:
        case = _find(tiny, target, NATIVE)
        rows.append(
            f"| {apis} | {workers} | **{median_rate(case):.0f}** | {_per_round(case)} | "
            f"{median_rate(case) / base:.2f}x | {_us(us_per_unit(case, 'api'))} | "
            f"{_us(us_per_unit(case, 'worker'))} | {_us(us_per_unit(case, 'redis'))} | "
            f"{_ceiling(case)} |"
        )
    return (
        "| API processes | workers | req/s (median) | per round | vs 1 API / 1 worker | "
        "API µs/job (all) | worker µs/job (all) | redis µs/job | jobs/s per Redis core |\n"
        "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows)
    )


def ratio_table(s: Setup, tiny: list[Case], streams: list[Case]) -> str:
    def r(a: Case, b: Case) -> str:
        pairs = zip(a.samples, b.samples, strict=True)
        rounds = " / ".join(f"{x.rate / y.rate:.2f}" for x, y in pairs)
        return f"**{median_rate(a) / median_rate(b):.2f}x** ({rounds})"

    def cpu(lite: Case, g: Case) -> str:
        a, b = _gateway_us(lite), _gateway_us(g)
        return f"{a / b:.1f}x" if a and b else "-"

    native = r(_find(tiny, s.gpugate, NATIVE), _find(tiny, s.direct, NATIVE))
    gpugate_openai = _find(tiny, s.gpugate, OPENAI)
    openai = r(gpugate_openai, _find(tiny, s.direct, OPENAI))
    litellm_openai = _find(tiny, s.litellm, OPENAI)
    litellm = r(gpugate_openai, litellm_openai)
    rows = [
        f"| tiny jobs, native | {native} | | |",
        f"| tiny jobs, OpenAI chat | {openai} | {litellm} | "
        f"{cpu(litellm_openai, gpugate_openai)} |",
    ]
    for n in STREAMS:
        g = _find(streams, s.gpugate, NDJSON, n, "stream")
        d = _find(streams, s.direct, NDJSON, n, "stream")
        rows.append(f"| NDJSON, {n} streams | {r(g, d)} | | |")
        g = _find(streams, s.gpugate, SSE, n, "stream")
        d = _find(streams, s.direct, SSE, n, "stream")
        lite = _find(streams, s.litellm, SSE, n, "stream")
        rows.append(f"| SSE, {n} streams | {r(g, d)} | {r(g, lite)} | {cpu(lite, g)} |")
    return (
        "| workload | gpugate / direct | gpugate / LiteLLM | gateway CPU per unit, "
        "LiteLLM / gpugate |\n|---|---|---|---|\n" + "\n".join(rows)
    )


def ceiling_table(s: Setup, tiny: list[Case], streams: list[Case]) -> str:
    rows = []
    for apis, workers, target in s.scaling:
        case = _find(tiny, target, NATIVE)
        rows.append(
            f"| tiny job ({apis} API, {workers} worker) | {_us(us_per_unit(case, 'redis'))} | "
            f"{_ceiling(case)} jobs/s |"
        )
    for n in STREAMS:
        for route in (NDJSON, SSE):
            case = _find(streams, s.gpugate, route, n, "stream")
            rows.append(
                f"| {route.label} chunk, {n} streams | {_us(us_per_unit(case, 'redis'))} | "
                f"{_ceiling(case)} chunks/s |"
            )
    return "| unit | redis-server µs | per Redis core (1e6 / µs) |\n|---|---|---|\n" + "\n".join(
        rows
    )


def client_table(s: Setup, streams: list[Case]) -> str:
    rows = []
    for case in streams:
        if case.workload != "check" or case.ref is None:
            continue
        mine = case.ref
        rows.append(
            f"| {case.route.label} | {case.concurrency} | {median_rate(mine):.0f} | "
            f"{median_rate(case):.0f} | {median_rate(mine) / median_rate(case):.2f}x | "
            f"{_us(_client_us(mine))} | {_us(_client_us(case))} |"
        )
    return (
        "| format | streams | asyncio client chunks/s | wrk chunks/s | client / wrk | "
        "asyncio client µs/chunk | wrk µs/chunk |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
    )


def backlog_table(b: Backlog) -> str:
    per_call = (b.rss_waiting["api"] - b.rss_before["api"]) * 1024 / b.callers
    grew = {k: b.redis_waiting[k] - b.redis_before[k] for k in b.redis_before}
    per_call_redis = grew["used_memory"] / 1024 / b.callers
    per_call_clients = grew["mem_clients_normal"] / 1024 / b.callers
    ok = b.statuses.get("200", 0)
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(b.statuses.items()))
    return (
        "| figure | value |\n|---|---|\n"
        f"| synchronous callers at once | {b.callers} |\n"
        f"| all admitted and waiting after | {b.fill_s:.1f} s (most waiting at once: "
        f"{b.peak_waiting}) |\n"
        f"| API RSS before / while all wait / after the drain | {b.rss_before['api']:.1f} / "
        f"{b.rss_waiting['api']:.1f} / {b.rss_after['api']:.1f} MB |\n"
        f"| API RSS per waiting call | **{per_call:.1f} KiB** |\n"
        f"| worker RSS before / while all wait | {b.rss_before['worker']:.1f} / "
        f"{b.rss_waiting['worker']:.1f} MB |\n"
        f"| Redis used_memory per waiting call | {per_call_redis:.1f} KiB, of which client "
        f"buffers {per_call_clients:.1f} KiB |\n"
        f"| Redis connections before / while all wait | {b.redis_before['connected_clients']} / "
        f"{b.redis_waiting['connected_clients']} |\n"
        f"| answers | {statuses} |\n"
        f"| every caller got its 200 | **{'yes' if ok == b.callers else 'NO'}** "
        f"(drained in {b.drain_s:.1f} s after the cap went to {GPU_CAP}) |"
    )


def report(
    plan: Plan, s: Setup, tiny: list[Case], streams: list[Case], b: Backlog, litellm_v: str
) -> str:
    setup = f"""\
One run, {plan.rounds} interleaved round(s) whose order rotates; a figure is the median of
its rounds. The simulator (`gpugate sim`, its own parallel limit {SIM_PARALLEL}) answers at
zero time per token: {TINY_TOKENS} tokens for tiny jobs, {STREAM_TOKENS} for streams. Every
target shares the machine's 2 cores with the simulator, the load tool and the idle
processes of the other targets, so absolute figures are lower than on a dedicated box; the
ratios, taken in the same run, are the point. Every response is checked (status and body);
any other answer fails the run.

- **direct**: the simulator itself. **gpugate**: one `gpugate api`, one `gpugate worker`, a
  private redis-server, `GPUGATE_GPU_CONCURRENCY={GPU_CAP}`,
  `GPUGATE_WORKER_CONCURRENCY={GPU_CAP}`, rate limit and queue depth far above the load,
  `GPUGATE_LOG_LEVEL=warning`; the scaling rows are three more such stacks (each its own
  redis-server) with 1 or 2 API processes and 1 or 2 workers.
- **LiteLLM** {litellm_v}: its proxy as its docs start it, `litellm --config
  bench/peers/litellm_config.yaml --num_workers 1`, one model `ollama_chat/{MODEL}` on the
  same simulator, a master key (it refuses to start without one), no database,
  `LITELLM_LOCAL_MODEL_COST_MAP=True`, `LITELLM_LOG=WARNING` (no access log, like gpugate).
  Like for like: the same OpenAI chat request to LiteLLM's `/chat/completions` and
  gpugate's `/v1/chat/completions`, the same answer format (JSON, or SSE with `stream:
  true`), the same simulator behind. The upstream leg differs by design: gpugate relays the
  simulator's own OpenAI route (Ollama serves one), LiteLLM's `ollama_chat` provider calls
  Ollama's `/api/chat` and converts the NDJSON into OpenAI chunks. {MODEL} is in LiteLLM's
  bundled cost map; for an Ollama model not there, LiteLLM POSTs `/api/show` synchronously
  on every request, and is slower still.
- **Tiny jobs**: `wrk -t1 -c{TINY_CONNECTIONS} -d{plan.tiny_s}s`; with two API processes, two wrk
  processes of {TINY_CONNECTIONS // 2} connections, one on each.
- **Streams**: {", ".join(map(str, STREAMS))} connections, each running the same number of
  streams back to back (set in the warm-up so that a run lasts about {plan.stream_s:g} s, at
  least one stream each); chunks/s = NDJSON lines or SSE `data:` events received by the
  client / wall time; every stream is checked whole, including its exact chunk count.
- **CPU** µs per job or chunk: user + system CPU (/proc/PID/stat) of each process of the
  target over the run / jobs or chunks; *gateway total* is API + worker + redis-server
  (LiteLLM: its one process). *jobs/s per Redis core* = 1e6 / redis µs per job: the
  fleet's ceiling on one Redis, whatever the number of API processes and workers."""
    sections = [
        setup,
        "**Tiny jobs** (non-streamed, 5 tokens):\n\n" + tiny_table(s, tiny),
        "**Streamed chunks** (1,000 tokens a stream):\n\n"
        + stream_table(s, streams)
        + "\n\nA chunk is one NDJSON line or SSE event received, whatever the framing: "
        "gpugate's worker writes several of Ollama's chunks to one Redis stream event when "
        "they come faster than it writes, and the API relays an event as one HTTP chunk, so "
        "gpugate's redis-server and client figures per chunk are lower than one read per "
        "chunk would cost.",
        "**Ratios of medians, same run** (in brackets: the ratio within each round, where the "
        "two targets ran one after the other):\n\n"
        + ratio_table(s, tiny, streams)
        + "\n\nOn streams, direct runs are bound by the simulator (one Python process at zero "
        "time per token, near one core). Through gpugate the simulator does the same work and "
        "gpugate's worker, API and redis-server run beside it on the second core, so gpugate / "
        "direct stays near 1 and moves with the machine's noise; it can exceed 1 because the "
        "simulator spends less per chunk when its reader is gpugate's worker, which takes "
        "chunks in batches, than when it is a client woken for every chunk (the simulator "
        "column). The cost gpugate adds is its own CPU per chunk.",
        "**gpugate with more processes** (tiny jobs, native route):\n\n" + scaling_table(s, tiny),
        "**Redis ceiling** (the one shared part of a fleet):\n\n" + ceiling_table(s, tiny, streams),
        "**Is the stream client the bottleneck?** Direct to the simulator, the same streams "
        "counted by the asyncio client and by wrk (C; its rate over whole streams after every "
        "connection finished its first one), interleaved. The client spends about as much CPU per "
        "chunk as wrk, a fraction of one of its cores (it is one process, one thread), and "
        "a fraction of the simulator's per chunk; through gpugate, which batches chunks, it "
        "spends about 1 µs a chunk. The rates agree within the noise of the shared machine.\n\n"
        + client_table(s, streams),
        f"**Memory under a deep backlog**: one API, one worker, GPU cap 1, "
        f"`GPUGATE_MAX_QUEUE_DEPTH={BACKLOG_DEPTH}`, the simulator at {BACKLOG_TOKENS} tokens x "
        f"{BACKLOG_TOKEN_DELAY_S:g} s; {b.callers} synchronous `POST /api/generate` "
        "callers at once (asyncio, one connection each); once all are admitted and waiting, the "
        f"simulator goes to 0 s per token and the cap to {GPU_CAP} "
        "(`PUT /admin/concurrency`).\n\n" + backlog_table(b),
    ]
    return "\n\n".join(sections)


# --- the run -----------------------------------------------------------------------------------


def run(plan: Plan) -> str:
    wrk.require()
    raise_fd_limit(4 * plan.backlog + 4096)
    started, load_before = time.monotonic(), os.getloadavg()[0]
    setup, tiny, streams, litellm_v = throughput(plan)
    print("== backlog", flush=True)
    b = backlog(plan.backlog)
    text = report(plan, setup, tiny, streams, b, litellm_v)
    text += (
        f"\n\nThe whole run took {time.monotonic() - started:.0f} s; load tool {wrk.version()}. "
        f"The machine's 1-minute load average (other work on it included) was {load_before:.1f} "
        f"at the start and {os.getloadavg()[0]:.1f} at the end."
    )
    print(text, flush=True)
    if b.statuses.get("200", 0) != b.callers:
        raise AssertionError(f"backlog: not every caller got its 200: {dict(b.statuses)}")
    return text


def main(argv: list[str] | None = None) -> None:
    quick = is_quick(arguments("throughput", __doc__).parse_args(argv or []), "throughput")
    publish("throughput", run(QUICK if quick else FULL), quick=quick)


if __name__ == "__main__":
    main(sys.argv[1:])
