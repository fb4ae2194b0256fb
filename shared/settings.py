"""Settings for every gpugate process, read once from `GPUGATE_*` variables and `.env`."""

from __future__ import annotations

import ipaddress
import json
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.keys import DEFAULT_BACKEND

_PERIOD_S = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(second|minute|hour|day)s?\s*$")


@dataclass(frozen=True)
class Rate:
    """A refill rate such as `60/minute`."""

    amount: float
    period_s: int

    @property
    def per_second(self) -> float:
        return self.amount / self.period_s

    @classmethod
    def parse(cls, text: str) -> Rate:
        match = _RATE.match(text)
        if match is None:
            raise ValueError(f"{text!r} is not a rate like '60/minute' (second|minute|hour|day)")
        amount = float(match.group(1))
        if amount <= 0:
            raise ValueError(f"{text!r}: the rate must be above zero")
        return cls(amount, _PERIOD_S[match.group(2)])

    def __str__(self) -> str:
        unit = next(name for name, s in _PERIOD_S.items() if s == self.period_s)
        return f"{self.amount:g}/{unit}"


class Backend(BaseModel):
    """One Ollama (one GPU, or one GPU host) behind the gate, or with `kind = "openai"` any
    server that speaks OpenAI's API (llama.cpp's llama-server, vLLM, SGLang, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")]
    url: str
    gpu_concurrency: Annotated[int, Field(ge=1, le=1024)]
    """Its own cap: requests running there at once (at most its OLLAMA_NUM_PARALLEL)."""
    models: tuple[str, ...] | None = None
    """What it serves; None: what its /api/tags (an openai one: /v1/models) lists, refreshed
    by the workers."""
    kind: Literal["ollama", "openai"] = "ollama"
    """`openai`: only the OpenAI inference paths run there (the Ollama-native ones need
    Ollama); its models come from /v1/models, its health from /health."""
    api_key: SecretStr | None = None
    """Sent to it as `Authorization: Bearer`; masked wherever it is shown."""
    adaptive: bool | None = None
    """Adaptive concurrency: `gpu_concurrency` is then a ceiling and gpugate finds the
    effective cap below it (worker/adaptive.py). None: GPUGATE_ADAPTIVE decides."""

    @property
    def openai(self) -> bool:
        return self.kind == "openai"

    def auth_headers(self) -> dict[str, str]:
        """The header that carries its `api_key` (none without one)."""
        if self.api_key is None:
            return {}
        return {"authorization": f"Bearer {self.api_key.get_secret_value()}"}

    def shown(self) -> dict[str, Any]:
        """Its settings for display (doctor, /admin/status): the api_key masked."""
        out = self.model_dump(mode="json", exclude={"api_key"})
        out["api_key"] = None if self.api_key is None else "********"
        return out

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")


def parse_backends(raw: Any, source: str) -> tuple[Backend, ...]:
    """The backend list of GPUGATE_BACKENDS (JSON) or the file's `[[backends]]`, each
    entry checked; an error names the entry (`backends[1] (gpu-b): url: ...`)."""
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{source}: expected a non-empty list of backends")
    backends: list[Backend] = []
    for i, entry in enumerate(raw):
        label = f"backends[{i}]"
        if isinstance(entry, dict) and isinstance(entry.get("name"), str):
            label += f" ({entry['name']})"
        try:
            backends.append(Backend.model_validate(entry))
        except ValidationError as exc:
            detail = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise ValueError(f"{source}: {label}: {detail}") from None
    names = [b.name for b in backends]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"{source}: backend name {name!r} is used twice")
    return tuple(backends)


class Settings(BaseSettings):
    """The SPEC's settings table; invalid values stop the process at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="GPUGATE_", env_file=".env", extra="ignore", frozen=True, populate_by_name=True
    )

    redis_url: str = "redis://127.0.0.1:6379/0"
    ollama_url: str = "http://127.0.0.1:11434"
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    rate_limit: str = "60/minute"
    burst: int = Field(10, ge=1)
    health_rate_limit: str = "600/minute"
    gpu_concurrency: int = Field(2, ge=1, le=1024)
    worker_concurrency: int = Field(4, ge=1, le=1024)
    max_queue_depth: int = Field(64, ge=1)
    keys_file: Path | None = None
    require_api_key: bool = False
    admin_key: SecretStr | None = None
    trusted_proxies: Annotated[list[str], NoDecode] = []
    sync_timeout: float = Field(300, gt=0)
    job_timeout: float = Field(600, gt=0)
    result_ttl: int = Field(3600, ge=1)
    max_body_bytes: int = Field(16_777_216, ge=1)
    backends_json: Annotated[str | None, Field(alias="GPUGATE_BACKENDS")] = None
    """GPUGATE_BACKENDS, as given; read `backends` for the checked list."""
    backends_file: Path | None = None
    affinity_wait: float = Field(30, ge=0, le=3600)
    adaptive: bool = False
    """Adaptive concurrency on every backend that does not say otherwise."""
    session_ttl: float = Field(600, ge=0, le=86400)
    """Seconds a session keeps its backend (api/sessions.py, lib/schedule.lua)."""
    session_wait: float = Field(1, ge=0, le=3600)
    """Seconds a session's job may wait for its backend's slot before another takes it."""
    max_batch_file_bytes: int = Field(67_108_864, ge=1)
    """The largest batch input file (api/files.py); a file holds at most 50,000 lines."""
    files_ttl: int = Field(604_800, ge=1)
    """Seconds batch input, output and error files are kept."""
    redis_min_replicas: int = Field(0, ge=0, le=16)
    redis_wait_ms: int = Field(100, ge=1, le=60_000)
    unknown_keys: Literal["default_tier", "refuse"] | None = None
    """What a key neither in the keys file nor created through /admin/keys gets; unset:
    `refuse` with a keys file, else `default_tier` (read `refuse_unknown_keys`)."""
    # Beyond the SPEC's table: operational knobs with safe defaults.
    lease_ttl: float = Field(10, gt=0, le=300)
    """Seconds a worker's claim on a job and its GPU slot lives without renewal."""
    max_attempts: int = Field(3, ge=1, le=20)
    """Runs of one job before a job whose worker keeps dying is failed."""
    ollama_retries: int = Field(2, ge=0, le=10)
    """Extra tries of an Ollama call refused or failing with 5xx, before any byte is relayed."""
    breaker_threshold: int = Field(3, ge=1, le=1000)
    """Jobs failing in a row on Ollama (unreachable, 5xx, hung) that open the breaker."""
    breaker_cooldown: float = Field(30, gt=0, le=3600)
    """Longest the breaker stays open without a worker seeing Ollama answer."""
    shutdown_grace: float = Field(30, ge=0)
    """Seconds a worker given SIGTERM lets running jobs finish."""
    metrics_token: SecretStr | None = None
    """When set, `/metrics` requires `Authorization: Bearer <token>`."""
    log_level: str = "info"
    log_format: Literal["text", "json"] = "text"
    """`json`: one JSON object per log line (shared/logs.py)."""
    otel: bool = False
    """OpenTelemetry traces over OTLP (shared/telemetry.py); also on when the standard
    OTEL_EXPORTER_OTLP_ENDPOINT is set."""

    @field_validator("rate_limit", "health_rate_limit")
    @classmethod
    def _valid_rate(cls, value: str) -> str:
        Rate.parse(value)
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _split_proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for cidr in value:
            ipaddress.ip_network(cidr, strict=False)
        return value

    @field_validator("redis_url")
    @classmethod
    def _valid_redis_url(cls, value: str) -> str:
        if not value.startswith(("redis://", "rediss://", "unix://", "redis+sentinel://")):
            raise ValueError("must start with redis://, rediss://, unix:// or redis+sentinel://")
        return value

    @field_validator("ollama_url")
    @classmethod
    def _valid_http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("admin_key", "metrics_token", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _keys_file_exists(self) -> Settings:
        if self.keys_file is not None and not self.keys_file.is_file():
            raise ValueError(f"GPUGATE_KEYS_FILE: no such file {self.keys_file}")
        self.backends  # noqa: B018  (a bad backend list stops start-up here)
        return self

    @property
    def backends(self) -> tuple[Backend, ...]:
        """The fleet: GPUGATE_BACKENDS, else GPUGATE_BACKENDS_FILE, else one backend named
        `default` from GPUGATE_OLLAMA_URL and GPUGATE_GPU_CONCURRENCY."""
        return _backends(
            self.backends_json, self.backends_file, self.ollama_url, self.gpu_concurrency
        )

    def backend(self, name: str) -> Backend | None:
        return next((b for b in self.backends if b.name == name), None)

    def adaptive_on(self, backend: Backend) -> bool:
        """Whether `backend`'s cap adapts (its own `adaptive`, else GPUGATE_ADAPTIVE)."""
        return self.adaptive if backend.adaptive is None else backend.adaptive

    @property
    def refuse_unknown_keys(self) -> bool:
        if self.unknown_keys is None:
            return self.keys_file is not None
        return self.unknown_keys == "refuse"

    @property
    def lease_ms(self) -> int:
        return int(self.lease_ttl * 1000)

    @property
    def worker_stale_ms(self) -> int:
        """A worker without a heartbeat for three leases is gone (its runs are reaped by
        then): the one place this rule is written."""
        return self.lease_ms * 3

    @property
    def fair_share_memory_ms(self) -> int:
        """How long a key with nothing waiting or running keeps its fair-share counter:
        as long as the default tier's request bucket takes to fill again. A key idle that
        long comes back level with the others, and a flood of one-off keys leaves no
        counter behind (SPEC "Invariants": per-key state expires)."""
        return max(1000, int(self.burst / self.rate.per_second * 1000))

    @property
    def rate(self) -> Rate:
        return Rate.parse(self.rate_limit)

    @property
    def health_rate(self) -> Rate:
        return Rate.parse(self.health_rate_limit)

    @property
    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(cidr, strict=False) for cidr in self.trusted_proxies]

    def masked(self) -> dict[str, Any]:
        """The effective settings as `GPUGATE_*` names, secrets masked (for `doctor`, logs)."""
        out: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr) or name in ("admin_key", "metrics_token"):
                value = None if value is None else "********"
            elif name == "redis_url":
                value = re.sub(r"//([^@/]*)@", "//***@", str(value))
            elif name == "backends_json" and value:
                value = _masked_backends(str(value))
            env_name = "BACKENDS" if name == "backends_json" else name.upper()
            out[f"GPUGATE_{env_name}"] = value if value is None else str(value)
        return out


def _masked_backends(raw_json: str) -> str:
    """GPUGATE_BACKENDS with each `api_key` masked (the text as given, if it is not a list)."""
    try:
        raw = json.loads(raw_json)
    except ValueError:
        return raw_json
    if not isinstance(raw, list):
        return raw_json
    for entry in raw:
        if isinstance(entry, dict) and entry.get("api_key"):
            entry["api_key"] = "********"
    return json.dumps(raw)


@cache
def _backends(
    raw_json: str | None, file: Path | None, ollama_url: str, gpu_concurrency: int
) -> tuple[Backend, ...]:
    if raw_json:
        try:
            raw = json.loads(raw_json)
        except ValueError as exc:
            raise ValueError(f"GPUGATE_BACKENDS is not JSON: {exc}") from None
        return parse_backends(raw, "GPUGATE_BACKENDS")
    if file is not None:
        try:
            data = tomllib.loads(file.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"GPUGATE_BACKENDS_FILE {file}: {exc}") from None
        return parse_backends(data.get("backends"), f"GPUGATE_BACKENDS_FILE {file}")
    return (Backend(name=DEFAULT_BACKEND, url=ollama_url, gpu_concurrency=gpu_concurrency),)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings once per process; a bad value raises naming its variable."""
    return Settings(**overrides)
