"""The gpugate API: `create_app(settings)` builds it; its lifespan opens and closes the
Redis clients and the HTTP client to Ollama. Nothing connects at import.

One request's path: api/edge.py (body, identity, admission: api/admission.py, which runs
shared/lua/admit.lua through shared/scripts.py) → its route (api/routes/) → api/relay.py,
which relays the job's events as the worker (worker/jobs.py) writes them.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI

from api import errors
from api.apikeys import KeyStore
from api.body_limit import BodyLimit
from api.edge import AdmissionEdge
from api.inbox import Inbox
from api.metrics import Metrics, RequestMetrics
from api.routes import (
    admin,
    batches,
    console,
    inference,
    jobs,
    keys,
    models,
    service,
    webhooks,
)
from api.state import Gate
from api.tiers import Keyring
from api.webhooks import FileKeyMirror
from shared import telemetry
from shared.redis import store
from shared.redis.lane import Lane
from shared.scripts import Scripts
from shared.settings import Settings

log = logging.getLogger("gpugate.api")


def _native_telemetry_off() -> dict[str, Any]:
    """FastAPI (0.16x) traces, meters and logs by itself once an OpenTelemetry provider is
    set, and asks the providers on every request to learn whether it should: gpugate's
    spans are its own (api/tracing.py), and the request path must not pay for them."""
    if "telemetry" not in inspect.signature(FastAPI.__init__).parameters:
        return {}
    off = ("tracing", "metrics", "logs", "operation_spans", "auto_configure")
    return {"telemetry": dict.fromkeys(off, False)}


def create_app(settings: Settings) -> FastAPI:
    keyring = Keyring.from_settings(settings)  # a bad keys file stops start-up here
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        redis = store.connect(settings.redis_url)
        blocking_redis = store.connect(settings.redis_url, blocking=True)
        http = httpx.AsyncClient(timeout=httpx.Timeout(10.0, connect=2.0))
        lane = Lane(settings.redis_url)
        inbox = Inbox(blocking_redis)
        key_store = KeyStore(redis, keyring)
        webhook_mirror = FileKeyMirror(redis, keyring)
        app.state.gate = Gate(
            settings=settings,
            redis=redis,
            blocking_redis=blocking_redis,
            scripts=Scripts(redis.execute_command),
            lane=lane,
            lane_scripts=Scripts(lane.execute),
            inbox=inbox,
            http=http,
            keyring=keyring,
            key_store=key_store,
            trusted=settings.trusted_networks,
            metrics=metrics,
        )
        inbox.start()
        await key_store.start()
        await webhook_mirror.start()
        try:
            yield
        finally:
            await webhook_mirror.stop()
            await key_store.stop()
            await inbox.stop()
            await http.aclose()
            await lane.aclose()
            await blocking_redis.aclose()
            await redis.aclose()

    app = FastAPI(
        title="gpugate",
        summary="Admission gateway for Ollama GPUs",
        version="0.1.0",
        lifespan=lifespan,
        **_native_telemetry_off(),
    )
    errors.install(app)
    for module in (inference, jobs, batches, models, service, admin, keys, webhooks, console):
        app.include_router(module.router)
    app.add_middleware(AdmissionEdge)  # innermost: it needs the body BodyLimit has read
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, file_bytes=settings.max_batch_file_bytes
    )
    app.add_middleware(RequestMetrics, metrics=metrics)
    if telemetry.ENABLED:  # outermost; off, no request meets it (shared/telemetry.py)
        from api.tracing import ServerSpans

        app.add_middleware(ServerSpans)
    return app
