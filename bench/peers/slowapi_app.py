"""The slowapi peer: the same route and body behind slowapi's decorator with Redis storage,
as slowapi's README sets it up (a module-level `Limiter`, `app.state.limiter`, its 429
handler), keyed by the `X-API-Key` header.

`BENCH_SLOWAPI_REDIS_URL` names the Redis; `BENCH_SLOWAPI_LIMIT` the limit per key
(default `1/hour`, the limit of gpugate's stacks in the benchmark). slowapi's
warning log line per rejection is switched off, so the benchmark compares the limiters,
not the logging. Run with `python -m uvicorn bench.peers.slowapi_app:app`.
"""

from __future__ import annotations

import logging
import os
import secrets

from fastapi import FastAPI, Request
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.responses import JSONResponse

from api.bodies import JobBody

LIMIT = os.environ.get("BENCH_SLOWAPI_LIMIT", "1/hour")


def api_key(request: Request) -> str:
    return request.headers.get("x-api-key") or get_remote_address(request)


logging.getLogger("slowapi").setLevel(logging.ERROR)
limiter = Limiter(key_func=api_key, storage_uri=os.environ["BENCH_SLOWAPI_REDIS_URL"])
app = FastAPI(title="slowapi peer")
app.state.limiter = limiter
app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)


@app.post("/v1/jobs", status_code=202)
@limiter.limit(LIMIT)
async def submit_job(request: Request, body: JobBody) -> JSONResponse:
    return JSONResponse({"id": secrets.token_urlsafe(16), "status": "queued"}, 202)
