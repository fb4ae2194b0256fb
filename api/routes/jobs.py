"""Async jobs: submit, read (optionally waiting), cancel."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query
from starlette.responses import JSONResponse

from api.bodies import JobBody
from api.dependencies import AdmittedJob, CurrentIdentity, GateDep
from api.edge import MAX_IDEMPOTENCY_KEY
from api.jobs import cancel_job, read_job, wait_job
from api.routes.inference import body_schema
from shared.jobs import JobStatus

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", status_code=202, openapi_extra=body_schema(JobBody))
async def submit_job(
    admitted: AdmittedJob,
    gate: GateDep,
    idempotency_key: Annotated[str | None, Header(max_length=MAX_IDEMPOTENCY_KEY)] = None,
) -> JSONResponse:
    # Checked and admitted at the edge (api/edge.py); the header is declared for the schema.
    job = admitted.job()
    if admitted.status is not JobStatus.QUEUED:  # a replay of a job that has moved on
        job = (await read_job(gate, admitted.owner, admitted.job_id)).public()
    headers = {"Location": f"/v1/jobs/{admitted.job_id}", **admitted.rate_limit.headers()}
    return JSONResponse(job, 202, headers=headers)


@router.get("/v1/jobs/{job_id}")
async def get_job(
    job_id: str,
    gate: GateDep,
    who: CurrentIdentity,
    wait: Annotated[
        float | None, Query(gt=0, le=60, description="Seconds to wait for the end")
    ] = None,
) -> dict[str, Any]:
    view = await wait_job(gate, who.owner, job_id, wait or 0)
    return view.public()


@router.delete("/v1/jobs/{job_id}")
async def delete_job(job_id: str, gate: GateDep, who: CurrentIdentity) -> dict[str, Any]:
    await cancel_job(gate, who.owner, job_id)
    return (await read_job(gate, who.owner, job_id)).public()
