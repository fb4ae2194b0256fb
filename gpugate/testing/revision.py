"""The code under test, as a report names it."""

from __future__ import annotations

import subprocess

from gpugate.testing.processes import ROOT


def revision() -> str:
    """The commit under test, and whether the working tree differs from it."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=False, cwd=ROOT
        ).stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return f"gpugate at commit `{commit}`" + (" (working tree modified)" if dirty else "")
