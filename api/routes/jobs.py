"""Async jobs: submit, read (optionally waiting), cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import JSONResponse

from api.bodies import JobBody, check_inference
from api.edge import MAX_IDEMPOTENCY_KEY, admission
from api.identity import identify
from api.jobs import cancel_job, read_job, wait_job
from api.state import gate

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202)
async def submit_job(
    request: Request,
    body: JobBody,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)] = None,
) -> JSONResponse:
    # Admitted at the edge (api/edge.py); `body` and `idempotency_key` are declared here
    # for FastAPI's validation and the OpenAPI schema.
    check_inference(body.endpoint, body.body, prefix="body.")
    admitted = admission(request)
    view = await read_job(gate(request), admitted.owner, admitted.job_id)
    return JSONResponse(
        view.public(),
        202,
        headers={"Location": f"/v1/jobs/{admitted.job_id}", **admitted.rate_limit.headers()},
    )


@router.get("/v1/jobs/{job_id}")
async def get_job(
    request: Request,
    job_id: str,
    wait: Annotated[
        float | None, Query(gt=0, le=60, description="Seconds to wait for the end")
    ] = None,
) -> dict[str, Any]:
    g = gate(request)
    who = identify(request, g.keyring, g.trusted, g.settings.require_api_key)
    view = await wait_job(g, who.owner, job_id, wait or 0)
    return view.public()


@router.delete("/v1/jobs/{job_id}")
async def delete_job(request: Request, job_id: str) -> dict[str, Any]:
    g = gate(request)
    who = identify(request, g.keyring, g.trusted, g.settings.require_api_key)
    await cancel_job(g, who.owner, job_id)
    return (await read_job(g, who.owner, job_id)).public()
