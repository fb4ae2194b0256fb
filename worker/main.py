"""`gpugate worker`: one worker process (worker/arq_adapter.py builds it)."""

from __future__ import annotations

from shared.settings import Settings
from worker.arq_adapter import create_worker


def run_worker(settings: Settings) -> None:
    create_worker(settings).run()
