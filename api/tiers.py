"""Tiers and API keys from `GPUGATE_KEYS_FILE` (TOML or YAML). Keys are stored as SHA-256
hex and compared in constant time; the clear key never leaves the request."""

from __future__ import annotations

import hashlib
import hmac
import tomllib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from shared.settings import Rate, Settings

DEFAULT_TIER = "free"
PRIORITY_STEP_MS = 1000
"""A job of priority p starts as if admitted p seconds earlier: priority with aging."""


@dataclass(frozen=True)
class Tier:
    name: str
    rate: Rate
    burst: int
    max_queued: int
    priority: int
    weight: float = 1.0
    """Fair-share weight among keys of equal priority."""
    tpm: Rate | None = None
    """Token limit: a bucket of `tpm.amount` tokens refilled over `tpm.period_s`."""
    manage_models: bool = False
    """May pull, push, create, copy and delete models."""

    @property
    def priority_boost_ms(self) -> int:
        return self.priority * PRIORITY_STEP_MS


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    tier: Tier


@lru_cache(maxsize=4096)
def key_digest(key: str) -> str:
    """A key's SHA-256, remembered for the keys seen lately (one per request otherwise)."""
    return hashlib.sha256(key.encode()).hexdigest()


def fingerprint(key: str) -> str:
    """What logs may show of a key: 8 hex digits of its hash."""
    return key_digest(key)[:8]


class Keyring:
    """The known keys, or none (then any key, or none, is on the default tier)."""

    def __init__(self, default: Tier, keys: list[ApiKey] | None = None) -> None:
        self.default = default
        self.keys = keys
        self.tiers = {default.name: default}

    @property
    def closed(self) -> bool:
        """True when only listed keys are accepted."""
        return self.keys is not None

    def lookup(self, key: str) -> ApiKey | None:
        digest = key_digest(key)
        found = None
        for entry in self.keys or []:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        default = Tier(
            DEFAULT_TIER, settings.rate, settings.burst, settings.max_queue_depth, priority=0
        )
        if settings.keys_file is None:
            return cls(default)
        return load_keys_file(settings.keys_file, default)


def _read(path: Path) -> dict[str, Any]:
    text = path.read_text()
    data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else tomllib.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a table with [tiers.*] and [[keys]]")
    return data


def _tier(name: str, raw: dict[str, Any], default: Tier) -> Tier:
    try:
        tier = Tier(
            name=name,
            rate=Rate.parse(str(raw.get("rate", default.rate))),
            burst=int(raw.get("burst", default.burst)),
            max_queued=int(raw.get("max_queued", default.max_queued)),
            priority=int(raw.get("priority", 0)),
            weight=float(raw.get("weight", 1)),
            tpm=Rate.parse(str(raw["tpm"])) if raw.get("tpm") is not None else None,
            manage_models=_flag(raw.get("manage_models", False)),
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tier {name!r}: {exc}") from exc
    if tier.burst < 1 or tier.max_queued < 1:
        raise ValueError(f"tier {name!r}: burst and max_queued must be at least 1")
    if not tier.weight > 0:
        raise ValueError(f"tier {name!r}: weight must be above zero")
    return tier


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"manage_models must be true or false, not {value!r}")
    return value


def load_keys_file(path: Path, default: Tier) -> Keyring:
    data = _read(path)
    tiers = {
        name: _tier(name, raw or {}, default) for name, raw in (data.get("tiers") or {}).items()
    }
    tiers.setdefault(DEFAULT_TIER, default)
    keys: list[ApiKey] = []
    for i, raw in enumerate(data.get("keys") or []):
        digest = str(raw.get("sha256", "")).lower()
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{path}: keys[{i}].sha256 must be 64 hex digits (SHA-256 of the key)")
        tier_name = raw.get("tier", DEFAULT_TIER)
        if tier_name not in tiers:
            raise ValueError(f"{path}: keys[{i}] names unknown tier {tier_name!r}")
        keys.append(ApiKey(str(raw.get("name", digest[:8])), digest, tiers[tier_name]))
    ring = Keyring(tiers[DEFAULT_TIER], keys)
    ring.tiers = tiers
    return ring
