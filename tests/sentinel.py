"""The Redis Sentinel cluster of the tests, from the one harness (`gpugate.testing.sentinel`).

Kept so that `from tests.sentinel import ...` goes on working.
"""

from __future__ import annotations

from gpugate.testing.sentinel import (
    DOWN_AFTER_MS,
    MASTER_NAME,
    PASSWORD,
    SentinelCluster,
    start_cluster,
    start_sentinel,
    start_server,
)

__all__ = [
    "DOWN_AFTER_MS",
    "MASTER_NAME",
    "PASSWORD",
    "SentinelCluster",
    "start_cluster",
    "start_sentinel",
    "start_server",
]
