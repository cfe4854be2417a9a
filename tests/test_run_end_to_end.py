"""`saebench-poly run` end to end on a tiny transformer-lens model and on the embedded toy benchmark."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from saebench_poly.leaderboard import LEADERBOARD_SCHEMA, SCHEMA_METADATA_KEY, SCHEMA_VERSION, UNITS_SCHEMA, units_path
from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec, with_overrides
from saebench_poly.testing import write_toy_spec
from tests.conftest import D_MLP, D_MODEL, copy_of_toy_spec, write_sae

RESID = "blocks.0.hook_resid_post"
MLP_OUT = "blocks.1.hook_mlp_out"


@pytest.fixture
def sae_folders(tmp_path: Path) -> list[str]:
    write_sae(tmp_path / "resid-topk", "topk", D_MODEL, 64, RESID, k=4)
    write_sae(tmp_path / "mlp-out-relu", "standard", D_MODEL, 48, MLP_OUT, seed=1)
    write_sae(tmp_path / "neurons-jumprelu", "jumprelu", D_MLP, 64, "blocks.0.mlp.hook_post", seed=2)
    return ["disk:resid-topk", "disk:mlp-out-relu", "disk:neurons-jumprelu"]


def test_cli_run_writes_a_leaderboard_with_sae_and_neuron_rows(tl_spec, sae_folders, run_cli, tmp_path: Path) -> None:
    spec = tl_spec(entries=sae_folders)
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    assert "tokens scored" in out
    board = tmp_path / "out" / "board.parquet"
    rows = pd.read_parquet(board)
    entries = set(rows["entry"])
    # each SAE's hook brings the MLP neurons of its block; the spec's hook brings all three baselines
    assert {"resid-topk", "mlp-out-relu", "neurons-jumprelu", "neurons:blocks.0.mlp.hook_post",
            "neurons:blocks.1.mlp.hook_post", f"neurons:{RESID}", f"pca:{RESID}", f"random:{RESID}"} == entries
    wide = rows.pivot_table(index="entry", columns="metric", values="value")
    assert wide.loc["resid-topk", "l0"] == pytest.approx(4)
    for neurons in ("neurons:blocks.0.mlp.hook_post", "neurons:blocks.1.mlp.hook_post", f"pca:{RESID}"):
        assert wide.loc[neurons, "fvu"] == pytest.approx(0, abs=1e-5)
        assert wide.loc[neurons, "ce_increase"] == pytest.approx(0, abs=1e-4)
        assert wide.loc[neurons, "kl_divergence"] == pytest.approx(0, abs=1e-5)
        assert wide.loc[neurons, "ce_loss_recovered"] == pytest.approx(1, abs=1e-3)
    assert (wide.loc["resid-topk", "kl_divergence"] > 1e-4) and (wide.loc["resid-topk", "fvu"] > 0.01)
    assert "feature_recovery" not in set(rows["metric_family"])
    provenance = rows.iloc[0]
    assert provenance["tokens_scored"] == 37 * (12 - 1)  # ceil(400 / 11) contexts of 11 scored tokens each
    assert provenance["device"] == "cpu" and provenance["spec_name"] == "tiny-tl" and len(provenance["spec_hash"]) == 64
    assert rows.groupby("entry")["weights_sha256"].nunique().eq(1).all() and rows["weights_sha256"].str.len().eq(64).all()
    assert '"torch"' in provenance["package_versions"]
    assert pq.read_schema(board).metadata[SCHEMA_METADATA_KEY] == str(SCHEMA_VERSION).encode()
    assert pq.read_schema(board).remove_metadata().equals(LEADERBOARD_SCHEMA)
    units = pd.read_parquet(units_path(board))
    assert list(units.columns) == UNITS_SCHEMA.names
    assert len(units[units["entry"] == "resid-topk"]) == 64
    assert duckdb.sql(f"select count(distinct entry) from '{board}'").fetchall() == [(len(entries),)]


def test_metrics_do_not_depend_on_batch_size(tl_spec, sae_folders) -> None:
    loaded = load_spec(tl_spec(entries=sae_folders, tokens=240))
    results = [run_benchmark(with_overrides(loaded, {"batch_size": size}), write=False).rows for size in (1, 7, 64)]
    values = [r.set_index(["entry", "metric"])["value"].sort_index() for r in results]
    for other in values[1:]:
        assert list(other.index) == list(values[0].index)
        np.testing.assert_allclose(other.to_numpy(), values[0].to_numpy(), rtol=1e-6, atol=1e-7)


def test_running_a_spec_again_replaces_its_rows(tl_spec, sae_folders, tmp_path: Path) -> None:
    loaded = load_spec(tl_spec(entries=sae_folders[:1], tokens=100))
    first = run_benchmark(loaded)
    second = run_benchmark(loaded)
    rows = pd.read_parquet(first.output)
    assert len(rows) == len(second.rows) and set(rows["run_id"]) == {second.rows["run_id"][0]}
    other = with_overrides(loaded, {"name": "another-spec", "tokens": 90})  # other settings: its rows join the board
    run_benchmark(other)
    assert set(pd.read_parquet(first.output)["spec_name"]) == {"tiny-tl", "another-spec"}


def test_tables_written_a_slice_at_a_time_read_back_whole(tl_spec, sae_folders, monkeypatch, tmp_path: Path) -> None:
    from saebench_poly import leaderboard

    result = run_benchmark(load_spec(tl_spec(entries=sae_folders[:1], tokens=100)), write=False)
    schema = leaderboard.units_schema(result.units.columns)
    leaderboard.write_frame(result.units, schema, str(tmp_path / "whole.parquet"))
    monkeypatch.setattr(leaderboard, "WRITE_ROWS", 7)  # the per-unit table (~100 rows) in many row groups
    leaderboard.write_frame(result.units, schema, str(tmp_path / "sliced.parquet"))
    assert pq.ParquetFile(tmp_path / "sliced.parquet").metadata.num_row_groups == -(-len(result.units) // 7)
    whole, sliced = (pq.read_table(tmp_path / name) for name in ("whole.parquet", "sliced.parquet"))
    assert sliced.equals(whole) and sliced.schema.metadata == whole.schema.metadata
    assert whole.schema.metadata[SCHEMA_METADATA_KEY] == str(SCHEMA_VERSION).encode()


def test_the_embedded_default_runs_and_saes_beat_neurons_at_finding_true_features(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("run", str(copy_of_toy_spec(tmp_path)), "--output", str(tmp_path / "toy.parquet"), "--tokens", "20000")
    assert code == 0, err
    wide = pd.read_parquet(tmp_path / "toy.parquet").pivot_table(index="entry", columns="metric", values="value")
    assert {"l1-0.1", "l1-0.3", "l1-1.0", "topk-2", "topk-4", "neurons:hidden", "pca:hidden", "random:hidden"} == set(wide.index)
    assert wide.loc["topk-2", "l0"] <= 2 and wide.loc["topk-4", "l0"] <= 4
    assert wide.loc["l1-0.3", "mean_max_cosine"] > wide.loc["neurons:hidden", "mean_max_cosine"] + 0.1
    assert wide.loc["neurons:hidden", "fvu"] == 0
    # a toy model's sample is no text: its one "token" lists its nonzero features, and the code at it is the peak's
    examples = pd.read_parquet(tmp_path / "toy.examples.parquet")
    assert set(examples["token_kind"]) == {"features"} and examples["token_ids"].isna().all()
    # (a PCA or random direction, centred, may peak on a sample with no feature active)
    assert examples["tokens"].map(lambda t: len(t) == 1 and (t[0].startswith("f") or t[0] == "(no feature active)")).all()
    assert (examples["window_start"] == 0).all() and (examples["activations"].map(len) == 1).all()


def test_hooks_lists_the_models_hooks_with_their_widths(tl_spec, run_cli) -> None:
    code, out, err = run_cli("hooks", str(tl_spec()))
    assert code == 0, err
    widths = dict(line.split("\t") for line in out.strip().splitlines())
    assert widths[RESID] == str(D_MODEL) and widths["blocks.1.mlp.hook_post"] == str(D_MLP)
    assert widths["blocks.0.attn.hook_z"] == str(D_MODEL) and widths["blocks.0.attn.hook_q"] == str(D_MODEL)
    # attention patterns and scores are [batch, head, query, key]: no position axis, so not hooks to score
    assert "blocks.0.attn.hook_pattern" not in widths and "blocks.0.attn.hook_attn_scores" not in widths
    code, out, err = run_cli("run", str(tl_spec(hooks=["blocks.0.attn.hook_pattern"])))
    assert code == 2 and err.splitlines()[-1].startswith("saebench-poly: error: hook 'blocks.0.attn.hook_pattern'") and "[batch, head, query, key]" in err


def test_a_trained_sae_is_reused_when_only_the_metrics_change_and_retrained_when_the_data_do(tmp_path: Path) -> None:
    spec = write_toy_spec(tmp_path, tokens=1000, fit_tokens=200)
    spec.write_text(spec.read_text() + '\n[[train]]\nname = "tiny"\narchitecture = "topk"\nd_sae = 8\nk = 2\n'
                    'training_samples = 2000\nbatch_size = 500\nlr = 3e-3\n')
    loaded = load_spec(spec)
    weights = tmp_path / ".artifacts" / "tiny-toy" / "saes" / "tiny" / "sae_weights.safetensors"

    def trained_at(overrides: dict) -> int:
        run_benchmark(with_overrides(loaded, overrides), write=False)
        return weights.stat().st_mtime_ns

    first = trained_at({})
    assert trained_at({"metrics": ["fvu", "l0"], "metric_options": {"rate": {"bits_per_value": 8}}}) == first
    assert trained_at({"seed": 1}) != first
