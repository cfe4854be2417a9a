"""Provenance recorded on every leaderboard row: package versions and the git commit of the code that scored."""

from __future__ import annotations

import json
import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

RECORDED_PACKAGES = ("saebench-poly", "torch", "sae-lens", "transformer-lens", "transformers", "datasets", "numpy", "pyarrow")


@cache
def package_versions() -> str:
    """JSON object of the versions of the packages that shape the numbers."""
    versions = {}
    for name in RECORDED_PACKAGES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = ""
    return json.dumps(versions, sort_keys=True)


@cache
def git_commit() -> str:
    """The commit of the saebench_poly checkout that runs, with ``-dirty`` when it has uncommitted changes; empty
    when the package is not in a git checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return f"{commit}-dirty" if dirty else commit
