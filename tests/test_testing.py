"""The harness itself (gpugate/testing): what the benchmarks rely on and no other test
shows — keys files gpugate reads back, percentiles, a process's CPU and memory, the
commit under test."""

from __future__ import annotations

import hashlib
import os
import random
import statistics
import time
from pathlib import Path

import pytest

from api.tiers import Tier, load_keys_file
from gpugate.testing.keys import Key, write_keys_file
from gpugate.testing.revision import revision
from gpugate.testing.stats import cpu_s, percentile, rss_mb
from shared.settings import Rate


def test_a_keys_file_written_by_the_harness_is_what_gpugate_reads(tmp_path: Path) -> None:
    default = Tier(name="free", rate=Rate.parse("60/minute"), burst=10, max_queued=5, priority=0)
    path = write_keys_file(
        tmp_path / "keys.toml",
        [Key("team-a", "secret-a"), Key("team-b", 'se"cret-b', "pro")],
        {"pro": {"rate": "600/hour", "burst": 50, "priority": 10, "weight": 2.5}},
    )
    ring = load_keys_file(path, default)
    assert ring.keys is not None
    by_name = {key.name: key for key in ring.keys}
    assert by_name["team-a"].sha256 == hashlib.sha256(b"secret-a").hexdigest()
    assert by_name["team-a"].tier is default
    pro = by_name["team-b"].tier
    assert by_name["team-b"].sha256 == hashlib.sha256(b'se"cret-b').hexdigest()
    assert (pro.name, pro.burst, pro.priority, pro.weight) == ("pro", 50, 10, 2.5)
    assert pro.rate == Rate.parse("600/hour")


@pytest.mark.parametrize("n", [2, 3, 10, 101])
def test_percentiles_are_the_inclusive_quantiles(n: int) -> None:
    values = [random.Random(n).uniform(0, 100) for _ in range(n)]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    for q in (1, 50, 90, 99):
        assert percentile(values, q) == pytest.approx(cuts[q - 1])
    assert percentile(values, 0) == min(values)
    assert percentile(values, 100) == max(values)


def test_percentiles_of_one_value_and_of_none() -> None:
    assert percentile([0.25], 99) == 0.25
    assert percentile([], 50) is None


def test_cpu_and_memory_of_a_process_are_read_from_proc() -> None:
    before = cpu_s(os.getpid())
    deadline = time.monotonic() + 5
    while cpu_s(os.getpid()) <= before:  # spinning spends CPU: the reading must move
        assert time.monotonic() < deadline, "the CPU time of this process did not grow in 5 s"
    assert 5 < rss_mb(os.getpid()) < 10_000


def test_a_report_names_the_commit_under_test() -> None:
    assert revision().startswith("gpugate at commit `")
