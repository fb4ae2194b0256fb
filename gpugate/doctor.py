"""`gpugate doctor` and `gpugate concurrency`: what an operator saves, and the live cap.

`gpugate doctor` prints one JSON object: `time`, `versions`, `settings` (secrets masked),
`redis` (server facts, the backends' caps and running jobs, the queue, live workers, and
`replication`: the master the URL leads to, through the Sentinels for a
`redis+sentinel://` URL, its replicas with their lag, what each Sentinel names, and
`warnings` when replication cannot give what GPUGATE_REDIS_MIN_REPLICAS asks) and
`ollama` (each backend's kind, version and models: an `openai` backend's from its
/v1/models, its api_key masked).
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict
from importlib import metadata
from typing import Any

import httpx
from redis.exceptions import RedisError

from api.snapshot import read_queue
from shared import keys
from shared.errors import InvalidRequest, RedisUnavailable
from shared.fleet import backend_named, set_cap
from shared.redis import store
from shared.redis.url import parse_sentinel
from shared.settings import Backend, Settings

PACKAGES = (
    "gpugate",
    "fastapi",
    "starlette",
    "uvicorn",
    "arq",
    "redis",
    "httpx",
    "pydantic",
    "pydantic-settings",
    "prometheus-client",
)


def _versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


async def _redis_facts(settings: Settings) -> dict[str, Any]:
    redis = store.connect(settings.redis_url)
    try:
        info = await redis.info()
        now_s, _ = await redis.time()
        workers = await redis.zrange(keys.WORKERS, 0, -1, withscores=True)
        live = []
        for worker_id, beat_ms in workers:
            age = now_s - beat_ms / 1000
            if age <= settings.lease_ttl * 3:
                raw = await redis.hget(keys.worker(worker_id.decode()), "info")  # type: ignore[misc]
                live.append(
                    {
                        "id": worker_id.decode(),
                        "heartbeat_age_s": round(age, 2),
                        **(json.loads(raw) if raw else {}),
                    }
                )
        queue = await read_queue(redis, settings)
        return {
            "redis_version": info.get("redis_version"),
            "used_memory_human": info.get("used_memory_human"),
            "maxmemory_policy": info.get("maxmemory_policy"),
            "gpu_concurrency": queue.backlog.cap,
            "backends": [b.public() for b in queue.backends],
            "queue_depth": queue.backlog.depth,
            "running": queue.backlog.running,
            "workers": live,
        }
    except RedisUnavailable as exc:
        return {"error": f"Redis unreachable: {exc.__cause__ or exc}"}
    except store.DRIVER_ERRORS as exc:
        return {"error": f"Redis unreachable: {exc}"}
    finally:
        await redis.aclose()


async def _replication_facts(settings: Settings) -> dict[str, Any]:
    """Where GPUGATE_REDIS_URL leads and how its replicas keep up (INFO replication on
    the master; for a `redis+sentinel://` URL, the master the Sentinels name)."""
    sentinel = parse_sentinel(settings.redis_url) is not None
    try:
        found = await store.replication(settings.redis_url)
    except (*store.DRIVER_ERRORS, RedisError) as exc:
        via = "through the Sentinels " if sentinel else ""
        return {"error": f"no master found {via}({exc.__class__.__name__}: {exc})"}
    online = [r for r in found.replicas if r.state == "online"]
    facts: dict[str, Any] = {
        "via": "sentinel" if sentinel else "direct",
        "master": found.master,
        "role": found.role,
        "master_repl_offset": found.master_repl_offset,
        "connected_replicas": len(found.replicas),
        "replicas": [asdict(r) for r in found.replicas],
    }
    if sentinel:
        facts["sentinels"] = [asdict(v) for v in found.sentinels]
    warnings = []
    if found.role != "master":
        warnings.append(
            f"GPUGATE_REDIS_URL leads to a {found.role}, not the master: every write fails"
        )
    wanted = settings.redis_min_replicas
    if wanted and len(online) < wanted:
        warnings.append(
            f"GPUGATE_REDIS_MIN_REPLICAS={wanted} but {len(online)} replica(s) online: "
            "admissions are answered 503 until enough replicas acknowledge"
        )
    for view in found.sentinels:
        if view.master != found.master:
            said = f"names {view.master}" if view.master else f"has no answer ({view.error})"
            warnings.append(f"Sentinel {view.address} {said}, not {found.master}")
    facts["warnings"] = warnings
    return facts


async def _backend_facts(http: httpx.AsyncClient, backend: Backend) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "name": backend.name,
        "kind": backend.kind,
        "url": backend.url,
        "gpu_concurrency": backend.gpu_concurrency,
    }
    if backend.api_key is not None:
        facts["api_key"] = "********"
    if backend.models is not None:
        facts["configured_models"] = list(backend.models)
    if backend.openai:
        return {**facts, **await _openai_facts(http, backend)}
    try:
        version = (await http.get(backend.url + "/api/version")).json()
        tags = (await http.get(backend.url + "/api/tags")).json()
    except (httpx.HTTPError, ValueError) as exc:
        return {**facts, "error": f"Ollama unreachable: {exc.__class__.__name__}: {exc}"}
    return {
        **facts,
        "version": version.get("version"),
        "models": [m.get("name") for m in tags.get("models", [])],
    }


async def _openai_facts(http: httpx.AsyncClient, backend: Backend) -> dict[str, Any]:
    """An OpenAI-compatible server: its health (/health, else /v1/models) and models."""
    headers = backend.auth_headers()
    try:
        health = await http.get(backend.url + "/health", headers=headers)
        listed = await http.get(backend.url + "/v1/models", headers=headers)
        models = [m.get("id") for m in listed.json().get("data", [])] if listed.is_success else []
    except (httpx.HTTPError, ValueError, AttributeError) as exc:
        return {"error": f"unreachable: {exc.__class__.__name__}: {exc}"}
    healthy = health.status_code == 200 or listed.status_code == 200
    facts: dict[str, Any] = {"healthy": healthy, "models": models}
    if not listed.is_success:
        facts["error"] = f"GET /v1/models answered {listed.status_code}"
    return facts


async def _ollama_facts(settings: Settings) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(timeout=5) as http:
        return list(await asyncio.gather(*(_backend_facts(http, b) for b in settings.backends)))


async def doctor(settings: Settings) -> None:
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "settings": settings.masked(),
        "redis": {
            **await _redis_facts(settings),
            "replication": await _replication_facts(settings),
        },
        "ollama": await _ollama_facts(settings),
    }
    print(json.dumps(report, indent=2))


async def concurrency(
    settings: Settings, cap: int | None, *, backend: str | None = None, reset: bool = False
) -> None:
    if cap is not None and not 1 <= cap <= 1024:
        sys.exit("gpugate: the cap must be between 1 and 1024")
    redis = store.connect(settings.redis_url)
    try:
        if reset or cap is not None:
            name = backend_named(settings, backend)
            if reset:
                await redis.hdel(keys.FLEET, keys.cap_field(name))  # type: ignore[misc]
            else:
                await set_cap(redis, name, cap or 1)
        queue = await read_queue(redis, settings)
    except InvalidRequest as exc:
        sys.exit(f"gpugate: {exc.message.replace('backend: ', '--backend: ')}")
    except RedisUnavailable as exc:
        url = settings.masked()["GPUGATE_REDIS_URL"]
        sys.exit(f"gpugate: Redis unreachable at {url}: {exc.__cause__ or exc}")
    finally:
        await redis.aclose()
    for b in queue.backends:
        configured = settings.backend(b.name)
        source = (
            "set live"
            if configured and b.gpu_concurrency != configured.gpu_concurrency
            else "configured"
        )
        print(f"{b.name}: gpu_concurrency={b.gpu_concurrency} ({source}); running={b.running}")
    if len(queue.backends) > 1:
        print(f"fleet: gpu_concurrency={queue.backlog.cap}; running={queue.backlog.running}")
