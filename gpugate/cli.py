"""The `gpugate` command: api, worker, sim, up, doctor, concurrency, keys."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from shared.settings import Settings, load_settings


def _settings(**overrides: object) -> Settings:
    try:
        return load_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = [
            f"  GPUGATE_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            for err in exc.errors()
        ]
        sys.exit("gpugate: invalid settings:\n" + "\n".join(lines))


def _observed(settings: Settings, service: str) -> None:
    """Log lines as GPUGATE_LOG_FORMAT says; traces if wanted (shared/telemetry.py)."""
    from shared import logs, telemetry

    logs.setup(settings)
    if telemetry.setup(settings, service):
        logging.getLogger("gpugate").info("OpenTelemetry traces on (OTLP/HTTP)")


def cmd_api(args: argparse.Namespace) -> None:
    import uvicorn

    from api.app import create_app
    from shared.logs import uvicorn_log_config

    settings = _settings(host=args.host, port=args.port)
    _observed(settings, "gpugate-api")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        proxy_headers=False,  # X-Forwarded-For is judged by GPUGATE_TRUSTED_PROXIES only
        access_log=False,
        log_config=uvicorn_log_config(),
        log_level=settings.log_level,
        timeout_graceful_shutdown=5,
    )


def cmd_worker(args: argparse.Namespace) -> None:
    from worker.main import run_worker

    settings = _settings()
    _observed(settings, "gpugate-worker")
    run_worker(settings)


def cmd_sim(argv: list[str]) -> None:
    from gpugate import sim

    sim.main(argv)


def cmd_up(args: argparse.Namespace) -> None:
    from gpugate.stack import run_stack

    run_stack(_settings())


def cmd_doctor(args: argparse.Namespace) -> None:
    from gpugate.doctor import doctor

    asyncio.run(doctor(_settings()))


def cmd_concurrency(args: argparse.Namespace) -> None:
    from gpugate.doctor import concurrency

    asyncio.run(concurrency(_settings(), args.n, backend=args.backend, reset=args.reset))


def cmd_keys(args: argparse.Namespace) -> None:
    from gpugate.keys_cli import run

    run(_settings(), args)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sim"]:  # the simulator parses its own options
        cmd_sim(argv[1:])
        return
    parser = argparse.ArgumentParser(prog="gpugate", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    api = sub.add_parser("api", help="run the HTTP API")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.set_defaults(func=cmd_api)
    sub.add_parser("worker", help="run a worker (arq)").set_defaults(func=cmd_worker)
    sub.add_parser("sim", help="run the Ollama simulator (see `gpugate sim --help`)")
    sub.add_parser("up", help="the whole stack in the foreground (make run)").set_defaults(
        func=cmd_up
    )
    sub.add_parser("doctor", help="versions, settings, Redis, Ollama, workers").set_defaults(
        func=cmd_doctor
    )
    conc = sub.add_parser("concurrency", help="show, or set live, a backend's GPU cap")
    conc.add_argument("n", nargs="?", type=int, help="the new cap (1..1024)")
    conc.add_argument("--reset", action="store_true", help="back to the configured cap")
    conc.add_argument("--backend", help="the backend (needed when there are several)")
    conc.set_defaults(func=cmd_concurrency)
    from gpugate.keys_cli import add_parser

    add_parser(sub).set_defaults(func=cmd_keys)
    args = parser.parse_args(argv)
    args.func(args)
