"""Ollama's metadata (no GPU slot, no inference token, the /health limit) and model
management (the admin key, or a tier with `manage_models`; else 403 and nothing reaches
Ollama)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from api import model_access
from api.dependencies import GateDep, presents_admin_key
from api.health_limit import check_cheap_limit
from api.identity import identify
from api.ollama import manage, metadata
from api.paths import without_root
from api.state import Gate
from shared.errors import Forbidden, InvalidApiKey, InvalidRequest
from shared.settings import Backend

router = APIRouter(tags=["ollama"])

BACKEND_HEADER = "x-gpugate-backend"


def ollama_path(request: Request) -> str:
    """The path to ask Ollama for: as the client sent it (still percent-encoded), without
    the `root_path` a server may have put in front."""
    raw: bytes = request.scope.get("raw_path") or request.url.path.encode()
    return without_root(request.scope, raw.decode("latin-1"))


async def relay_metadata(request: Request, gate: GateDep) -> Response:
    await check_cheap_limit(gate, request)
    path = ollama_path(request)
    models = model_access.allowed_models(gate, request)
    if models is None:
        return await metadata(gate, request, path)
    # a key with a `models` allow-list sees only those (api/model_access.py)
    answer = await model_access.hidden(request, path, models)
    if answer is not None:
        return answer
    return model_access.filtered(await metadata(gate, request, path), path, models)


async def relay_model(model: str, request: Request, gate: GateDep) -> Response:
    """`GET /v1/models/{model}`: one model's details (from a backend that has it)."""
    return await relay_metadata(request, gate)


router.add_api_route("/v1/models/{model:path}", relay_model, methods=["GET"], name="metadata model")
for _path, _methods in (
    ("/", ["GET", "HEAD"]),
    ("/api/version", ["GET", "HEAD"]),
    ("/api/tags", ["GET", "HEAD"]),
    ("/api/ps", ["GET"]),
    ("/api/show", ["POST"]),
    ("/v1/models", ["GET"]),
):
    for _method in _methods:
        router.add_api_route(_path, relay_metadata, methods=[_method], name=f"metadata {_path}")


def _may_manage(gate: Gate, request: Request) -> bool:
    if gate.settings.admin_key is not None and request.headers.get("x-admin-key") is not None:
        return presents_admin_key(gate, request)
    try:
        who = identify(request, gate.keyring, gate.trusted, require_key=True)
    except InvalidApiKey:
        return False
    return who.tier.manage_models


def _backend(gate: Gate, request: Request) -> Backend:
    backends = gate.settings.backends
    name = request.headers.get(BACKEND_HEADER)
    if name is None and len(backends) == 1:
        return backends[0]
    backend = gate.settings.backend(name or "")
    if backend is None:
        names = ", ".join(b.name for b in backends if not b.openai)
        raise InvalidRequest(f"X-Gpugate-Backend: name the backend to manage ({names})", status=400)
    if backend.openai:
        raise InvalidRequest(
            f"backend {backend.name!r} is of kind openai: managing models needs Ollama", status=400
        )
    return backend


async def relay_management(request: Request, gate: GateDep) -> Response:
    if not _may_manage(gate, request):
        raise Forbidden(
            "Managing models needs the admin key or a key whose tier may manage models."
        )
    return await manage(gate, request, _backend(gate, request), ollama_path(request))


async def relay_blob(digest: str, request: Request, gate: GateDep) -> Response:
    """`HEAD|POST /api/blobs/{digest}`: a model file, streamed through."""
    return await relay_management(request, gate)


for _method in ("HEAD", "POST"):
    router.add_api_route(
        "/api/blobs/{digest}", relay_blob, methods=[_method], name="manage /api/blobs"
    )
for _path, _methods in (
    ("/api/pull", ["POST"]),
    ("/api/push", ["POST"]),
    ("/api/create", ["POST"]),
    ("/api/copy", ["POST"]),
    ("/api/delete", ["DELETE"]),
):
    for _method in _methods:
        router.add_api_route(_path, relay_management, methods=[_method], name=f"manage {_path}")
