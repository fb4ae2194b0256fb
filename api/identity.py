"""Who is asking: the API key (X-API-Key, else Bearer), else the client IP.

The IP is the socket peer, unless that peer is a trusted proxy: then the right-most
`X-Forwarded-For` entry that is not itself a trusted proxy. uvicorn's own proxy-header
handling is switched off (`gpugate api` runs it with proxy_headers=False), so a forged
header from an untrusted client changes nothing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from starlette.requests import HTTPConnection

from api.tiers import ApiKey, Keyring, Tier, fingerprint, key_digest, model_allowed
from shared.budget import Budget
from shared.errors import InvalidApiKey

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Identity:
    owner: str
    """Stable, secret-free id of the client: `key:<sha256>` or `ip:<address>`."""
    name: str
    """What logs and metrics show: the key's name, its fingerprint, or the IP."""
    tier: Tier
    named: bool = False
    """A known key: the keys file's or one of /admin/keys (its `name` is then what usage
    reports)."""
    models: tuple[str, ...] | None = None
    """The models the key may use (names or patterns); None: any."""
    max_running: int | None = None
    budget: Budget | None = None
    record: str = ""
    """The key's /admin/keys record, when it has one (the scheduler reads its live
    `max_running` there)."""
    hook: str = ""
    """The key's name when it has a webhook: its jobs' and batches' events go there."""

    def may_use(self, model: str) -> bool:
        return model_allowed(self.models, model)

    @property
    def usage_name(self) -> str:
        """The name in /admin/usage and the per-key metrics: the keys file's `name`, else
        `anonymous` (so the metrics' label values stay bounded)."""
        return self.name if self.named else ANONYMOUS


ANONYMOUS = "anonymous"


def presented_key(conn: HTTPConnection) -> str | None:
    key = conn.headers.get("x-api-key")
    if key:
        return key
    scheme, _, token = conn.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in networks)


def client_ip(conn: HTTPConnection, trusted: Sequence[Network]) -> str:
    peer = conn.client.host if conn.client else "unknown"
    if not trusted or not _trusted(peer, trusted):
        return peer
    hops = [h.strip() for h in ",".join(conn.headers.getlist("x-forwarded-for")).split(",")]
    for hop in reversed([h for h in hops if h]):
        if not _trusted(hop, trusted):
            return hop
    return peer


def identify(
    conn: HTTPConnection, keyring: Keyring, trusted: Sequence[Network], require_key: bool
) -> Identity:
    key = presented_key(conn)
    if key is not None:
        entry = keyring.lookup(key)  # 401 for a key known and refused now
        if entry is not None:
            return known(entry)
        if keyring.closed:
            raise InvalidApiKey("Unknown API key.")
        return Identity(f"key:{key_digest(key)}", f"key:{fingerprint(key)}", keyring.default)
    if require_key:
        raise InvalidApiKey("An API key is required (X-API-Key or Authorization: Bearer).")
    ip = client_ip(conn, trusted)
    return Identity(f"ip:{ip}", f"ip:{ip}", keyring.default)


def known(entry: ApiKey) -> Identity:
    return Identity(
        entry.owner_id,
        entry.name,
        entry.tier,
        named=True,
        models=entry.models,
        max_running=entry.max_running,
        budget=entry.budget,
        record=entry.record,
        hook=entry.name if entry.webhook_url else "",
    )


def client_id(conn: HTTPConnection, trusted: Sequence[Network]) -> str:
    """Identity for the cheap limits (/health, metadata): no key check, never a 401."""
    key = presented_key(conn)
    return f"key:{key_digest(key)}" if key else f"ip:{client_ip(conn, trusted)}"
