"""Tiers and API keys: those of `GPUGATE_KEYS_FILE` (TOML or YAML), and those created
through `/admin/keys` (api/apikeys.py keeps them here, reloaded within a second of any
change). Keys are stored as SHA-256 hex; the clear key never leaves the request."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import time
import tomllib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from shared.budget import Budget
from shared.errors import InvalidApiKey
from shared.settings import Rate, Settings
from shared.webhooks import SECRET_MAX_BYTES, SECRET_MIN_BYTES, SECRET_PREFIX, secret_key

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
    max_running: int | None = None
    """This key's jobs running at once, fleet-wide (the scheduler holds the others)."""
    budget: Budget | None = None
    """Tokens per UTC day, week or month."""

    @property
    def priority_boost_ms(self) -> int:
        return self.priority * PRIORITY_STEP_MS


@dataclass(frozen=True)
class ApiKey:
    name: str
    sha256: str
    tier: Tier
    models: tuple[str, ...] | None = None
    """Names or fnmatch patterns of the models the key may use; None: any."""
    max_running: int | None = None
    """The key's own, else its tier's."""
    budget: Budget | None = None
    """The key's own, else its tier's."""
    owner: str = ""
    """Whose buckets, jobs and budget: `key:<sha256>` for a file key, `key:<id>` for one
    of /admin/keys (the same across rotations)."""
    record: str = ""
    """The name of its /admin/keys record ("" for a file key)."""
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    """A keys-file key's `whsec_` secret (one of /admin/keys keeps its own in its record);
    mirrored into Redis for the workers (api/webhooks.py), never shown."""

    @property
    def source(self) -> str:
        return "api" if self.record else "file"

    @property
    def owner_id(self) -> str:
        return self.owner or f"key:{self.sha256}"


@dataclass(frozen=True)
class ManagedKey:
    """A digest of an /admin/keys key: its key, and what may refuse it."""

    key: ApiKey
    disabled: bool = False
    expires_at_s: float | None = None
    grace_until_s: float | None = None
    """Set for the old key of a rotation: accepted until then."""

    def refusal(self, now_s: float) -> str | None:
        if self.disabled:
            return "This API key is disabled."
        if self.expires_at_s is not None and now_s >= self.expires_at_s:
            return "This API key has expired."
        if self.grace_until_s is not None and now_s >= self.grace_until_s:
            return "This API key was replaced (rotated) and its grace period is over."
        return None


@dataclass(frozen=True)
class Managed:
    """The keys of /admin/keys as one process last loaded them (swapped whole)."""

    by_digest: dict[str, ManagedKey] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()
    """Digests of deleted keys and of old keys replaced: refused, never the default tier."""
    version: bytes | None = None


@lru_cache(maxsize=4096)
def key_digest(key: str) -> str:
    """A key's SHA-256, remembered for the keys seen lately (one per request otherwise)."""
    return hashlib.sha256(key.encode()).hexdigest()


def _bare(model: str) -> str:
    return model.removesuffix(":latest")


def model_allowed(patterns: tuple[str, ...] | None, model: str) -> bool:
    """Whether a key's `models` (names or fnmatch patterns; None: any) include `model`;
    `x` and `x:latest` are the same model, as Ollama has them."""
    if patterns is None:
        return True
    name = _bare(model)
    return any(
        fnmatch.fnmatchcase(name, _bare(p)) or fnmatch.fnmatchcase(model, p) for p in patterns
    )


def fingerprint(key: str) -> str:
    """What logs may show of a key: 8 hex digits of its hash."""
    return key_digest(key)[:8]


class Keyring:
    """The known keys, or none (then any key, or none, is on the default tier)."""

    def __init__(
        self, default: Tier, keys: list[ApiKey] | None = None, *, refuse_unknown: bool = False
    ) -> None:
        self.default = default
        self.keys = keys
        self.tiers = {default.name: default}
        self.refuse_unknown = refuse_unknown or keys is not None
        self.managed = Managed()
        """Replaced whole by api/apikeys.py's refresher; read without a lock."""

    @property
    def closed(self) -> bool:
        """True when only known keys are accepted (GPUGATE_UNKNOWN_KEYS=refuse)."""
        return self.refuse_unknown

    def file_key(self, digest: str) -> ApiKey | None:
        found = None
        for entry in self.keys or []:
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def lookup(self, key: str) -> ApiKey | None:
        """The known key (the file's, or one of /admin/keys), None for an unknown one;
        401 for a key known and refused now: disabled, expired, past its grace, revoked."""
        digest = key_digest(key)
        found = self.file_key(digest)
        if found is not None:
            return found
        managed = self.managed
        entry = managed.by_digest.get(digest)
        if entry is not None:
            refusal = entry.refusal(time.time())
            if refusal is not None:
                raise InvalidApiKey(refusal)
            return entry.key
        if digest in managed.revoked:
            raise InvalidApiKey("This API key was revoked.")
        return None

    @classmethod
    def from_settings(cls, settings: Settings) -> Keyring:
        default = Tier(
            DEFAULT_TIER, settings.rate, settings.burst, settings.max_queue_depth, priority=0
        )
        if settings.keys_file is None:
            return cls(default, refuse_unknown=settings.refuse_unknown_keys)
        ring = load_keys_file(settings.keys_file, default)
        ring.refuse_unknown = settings.refuse_unknown_keys
        return ring


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
            max_running=int(raw["max_running"]) if raw.get("max_running") is not None else None,
            budget=Budget.parse(str(raw["budget"])) if raw.get("budget") is not None else None,
        )
    except (TypeError, ValueError) as exc:
        raise ValueError(f"tier {name!r}: {exc}") from exc
    if tier.burst < 1 or tier.max_queued < 1:
        raise ValueError(f"tier {name!r}: burst and max_queued must be at least 1")
    if not tier.weight > 0:
        raise ValueError(f"tier {name!r}: weight must be above zero")
    if tier.max_running is not None and tier.max_running < 1:
        raise ValueError(f"tier {name!r}: max_running must be at least 1")
    return tier


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"manage_models must be true or false, not {value!r}")
    return value


def _webhook(raw: dict[str, Any], where: str) -> tuple[str | None, str | None]:
    """A file key's `webhook_url` and the `webhook_secret` it needs (a secret alone is
    checked, and unused). Errors name the key, never the secret."""
    url, secret = raw.get("webhook_url") or None, raw.get("webhook_secret") or None
    if url is not None and not (isinstance(url, str) and url.startswith(("http://", "https://"))):
        raise ValueError(f"{where}: webhook_url must start with http:// or https://")
    if secret is not None:
        try:
            secret_key(secret if isinstance(secret, str) else "")
        except ValueError as exc:
            raise ValueError(f"{where}: webhook_secret is not valid: {exc}") from None
    if url is not None and secret is None:
        raise ValueError(
            f"{where}: webhook_url needs a webhook_secret to sign with "
            f"({SECRET_PREFIX} and the base64 of {SECRET_MIN_BYTES} to {SECRET_MAX_BYTES} "
            f"random bytes, e.g. {SECRET_PREFIX}$(openssl rand -base64 32))"
        )
    return url, secret if url is not None else None


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
        tier = tiers[tier_name]
        models = raw.get("models")
        if models is not None and (
            not isinstance(models, list) or not all(isinstance(m, str) for m in models)
        ):
            raise ValueError(f"{path}: keys[{i}].models must be a list of model names")
        name = str(raw.get("name", digest[:8]))
        webhook_url, webhook_secret = _webhook(raw, f"{path}: keys[{i}] ({name!r})")
        keys.append(
            ApiKey(
                name,
                digest,
                tier,
                models=tuple(models) if models is not None else None,
                max_running=tier.max_running,
                budget=tier.budget,
                webhook_url=webhook_url,
                webhook_secret=webhook_secret,
            )
        )
    ring = Keyring(tiers[DEFAULT_TIER], keys)
    ring.tiers = tiers
    return ring
