"""The command line: `gpugate sim` and `python -m gpugate.sim`."""

from __future__ import annotations

import argparse

import uvicorn

from gpugate.sim.app import create_app
from gpugate.sim.config import FAIL_MODES, SimConfig, validate_config

DESCRIPTION = "An Ollama simulator: Ollama's HTTP API without a GPU."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(prog="python -m gpugate.sim", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="tokens per reply")
    parser.add_argument(
        "--token-delay", type=float, default=defaults.token_delay_s, help="seconds per token"
    )
    parser.add_argument(
        "--parallel", type=int, default=defaults.parallel, help="like OLLAMA_NUM_PARALLEL"
    )
    parser.add_argument("--fail-mode", choices=FAIL_MODES, default=defaults.fail_mode)
    parser.add_argument(
        "--load-time",
        type=float,
        default=defaults.load_time_s,
        help="seconds to load a 3.2B model (llama3.2); others in proportion to their size",
    )
    parser.add_argument(
        "--max-loaded",
        type=int,
        default=defaults.max_loaded,
        help="like OLLAMA_MAX_LOADED_MODELS (0: no limit)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    config = SimConfig(
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        tokens=args.tokens,
        token_delay_s=args.token_delay,
        parallel=args.parallel,
        fail_mode=args.fail_mode,
        load_time_s=args.load_time,
        max_loaded=args.max_loaded,
    )
    try:
        validate_config(config)
    except ValueError as exc:
        raise SystemExit(f"gpugate.sim: {exc}") from None
    uvicorn.run(
        create_app(config),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
