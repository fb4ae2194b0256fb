"""The bare peer: gpugate's `POST /v1/jobs` route and body model, answering 202 at once.

No identity, no limit, no Redis: what one FastAPI process does for this request when the
admission decision costs nothing. Run with `python -m uvicorn bench.peers.bare:app`.
"""

from __future__ import annotations

import secrets

from fastapi import FastAPI
from starlette.responses import JSONResponse

from api.bodies import JobBody

app = FastAPI(title="bare peer")


@app.post("/v1/jobs", status_code=202)
async def submit_job(body: JobBody) -> JSONResponse:
    return JSONResponse({"id": secrets.token_urlsafe(16), "status": "queued"}, 202)
