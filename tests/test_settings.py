"""Settings: every SPEC variable with its default; nonsense refused naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from shared.settings import Rate, Settings


def test_defaults_are_the_specs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("GPUGATE_"):
            monkeypatch.delenv(name)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.redis_url, s.ollama_url) == ("redis://127.0.0.1:6379/0", "http://127.0.0.1:11434")
    assert (s.port, s.host, s.rate_limit, s.burst) == (8000, "127.0.0.1", "60/minute", 10)
    assert (s.gpu_concurrency, s.worker_concurrency, s.max_queue_depth) == (2, 4, 64)
    assert (s.affinity_wait, s.redis_min_replicas, s.redis_wait_ms) == (30, 0, 100)
    assert [(b.name, b.url, b.gpu_concurrency) for b in s.backends] == [
        ("default", "http://127.0.0.1:11434", 2)
    ]
    assert (s.sync_timeout, s.job_timeout, s.result_ttl, s.max_body_bytes) == (
        300,
        600,
        3600,
        16 * 1024 * 1024,  # the SPEC's 16 MiB: vision models take base64 images in the body
    )
    assert s.health_rate_limit == "600/minute" and s.trusted_proxies == []
    assert s.keys_file is None and s.admin_key is None and s.require_api_key is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("GPUGATE_GPU_CONCURRENCY", "-1"),
        ("GPUGATE_GPU_CONCURRENCY", "0"),
        ("GPUGATE_RATE_LIMIT", "0/minute"),
        ("GPUGATE_RATE_LIMIT", "lots"),
        ("GPUGATE_BURST", "0"),
        ("GPUGATE_TRUSTED_PROXIES", "10.0.0.0/33"),
        ("GPUGATE_MAX_QUEUE_DEPTH", "zero"),
        ("GPUGATE_REDIS_URL", "http://nope"),
        ("GPUGATE_KEYS_FILE", "/no/such/keys.toml"),
    ],
)
def test_nonsense_is_refused_at_start_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ValidationError):
        Settings(_env_file=None)  # type: ignore[call-arg]
    run = subprocess.run(
        [sys.executable, "-m", "gpugate", "api"], capture_output=True, text=True, timeout=60
    )
    assert run.returncode != 0
    assert variable in run.stderr, run.stderr


def test_rates_parse_with_their_period() -> None:
    assert Rate.parse("60/minute").per_second == 1
    assert Rate.parse("10/second").per_second == 10
    assert str(Rate.parse("600/minute")) == "600/minute"


def test_secrets_are_masked() -> None:
    s = Settings(_env_file=None, admin_key="hunter2", redis_url="redis://u:pw@h:6379/0")  # type: ignore[call-arg]
    masked = s.masked()
    assert masked["GPUGATE_ADMIN_KEY"] == "********"
    assert "pw" not in masked["GPUGATE_REDIS_URL"]
