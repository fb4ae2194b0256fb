"""OpenAI's Files and Batch API, as the `openai` SDK calls them: the work is api/files.py's
and api/batches.py's; every object is its owner's only."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Form, Query, Request, UploadFile
from starlette.responses import Response

from api.batches import BatchBody, cancel_batch, create_batch, list_batches, read_batch
from api.bodies import parse
from api.dependencies import CurrentIdentity, GateDep
from api.files import delete_file, file_content, find_file, list_files, store_file
from api.routes.inference import body_schema

router = APIRouter(tags=["batches"])

Limit = Annotated[int, Query(ge=1, le=100)]


@router.post("/v1/files")
async def upload_file(
    gate: GateDep,
    who: CurrentIdentity,
    file: UploadFile,
    purpose: Annotated[str, Form()],
) -> dict[str, Any]:
    content = await file.read()
    return await store_file(gate, who.owner, file.filename or "", purpose, content)


@router.get("/v1/files")
async def get_files(
    gate: GateDep, who: CurrentIdentity, limit: Limit = 100, after: str | None = None
) -> dict[str, Any]:
    return await list_files(gate, who.owner, limit, after)


@router.get("/v1/files/{file_id}")
async def get_file(file_id: str, gate: GateDep, who: CurrentIdentity) -> dict[str, Any]:
    return (await find_file(gate, who.owner, file_id)).public()


@router.get("/v1/files/{file_id}/content")
async def get_file_content(file_id: str, gate: GateDep, who: CurrentIdentity) -> Response:
    content = await file_content(gate, who.owner, file_id)
    return Response(content, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def remove_file(file_id: str, gate: GateDep, who: CurrentIdentity) -> dict[str, Any]:
    return await delete_file(gate, who.owner, file_id)


@router.post("/v1/batches", openapi_extra=body_schema(BatchBody))
async def new_batch(gate: GateDep, who: CurrentIdentity, request: Request) -> dict[str, Any]:
    # JSON whatever the Content-Type, as every body of gpugate's (api/bodies.py)
    body: BatchBody = parse(BatchBody, await request.body())
    return await create_batch(gate, who, body)


@router.get("/v1/batches")
async def get_batches(
    gate: GateDep, who: CurrentIdentity, limit: Limit = 20, after: str | None = None
) -> dict[str, Any]:
    return await list_batches(gate, who.owner, limit, after)


@router.get("/v1/batches/{batch_id}")
async def get_batch(batch_id: str, gate: GateDep, who: CurrentIdentity) -> dict[str, Any]:
    return await read_batch(gate, who.owner, batch_id)


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel(batch_id: str, gate: GateDep, who: CurrentIdentity) -> dict[str, Any]:
    return await cancel_batch(gate, who.owner, batch_id)
