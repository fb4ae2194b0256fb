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

from api.tiers import Keyring, Tier, fingerprint, key_digest
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
    """A key listed in the keys file (its `name` is then what usage reports)."""

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
        if keyring.closed:
            entry = keyring.lookup(key)
            if entry is None:
                raise InvalidApiKey("Unknown API key.")
            return Identity(f"key:{entry.sha256}", entry.name, entry.tier, named=True)
        return Identity(f"key:{key_digest(key)}", f"key:{fingerprint(key)}", keyring.default)
    if require_key:
        raise InvalidApiKey("An API key is required (X-API-Key or Authorization: Bearer).")
    ip = client_ip(conn, trusted)
    return Identity(f"ip:{ip}", f"ip:{ip}", keyring.default)


def client_id(conn: HTTPConnection, trusted: Sequence[Network]) -> str:
    """Identity for the cheap limits (/health, metadata): no key check, never a 401."""
    key = presented_key(conn)
    return f"key:{key_digest(key)}" if key else f"ip:{client_ip(conn, trusted)}"
