"""Prometheus metrics. Per-process counters (requests, rejections) live here; queue-wide
gauges and the queue-wait and job-duration histograms are read from Redis at scrape time,
so every API instance reports the same truth."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shared.jobs import JobStatus
from shared.scripts import HISTOGRAMS, AdmitOutcome, histogram_field

if TYPE_CHECKING:
    from api.snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

REJECTIONS = tuple(
    outcome.value
    for outcome in AdmitOutcome
    if outcome not in (AdmitOutcome.ADMITTED, AdmitOutcome.EXISTING, AdmitOutcome.CONFLICT)
)
"""Why admission refused: one name each, in /metrics, /admin/status and Redis's stats."""
EDGE_REJECTIONS = ("invalid_api_key", "model_not_allowed")
"""Refused at the edge before admission (this API process only; not in Redis's stats)."""


class _QueueCollector(Collector):
    """Yields the last snapshot read from Redis (set just before each scrape)."""

    def __init__(self) -> None:
        self.snapshot: Snapshot | None = None

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot
        if snap is None:
            return
        backlog = snap.backlog
        yield _gauge("gpugate_queue_depth", "Jobs admitted and not yet running.", backlog.depth)
        yield _gauge("gpugate_running_jobs", "Jobs holding a GPU slot.", backlog.running)
        yield _gauge("gpugate_gpu_concurrency", "The fleet's GPU-slot cap (sum).", backlog.cap)
        yield _gauge("gpugate_workers_alive", "Workers with a recent heartbeat.", len(snap.workers))
        yield _gauge(
            "gpugate_breaker_open",
            "1 while every backend's circuit breaker is open (new work is refused).",
            int(not any(b.healthy for b in snap.queue.backends)),
        )
        for name, doc, value in (
            ("gpugate_backend_running", "Jobs holding a GPU slot on the backend.", "running"),
            ("gpugate_backend_gpu_concurrency", "The backend's GPU-slot cap.", "gpu_concurrency"),
            (
                "gpugate_backend_effective_concurrency",
                "The cap dispatch fills now: the backend's, or below it what adaptive "
                "concurrency found.",
                "effective_concurrency",
            ),
            ("gpugate_backend_up", "1 unless the backend's circuit breaker is open.", "healthy"),
        ):
            family = GaugeMetricFamily(name, doc, labels=["backend"])
            for b in snap.queue.backends:
                family.add_metric([b.name], float(b.public()[value]))
            yield family
        loads = CounterMetricFamily(
            "gpugate_model_loads", "Model loads seen on a backend.", labels=["backend", "model"]
        )
        for (backend, model), count in sorted(snap.model_loads.items()):
            loads.add_metric([backend, model], count)
        yield loads
        tokens = CounterMetricFamily(
            "gpugate_key_tokens",
            "Tokens served per named key (else `anonymous`), fleet-wide.",
            labels=["key", "kind"],
        )
        for key, usage in sorted(snap.usage.items()):
            for kind in ("input", "output"):
                tokens.add_metric([key, kind], usage.get(f"{kind}_tokens", 0.0))
        yield tokens
        yield _gauge(
            "gpugate_estimated_wait_seconds",
            "Estimated queue wait of a job admitted now.",
            backlog.queue_wait_s(),
        )
        yield _gauge(
            "gpugate_mean_job_seconds", "Measured mean job duration (EWMA).", backlog.mean_job_s
        )
        finals = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)
        for name, doc, label, prefix, values in (
            (
                "gpugate_jobs",
                "Jobs by final status, across all workers.",
                "status",
                "jobs_",
                ("admitted", *finals, "requeued"),
            ),
            (
                "gpugate_session_dispatch",
                "Jobs of a session by where they went: kept on its backend, moved, or new.",
                "outcome",
                "session_",
                ("kept", "moved", "new"),
            ),
            (
                "gpugate_batch_lines",
                "Batch lines by how they ended: completed, failed, cancelled or expired before "
                "they started.",
                "outcome",
                "batch_lines_",
                ("completed", "failed", "cancelled", "expired"),
            ),
            (
                "gpugate_ollama_errors",
                "Failed Ollama calls by kind, across all workers.",
                "kind",
                "errors_",
                ("ollama_error", "backend_error", "timeout"),
            ),
        ):
            counter = CounterMetricFamily(name, doc, labels=[label])
            for value in values:
                counter.add_metric([value], snap.stats.get(prefix + value, 0.0))
            yield counter
        for name, doc in (
            ("queue_wait_seconds", "Time from admission to the start on a GPU slot."),
            ("job_duration_seconds", "Time a job held its GPU slot."),
        ):
            raw = snap.histograms.get(name, {})
            buckets, total = [], 0.0
            for bound in HISTOGRAMS[name]:
                total += raw.get(histogram_field(bound), 0.0)
                buckets.append((str(bound), total))
            buckets.append(("+Inf", total + raw.get("+Inf", 0.0)))
            yield HistogramMetricFamily(
                f"gpugate_{name}", doc, buckets=buckets, sum_value=raw.get("sum", 0.0)
            )


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class _BudgetCollector(Collector):
    """Each key's use of its budget in the current period (set just before each scrape)."""

    def __init__(self) -> None:
        self.used: dict[str, float] = {}

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "gpugate_key_budget_used_tokens",
            "Tokens a key with a budget used (and has reserved) in the current period.",
            labels=["key"],
        )
        for key, used in sorted(self.used.items()):
            family.add_metric([key], used)
        yield family


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpugate_requests",
            "HTTP requests by route and status (this API process).",
            ["endpoint", "status"],
            registry=self.registry,
        )
        self.rejections = Counter(
            "gpugate_rejections",
            "Requests refused at admission, by reason (this API process).",
            ["reason"],
            registry=self.registry,
        )
        self._rejected = {
            reason: self.rejections.labels(reason) for reason in (*REJECTIONS, *EDGE_REJECTIONS)
        }
        self._requests: dict[tuple[str, int], Counter] = {}
        self.queue = _QueueCollector()
        self.registry.register(self.queue)
        self.budgets = _BudgetCollector()
        self.registry.register(self.budgets)

    def request_done(self, path: str, status: int) -> None:
        counter = self._requests.get((path, status))
        if counter is None:  # prometheus_client's labels() costs more than the count
            counter = self._requests[path, status] = self.requests.labels(path, str(status))
        counter.inc()

    def admission(self, outcome: str) -> None:
        counter = self._rejected.get(outcome)
        if counter is not None:
            counter.inc()

    def render(self, snapshot: Snapshot) -> bytes:
        self.queue.snapshot = snapshot
        return generate_latest(self.registry)


EDGE_ROUTE = "gpugate.route"
"""Scope key naming the route of a request that `api.edge` answered before routing."""


class RequestMetrics:
    """ASGI middleware counting responses by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, record)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", None) or scope.get(EDGE_ROUTE, "unmatched")
            self.metrics.request_done(path, status)
