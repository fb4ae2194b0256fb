"""Synchronous inference: every inference path Ollama serves (shared/endpoints.py).

The edge (api/edge.py) admits each request and relays its job's answer itself
(api/relay.py); these routes document each path, its body from the model the edge checks
(api/bodies.py), and answer what the edge did not take as `sync_inference` would have
(a request whose body it never saw: 422).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.responses import Response

from api.bodies import BODIES
from api.dependencies import AdmittedJob, GateDep
from api.relay import JobRelay
from shared.endpoints import INFERENCE

router = APIRouter()


async def sync_inference(admitted: AdmittedJob, gate: GateDep) -> Response:
    return JobRelay.of(gate, admitted)


def body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The OpenAPI request body of a path whose body the edge validates."""
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"application/json": schema}}}


for _path, _model in BODIES.items():
    router.add_api_route(
        _path,
        sync_inference,
        methods=["POST"],
        tags=[INFERENCE[_path].api.value],
        name=f"inference {_path}",
        openapi_extra=body_schema(_model),
        response_class=Response,
    )
