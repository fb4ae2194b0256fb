"""Keys files (GPUGATE_KEYS_FILE): API keys by the SHA-256 of their secret, and tiers."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Key:
    name: str
    secret: str
    """The clear API key a client sends; the file holds its SHA-256."""
    tier: str | None = None
    webhook_url: str | None = None
    webhook_secret: str | None = None
    """`whsec_…`, which the keys file holds as it is (signing needs it)."""


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def write_keys_file(
    path: Path, keys: Iterable[Key], tiers: Mapping[str, Mapping[str, object]] | None = None
) -> Path:
    """Write a TOML keys file at `path`: `tiers` by name (their fields as given), then
    `keys`; returns `path`."""
    lines = []
    for name, fields in (tiers or {}).items():
        lines.append(f"[tiers.{name}]")
        lines += [f"{field} = {_toml(value)}" for field, value in fields.items()]
    for key in keys:
        lines += ["[[keys]]", f"name = {_toml(key.name)}", f'sha256 = "{digest(key.secret)}"']
        for field in ("tier", "webhook_url", "webhook_secret"):
            value = getattr(key, field)
            if value is not None:
                lines.append(f"{field} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    return path
