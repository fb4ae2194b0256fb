"""The app: the routes of the inference, metadata, model management and control APIs."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from gpugate.sim.apis import PLAIN_JSON_TYPE, Api, ApiError
from gpugate.sim.asgi import error_response, json_response, native_errors
from gpugate.sim.config import SimConfig
from gpugate.sim.golang import decode_object
from gpugate.sim.inference import InferenceEndpoint
from gpugate.sim.management import ModelManagement
from gpugate.sim.models import SimModel
from gpugate.sim.names import display_name, name_parts
from gpugate.sim.performance import PerformanceConfig
from gpugate.sim.requests import name_field
from gpugate.sim.simulator import Simulator

OLLAMA_VERSION = "0.6.0"


def openai_model(model: SimModel, name: str) -> dict[str, Any]:
    """openai.ToModel / ToListCompletion: `id` as asked, owned by the name's namespace."""
    created = int(model.modified_at.timestamp())
    owner = (name_parts(name) or {}).get("namespace", "library")
    return {"id": name, "object": "model", "created": created, "owned_by": owner}


async def _request_json(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def exact_route(path: str, endpoint: Callable[..., Any], methods: list[str]) -> Route:
    """A route answering exactly `methods` (Starlette adds HEAD to a GET route; Gin does not)."""
    route = Route(path, endpoint, methods=methods)
    route.methods = set(methods)
    return route


def metadata_routes(sim: Simulator) -> list[Route]:
    async def root(request: Request) -> Response:
        return PlainTextResponse("Ollama is running")

    async def version(request: Request) -> Response:
        return json_response({"version": OLLAMA_VERSION})

    async def tags(request: Request) -> Response:
        return json_response({"models": [m.tag_entry() for m in sim.models.values()]})

    async def ps(request: Request) -> Response:
        return json_response({"models": sim.running_models()})

    async def show(request: Request) -> Response:
        data = decode_object(await request.body(), "api.ShowRequest", "missing request body")
        name = name_field("api.ShowRequest", data)
        if not name:
            return error_response(400, "model is required")
        model = sim.find_model(name)
        if model is None:
            return error_response(404, f"model '{display_name(name)}' not found")
        return json_response(model.show())

    async def v1_models(request: Request) -> Response:
        data = [openai_model(model, model.name) for model in sim.models.values()]
        return json_response({"object": "list", "data": data}, media_type=PLAIN_JSON_TYPE)

    async def v1_model(request: Request) -> Response:
        name = request.path_params["model"]
        model = sim.find_model(name)
        if model is None:
            error = ApiError(404, f"model '{display_name(name)}' not found").body(Api.OPENAI_CHAT)
            return json_response(error, 404, media_type=PLAIN_JSON_TYPE)
        return json_response(openai_model(model, name), media_type=PLAIN_JSON_TYPE)

    return [
        Route("/", root, methods=["GET", "HEAD"]),
        Route("/api/version", version, methods=["GET", "HEAD"]),
        Route("/api/tags", tags, methods=["GET", "HEAD"]),
        exact_route("/api/ps", ps, ["GET"]),
        Route("/api/show", native_errors(show), methods=["POST"]),
        exact_route("/v1/models", v1_models, ["GET"]),
        exact_route("/v1/models/{model:path}", v1_model, ["GET"]),
    ]


def control_routes(sim: Simulator) -> list[Route]:
    async def stats(request: Request) -> Response:
        return json_response(sim.snapshot(), media_type=PLAIN_JSON_TYPE)

    async def reset(request: Request) -> Response:
        sim.stats.reset()
        return json_response(sim.snapshot(), media_type=PLAIN_JSON_TYPE)

    async def config(request: Request) -> Response:
        changes = await _request_json(request)
        if not isinstance(changes, dict):
            return json_response({"error": "expected a JSON object"}, 400, PLAIN_JSON_TYPE)
        try:
            sim.reconfigure(changes)
        except ValueError as exc:
            return json_response({"error": str(exc)}, 400, PLAIN_JSON_TYPE)
        return json_response(sim.settings(), media_type=PLAIN_JSON_TYPE)

    async def performance(request: Request) -> Response:
        return json_response(sim.performance.listed(), media_type=PLAIN_JSON_TYPE)

    return [
        Route("/sim/stats", stats, methods=["GET"]),
        Route("/sim/reset", reset, methods=["POST"]),
        Route("/sim/config", config, methods=["PUT"]),
        Route("/sim/performance", performance, methods=["GET"]),
    ]


async def _gin_error(request: Request, exc: Exception) -> Response:
    """Gin's answer to an unknown path, or to a known path with another method."""
    if isinstance(exc, HTTPException) and exc.status_code == 405:
        return PlainTextResponse("405 method not allowed", status_code=405)
    return PlainTextResponse("404 page not found", status_code=404)


_INFERENCE_PATHS = {
    "/api/generate": Api.GENERATE,
    "/api/chat": Api.CHAT,
    "/api/embed": Api.EMBED,
    "/api/embeddings": Api.EMBEDDINGS,
    "/v1/chat/completions": Api.OPENAI_CHAT,
    "/v1/completions": Api.OPENAI_COMPLETION,
    "/v1/embeddings": Api.OPENAI_EMBEDDINGS,
    "/v1/responses": Api.OPENAI_RESPONSES,
    "/v1/messages": Api.ANTHROPIC_MESSAGES,
}


def create_app(config: SimConfig, performance: PerformanceConfig | None = None) -> ASGIApp:
    """The simulator as an ASGI app; its Simulator is at `app.state.sim`."""
    sim = Simulator(config, performance)
    inference = [
        Route(path, InferenceEndpoint(sim, api), methods=["POST"])
        for path, api in _INFERENCE_PATHS.items()
    ]
    routes = [
        *inference,
        *metadata_routes(sim),
        *ModelManagement(sim).routes(),
        *control_routes(sim),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: _gin_error})
    app.state.sim = sim
    return app
