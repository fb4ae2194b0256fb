"""Figures of a run: percentiles, and what a process has used (Linux /proc)."""

from __future__ import annotations

import math
import os
import resource
from collections.abc import Sequence
from pathlib import Path


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0 to 100), interpolated between the closest ranks (as
    `statistics.quantiles(..., method="inclusive")`); None of no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    """CPU seconds of this process's children that have ended (wrk runs, say)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rss_mb(pid: int) -> float:
    """Resident memory of process `pid`, in MB (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
