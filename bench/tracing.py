"""Tracing's cost: tiny jobs through gpugate with OpenTelemetry off and on, in interleaved
rounds on the same machine, and the CPU each process spends per job (issue 26).

Two stacks on one private redis-server (a database each), each one `gpugate api` and one
`gpugate worker`, GPU cap 32, in front of one simulator (5 tokens, no delay): *off* (no
OTEL_* variable, the default) and *on* (OTEL_EXPORTER_OTLP_ENDPOINT pointing at a sink on
loopback that reads each OTLP/HTTP export, counts its spans and answers 200, as a
Collector would; the SDK's batch processor at its defaults). Load: `wrk` (32 connections)
POSTing non-streamed `/api/generate` calls, each of which is admitted, queued, run by the
worker and relayed. CPU: user + system time (/proc) of the API, the worker and Redis over
each run, per job; the sink's own CPU (the Collector's, in production) is not counted.
A traced job exports five spans: the server span, `gpugate.admit`, `gpugate.queue`,
`gpugate.run` and the call to the backend.

`python -m bench.tracing` writes its section of BENCHMARKS.md; `--quick` prints only.
"""

from __future__ import annotations

import json
import os
import statistics
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from bench import report
from gpugate.testing import wrk
from gpugate.testing.stack import NO_RATE_LIMIT, Stack, start_redis, start_sim, start_stack
from gpugate.testing.stats import cpu_s

ROUNDS, DURATION_S, WARMUP_S, CONNECTIONS = 3, 5, 1, 32
QUICK_ROUNDS, QUICK_DURATION_S = 1, 2
SPANS_PER_JOB = 5
BODY = {"model": "llama3.2", "prompt": "hi", "stream": False}
GATEWAY: dict[str, object] = {
    "gpu_concurrency": 32,
    "worker_concurrency": 32,
    "max_queue_depth": 100000,
    "shutdown_grace": 0,
    **NO_RATE_LIMIT,
}
OTEL_VARIABLES = (
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_TRACES_SAMPLER",
    "OTEL_TRACES_SAMPLER_ARG",
    "OTEL_SERVICE_NAME",
)
SAMPLED_10 = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}


class Sink:
    """An OTLP/HTTP endpoint that decodes each export only to count its spans."""

    def __init__(self) -> None:
        self.spans: Counter[str] = Counter()
        """Spans received by service name (each variant's processes name theirs)."""
        lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                request = ExportTraceServiceRequest.FromString(body)
                counts: Counter[str] = Counter()
                for r in request.resource_spans:
                    service = next(
                        (
                            a.value.string_value
                            for a in r.resource.attributes
                            if a.key == "service.name"
                        ),
                        "",
                    )
                    for s in r.scope_spans:  # not the readiness probes' server spans
                        counts[service] += sum(not sp.name.startswith("GET ") for sp in s.spans)
                with lock:
                    sink.spans.update(counts)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Case:
    name: str
    stack: Stack
    pids: dict[str, int]
    rates: list[float] = field(default_factory=list)
    jobs: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    sent: int = 0
    """Every request, warm-ups included: what the spans exported are counted against."""


@contextmanager
def otel_env(variables: dict[str, str]) -> Iterator[None]:
    """The OTEL_* variables the processes started inside inherit (none: tracing off)."""
    saved = {name: os.environ.pop(name, None) for name in OTEL_VARIABLES}
    os.environ.update(variables)
    try:
        yield
    finally:
        for name in OTEL_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update({k: v for k, v in saved.items() if v is not None})


def run_case(case: Case, duration_s: int) -> None:
    load = wrk.Load(json.dumps(BODY), 200, ('"done":true', '"response":"'))
    url = case.stack.url + "/api/generate"
    warm = wrk.run(url, load, "warm-up", duration_s=WARMUP_S, connections=CONNECTIONS)
    cpu0 = {name: cpu_s(pid) for name, pid in case.pids.items()}
    result = wrk.run(url, load, case.name, duration_s=duration_s, connections=CONNECTIONS)
    result.check(case.name)
    for name, pid in case.pids.items():
        case.cpu_s[name] = case.cpu_s.get(name, 0.0) + cpu_s(pid) - cpu0[name]
    case.rates.append(result.rate)
    case.jobs += result.requests
    case.sent += warm.requests + result.requests


def main(argv: list[str] | None = None) -> None:
    args = report.arguments("tracing", __doc__).parse_args(argv)
    quick = report.is_quick(args, "tracing")
    rounds, duration_s = (QUICK_ROUNDS, QUICK_DURATION_S) if quick else (ROUNDS, DURATION_S)
    wrk.require()
    sink = Sink()
    sim = start_sim("--tokens", "5", "--token-delay", "0", "--parallel", "512")
    redis_server = start_redis()
    stacks: list[Stack] = []
    try:
        cases = []
        endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": sink.url}
        variants: tuple[tuple[str, dict[str, str]], ...] = (
            ("off", {}),
            ("on", endpoint),
            ("on, 10 % sampled", endpoint | SAMPLED_10),
        )
        for db, (name, variables) in enumerate(variants, start=1):
            redis_url = f"redis://127.0.0.1:{redis_server.port}/{db}"
            with otel_env({**variables, "OTEL_SERVICE_NAME": f"bench-{db}"}):
                stack = start_stack(sim.url, redis_url, **GATEWAY)  # type: ignore[arg-type]
            stacks.append(stack)
            pids = {"api": stack.apis[0].pid, "worker": stack.workers[0].pid}
            cases.append(Case(name, stack, {**pids, "redis": redis_server.pid}))
        for r in range(rounds):
            for case in cases[r % len(cases) :] + cases[: r % len(cases)]:  # order rotates
                run_case(case, duration_s)
                print(f"round {r + 1}: {case.name} {case.rates[-1]:.0f} req/s", flush=True)
        load_avg = os.getloadavg()[0]
        for case in cases:
            case.stack.stop()  # its providers export what they still hold as they exit
        exported = {case.name: sink.spans[f"bench-{db}"] for db, case in enumerate(cases, 1)}
        text = render(cases, rounds, duration_s, load_avg, exported)
        print(text)
        report.publish("tracing", text, quick=quick, command="python -m bench.tracing")
    finally:
        for stack in stacks:
            stack.stop()
        redis_server.stop()
        sim.stop()
        sink.close()


def render(
    cases: list[Case], rounds: int, duration_s: int, load_avg: float, spans: dict[str, int]
) -> str:
    lines = [
        f"Tiny non-streamed `/api/generate` jobs through one API and one worker, `wrk -t1 "
        f"-c{CONNECTIONS} -d{duration_s}s` in {rounds} interleaved rounds (order rotating), "
        f"tracing off, on (OTLP/HTTP to a counting sink on loopback, SDK defaults), and on "
        f"with 10 % of the traces sampled (`OTEL_TRACES_SAMPLER=parentbased_traceidratio`, "
        f"`OTEL_TRACES_SAMPLER_ARG=0.1`); "
        f"CPU of each process per job, summed over the rounds. Load average at the end: "
        f"{load_avg:.1f} (the machine is shared: compare the columns, not other sections).",
        "",
        "| tracing | req/s (median) | req/s per round | API CPU ms/job | worker CPU ms/job "
        "| Redis CPU ms/job | spans exported per request sent |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in cases:
        per_job = {k: 1000 * v / max(1, case.jobs) for k, v in case.cpu_s.items()}
        exported = f"{spans[case.name] / max(1, case.sent):.2f}"
        lines.append(
            f"| {case.name} | **{statistics.median(case.rates):.0f}** | "
            f"{' / '.join(f'{r:.0f}' for r in case.rates)} | {per_job['api']:.3f} | "
            f"{per_job['worker']:.3f} | {per_job['redis']:.3f} | {exported} |"
        )
    ms = {c.name: sum(c.cpu_s.values()) * 1000 / max(1, c.jobs) for c in cases}
    off, on, sampled = ms["off"], ms["on"], ms["on, 10 % sampled"]
    lines += [
        "",
        f"Tracing on costs **{on - off:.3f} ms of CPU per job** (API + worker + Redis: "
        f"{off:.3f} off, {on:.3f} on, {100 * (on / off - 1):+.0f} %); with 10 % sampled, "
        f"**{sampled - off:.3f} ms** ({100 * (sampled / off - 1):+.0f} %). "
        f"{SPANS_PER_JOB} spans per traced job are expected (a little more per request sent: "
        f"wrk does not count the requests still in flight when it stops; fewer: the batch "
        f"processor dropped some, its queue of 2,048 full, which OTEL_BSP_MAX_QUEUE_SIZE "
        f"raises).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
