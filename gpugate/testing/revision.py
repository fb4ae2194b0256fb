"""The code under test, as a report names it."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

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


def tree_at(rev: str) -> Path | None:
    """gpugate's files at `rev` (`git archive` into a new folder), to run another
    revision's API and workers beside today's; None outside a git checkout or for an
    unknown revision."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=False
    )
    if archive.returncode:
        return None
    folder = Path(tempfile.mkdtemp(prefix=f"gpugate-{rev.replace('^', '-parent')}-"))
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder
