"""Settings: every SPEC variable with its default; nonsense refused naming the variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


@pytest.mark.parametrize(
    ("backends", "named"),
    [
        (
            '[{"name": "gpu-a", "url": "http://a:11434", "gpu_concurrency": 0}]',
            "backends[0] (gpu-a)",
        ),
        (
            '[{"name": "gpu-a", "url": "http://a", "gpu_concurrency": 1},'
            ' {"name": "gpu-b", "url": "ftp://b", "gpu_concurrency": 1}]',
            "backends[1] (gpu-b): url",
        ),
        (
            '[{"name": "x", "url": "http://a", "gpu_concurrency": 1},'
            ' {"name": "x", "url": "http://b", "gpu_concurrency": 1}]',
            "'x' is used twice",
        ),
        ("not json", "GPUGATE_BACKENDS is not JSON"),
    ],
)
def test_a_bad_backend_stops_start_up_naming_the_entry(
    monkeypatch: pytest.MonkeyPatch, backends: str, named: str
) -> None:
    monkeypatch.setenv("GPUGATE_BACKENDS", backends)
    with pytest.raises(ValidationError) as refused:
        Settings(_env_file=None)  # type: ignore[call-arg]
    assert named in str(refused.value)


def test_backends_come_from_a_toml_file(tmp_path: Path) -> None:
    path = tmp_path / "backends.toml"
    path.write_text(
        '[[backends]]\nname = "gpu-a"\nurl = "http://a:11434/"\ngpu_concurrency = 2\n'
        '[[backends]]\nname = "gpu-b"\nurl = "http://b:11434"\ngpu_concurrency = 1\n'
        'models = ["qwen2.5:7b"]\n'
    )
    s = Settings(_env_file=None, backends_file=path)  # type: ignore[call-arg]
    assert [(b.name, b.url, b.gpu_concurrency, b.models) for b in s.backends] == [
        ("gpu-a", "http://a:11434", 2, None),
        ("gpu-b", "http://b:11434", 1, ("qwen2.5:7b",)),
    ]


def test_a_sentinel_url_is_accepted() -> None:
    url = "redis+sentinel://:pw@127.0.0.1:26379,127.0.0.1:26380/mymaster/0"
    s = Settings(_env_file=None, redis_url=url)  # type: ignore[call-arg]
    assert "pw" not in s.masked()["GPUGATE_REDIS_URL"]
