"""`gpugate up` (what `make run` runs): the whole stack in the foreground.

Redis: the one at GPUGATE_REDIS_URL if it answers, else a private redis-server on a free
port. Ollama: the one at GPUGATE_OLLAMA_URL if it answers, else the bundled simulator.
Then one worker and the API. Ctrl-C stops everything this command started.

The processes are started as the tests and benchmarks start theirs (`gpugate.testing`),
with their output on this terminal and in this working directory.
"""

from __future__ import annotations

import shutil
import signal
import sys
import time
from pathlib import Path

from gpugate.testing.processes import Process, Spawn, answers_http, stop_all
from gpugate.testing.stack import start_api, start_redis, start_sim, start_worker
from shared.settings import Settings

STOP_TIMEOUT_S = 15
"""How long each process may take to stop after SIGTERM (then SIGKILL)."""


def _redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def run_stack(settings: Settings) -> None:
    children: list[Process] = []
    env: dict[str, str] = {}
    here = Spawn(cwd=Path.cwd(), log=False, new_session=False)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        redis_url = settings.redis_url
        if _redis_answers(redis_url):
            print(f"gpugate up: using Redis at {settings.masked()['GPUGATE_REDIS_URL']}")
        else:
            if shutil.which("redis-server") is None:
                raise SystemExit("gpugate up: no Redis answers and redis-server is not installed")
            children.append(start_redis(**here))
            redis_url = children[-1].url
            print(f"gpugate up: started a private redis-server on port {children[-1].port}")
        env["GPUGATE_REDIS_URL"] = redis_url

        ollama_url = settings.ollama_url
        if answers_http(ollama_url + "/api/version"):
            print(f"gpugate up: using Ollama at {ollama_url}")
        else:
            children.append(start_sim(**here))
            ollama_url = children[-1].url
            print(f"gpugate up: no Ollama answered; started the simulator at {ollama_url}")
        env["GPUGATE_OLLAMA_URL"] = ollama_url

        children.append(start_worker(env, **here))
        children.append(start_api(env, settings.port, host=settings.host, **here))
        print(_banner(children[-1].url, ollama_url))
        while all(p.alive() for p in children):
            time.sleep(0.5)
        dead = [p.name for p in children if not p.alive()]
        print(f"gpugate up: {', '.join(dead)} exited; stopping the rest", file=sys.stderr)
    except AssertionError as exc:  # a child that exited or never became ready
        raise SystemExit(f"gpugate up: {exc}") from None
    except KeyboardInterrupt:
        print("\ngpugate up: stopping")
    finally:
        stop_all(children, timeout=STOP_TIMEOUT_S)


def _banner(api_url: str, ollama_url: str) -> str:
    return f"""
gpugate is up.
  API                 {api_url}   (OpenAI: {api_url}/v1, Ollama: {api_url})
  queue               {api_url}/v1/queue
  metrics             {api_url}/metrics
  console             {api_url}/admin/ui   (with GPUGATE_ADMIN_KEY set)
  Ollama              {ollama_url}

Try:
  curl -s {api_url}/v1/chat/completions -H 'Authorization: Bearer my-key' \\
       -d '{{"model": "llama3.2", "messages": [{{"role": "user", "content": "Hello"}}]}}'

Ctrl-C stops everything started here.
"""
