"""One place that turns every error into the SPEC's JSON body."""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse, Response

from shared.errors import GatewayError, InvalidRequest

log = logging.getLogger("gpugate.api")

_HTTP_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "request_too_large",
}


def error_response(error: GatewayError) -> Response:
    """The error's JSON body (orjson: every refusal under load is one of these)."""
    return Response(
        orjson.dumps(error.body()), error.status, error.headers, media_type="application/json"
    )


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(exc)


async def validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    if any(err.get("type") == "json_invalid" for err in errors):
        return error_response(InvalidRequest("The body is not valid JSON.", status=400))
    parts = []
    for err in errors:
        where = [str(p) for p in err.get("loc", ())]  # ("body", "messages", 0, ...)
        loc = ".".join(where[1:]) or "".join(where[:1])  # a missing body is named "body"
        parts.append(f"{loc}: {err['msg']}" if loc else str(err["msg"]))
    return error_response(InvalidRequest("; ".join(parts)))


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = _HTTP_CODES.get(exc.status_code, "error")
    body = {"error": code, "message": str(exc.detail)}
    return JSONResponse(body, exc.status_code, headers=exc.headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return JSONResponse({"error": "internal_error", "message": "Internal gateway error."}, 500)


def install(app: FastAPI) -> None:
    app.add_exception_handler(GatewayError, gateway_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, unexpected_error)
