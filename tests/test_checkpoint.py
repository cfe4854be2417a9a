"""Resumable runs (`saebench_poly.checkpoint`): a run killed with SIGKILL after writing a checkpoint and resumed with
``--resume`` writes the leaderboard of an uninterrupted run, bit for bit on CPU; a checkpoint of another spec is
refused in one line; a finished run leaves no checkpoint."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open

from saebench_poly import checkpoint, cli
from saebench_poly.errors import UserError
from saebench_poly.run import Reporter, _score_here, prepare_run
from saebench_poly.spec import load_spec
from tests.conftest import D_MODEL, write_sae
from tests.test_cli_errors import error_line

HOOK = "blocks.0.hook_resid_post"
TOKENS = 3000  # ~270 one-context batches: long enough to be killed in the middle of the pass


def _spec(tl_spec, tmp_path: Path, **top: object) -> Path:
    write_sae(tmp_path / "sae", "standard", D_MODEL, 48, HOOK)
    return tl_spec(entries=["disk:sae"], tokens=TOKENS, batch_size=1, **top)


def _board(path: Path) -> pd.DataFrame:
    rows = pd.read_parquet(path)
    return rows.set_index(["entry", "metric"])["value"].sort_index()


def _written_position(path: Path) -> dict | None:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads(handle.metadata()["position"])
    except Exception:  # not written yet, or being renamed into place
        return None


def test_a_run_killed_with_sigkill_and_resumed_writes_the_uninterrupted_leaderboard(tl_spec, tmp_path, run_cli) -> None:
    spec = _spec(tl_spec, tmp_path)
    saved = checkpoint.checkpoint_path(tmp_path / ".artifacts" / "tiny-tl")
    # one thread, as the tests run in this process (conftest): a float sum cut over other threads rounds otherwise
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "OMP_NUM_THREADS": "1"}
    killed = subprocess.Popen([sys.executable, "-m", "saebench_poly.cli", "run", str(spec), "--checkpoint-every", "5"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while (position := _written_position(saved)) is None or position["batches"] < 10:
        assert killed.poll() is None, killed.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    assert not (tmp_path / "out" / "board.parquet").exists()

    code, _, err = run_cli("run", str(spec), "--resume")
    assert code == 0, err
    resumed_at = _written_position_line(err)
    assert 0 < resumed_at < TOKENS, err  # it resumed in the middle of the pass
    assert not saved.exists()  # a finished run removes its checkpoint
    resumed = _board(tmp_path / "out" / "board.parquet")

    code, _, err = run_cli("run", str(spec), "--output", str(tmp_path / "plain.parquet"), "--checkpoint-every", "0")
    assert code == 0, err
    uninterrupted = _board(tmp_path / "plain.parquet")
    assert list(resumed.index) == list(uninterrupted.index)
    assert resumed.to_numpy().tobytes() == uninterrupted.to_numpy().tobytes()  # bit-identical, NaNs included
    resumed_units = pd.read_parquet(tmp_path / "out" / "board.units.parquet")
    plain_units = pd.read_parquet(tmp_path / "plain.units.parquet")
    for column in ("firing_frequency", "max_activation", "n_examples", "effective_behaviours", "capacity"):
        assert resumed_units[column].to_numpy(float).tobytes() == plain_units[column].to_numpy(float).tobytes(), column


def _written_position_line(err: str) -> int:
    """The tokens that the "resuming from" message says were scored (the console may wrap it)."""
    found = re.search(r"resuming from .*?: ([\d,]+) tokens", " ".join(err.split()))
    assert found, err
    return int(found.group(1).replace(",", ""))


def test_a_checkpoint_of_another_spec_is_refused_in_one_line(tl_spec, tmp_path, run_cli) -> None:
    spec = _spec(tl_spec, tmp_path)
    prepared = prepare_run(load_spec(spec))
    _score_here(prepared, Reporter(), every=50, resume=False)  # leaves the checkpoint a killed run would
    saved = checkpoint.checkpoint_path(tmp_path / ".artifacts" / "tiny-tl")
    assert saved.is_file()
    other = _spec(tl_spec, tmp_path, seed=1)
    code, _, err = run_cli("run", str(other), "--resume")
    assert code == 2
    assert error_line(err).startswith(f"saebench-poly: error: the checkpoint {saved} was written by a run with other "
                                      "spec settings")
    assert not (tmp_path / "out" / "board.parquet").exists()


def test_a_checkpoint_of_another_version_is_refused_in_one_line(tmp_path) -> None:
    from safetensors.torch import save_file

    old = tmp_path / checkpoint.CHECKPOINT_FILE
    save_file({"x": torch.zeros(1)}, str(old), metadata={"format": f"{checkpoint.FORMAT_NAME} 1"})
    with pytest.raises(UserError, match="written by another version of saebench-poly: run without --resume"):
        checkpoint.restore(old, {}, [], torch.device("cpu"))


def test_resume_with_the_ray_executor_is_refused(tl_spec, tmp_path, run_cli) -> None:
    pytest.importorskip("ray")
    code, _, err = run_cli("run", str(_spec(tl_spec, tmp_path)), "--resume", "--executor", "ray", "--workers", "1")
    assert code == 2
    assert error_line(err) == ("saebench-poly: error: --resume applies to --executor local only (a sharded run "
                               "writes no checkpoint)")


def test_the_command_line_states_the_checkpoint_defaults() -> None:
    assert (cli.CHECKPOINT_FILE, cli.DEFAULT_CHECKPOINT_EVERY) == (checkpoint.CHECKPOINT_FILE, checkpoint.DEFAULT_EVERY)
