"""Webhooks: a key's events, POSTed to its `webhook_url` and signed as the Standard
Webhooks specification says (https://www.standardwebhooks.com).

The signature is ours, not the `standardwebhooks` package's: it is one HMAC-SHA256, and
the package stays a test dependency, so the tests check our bytes with the reference
implementation instead of our code against itself.

A delivery is one HASH, `keys.WEBHOOK` + event id, written by shared/lua/lib/webhook.lua
(`emit_webhook`, in the same step as the job or batch event it reports) and then only by
the delivery scripts (shared/lua/webhook_claim.lua, webhook_done.lua):

| field | written by | meaning |
|---|---|---|
| id, key, type, data_id | emit | `evt_…`, the key's name, `job.succeeded`…, job or batch id |
| created_at | emit | ms |
| body | emit | the exact bytes every attempt POSTs |
| state | emit, done | `State` below |
| attempts | done | attempts made (an attempt cut short by a dying worker is not one) |
| next_at | emit, done | ms of the next attempt (pending only) |
| claim | claim, done | the worker's claim on the attempt under way |
| last_status, last_error, last_attempt_at | done | HTTP status ('' if none came), why, ms |
| delivered_at, failed_at | done | ms |

`keys.WEBHOOK_DUE` holds the pending ones by the ms of their next attempt (a claimed one
by the end of its claim); `keys.WEBHOOKS_OF` + key name lists the pending and failed ones
for `/admin/webhooks`. A delivered record is kept `DELIVERED_KEEP_S` (its id then
stays taken: the same event reported twice is sent once), a failed one `FAILED_KEEP_S`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from enum import StrEnum

SECRET_PREFIX = "whsec_"
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64
"""The specification's bounds on a secret's length (decoded)."""

DELIVERED_KEEP_S = 6 * 3600
FAILED_KEEP_S = 7 * 86400


class State(StrEnum):
    PENDING = "pending"
    """Waiting for its next attempt (or being attempted)."""
    DELIVERED = "delivered"
    """A 2xx came back."""
    FAILED = "failed"
    """No 2xx within the retry window, or its key has no webhook any more."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of a `whsec_…` secret: the base64 after the prefix, decoded. A
    ValueError (that never quotes the secret) when it is not one."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret.removeprefix(SECRET_PREFIX), validate=True)
    except binascii.Error:
        raise ValueError(f"a webhook secret is {SECRET_PREFIX!r} and then base64") from None
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(
            f"a webhook secret holds {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} bytes "
            f"(base64-decoded), not {len(key)}"
        )
    return key


def signature(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """`v1,` + base64 of HMAC-SHA256 over `{id}.{timestamp}.{body}`."""
    mac = hmac.new(key, f"{msg_id}.{timestamp_s}.".encode() + body, hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode()


def signed_headers(key: bytes, msg_id: str, timestamp_s: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt: the same `webhook-id` every attempt, the attempt's own
    timestamp (receivers refuse one more than a few minutes off their clock)."""
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp_s),
        "webhook-signature": signature(key, msg_id, timestamp_s, body),
    }
