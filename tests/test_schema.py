"""Property-based run of every route in the API's own OpenAPI schema (schemathesis).

A real stack with a live worker, a fast simulator and limits too high to hit: whatever
schemathesis sends (valid bodies, boundary values, wrong types, missing fields), the
gateway never answers 5xx, never hangs, and every error is either its own SPEC JSON
(`{"error": CODE, "message": TEXT}`, Retry-After where the SPEC wants it) or Ollama's own
error relayed unchanged.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.core.transport import Response

from api.app import create_app
from shared.endpoints import INFERENCE as ENDPOINTS
from shared.settings import Settings
from tests.conftest import Stack, build_stack
from tests.processes import Process

API_KEY = "schemathesis-key"
ADMIN_KEY = "schemathesis-admin"
METRICS_TOKEN = "schemathesis-metrics"
HEADERS = {
    "X-API-Key": API_KEY,  # identity: X-API-Key wins over Authorization
    "X-Admin-Key": ADMIN_KEY,
    "Authorization": f"Bearer {METRICS_TOKEN}",  # read by /metrics only
}
MODEL = "llama3.2"
MESSAGES = [{"role": "user", "content": "hi"}]
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": MODEL, "messages": MESSAGES},
    "/v1/completions": {"model": MODEL, "prompt": "hi"},
    "/api/generate": {"model": MODEL, "prompt": "hi"},
    "/api/chat": {"model": MODEL, "messages": MESSAGES},
}
INFERENCE = tuple(ENDPOINTS)
RELAYED = {
    *INFERENCE,
    *("/", "/api/version", "/api/tags", "/api/ps", "/api/show", "/v1/models"),
    *("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete"),
}
"""Paths whose answers may be Ollama's own, relayed (inference, metadata, management)."""
RELAYED_PREFIXES = ("/v1/models/", "/api/blobs/")
SPEC_STATUS = {
    "invalid_request": {400, 422},
    "invalid_api_key": {401},
    "forbidden": {403},
    "not_found": {404},
    "method_not_allowed": {405},
    "conflict": {409},
    "request_too_large": {413},
    "rate_limit_exceeded": {429},
    "queue_full": {429},
    "backend_error": {502},
    "unavailable": {503},
    "timeout": {504},
}
"""The gateway's own error codes (the SPEC's table, and 405 for a wrong method)."""


@pytest.fixture(scope="module")
def schema_stack(redis_proc: Process, sim_proc: Process) -> Iterator[Stack]:
    """Limits out of reach, so that schemathesis tests the routes and not the 429."""
    stack = build_stack(
        redis_proc,
        sim_proc,
        rate_limit="1000000/minute",
        burst=100000,
        health_rate_limit="1000000/minute",
        max_queue_depth=10000,
        gpu_concurrency=8,
        worker_concurrency=16,
        sync_timeout=20,  # the simulator answers in milliseconds: a 504 would be a hang
        job_timeout=20,
        admin_key=ADMIN_KEY,
        metrics_token=METRICS_TOKEN,
    )
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def finished_job(schema_stack: Stack) -> str:
    """A job of API_KEY that has ended: half the job-id cases read or cancel it."""
    with httpx.Client(base_url=schema_stack.url, headers=HEADERS, timeout=30) as client:
        job_id = client.post(
            "/v1/jobs", json={"endpoint": "/api/generate", "body": {"model": "llama3.2"}}
        ).json()["id"]
        done = client.get(f"/v1/jobs/{job_id}", params={"wait": 10}).json()
    assert done["status"] == "succeeded", done
    return str(job_id)


def openapi() -> dict[str, Any]:
    """The schema the API serves at /openapi.json, built without starting anything."""
    return create_app(Settings(_env_file=None, keys_file=None)).openapi()  # type: ignore[call-arg]


# Loaded when the module is collected so that each operation is a test of its own;
# test_the_running_api_serves_this_schema proves it is the one the stack serves.
schema = schemathesis.openapi.from_dict(
    openapi(), config=SchemathesisConfig.from_dict({"seed": 5, "request-timeout": 30})
)


def test_the_running_api_serves_this_schema(schema_stack: Stack) -> None:
    served = httpx.get(schema_stack.url + "/openapi.json", timeout=10)
    assert served.status_code == 200
    assert served.json() == json.loads(json.dumps(openapi()))


def steer(case: Case[Any], finished_job: str) -> None:
    """Random model names and job ids only ever meet a 404: send about half the cases to
    the simulator's model and to a real job instead (chosen from the case: deterministic)."""
    if "job_id" in case.path_parameters and len(str(case.path_parameters["job_id"])) % 2:
        case.path_parameters["job_id"] = finished_job
    body = case.body
    if not isinstance(body, dict) or len(json.dumps(body)) % 2:
        return
    if case.path in INFERENCE and isinstance(body.get("model"), str):
        body["model"] = MODEL
    endpoint = body.get("endpoint")
    if case.path == "/v1/jobs" and isinstance(endpoint, str) and endpoint in VALID:
        inner = body.get("body")
        body["body"] = {**(inner if isinstance(inner, dict) else {}), **VALID[endpoint]}


def assert_relayed_from_ollama(response: Response, sim_url: str) -> None:
    """An error that is not the gateway's must be Ollama's answer to the very same request."""
    path, method = response.request.path_url, response.request.method
    relayed = path.split("?")[0] in RELAYED or path.startswith(RELAYED_PREFIXES)
    assert relayed, f"{method} {path} answered a non-SPEC error: {response.text[:500]}"
    sent = response.request.body or b""
    assert isinstance(sent, bytes | str), f"a streamed request body: {sent!r}"
    direct = httpx.request(
        method,
        sim_url + path,
        content=sent.encode() if isinstance(sent, str) else sent,
        headers={"content-type": "application/json"},
        timeout=10,
    )
    assert (response.status_code, _unstamped(response.content)) == (
        direct.status_code,
        _unstamped(direct.content),
    ), (
        f"not relayed unchanged: gateway {response.status_code} {response.text[:300]!r}, "
        f"Ollama {direct.status_code} {direct.text[:300]!r}"
    )


def _unstamped(body: bytes) -> bytes:
    """The body without what differs on every answer by design (the Anthropic layer's
    `request_id`)."""
    return re.sub(rb'"request_id":"[^"]*"', b'"request_id":""', body)


def assert_spec_error(response: Response, sim_url: str) -> None:
    # 502/503/504 are SPEC errors, but not with a live worker and a fast simulator
    assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
    if response.request.method == "HEAD":  # an answer to HEAD has no body to judge
        return
    body = response.json()
    assert isinstance(body, dict), response.text[:500]
    error = body.get("error")
    if not (isinstance(error, str) and error in SPEC_STATUS):
        assert_relayed_from_ollama(response, sim_url)
        return
    assert response.status_code in SPEC_STATUS[error], f"{error} with {response.status_code}"
    assert isinstance(body.get("message"), str) and body["message"], body
    if response.status_code == 429:
        assert response.headers.get("retry-after") == [str(body["retry_after"])], body
        assert 1 <= body["retry_after"] <= 120, body


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    database=None,  # nothing written into the checkout
    suppress_health_check=list(HealthCheck),
)
def test_no_route_answers_5xx_or_outside_the_spec(
    case: Case[Any], schema_stack: Stack, finished_job: str
) -> None:
    steer(case, finished_job)
    response = case.call(base_url=schema_stack.url, headers=HEADERS, timeout=30)
    if response.status_code >= 400:
        assert_spec_error(response, schema_stack.ollama_url)
