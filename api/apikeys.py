"""API keys managed live through `/admin/keys`: their records in Redis, the audit trail,
and the copy every API process keeps of them.

Redis (shared/keys.py): one hash per key name (`APIKEY`), the names by creation time,
an index from SHA-256 digest to name for the keys accepted now (a rotated key's old digest
too, during its grace), the digests refused for good (deleted keys, rotated-out keys), a
version counter that every change increments, and the audit list. A key itself is never
stored, only its SHA-256; a webhook secret is stored (signing needs it) and never shown
again after the call that made it.

Every API process keeps the records in memory (`Keyring.managed`, swapped whole) and
polls the version counter every `POLL_S`: a change made through any process holds on all
of them within a second, and identifying a caller costs admission no round trip. The
scheduler reads a key's live `max_running` from its record itself (lib/schedule.lua).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import math
import secrets
import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from redis.asyncio import Redis

from api.tiers import ApiKey, Keyring, Managed, ManagedKey, key_digest
from shared import keys
from shared.budget import Budget, iso
from shared.errors import Conflict, InvalidRequest, NotFound, RedisUnavailable
from shared.outage import Outage, supervised
from shared.redis.store import REDIS_ERRORS, redis_errors

log = logging.getLogger("gpugate.keys")

POLL_S = 0.25
"""How often each API process checks whether a key changed (changes hold within 1 s)."""
AUDIT_KEEP = 10_000
KEY_PREFIX = "gg_"
SECRET_PREFIX = "whsec_"
MAX_GRACE_S = 86_400

Name = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]


class BudgetBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tokens: Annotated[int, Field(ge=1)]
    period: Literal["day", "week", "month"]


class KeyChanges(BaseModel):
    """`PATCH /admin/keys/{name}`: the fields given change; `null` clears one."""

    model_config = ConfigDict(extra="forbid")
    tier: str | None = None
    models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = None
    max_running: Annotated[int, Field(ge=1, le=1_000_000)] | None = None
    budget: BudgetBody | None = None
    expires_at: datetime | None = None
    disabled: bool | None = None
    webhook_url: Annotated[str, Field(max_length=2048)] | None = None

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value


class NewKey(KeyChanges):
    """`POST /admin/keys`: only `name` is required."""

    name: Name


class Rotation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    grace_seconds: Annotated[int, Field(ge=0, le=MAX_GRACE_S)] = 0


def new_key() -> str:
    """`gg_` + 43 URL-safe characters (32 random bytes)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def new_webhook_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(24)).decode()


def _ms(value: datetime | None) -> str:
    if value is None:
        return ""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return str(int(value.timestamp() * 1000))


def _text(raw: dict[bytes, bytes], name: str) -> str:
    return raw.get(name.encode(), b"").decode()


def _number(raw: dict[bytes, bytes], name: str) -> int | None:
    value = _text(raw, name)
    return int(float(value)) if value else None


class Stored:
    """One record as Redis holds it (every field a string)."""

    def __init__(self, raw: dict[bytes, bytes]) -> None:
        self.raw = raw
        self.name = _text(raw, "name")
        self.id = _text(raw, "id")
        self.digest = _text(raw, "digest")
        self.old_digest = _text(raw, "old_digest")
        self.old_until_ms = _number(raw, "old_until_ms")
        self.tier = _text(raw, "tier")
        models = _text(raw, "models")
        self.models: list[str] | None = json.loads(models) if models else None
        self.max_running = _number(raw, "max_running")
        budget = _text(raw, "budget")
        self.budget = Budget.from_json(json.loads(budget)) if budget else None
        self.expires_at_ms = _number(raw, "expires_at_ms")
        self.disabled = _text(raw, "disabled") == "1"
        self.created_at_ms = _number(raw, "created_at_ms")
        self.webhook_url = _text(raw, "webhook_url") or None
        self.has_webhook_secret = bool(_text(raw, "webhook_secret"))

    @property
    def owner(self) -> str:
        return f"key:{self.id}"

    def api_key(self, keyring: Keyring) -> ApiKey:
        tier = keyring.tiers.get(self.tier) or keyring.default
        return ApiKey(
            self.name,
            self.digest,
            tier,
            models=tuple(self.models) if self.models is not None else None,
            max_running=self.max_running if self.max_running is not None else tier.max_running,
            budget=self.budget or tier.budget,
            owner=self.owner,
            record=self.name,
            webhook_url=self.webhook_url,
        )

    def managed(self, keyring: Keyring) -> list[tuple[str, ManagedKey]]:
        key = self.api_key(keyring)
        expires = self.expires_at_ms / 1000 if self.expires_at_ms is not None else None
        out = [(self.digest, ManagedKey(key, self.disabled, expires))]
        if self.old_digest and self.old_until_ms is not None:
            out.append(
                (self.old_digest, ManagedKey(key, self.disabled, expires, self.old_until_ms / 1000))
            )
        return out


class KeyStore:
    """The records in Redis, and this process's copy of them (`keyring.managed`)."""

    def __init__(self, redis: Redis, keyring: Keyring) -> None:
        self.redis = redis
        self.keyring = keyring
        self._task: asyncio.Task[None] | None = None
        self._outage = Outage(log, "Redis (API key refresh)")

    # --- this process's copy -------------------------------------------------------------

    async def start(self) -> None:
        """Load the keys now (a Redis down at start-up is the loop's to retry), then
        follow their changes."""
        with contextlib.suppress(RedisUnavailable, *REDIS_ERRORS):
            await self.refresh()
        self._task = asyncio.create_task(
            supervised("API keys", self._poll, self._outage, log, retry_s=POLL_S)
        )

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> float:
        await self.refresh()
        return POLL_S

    async def refresh(self, *, force: bool = False) -> None:
        """Reload the records when their version moved (or `force`)."""
        version = await self.redis.get(keys.APIKEYS_VERSION)
        self._outage.recovered()
        if not force and version == self.keyring.managed.version:
            return
        records = await self._records()
        revoked = await self.redis.hkeys(keys.APIKEY_REVOKED)  # type: ignore[misc]
        by_digest: dict[str, ManagedKey] = {}
        for record in records:
            by_digest.update(record.managed(self.keyring))
        self.keyring.managed = Managed(by_digest, frozenset(d.decode() for d in revoked), version)

    async def _records(self) -> list[Stored]:
        names = await self.redis.zrange(keys.APIKEY_NAMES, 0, -1)
        if not names:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.apikey(name.decode()))
        return [Stored(raw) for raw in await pipe.execute() if raw]

    # --- reading -------------------------------------------------------------------------

    async def listing(self) -> list[dict[str, Any]]:
        with redis_errors():
            stored = await self._records()
            file_keys = self.keyring.keys or []
            used = await self._usage(
                [(s.owner, s.api_key(self.keyring).budget) for s in stored]
                + [(k.owner_id, k.budget) for k in file_keys]
            )
            last_used = await self._last_used([s.name for s in stored])
        out = [self._file_record(k, u) for k, u in zip(file_keys, used[len(stored) :], strict=True)]
        out += [
            self._record(s, u, last_used.get(s.name))
            for s, u in zip(stored, used[: len(stored)], strict=True)
        ]
        return sorted(out, key=lambda r: r["name"])

    async def show(self, name: str) -> dict[str, Any]:
        file_key = self._file_key(name)
        with redis_errors():
            if file_key is not None:
                (usage,) = await self._usage([(file_key.owner_id, file_key.budget)])
                return self._file_record(file_key, usage)
            stored = await self._stored(name)
            (usage,) = await self._usage([(stored.owner, stored.api_key(self.keyring).budget)])
            last_used = await self._last_used([name])
        return self._record(stored, usage, last_used.get(name))

    async def budget_use(self) -> dict[str, float]:
        """Each key with a budget: its use in the current period (`/metrics`)."""
        known = [
            entry.key
            for entry in self.keyring.managed.by_digest.values()
            if entry.grace_until_s is None
        ]
        with_budget = [k for k in [*(self.keyring.keys or []), *known] if k.budget is not None]
        if not with_budget:
            return {}
        now = time.time()
        with redis_errors():
            values = await self.redis.mget(
                [keys.budget(k.owner_id, k.budget.window(now)[0]) for k in with_budget if k.budget]
            )
        return {k.name: float(v or 0) for k, v in zip(with_budget, values, strict=True)}

    async def _stored(self, name: str) -> Stored:
        raw = await self.redis.hgetall(keys.apikey(name))  # type: ignore[misc]
        if not raw:
            raise NotFound(f"No API key named {name!r}.")
        return Stored(raw)

    def _file_key(self, name: str) -> ApiKey | None:
        return next((k for k in self.keyring.keys or [] if k.name == name), None)

    async def _last_used(self, names: list[str]) -> dict[str, int]:
        if not names:
            return {}
        values = await self.redis.hmget(keys.APIKEY_USED, names)  # type: ignore[misc]
        return {n: int(v) for n, v in zip(names, values, strict=True) if v is not None}

    async def _usage(self, owners: list[tuple[str, Budget | None]]) -> list[dict[str, Any]]:
        """Running jobs and the period's budget use of each (owner, budget)."""
        if not owners:
            return []
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        windows = []
        for owner, budget in owners:
            pipe.zrange(keys.owner_running(owner), 0, -1)
            window = budget.window(now) if budget else None
            windows.append(window)
            if window is not None:
                pipe.get(keys.budget(owner, window[0]))
        replies = iter(await pipe.execute())
        runs_of, used_of = [], []
        for window in windows:
            runs_of.append([r.decode() for r in next(replies)])
            used_of.append(float(next(replies) or 0) if window is not None else 0.0)
        all_runs = [r for runs in runs_of for r in runs]
        live: set[str] = set()
        if all_runs:
            scores = await self.redis.zmscore(keys.LEASES, all_runs)
            live = {r for r, s in zip(all_runs, scores, strict=True) if s is not None}
        out = []
        for (_, budget), window, runs, used in zip(owners, windows, runs_of, used_of, strict=True):
            usage: dict[str, Any] = {
                "running": sum(1 for r in runs if r in live),
                "budget_used": None,
                "budget_remaining": None,
                "resets_at": None,
            }
            if budget is not None and window is not None:
                whole = max(0, math.ceil(used))
                usage.update(
                    budget_used=whole,
                    budget_remaining=max(0, budget.tokens - whole),
                    resets_at=iso(window[1]),
                )
            out.append(usage)
        return out

    def _record(self, s: Stored, usage: dict[str, Any], last_used_ms: int | None) -> dict[str, Any]:
        return {
            "name": s.name,
            "fingerprint": s.digest[:8],
            "source": "api",
            "tier": s.tier,
            "models": s.models,
            "max_running": s.max_running,
            "budget": s.budget.public() if s.budget else None,
            "expires_at": iso(s.expires_at_ms / 1000) if s.expires_at_ms is not None else None,
            "disabled": s.disabled,
            "created_at": iso(s.created_at_ms / 1000) if s.created_at_ms is not None else None,
            "last_used_at": iso(last_used_ms / 1000) if last_used_ms else None,
            "webhook_url": s.webhook_url,
            "usage": usage,
        }

    def _file_record(self, k: ApiKey, usage: dict[str, Any]) -> dict[str, Any]:
        return {
            "name": k.name,
            "fingerprint": k.sha256[:8],
            "source": "file",
            "tier": k.tier.name,
            "models": list(k.models) if k.models is not None else None,
            "max_running": k.max_running,
            "budget": k.budget.public() if k.budget else None,
            "expires_at": None,
            "disabled": False,
            "created_at": None,
            "last_used_at": None,
            "webhook_url": k.webhook_url,
            "usage": usage,
        }

    # --- changing ------------------------------------------------------------------------

    def _check_tier(self, tier: str | None) -> None:
        if tier is not None and tier not in self.keyring.tiers:
            known = ", ".join(sorted(self.keyring.tiers))
            raise InvalidRequest(f"tier: unknown tier {tier!r} (known: {known})")

    def _fields(self, changes: KeyChanges) -> dict[str, str]:
        """The record's fields for the changes given (every field set, or cleared: "")."""
        out: dict[str, str] = {}
        given = changes.model_fields_set
        if "tier" in given:
            out["tier"] = changes.tier or self.keyring.default.name
        if "models" in given:
            out["models"] = json.dumps(changes.models) if changes.models is not None else ""
        if "max_running" in given:
            out["max_running"] = str(changes.max_running or "")
        if "budget" in given:
            budget = changes.budget
            out["budget"] = json.dumps(budget.model_dump()) if budget is not None else ""
        if "expires_at" in given:
            out["expires_at_ms"] = _ms(changes.expires_at)
        if "disabled" in given:
            out["disabled"] = "1" if changes.disabled else "0"
        if "webhook_url" in given:
            out["webhook_url"] = changes.webhook_url or ""
        return out

    async def create(self, body: NewKey, by: str) -> dict[str, Any]:
        self._check_tier(body.tier)
        if self._file_key(body.name) is not None:
            raise Conflict(f"The name {body.name!r} is a key of the keys file.")
        key = new_key()
        now_ms = int(time.time() * 1000)
        fields = {
            "name": body.name,
            "id": secrets.token_hex(16),
            "digest": key_digest(key),
            "tier": self.keyring.default.name,
            "disabled": "0",
            "created_at_ms": str(now_ms),
            **self._fields(body),
        }
        secret = None
        if body.webhook_url:
            secret = fields["webhook_secret"] = new_webhook_secret()
        with redis_errors():
            if not await self.redis.zadd(keys.APIKEY_NAMES, {body.name: now_ms}, nx=True):
                raise Conflict(f"An API key named {body.name!r} exists already.")
            pipe = self.redis.pipeline(transaction=True)
            pipe.hset(keys.apikey(body.name), mapping=fields)
            pipe.hset(keys.APIKEY_DIGESTS, fields["digest"], body.name)
            pipe.incr(keys.APIKEYS_VERSION)
            try:
                version = (await pipe.execute())[-1]
            except REDIS_ERRORS:
                with contextlib.suppress(*REDIS_ERRORS):  # the name is free again
                    await self.redis.zrem(keys.APIKEY_NAMES, body.name)
                raise
        record = await self._changed(body.name, version)
        changes = {k: v for k, v in record.items() if k not in ("name", "usage", "last_used_at")}
        await self.audit("create", body.name, by, changes)
        out = {**record, "key": key}
        if secret is not None:
            out["webhook_secret"] = secret
        return out

    async def _api_record(self, name: str) -> Stored:
        if self._file_key(name) is not None:
            raise Conflict(f"The key {name!r} belongs to the keys file; change it there.")
        with redis_errors():
            return await self._stored(name)

    async def update(self, name: str, changes: KeyChanges, by: str) -> dict[str, Any]:
        self._check_tier(changes.tier)
        stored = await self._api_record(name)
        fields = self._fields(changes)
        secret = None
        if changes.webhook_url and not stored.has_webhook_secret:
            secret = fields["webhook_secret"] = new_webhook_secret()
        version = None
        if fields:
            with redis_errors():
                pipe = self.redis.pipeline(transaction=True)
                pipe.hset(keys.apikey(name), mapping=fields)
                pipe.incr(keys.APIKEYS_VERSION)
                version = (await pipe.execute())[-1]
        record = await self._changed(name, version)
        shown = changes.model_dump(mode="json", include=changes.model_fields_set)
        await self.audit("update", name, by, shown)
        return record if secret is None else {**record, "webhook_secret": secret}

    async def rotate(self, name: str, rotation: Rotation, by: str) -> dict[str, Any]:
        stored = await self._api_record(name)
        key = new_key()
        grace = rotation.grace_seconds
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            retired = [d for d in (stored.old_digest,) if d]  # an older key still in grace
            fields = {"digest": key_digest(key), "old_digest": "", "old_until_ms": ""}
            if grace > 0:
                until_ms = int((time.time() + grace) * 1000)
                fields.update(old_digest=stored.digest, old_until_ms=str(until_ms))
            else:
                retired.append(stored.digest)
            pipe.hset(keys.apikey(name), mapping=fields)
            pipe.hset(keys.APIKEY_DIGESTS, fields["digest"], name)
            for digest in retired:
                pipe.hdel(keys.APIKEY_DIGESTS, digest)
                pipe.hset(keys.APIKEY_REVOKED, digest, name)
            pipe.incr(keys.APIKEYS_VERSION)
            version = (await pipe.execute())[-1]
        record = await self._changed(name, version, retired)
        await self.audit("rotate", name, by, {"grace_seconds": grace})
        return {**record, "key": key}

    async def delete(self, name: str, by: str) -> dict[str, Any]:
        stored = await self._api_record(name)
        record = await self.show(name)
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            for digest in (stored.digest, stored.old_digest):
                if digest:
                    pipe.hdel(keys.APIKEY_DIGESTS, digest)
                    pipe.hset(keys.APIKEY_REVOKED, digest, name)
            pipe.delete(keys.apikey(name))
            pipe.zrem(keys.APIKEY_NAMES, name)
            pipe.hdel(keys.APIKEY_USED, name)
            pipe.incr(keys.APIKEYS_VERSION)
            version = (await pipe.execute())[-1]
            await self._hold(name, version, [d for d in (stored.digest, stored.old_digest) if d])
        await self.audit("delete", name, by, {})
        return record

    async def _changed(
        self, name: str, version: int | None, retired: list[str] | None = None
    ) -> dict[str, Any]:
        """The record after a change, which this process holds at once (the others
        within POLL_S)."""
        if version is not None:
            with redis_errors():
                await self._hold(name, version, retired or [])
        return await self.show(name)

    async def _hold(self, name: str, version: int, retired: list[str]) -> None:
        """Hold this process's own change: when the version moved by this change alone,
        only its record is read again (a few thousand keys created one after another
        cost a read each, not a reload each); else every record."""
        managed = self.keyring.managed
        known = int(managed.version) if managed.version else 0
        if known != version - 1:
            await self.refresh(force=True)
            return
        raw = await self.redis.hgetall(keys.apikey(name))  # type: ignore[misc]
        by_digest = {d: e for d, e in managed.by_digest.items() if e.key.record != name}
        if raw:
            by_digest.update(Stored(raw).managed(self.keyring))
        revoked = managed.revoked | frozenset(retired)
        self.keyring.managed = Managed(by_digest, revoked, str(version).encode())

    # --- audit ---------------------------------------------------------------------------

    async def audit(self, action: str, name: str | None, by: str, changes: dict[str, Any]) -> None:
        """One event: kept (the last AUDIT_KEEP) and logged; never a key or a secret.
        `name`: the key changed (None for a change of the GPU caps)."""
        event = {
            "at": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "action": action,
            "key": name,
            "by": by,
            "changes": changes,
        }
        text = json.dumps(event, separators=(",", ":"))
        log.info("audit %s", text)
        with redis_errors():
            pipe = self.redis.pipeline(transaction=True)
            pipe.lpush(keys.AUDIT, text)
            pipe.ltrim(keys.AUDIT, 0, AUDIT_KEEP - 1)
            await pipe.execute()

    async def events(self, limit: int) -> list[dict[str, Any]]:
        with redis_errors():
            raw = await self.redis.lrange(keys.AUDIT, 0, limit - 1)  # type: ignore[misc]
        return [json.loads(e) for e in raw]
