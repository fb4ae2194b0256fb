"""The errors gpugate itself raises; one handler in the API turns each into the SPEC's JSON.

GatewayError                      code, status, message, headers, extra body fields
 ├── InvalidRequest               400/422 invalid_request
 ├── InvalidApiKey                401 invalid_api_key
 ├── Forbidden                    403 forbidden
 │    └── ModelNotAllowed         403 model_not_allowed (the key's `models` exclude it)
 ├── NotFound                     404 not_found
 ├── Conflict                     409 conflict
 ├── RequestTooLarge              413 request_too_large
 ├── RateLimited                  429 rate_limit_exceeded (Retry-After; `limit: tokens`)
 ├── QueueFull                    429 queue_full (Retry-After, queue_depth)
 ├── BudgetExhausted              429 budget_exhausted (resets_at; Retry-After not capped)
 ├── BackendError                 502 backend_error
 ├── Unavailable                  503 unavailable (Retry-After)
 │    └── RedisUnavailable        Redis could not be reached, or refused the command with an
 │                                error reply (out of memory, read-only, loading, busy, ACL…):
 │                                `reason` says which (shared/redis/store.py maps every error)
 └── GatewayTimeout               504 timeout (job_id, status)
"""

from __future__ import annotations

import math
from typing import Any

MAX_RETRY_AFTER_S = 120
"""The OpenAI SDK stops retrying when Retry-After is above 120 s."""


def clamp_retry_after(seconds: float) -> int:
    """Whole seconds, rounded up, within [1, 120]."""
    return max(1, min(MAX_RETRY_AFTER_S, math.ceil(seconds)))


class GatewayError(Exception):
    code = "internal_error"
    status = 500

    def __init__(
        self, message: str, *, headers: dict[str, str] | None = None, **extra: Any
    ) -> None:
        super().__init__(message)
        self.message = message
        self.headers = dict(headers or {})
        self.extra = extra

    def body(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.extra}


class InvalidRequest(GatewayError):
    code = "invalid_request"
    status = 422

    def __init__(self, message: str, *, status: int = 422, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.status = status


class InvalidApiKey(GatewayError):
    code = "invalid_api_key"
    status = 401


class Forbidden(GatewayError):
    code = "forbidden"
    status = 403


class ModelNotAllowed(Forbidden):
    code = "model_not_allowed"

    def __init__(self, model: str) -> None:
        super().__init__(f"This API key may not use the model {model!r}.", model=model)


class NotFound(GatewayError):
    code = "not_found"
    status = 404


class Conflict(GatewayError):
    code = "conflict"
    status = 409


class RequestTooLarge(GatewayError):
    code = "request_too_large"
    status = 413


class _RetryLater(GatewayError):
    """An error that tells the client when to come back (`Retry-After` = body's `retry_after`)."""

    def __init__(self, message: str, *, retry_after_s: float, **extra: Any) -> None:
        retry_after = clamp_retry_after(retry_after_s)
        super().__init__(
            message.format(retry_after=retry_after),
            headers={"Retry-After": str(retry_after)},
            retry_after=retry_after,
            **extra,
        )


class RateLimited(_RetryLater):
    code = "rate_limit_exceeded"
    status = 429

    def __init__(self, retry_after_s: float, limit: str | None = None) -> None:
        if limit == "tokens":
            message = "Token limit reached. Try again in {retry_after} seconds."
            super().__init__(message, retry_after_s=retry_after_s, limit=limit)
            return
        super().__init__(
            "Too many requests. Try again in {retry_after} seconds.", retry_after_s=retry_after_s
        )


class QueueFull(_RetryLater):
    code = "queue_full"
    status = 429

    def __init__(self, retry_after_s: float, queue_depth: int, scope: str = "gateway") -> None:
        what = "The GPU queue is full" if scope == "gateway" else "Too many of your jobs are queued"
        super().__init__(
            what + ". Try again in {retry_after} seconds.",
            retry_after_s=retry_after_s,
            queue_depth=queue_depth,
        )


class BudgetExhausted(GatewayError):
    """The key's token budget for the period is used up. Retry-After is the time to the
    reset, not capped at 120 s (the SDKs stop retrying, which is right: it may be days)."""

    code = "budget_exhausted"
    status = 429

    def __init__(self, resets_at_s: int, now_s: float) -> None:
        from shared.budget import iso

        retry_after = max(1, math.ceil(resets_at_s - now_s))
        super().__init__(
            f"The token budget of this API key is used up until {iso(resets_at_s)}.",
            headers={"Retry-After": str(retry_after)},
            retry_after=retry_after,
            resets_at=iso(resets_at_s),
        )


class BackendError(GatewayError):
    code = "backend_error"
    status = 502


class Unavailable(_RetryLater):
    code = "unavailable"
    status = 503

    def __init__(self, message: str, retry_after_s: float = 1) -> None:
        super().__init__(message, retry_after_s=retry_after_s)


class RedisUnavailable(Unavailable):
    """Redis cannot take the command now. `reason` is what `/ready` and the outage log
    name: "unreachable", "out of memory", "read-only", "loading", "busy", "denied"…"""

    def __init__(self, reason: str = "unreachable") -> None:
        super().__init__(f"Redis is unavailable ({reason}); try again shortly.", retry_after_s=2)
        self.reason = reason


class GatewayTimeout(GatewayError):
    code = "timeout"
    status = 504
