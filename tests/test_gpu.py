"""The GPU path end to end: a run on a CUDA device writes the leaderboard that the same run on the CPU writes, to
float tolerance (skipped without CUDA; `scripts/gpu_check.sh` runs it on a GPU machine)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saebench_poly.leaderboard import units_path
from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec, with_overrides
from tests.conftest import D_MLP, D_MODEL, write_sae

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

RESID = "blocks.0.hook_resid_post"
# (dtype, rtol, atol) of a leaderboard value on the GPU against the CPU: float64 runs agree to rounding; float32
# ones to its precision, propagated through eigendecompositions and logs
TOLERANCES = {"float64": (1e-6, 1e-9), "float32": (2e-3, 1e-4)}


@pytest.fixture
def gpu_spec(tl_spec, tmp_path: Path) -> Path:
    write_sae(tmp_path / "resid-topk", "topk", D_MODEL, 64, RESID, k=4)
    write_sae(tmp_path / "mlp-out-relu", "standard", D_MODEL, 48, "blocks.1.hook_mlp_out", seed=1)
    write_sae(tmp_path / "neurons-jumprelu", "jumprelu", D_MLP, 64, "blocks.0.mlp.hook_post", seed=2)
    return tl_spec(entries=["disk:resid-topk", "disk:mlp-out-relu", "disk:neurons-jumprelu"])


def _run(loaded, device: str, dtype: str, folder: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    board = folder / device / "board.parquet"
    run_benchmark(with_overrides(loaded, {"device": device, "dtype": dtype, "output": str(board)}))
    rows = pd.read_parquet(board)
    return rows, pd.read_parquet(units_path(board))


@pytest.mark.parametrize("dtype", sorted(TOLERANCES))
def test_a_run_on_the_gpu_writes_the_cpu_leaderboard(gpu_spec: Path, tmp_path: Path, dtype: str) -> None:
    loaded = load_spec(gpu_spec)
    (cpu_rows, cpu_units), (gpu_rows, gpu_units) = (_run(loaded, device, dtype, tmp_path) for device in ("cpu", "cuda"))
    assert set(gpu_rows["device"]) == {"cuda"} and set(cpu_rows["device"]) == {"cpu"}
    assert set(gpu_rows["spec_hash"]) == set(cpu_rows["spec_hash"])  # the device is not part of what was scored
    rtol, atol = TOLERANCES[dtype]
    if dtype == "float32":  # a float32 activation at the examples' threshold may fall on either side of it
        cpu_rows, gpu_rows = (rows[rows["metric_family"] != "polysemanticity"] for rows in (cpu_rows, gpu_rows))
    values = [rows.set_index(["entry", "metric"])["value"].sort_index() for rows in (cpu_rows, gpu_rows)]
    assert list(values[0].index) == list(values[1].index)
    np.testing.assert_allclose(values[1].to_numpy(), values[0].to_numpy(), rtol=rtol, atol=atol, equal_nan=True)
    if dtype == "float64":
        key = ["entry", "unit"]
        cpu_units, gpu_units = (u.sort_values(key).reset_index(drop=True) for u in (cpu_units, gpu_units))
        for column in ("poly_status", "n_behaviours", "example_contexts", "example_positions"):
            assert cpu_units[column].astype(str).tolist() == gpu_units[column].astype(str).tolist(), column
