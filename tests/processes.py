"""Real servers for the tests, from the one harness (`gpugate.testing`): a private
redis-server, the simulator, the API, workers, free ports and waits with a deadline.

Kept so that `from tests.processes import ...` goes on working; new code imports
`gpugate.testing` directly.
"""

from __future__ import annotations

from gpugate.testing.processes import ROOT, Process, free_port, wait_until
from gpugate.testing.processes import spawn as _spawn
from gpugate.testing.stack import start_api, start_redis, start_sim, start_worker

__all__ = [
    "ROOT",
    "Process",
    "_spawn",
    "free_port",
    "start_api",
    "start_redis",
    "start_sim",
    "start_worker",
    "wait_until",
]
