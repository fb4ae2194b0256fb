"""Async jobs: submit, read (optionally waiting), cancel."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from starlette.responses import JSONResponse

from api.admission import JobRequest, admit
from api.bodies import JobBody, check_inference
from api.identity import identify
from api.jobs import cancel_job, read_job, wait_job
from api.state import gate

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202)
async def submit_job(
    request: Request,
    body: JobBody,
    idempotency_key: Annotated[str | None, Header(max_length=256)] = None,
) -> JSONResponse:
    g = gate(request)
    who = identify(request, g.keyring, g.trusted, g.settings.require_api_key)
    check_inference(body.endpoint, body.body, prefix="body.")
    job = JobRequest(
        endpoint=body.endpoint,
        body=json.dumps({**body.body, "stream": False}),  # jobs always run unstreamed
        stream=False,
        sync=False,
        deadline_s=body.deadline_s,
        idempotency_key=idempotency_key,
    )
    admitted = await admit(g, who, job)
    view = await read_job(g, who.owner, admitted.job_id)
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
