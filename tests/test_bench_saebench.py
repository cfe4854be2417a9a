"""The SAEBench comparison script says it skips, and exits 0, where no Python with sae-bench is given."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "perf" / "bench_saebench.py"


def test_without_sae_bench_the_comparison_skips_in_one_line(tmp_path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "SAEBENCH_PYTHON"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--saebench-python", str(tmp_path / "no-python")],
                          capture_output=True, text=True, env=env, check=False, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        "skipped: no Python with sae-bench (pass --saebench-python or set SAEBENCH_PYTHON; README, Performance)"]
