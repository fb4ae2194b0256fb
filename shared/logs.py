"""Log lines of the API and the worker: text (the default), or with
GPUGATE_LOG_FORMAT=json one JSON object per line (SPEC "Observability", issue 26):

    {"ts": "2026-12-07T03:20:01.123Z", "level": "warning", "logger": "gpugate.worker",
     "msg": "...", "job_id": "job_…", "key": "team-a", "backend": "gpu0", "trace_id": "…"}

`job_id`, `key` (the key's name or fingerprint, never the key) and `backend` are bound
to the task that handles a request or runs a job (`bind`, a context variable: whatever
that task logs carries them); `trace_id` is the current span's when tracing is on.
uvicorn's and arq's loggers propagate to the one root handler, so their lines are JSON
too (uvicorn's access log included, when a server enables it), and so are warnings and
uncaught exceptions.
"""

from __future__ import annotations

import logging
import sys
import threading
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import Any

import orjson

from shared import telemetry
from shared.settings import Settings

JSON = False
"""True once `setup` chose JSON lines: callers bind fields only then (`if logs.JSON:`)."""

_BOUND: ContextVar[dict[str, str] | None] = ContextVar("gpugate_log_fields", default=None)
FIELDS = ("job_id", "key", "backend", "trace_id")
"""What a line carries where it applies, bound or given as `extra=`."""
_THIRD_PARTY = ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi", "arq")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def bind(**fields: str) -> None:
    """Add fields to every line the current task (and the tasks it starts) logs."""
    bound = _BOUND.get()
    _BOUND.set({**bound, **fields} if bound else fields)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        bound = _BOUND.get()
        if bound:
            out.update(bound)
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value:
                out[name] = value
        if "trace_id" not in out and telemetry.ENABLED:
            trace_id = telemetry.current_trace_id()
            if trace_id:
                out["trace_id"] = trace_id
        if record.name == "uvicorn.access" and isinstance(record.args, tuple):
            _access_fields(out, record.args)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return orjson.dumps(out, default=str).decode()


def _access_fields(out: dict[str, Any], args: tuple[Any, ...]) -> None:
    """uvicorn's access record: (client, method, path, HTTP version, status)."""
    if len(args) == 5:
        out.update(client=args[0], method=args[1], path=args[2], status=args[4])


def setup(settings: Settings) -> None:
    """Configure the root logger once per process (gpugate/cli.py), before uvicorn or arq
    start; in JSON mode their loggers hand their records to it."""
    global JSON
    level = settings.log_level.upper()
    if settings.log_format != "json":
        logging.basicConfig(level=level, format=TEXT_FORMAT)
    else:
        JSON = True
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(level)
        for name in _THIRD_PARTY:
            third = logging.getLogger(name)
            third.handlers.clear()
            third.propagate = True
        logging.captureWarnings(True)
        sys.excepthook = _log_uncaught
        threading.excepthook = _log_thread_uncaught
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Ollama call is noise


def uvicorn_log_config() -> dict[str, Any] | None:
    """uvicorn's `log_config`: its own in text mode; none in JSON mode (the root's)."""
    if JSON:
        return None
    from uvicorn.config import LOGGING_CONFIG

    return LOGGING_CONFIG


def _log_uncaught(
    kind: type[BaseException], value: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("gpugate").critical("uncaught exception", exc_info=(kind, value, tb))


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is None:
        return
    logging.getLogger("gpugate").error(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
