"""Writes a benchmark's section into BENCHMARKS.md with the command, date, versions, machine."""

from __future__ import annotations

import argparse
import os
import platform
import re
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "BENCHMARKS.md"
PACKAGES = ("fastapi", "starlette", "pydantic", "uvicorn", "arq", "redis", "hiredis", "httpx")


def environment() -> str:
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in PACKAGES)
    try:
        redis_v = (
            subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True, check=True
            )
            .stdout.split()[2]
            .removeprefix("v=")
        )
    except (OSError, subprocess.CalledProcessError, IndexError):
        redis_v = "unknown"
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"- machine: {os.cpu_count()} cores ({cpu}), {mem_gib:.0f} GiB, {platform.platform()}\n"
        f"- Python {sys.version.split()[0]}, redis-server {redis_v}, {versions}\n"
    )


def write_section(name: str, command: str, body: str) -> None:
    """Replace (or append) the section between the markers of benchmark `name`."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    section = f"{start}\n`{command}`\n\n{environment()}\n{body.strip()}\n{end}"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text)
    else:
        text += "\n" + section + "\n"
    BENCHMARKS.write_text(text)


def verdict(ok: bool) -> str:
    """A target's verdict in a report's table."""
    return "met" if ok else "**not met**"


def arguments(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The options of `python -m bench.NAME`, starting with --quick."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=doc)
    parser.add_argument("--quick", action="store_true", help="smoke run; writes nothing")
    return parser


def is_quick(args: argparse.Namespace, name: str) -> bool:
    """--quick, or NAME_QUICK=1 in the environment."""
    return bool(args.quick) or os.environ.get(f"{name.upper()}_QUICK", "") not in ("", "0")


def publish(name: str, text: str, *, quick: bool, command: str = "") -> None:
    """Write the section of benchmark `name` into BENCHMARKS.md, unless the run was quick."""
    if quick:
        print(f"quick run ({name}): BENCHMARKS.md untouched", flush=True)
    else:
        write_section(name, command or f"make bench  # python -m bench {name}", text)
