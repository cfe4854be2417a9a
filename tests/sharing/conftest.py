"""Fixtures for submitting and checking: a tiny toy benchmark, SAEs on it, a leaderboard and a results file.

The benchmark and its trained SAE come from `saebench_poly.testing`, as a training repository would use them. The
leaderboard and the results file are scored once and copied into each test that changes them.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from saebench_poly import leaderboard
from saebench_poly.integrity import FileProvenance
from saebench_poly.leaderboard import Contents
from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec
from saebench_poly.testing import (  # noqa: F401 - fixtures, registered by being imported here
    TINY_TOY_MODEL,
    saebench_toy_sae,
    saebench_toy_spec,
    write_toy_spec,
)
from tests.conftest import write_sae

WIDTH = TINY_TOY_MODEL["n_hidden"]


@pytest.fixture(scope="package")
def toy(saebench_toy_spec: Path, saebench_toy_sae: Path) -> dict[str, Path]:  # noqa: F811 - fixtures imported above
    """The tiny spec's folder with: ``sae-a`` (random TopK, the leaderboard's own entry), ``sae-b`` (trained with
    sae-lens), ``sae-broken`` (``sae-b`` with its encoder zeroed, so its code and its reconstruction are the same
    for every input: FVU >= 1), specs ``board`` (entries: sae-a),
    ``submission`` (entries: sae-b) and ``fewer-tokens`` (as ``submission`` on fewer tokens: other settings)."""
    from sae_lens import SAE

    folder = saebench_toy_spec.parent
    write_sae(folder / "sae-a", "topk", WIDTH, 16, "hidden", seed=3, k=2)
    shutil.copytree(saebench_toy_sae, folder / "sae-b", dirs_exist_ok=True)
    broken = SAE.load_from_disk(folder / "sae-b")
    with torch.no_grad():
        broken.W_enc.zero_()
    broken.save_model(folder / "sae-broken")
    return {
        "folder": folder, "sae-a": folder / "sae-a", "sae-b": folder / "sae-b", "sae-broken": folder / "sae-broken",
        "board_spec": write_toy_spec(folder, name="board", entries=["disk:sae-a"]),
        "submission_spec": write_toy_spec(folder, name="submission", entries=["disk:sae-b"]),
        "fewer_tokens_spec": write_toy_spec(folder, name="fewer-tokens", entries=["disk:sae-b"], tokens=3000),
    }


@pytest.fixture(scope="package")
def scored(toy: dict[str, Path]) -> dict[str, Path]:
    """Scored once for these tests, never changed: ``board.parquet`` (spec board) and ``results.parquet`` (spec submission)."""
    paths = {}
    for name, spec in (("board", toy["board_spec"]), ("results", toy["submission_spec"])):
        loaded = load_spec(spec)
        loaded.spec.output = str(toy["folder"] / "scored" / f"{name}.parquet")
        paths[name] = run_benchmark(loaded).output
    return paths


def copy_table(source: Path, target: Path) -> Path:
    """Copy a leaderboard file and its per-unit table."""
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    shutil.copyfile(leaderboard.units_path(source), leaderboard.units_path(target))
    return target


@pytest.fixture
def board(scored: dict[str, Path], tmp_path: Path) -> Path:
    """A leaderboard of its own for this test: sae-a with the raw-neuron, PCA and random baselines."""
    return copy_table(scored["board"], tmp_path / "board" / "board.parquet")


@pytest.fixture
def results(scored: dict[str, Path], tmp_path: Path) -> Path:
    """A results file of its own for this test: sae-b with the baselines."""
    return copy_table(scored["results"], tmp_path / "results" / "results.parquet")


def rewrite(path: Path, edit: Callable, reseal: bool, target: Path | None = None) -> Path:
    """Apply ``edit`` to a results file's rows (DataFrame -> DataFrame) and write them to
    ``target`` (default: in place). ``reseal``: recompute the digests, as a results writer would, so that the edit
    is the only problem; otherwise keep the old ones, as a hand edit does."""
    rows = edit(leaderboard.read_table(path))
    units = leaderboard.read_table(leaderboard.units_path(path), leaderboard.UNITS_SCHEMA)
    provenance = leaderboard.read_provenance(path)
    if reseal:
        provenance = provenance.merged(FileProvenance(digests=leaderboard.entry_digests(rows)))
    target = target or path
    leaderboard.update(target, lambda _old: Contents(rows, units, provenance))
    return target


def as_new_entry(path: Path, name: str, target: Path) -> Path:
    """A copy of the SAE entries of results file ``path`` as another SAE (new entry name, run id and weights
    hash), resealed: what scoring a different checkpoint would write, without scoring it."""
    run_id = uuid.uuid4().hex
    sha = uuid.uuid5(uuid.NAMESPACE_OID, name).hex * 2

    def edit(rows):
        rows = rows[rows["entry_kind"] == "sae"].copy()
        return rows.assign(entry=name, run_id=run_id, weights_sha256=sha)

    units = leaderboard.read_table(leaderboard.units_path(path), leaderboard.UNITS_SCHEMA)
    units = units[units["entry_kind"] == "sae"].assign(entry=name, run_id=run_id)
    rows = edit(leaderboard.read_table(path))
    provenance = FileProvenance(digests=leaderboard.entry_digests(rows), specs=leaderboard.read_provenance(path).specs)
    leaderboard.update(target, lambda _old: Contents(rows, units, provenance))
    return target


def schema_metadata(path: Path) -> dict[bytes, bytes]:
    return dict(pq.read_schema(path).metadata)
