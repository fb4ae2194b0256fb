"""Model management: pull, push, create, copy, delete and blobs."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from gpugate.sim.apis import NDJSON_TYPE, PLAIN_JSON_TYPE
from gpugate.sim.asgi import error_response, json_response, native_errors
from gpugate.sim.golang import decode_object, encode_json, typed_field
from gpugate.sim.models import (
    CONFIG_LAYER,
    LICENSE_LAYER,
    MESSAGES_LAYER,
    MODEL_LAYER,
    PARAMS_LAYER,
    SYSTEM_LAYER,
    TEMPLATE_LAYER,
    Layer,
    SimModel,
    config_layer,
)
from gpugate.sim.names import (
    blob_digest,
    blob_path,
    display_name,
    manifest_path,
    model_key,
    valid_model_name,
)
from gpugate.sim.requests import name_field
from gpugate.sim.simulator import Simulator

Progress = AsyncIterator[dict[str, Any]]
"""api.ProgressResponse objects; an `error` (with an HTTP `status`, else 500) ends it."""


async def pull_progress(sim: Simulator, name: str) -> Progress:
    """server.PullModel: manifest, each layer (with total/completed), verify, write."""
    yield {"status": "pulling manifest"}
    have = sim.find_model(name)
    model = have or SimModel.describe(name, datetime.now(UTC))
    for layer in model.layers:
        status = {
            "status": f"pulling {layer.digest[7:19]}",
            "digest": layer.digest,
            "total": layer.size,
        }
        if have is None:  # a new blob starts at 0 (omitted); one on disk is complete at once
            yield status
        yield {**status, "completed": layer.size}
    yield {"status": "verifying sha256 digest"}
    yield {"status": "writing manifest"}
    sim.models[model_key(name)] = replace(model, modified_at=datetime.now(UTC))
    yield {"status": "success"}


async def push_progress(sim: Simulator, name: str) -> Progress:
    """server.PushModel: every layer is already on the registry."""
    yield {"status": "retrieving manifest"}
    model = sim.find_model(name)
    if model is None:
        yield {"status": "couldn't retrieve manifest"}
        yield {"error": f"open {manifest_path(name)}: no such file or directory"}
        return
    for layer in model.layers:
        yield {
            "status": f"pushing {layer.digest[7:19]}",
            "digest": layer.digest,
            "total": layer.size,
            "completed": layer.size,
        }
    yield {"status": "pushing manifest"}
    yield {"status": "success"}


async def create_progress(sim: Simulator, name: str, data: Mapping[str, Any]) -> Progress:
    """server.CreateHandler: from a model (pulled first if unknown) or from uploaded blobs."""
    source = data.get("from")
    files = data.get("files")
    if isinstance(source, str) and source:
        if not valid_model_name(source):
            yield {"error": "invalid model name", "status": 400}
            return
        if sim.find_model(source) is None:
            async for item in pull_progress(sim, source):
                yield item
        base, parent = sim.models[model_key(source)], display_name(source)
    elif isinstance(files, dict) and files:
        missing = [str(d) for d in files.values() if not sim.has_blob(str(d))]
        if missing:
            yield {"error": f"open {blob_path(missing[0])}: no such file or directory"}
            return
        yield {"status": "parsing GGUF"}
        base, parent = _model_from_blobs(sim, name, [str(d) for d in files.values()]), ""
    else:
        yield {"error": "neither 'from' or 'files' was specified", "status": 400}
        return
    model, statuses = derive_model(base, name, data, parent)
    for status in statuses:
        yield {"status": status}
    yield {"status": "writing manifest"}
    sim.models[model_key(name)] = model
    yield {"status": "success"}


def _model_from_blobs(sim: Simulator, name: str, digests: list[str]) -> SimModel:
    described = SimModel.describe(name, datetime.now(UTC))
    keys = [digest.replace("-", ":", 1) for digest in digests]
    blobs = [Layer(MODEL_LAYER, key, sim.blobs.get(key, 0)) for key in keys]
    others = [layer for layer in described.layers if layer.media_type != MODEL_LAYER]
    return replace(described, layers=(*blobs, *others))


def derive_model(
    base: SimModel, name: str, data: Mapping[str, Any], parent: str
) -> tuple[SimModel, list[str]]:
    """The model `create` makes of `base`, and its layers' statuses (server.createModel)."""
    layers = [layer for layer in base.layers if layer.media_type != CONFIG_LAYER]
    changes: dict[str, Any] = {}

    def put(media_type: str, content: str) -> None:
        layers[:] = [layer for layer in layers if layer.media_type != media_type]
        layers.append(Layer.of(media_type, content))

    for key, media_type in (("template", TEMPLATE_LAYER), ("system", SYSTEM_LAYER)):
        if isinstance(data.get(key), str) and data[key]:
            put(media_type, data[key])
            changes[key] = data[key]
    license_text = _license_text(data.get("license"))
    if license_text:
        put(LICENSE_LAYER, license_text)
        changes["license"] = license_text
    if isinstance(data.get("parameters"), dict) and data["parameters"]:
        merged = {**dict(base.parameters), **data["parameters"]}
        put(PARAMS_LAYER, json.dumps(merged))
        changes["parameters"] = tuple(merged.items())
    if isinstance(data.get("messages"), list) and data["messages"]:
        put(MESSAGES_LAYER, json.dumps(data["messages"]))
    known = {layer.digest for layer in base.layers}
    statuses = [
        f"{'using existing' if layer.digest in known else 'creating new'} layer {layer.digest}"
        for layer in layers
    ]
    final = (*layers, config_layer(tuple(layers)))
    digest = hashlib.sha256(json.dumps([layer.digest for layer in final]).encode()).hexdigest()
    model = replace(
        base,
        name=display_name(name),
        digest=digest,
        layers=final,
        parent_model=parent,
        modified_at=datetime.now(UTC),
        **changes,
    )
    return model, statuses


def _license_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(item for item in value if isinstance(item, str))
    return value if isinstance(value, str) else ""


async def progress_response(items: Progress, stream: bool) -> Response:
    """server.streamResponse (NDJSON; an error before any line is a JSON answer with its
    status) or, with `"stream": false`, server.waitForStream (only the last status)."""
    if not stream:
        latest: dict[str, Any] = {}
        async for item in items:
            if "error" in item:
                return _error_response(item)
            latest = item
        return json_response(latest, media_type=PLAIN_JSON_TYPE)
    first = await anext(items, None)
    if first is not None and "error" in first:
        return _error_response(first)

    async def lines() -> AsyncIterator[bytes]:
        if first is not None:
            yield encode_json(first) + b"\n"
        async for item in items:
            yield encode_json({"error": item["error"]} if "error" in item else item) + b"\n"
            if "error" in item:
                return

    return StreamingResponse(lines(), media_type=NDJSON_TYPE)


def _error_response(item: Mapping[str, Any]) -> Response:
    return json_response({"error": item["error"]}, item.get("status", 500), PLAIN_JSON_TYPE)


class ModelManagement:
    """Pull, push, create, copy, delete and blobs, as server/routes.go and create.go answer."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def routes(self) -> list[Route]:
        return [
            Route("/api/pull", native_errors(self.pull), methods=["POST"]),
            Route("/api/push", native_errors(self.push), methods=["POST"]),
            Route("/api/create", native_errors(self.create), methods=["POST"]),
            Route("/api/copy", native_errors(self.copy), methods=["POST"]),
            Route("/api/delete", native_errors(self.delete), methods=["DELETE"]),
            Route("/api/blobs/{digest}", self.blob, methods=["HEAD", "POST"]),
        ]

    @staticmethod
    async def _body(request: Request, struct_name: str) -> dict[str, Any]:
        return decode_object(await request.body(), struct_name, "missing request body")

    async def pull(self, request: Request) -> Response:
        data = await self._body(request, "api.PullRequest")
        name = name_field("api.PullRequest", data).strip()
        if not valid_model_name(name):
            return error_response(400, "invalid model name")
        stream = typed_field("api.PullRequest", data, "stream", bool, True)
        return await progress_response(pull_progress(self.sim, name), stream)

    async def push(self, request: Request) -> Response:
        data = await self._body(request, "api.PushRequest")
        name = name_field("api.PushRequest", data)
        if not name:
            return error_response(400, "model is required")
        stream = typed_field("api.PushRequest", data, "stream", bool, True)
        return await progress_response(push_progress(self.sim, name), stream)

    async def create(self, request: Request) -> Response:
        data = await self._body(request, "api.CreateRequest")
        name = name_field("api.CreateRequest", data)
        if not valid_model_name(name):
            return error_response(400, "invalid model name")
        stream = typed_field("api.CreateRequest", data, "stream", bool, True)
        return await progress_response(create_progress(self.sim, name, data), stream)

    async def copy(self, request: Request) -> Response:
        data = await self._body(request, "api.CopyRequest")
        source = typed_field("api.CopyRequest", data, "source", str, "")
        destination = typed_field("api.CopyRequest", data, "destination", str, "")
        if not valid_model_name(source):
            return error_response(400, f"source {json.dumps(source)} is invalid")
        if not valid_model_name(destination):
            return error_response(400, f"destination {json.dumps(destination)} is invalid")
        model = self.sim.find_model(source)
        if model is None:
            return error_response(404, f"model {json.dumps(source)} not found")
        copied = replace(model, name=display_name(destination), modified_at=datetime.now(UTC))
        self.sim.models[model_key(destination)] = copied
        return Response(status_code=200)

    async def delete(self, request: Request) -> Response:
        data = await self._body(request, "api.DeleteRequest")
        name = name_field("api.DeleteRequest", data).strip()
        if not name:
            return error_response(400, "model is required")
        if not valid_model_name(name):
            return error_response(400, f"name {json.dumps(name)} is invalid")
        if self.sim.models.pop(model_key(name), None) is None:  # a loaded one stays loaded
            return error_response(404, f"model '{name}' not found")
        return Response(status_code=200)

    async def blob(self, request: Request) -> Response:
        """HEAD: is the blob here; POST: upload it (201), checking its digest."""
        digest = request.path_params["digest"]
        if not re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", digest):
            return error_response(400, "invalid digest format")
        if self.sim.has_blob(digest):
            return Response(status_code=200)
        if request.method == "HEAD":
            return error_response(404, f"blob {json.dumps(digest)} not found")
        content = await request.body()
        actual = blob_digest(content)
        if actual != digest:
            expected = f"expected {json.dumps(digest)}, got {json.dumps(actual)}"
            return error_response(400, f"digest mismatch, {expected}")
        self.sim.blobs[digest] = len(content)
        return Response(status_code=201)
