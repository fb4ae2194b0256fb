"""`gpugate doctor` and `gpugate concurrency`: what an operator saves, and the live cap."""

from __future__ import annotations

import json
import sys
import time
from importlib import metadata
from typing import Any

import httpx

from shared import keys, store
from shared.settings import Settings

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
        cap = await redis.get(keys.CAP)
        return {
            "redis_version": info.get("redis_version"),
            "used_memory_human": info.get("used_memory_human"),
            "maxmemory_policy": info.get("maxmemory_policy"),
            "gpu_concurrency": int(cap) if cap else settings.gpu_concurrency,
            "gpu_concurrency_source": "live (Redis)" if cap else "GPUGATE_GPU_CONCURRENCY",
            "queue_depth": await redis.zcard(keys.QUEUED),
            "running": await redis.zcard(keys.RUNNING),
            "workers": live,
        }
    except store.DRIVER_ERRORS as exc:
        return {"error": f"Redis unreachable: {exc}"}
    finally:
        await redis.aclose()


async def _ollama_facts(settings: Settings) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            version = (await http.get(settings.ollama_url + "/api/version")).json()
            tags = (await http.get(settings.ollama_url + "/api/tags")).json()
        except (httpx.HTTPError, ValueError) as exc:
            return {"error": f"Ollama unreachable: {exc.__class__.__name__}: {exc}"}
    return {
        "version": version.get("version"),
        "models": [m.get("name") for m in tags.get("models", [])],
    }


async def doctor(settings: Settings) -> None:
    report = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": _versions(),
        "settings": settings.masked(),
        "redis": await _redis_facts(settings),
        "ollama": await _ollama_facts(settings),
    }
    print(json.dumps(report, indent=2))


async def concurrency(settings: Settings, cap: int | None, *, reset: bool = False) -> None:
    if cap is not None and not 1 <= cap <= 1024:
        sys.exit("gpugate: the cap must be between 1 and 1024")
    redis = store.connect(settings.redis_url)
    try:
        if reset or cap is not None:
            async with redis.pipeline(transaction=True) as pipe:
                if reset:
                    pipe.delete(keys.CAP)
                else:
                    pipe.set(keys.CAP, str(cap))
                pipe.publish(keys.SLOTS_CHANNEL, "cap")
                await pipe.execute()
        current = await redis.get(keys.CAP)
        running = await redis.zcard(keys.RUNNING)
    except store.DRIVER_ERRORS as exc:
        sys.exit(f"gpugate: Redis unreachable at {settings.masked()['GPUGATE_REDIS_URL']}: {exc}")
    finally:
        await redis.aclose()
    value = int(current) if current else settings.gpu_concurrency
    source = "set live" if current else "from GPUGATE_GPU_CONCURRENCY"
    print(f"gpu_concurrency={value} ({source}); running={running}")
