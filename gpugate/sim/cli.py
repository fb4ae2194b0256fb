"""The command line: `gpugate sim` and `python -m gpugate.sim`."""

from __future__ import annotations

import argparse

import uvicorn

from gpugate.sim.app import create_app
from gpugate.sim.config import FAIL_MODES, SimConfig, validate_config
from gpugate.sim.performance import CALIBRATED, PerformanceConfig, validate_performance

DESCRIPTION = "An Ollama simulator: Ollama's HTTP API without a GPU."


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = SimConfig()
    parser = argparse.ArgumentParser(prog="python -m gpugate.sim", description=DESCRIPTION)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434)
    parser.add_argument("--models", default=",".join(defaults.models), help="comma-separated")
    parser.add_argument("--tokens", type=int, default=defaults.tokens, help="tokens per reply")
    parser.add_argument(
        "--token-delay",
        type=float,
        default=None,
        help=f"seconds per token (default {defaults.token_delay_s}, calibrated "
        f"{CALIBRATED['token_delay_s']})",
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
    performance = PerformanceConfig()
    parser.add_argument(
        "--knee",
        type=int,
        default=None,
        help="generations at once past which each token takes longer, so that tokens/s stops "
        f"rising (default {performance.knee}: off; calibrated {CALIBRATED['knee']})",
    )
    parser.add_argument(
        "--prompt-token-time",
        type=float,
        default=None,
        help="seconds per uncached prompt token, with a prompt cache per slot (default "
        f"{performance.prompt_token_s}: off; calibrated {CALIBRATED['prompt_token_s']})",
    )
    parser.add_argument(
        "--max-generations",
        type=int,
        default=performance.max_generations,
        help="generations at once past which a request answers 503 out of memory (0: none)",
    )
    parser.add_argument(
        "--calibrated",
        action="store_true",
        help="token delay, knee and prompt token time measured on llama-server (the flags "
        "above still win)",
    )
    return parser.parse_args(argv)


def _chosen(given: float | None, name: str, default: float, calibrated: bool) -> float:
    if given is not None:
        return given
    return CALIBRATED[name] if calibrated else default


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    defaults, calibrated = SimConfig(), args.calibrated
    performance = PerformanceConfig(
        knee=int(_chosen(args.knee, "knee", 0, calibrated)),
        prompt_token_s=_chosen(args.prompt_token_time, "prompt_token_s", 0.0, calibrated),
        max_generations=args.max_generations,
    )
    config = SimConfig(
        models=[name.strip() for name in args.models.split(",") if name.strip()],
        tokens=args.tokens,
        token_delay_s=_chosen(
            args.token_delay, "token_delay_s", defaults.token_delay_s, calibrated
        ),
        parallel=args.parallel,
        fail_mode=args.fail_mode,
        load_time_s=args.load_time,
        max_loaded=args.max_loaded,
    )
    try:
        validate_config(config)
        validate_performance(performance)
    except ValueError as exc:
        raise SystemExit(f"gpugate.sim: {exc}") from None
    uvicorn.run(
        create_app(config, performance),
        host=args.host,
        port=args.port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
