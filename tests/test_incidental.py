"""The incidental-polysemanticity model (Lecomte et al. 2023) and the neuron-level ground truth it is scored with."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from saebench_poly.leaderboard import units_path
from saebench_poly.metrics.neuron_truth import NeuronTruth
from saebench_poly.models.incidental import IncidentalConfig, features_per_neuron, train_pair
from saebench_poly.spec import load_spec

REPOSITORY = Path(__file__).resolve().parent.parent
# Fast settings: a stronger L1 and a larger step sparsify the weights in 1,000 steps instead of 7,500.
FAST = {"l1": 0.01, "lr": 0.01, "steps": 1000}


def test_features_per_neuron_counts_weights_in_the_window() -> None:
    weights = torch.tensor([[1.0, 0.0, 0.79], [-1.1, 0.5, 0.0], [0.0, 1.2, 0.0], [0.9, 0.01, -1.21]])
    assert features_per_neuron(weights).tolist() == [3, 1, 0]


def test_a_small_model_shows_incidental_polysemanticity_with_opposite_signs() -> None:
    n, m = 16, 32
    weights = train_pair(n, m, IncidentalConfig(pairs=((n, m),), instances=8, **FAST))
    output = torch.relu(weights @ weights.transpose(1, 2))
    assert float((output - torch.eye(n)).abs().max()) < 0.05  # every one-hot input is reconstructed
    polysemantic = placed = 0
    for copy in weights:
        held = (copy.abs() >= 0.8) & (copy.abs() <= 1.2)
        placed += int(held.any(dim=1).sum())
        for neuron in (held.sum(dim=0) >= 2).nonzero().flatten():
            signs = copy[held[:, neuron], neuron].sign()
            assert signs.min() < 0 < signs.max()  # only opposite-sign pairs survive the ReLU
            polysemantic += 1
    assert placed >= 0.95 * 8 * n  # (nearly) every feature has sparsified onto a neuron of its own weight ~1
    # more neurons than features, yet some hold two: about n^2 / (4m) = 2 per copy
    assert 0.25 * 2 <= polysemantic / 8 <= 2 * 2


def truth_adapter(weights: torch.Tensor) -> SimpleNamespace:
    return SimpleNamespace(true_feature_weights=lambda hook: weights,
                           true_feature_directions=lambda hook: weights / weights.norm(dim=1, keepdim=True))


def test_neuron_truth_known_answers() -> None:
    # neuron 0 holds features 0 and 1 (opposite signs); neuron 1 holds feature 2; neuron 2 carries feature 3 at a
    # weight outside the window, neuron 3 nothing
    weights = torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0], [0, 0.9, 0, 0], [0, 0, 0.5, 0]])
    entry = SimpleNamespace(kind="neurons", hook="h", width=4)
    truth = NeuronTruth(entry, truth_adapter(weights))
    assert truth.compute() == {
        "neuron_truth_pr_mean": pytest.approx(4 / 3), "neuron_truth_polysemantic_fraction": 0.25,
        "neuron_truth_weights_polysemantic_fraction": 0.25, "neuron_truth_agreement": 1.0,
        "neuron_truth_predicted_polysemantic_fraction": pytest.approx(4**2 / (4 * 4) / 4),
    }
    units = truth.unit_values()
    torch.testing.assert_close(units["neuron_truth_pr"], torch.tensor([2.0, 1, 1, float("nan")], dtype=torch.float64), equal_nan=True)
    assert units["neuron_truth_features_by_weights"].tolist() == [2, 1, 0, 0]
    # PR counts feature 3's weak loading on neuron 1, which the weight window misses: they disagree on neuron 1
    weights[3, 1] = 0.5
    assert NeuronTruth(entry, truth_adapter(weights)).compute()["neuron_truth_agreement"] == 0.75


def write_spec(folder: Path, pairs: list[list[int]], **options) -> Path:
    settings = {"instances": 2, **FAST, **options}
    lines = ['name = "incidental-tiny"', f"hooks = {[f'n{n}_m{m}' for n, m in pairs]!r}".replace("'", '"'),
             'baselines = ["neurons"]', "tokens = 256", "fit_tokens = 0", "batch_size = 100",
             f'output = "{folder / "board.parquet"}"', "[model]", 'loader = "incidental"', 'name = "model"',
             "[model.options]", f"pairs = {pairs}", *(f"{k} = {v}" for k, v in settings.items()),
             "[dataset]", 'kind = "synthetic"']
    path = folder / "spec.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_incidental_spec_runs_end_to_end(run_cli, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, [[8, 16], [16, 32]])
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "board.parquet")
    wide = rows.pivot_table(index="hook", columns="metric", values="value")
    weights = load_file(tmp_path / "model" / "model.safetensors")
    for hook, n, m in (("n8_m16", 8, 16), ("n16_m32", 16, 32)):
        copies = weights[hook]
        assert copies.shape == (2, n, m)
        polysemantic = sum(int((features_per_neuron(copy) >= 2).sum()) for copy in copies)
        assert wide.loc[hook, "neuron_truth_weights_polysemantic_fraction"] == polysemantic / (2 * m)
        assert wide.loc[hook, "neuron_truth_predicted_polysemantic_fraction"] == pytest.approx(n * n / (4 * m) / m)
        assert wide.loc[hook, "fvu"] == 0 and 0.5 <= wide.loc[hook, "neuron_truth_agreement"] <= 1
    units = pd.read_parquet(units_path(tmp_path / "board.parquet"))
    counts = units.loc[units["hook"] == "n16_m32", "neuron_truth_features_by_weights"].to_numpy()
    assert counts.tolist() == torch.cat([features_per_neuron(c) for c in weights["n16_m32"]]).tolist()

    trained = (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns
    assert run_cli("run", str(spec))[0] == 0
    assert (tmp_path / "model" / "model.safetensors").stat().st_mtime_ns == trained  # reused, not retrained
    code, _, err = run_cli("run", str(write_spec(tmp_path, [[8, 16], [16, 32]], steps=10)))
    assert code == 2 and "delete the folder to retrain" in err
    other = tmp_path / "other"
    other.mkdir()
    code, _, err = run_cli("run", str(write_spec(other, [[16, 8]])))
    assert code == 2 and "m >= n" in err


def test_the_benchmark_spec_follows_the_paper() -> None:
    loaded = load_spec(REPOSITORY / "benchmarks" / "incidental-polysemanticity.toml")
    options = IncidentalConfig(**loaded.spec.model.options)
    assert len(options.pairs) >= 4 and all(m >= n for n, m in options.pairs)
    assert (options.l1, options.lr, options.steps) == (1e-3, 1e-3, 7500)
    assert loaded.spec.hooks == [f"n{n}_m{m}" for n, m in options.pairs]
