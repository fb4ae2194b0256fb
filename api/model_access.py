"""What a key with a `models` allow-list sees of the metadata: `/v1/models`, `/api/tags`
and `/api/ps` list only the models it may use; `GET /v1/models/{model}` and
`POST /api/show` of another model answer as Ollama does for a model that does not exist."""

from __future__ import annotations

import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from api.identity import presented_key
from api.state import Gate
from api.tiers import model_allowed

LISTS = {
    "/api/tags": ("models", "name"),
    "/api/ps": ("models", "name"),
    "/v1/models": ("data", "id"),
}
"""The listing paths: the field holding the list, and each entry's model name."""


def allowed_models(gate: Gate, request: Request) -> tuple[str, ...] | None:
    """The caller's allow-list; None: every model. A key known and refused now is 401."""
    key = presented_key(request)
    if key is None:
        return None
    entry = gate.keyring.lookup(key)
    return entry.models if entry is not None else None


def _latest(name: str) -> str:
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


async def hidden(request: Request, path: str, models: tuple[str, ...]) -> Response | None:
    """The answer for a model the key may not see (None: ask the backends)."""
    if path.startswith("/v1/models/"):
        model = request.path_params.get("model", path.removeprefix("/v1/models/"))
        if model_allowed(models, model):
            return None
        message = f"model '{_latest(model)}' not found"
        body = {"error": {"message": message, "type": "api_error", "param": None, "code": None}}
        return JSONResponse(body, 404)
    if path == "/api/show":
        try:
            data = json.loads(await request.body())
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        model = data.get("model") or data.get("name")
        if not isinstance(model, str) or not model or model_allowed(models, model):
            return None
        return JSONResponse({"error": f"model '{_latest(model)}' not found"}, 404)
    return None


def filtered(response: Response, path: str, models: tuple[str, ...]) -> Response:
    """A listing with only the allowed models (other answers as they came)."""
    shape = LISTS.get(path)
    if shape is None or response.status_code != 200 or not response.body:
        return response
    field, name = shape
    try:
        data: Any = json.loads(bytes(response.body))
    except ValueError:
        return response
    if not isinstance(data, dict) or not isinstance(data.get(field), list):
        return response
    data[field] = [
        m for m in data[field] if isinstance(m, dict) and model_allowed(models, str(m.get(name)))
    ]
    return JSONResponse(data, response.status_code)
