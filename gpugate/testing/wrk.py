"""wrk, the load tool (Debian's package; `make wrk`), with one Lua script that checks
every response, so that a run cannot silently measure errors.

A `Load` says what to POST and what a good answer is; `run(url, load, ...)` runs wrk and
returns its `Result`; `start` and `finish` run several at once.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NotRequired, TypedDict, Unpack

SCRIPT = r"""
-- gpugate.testing.wrk: POST one JSON body; a response is unexpected unless it has the
-- status, both texts and (when count > 0) exactly `count` matches of `pattern`.
-- args: status text1 text2 pattern count header value keys body window_after
--   keys "fresh": the header's value gets "-1", "-2", ... (a new API key per request)
--   window_after > 0: chunks are also counted over a window from that response on
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } gpugate_timespec;
int clock_gettime(int clk, gpugate_timespec *tp);
]]
local ts = ffi.new("gpugate_timespec")
local function now()
  ffi.C.clock_gettime(1, ts)
  return tonumber(ts.tv_sec) + tonumber(ts.tv_nsec) * 1e-9
end
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args)
  status_ok, text1, text2 = tonumber(args[1]), args[2], args[3]
  pattern, count = args[4], tonumber(args[5])
  header, value, fresh, payload = args[6], args[7], args[8] == "fresh", args[9]
  window_after = tonumber(args[10])
  req = wrk.format("POST", nil, {["Content-Type"] = "application/json", [header] = value},
    payload)
  sent, unexpected, chunks, seen, wchunks, wfirst, wlast = 0, 0, 0, 0, 0, 0, 0
  statuses = {}
end
function request()
  if not fresh then return req end
  sent = sent + 1
  return wrk.format("POST", nil, {["Content-Type"] = "application/json",
    [header] = value .. "-" .. sent}, payload)
end
function response(status, headers, body)
  local n = 0
  if pattern ~= "" then n = select(2, string.gsub(body, pattern, "")) end
  if status ~= status_ok or not string.find(body, text1, 1, true)
      or not string.find(body, text2, 1, true) or (count > 0 and n ~= count) then
    unexpected = unexpected + 1
  end
  statuses[status] = (statuses[status] or 0) + 1
  chunks = chunks + n
  if window_after > 0 then
    -- from the window_after-th response to the last one: once every connection has
    -- finished a stream, only whole streams fall in the window
    seen = seen + 1
    if seen == window_after then wfirst = now() elseif seen > window_after then
      wchunks = wchunks + n
      wlast = now()
    end
  end
end
function done(summary, latency, requests)
  local counts, bad, all, win, window = {}, 0, 0, 0, 0
  for _, t in ipairs(threads) do
    for status, n in pairs(t:get("statuses")) do counts[status] = (counts[status] or 0) + n end
    bad, all, win = bad + t:get("unexpected"), all + t:get("chunks"), win + t:get("wchunks")
    window = math.max(window, t:get("wlast") - t:get("wfirst"))
  end
  for status, n in pairs(counts) do io.write(string.format("STATUS %d %d\n", status, n)) end
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d %d %d %.6f %d %d %d %d %d %d\n", summary.requests,
    summary.duration, bad, all, win, window, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True)
class Load:
    """What wrk sends, and what a good answer is."""

    body: str
    """The JSON body of every POST."""
    status: int
    texts: tuple[str, str] = ("", "")
    """Pieces every good answer's body contains."""
    header: tuple[str, str] = ("X-API-Key", "")
    """A header sent with every request (the API key: `Authorization: Bearer ...`)."""
    fresh: bool = False
    """A new header value on every request (the value with "-1", "-2", ...): a new key."""
    pattern: str = ""
    """A Lua pattern counted in every body (NDJSON lines: "\\n", SSE events: "data: ")."""
    count: int = 0
    """> 0: a good answer has exactly this many matches of `pattern`."""
    window_after: int = 0
    """> 0: chunks are also counted from this response on (`Result.window_chunks`)."""


@dataclass(frozen=True)
class Result:
    requests: int
    duration_s: float
    unexpected: int
    """Answers without the status, texts or count of the `Load`."""
    chunks: int
    window_chunks: int
    window_s: float
    socket_errors: tuple[int, int, int, int]
    """connect, read, write, timeout."""
    p50_ms: float
    p99_ms: float
    statuses: Counter[int]

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.duration_s

    def check(self, what: str) -> Result:
        """Fail unless every answer was the expected one."""
        if self.unexpected or any(self.socket_errors):
            raise AssertionError(
                f"{what}: {self.unexpected} unexpected responses and socket errors "
                f"(connect, read, write, timeout) {list(self.socket_errors)} in "
                f"{self.requests} requests (statuses {dict(self.statuses)})"
            )
        return self


def require() -> None:
    if shutil.which("wrk") is None:
        raise RuntimeError("wrk is missing: `make wrk` installs Debian's package")


def version() -> str:
    out = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    words = (out.stdout + out.stderr).split()
    return " ".join(words[:2]) if words else "wrk"


@functools.cache
def _script() -> Path:
    path = Path(tempfile.mkdtemp(prefix="gpugate-wrk-")) / "post.lua"
    path.write_text(SCRIPT)
    return path


class Options(TypedDict):
    """How wrk runs: `-d`, `-c`, `-t` (default 1) and `--timeout` (default 5 s)."""

    duration_s: int
    connections: int
    threads: NotRequired[int]
    timeout_s: NotRequired[int]


def start(url: str, load: Load, **options: Unpack[Options]) -> subprocess.Popen[str]:
    """wrk POSTing `load` to `url` for `duration_s` whole seconds; `finish` reads it."""
    argv = ["wrk", f"-t{options.get('threads', 1)}", f"-c{options['connections']}"]
    argv += [f"-d{options['duration_s']}s", "--timeout", f"{options.get('timeout_s', 5)}s"]
    argv += ["-s", str(_script()), url, "--"]
    argv += [str(load.status), *load.texts, load.pattern, str(load.count), *load.header]
    argv += ["fresh" if load.fresh else "fixed", load.body, str(load.window_after)]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen[str], what: str, timeout_s: float = 180) -> Result:
    out, err = proc.communicate(timeout=timeout_s)
    lines = out.splitlines()
    line = next((x for x in lines if x.startswith("RESULT ")), None)
    if proc.returncode or line is None:
        raise AssertionError(f"{what}: wrk failed:\n{out}{err}")
    requests, duration_us, bad, chunks, wchunks, window, *rest = line.split()[1:]
    connect, read, write, timeout, p50_us, p99_us = (int(x) for x in rest)
    statuses = Counter({int(x.split()[1]): int(x.split()[2]) for x in lines if x[:7] == "STATUS "})
    return Result(
        requests=int(requests),
        duration_s=int(duration_us) / 1e6,
        unexpected=int(bad),
        chunks=int(chunks),
        window_chunks=int(wchunks),
        window_s=float(window),
        socket_errors=(connect, read, write, timeout),
        p50_ms=p50_us / 1000,
        p99_ms=p99_us / 1000,
        statuses=statuses,
    )


def run(url: str, load: Load, what: str = "wrk", **options: Unpack[Options]) -> Result:
    """One wrk run (see `start`); `what` names it in a failure."""
    return finish(start(url, load, **options), what, options["duration_s"] + 120)
