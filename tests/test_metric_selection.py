"""A spec's `metrics` through the CLI: every metric family alone and in every pair, metrics that apply to no entry,
per-unit columns that a third-party family declares, and a PCA baseline with nothing to fit it on."""

from __future__ import annotations

import re
from itertools import combinations
from pathlib import Path

import pandas as pd
import pytest
import torch

from saebench_poly.leaderboard import UNITS_SCHEMA, units_path
from saebench_poly.metrics import ACCUMULATORS, MetricSpec, all_metrics
from saebench_poly.metrics.base import Accumulator
from saebench_poly.testing import write_toy_spec

FAMILIES: dict[str, list[str]] = {}
for _name, (_metric, _) in all_metrics().items():
    FAMILIES.setdefault(_metric.family, []).append(_name)
# Downstream metrics need a language model; the toy model is the fast home of every other family.
COMBINATIONS = [(family,) for family in sorted(FAMILIES)] + list(combinations(sorted(FAMILIES), 2))


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("toy")


def toy_spec(folder: Path, name: str, metrics: list[str], output: str | None = None) -> Path:
    """The tiny toy spec of `saebench_poly.testing` (its model trained once per module), scoring ``metrics``."""
    path = write_toy_spec(folder, name=name, tokens=2000, fit_tokens=500)
    text = path.read_text().replace('output = "{name}.parquet"', f'output = "{output or "{name}.parquet"}"')
    path.write_text(f"metrics = {metrics!r}\n".replace("'", '"') + text)
    return path


@pytest.mark.parametrize("families", COMBINATIONS, ids="+".join)
def test_every_metric_family_alone_and_in_every_pair(families, toy_folder, tl_spec, run_cli) -> None:
    metrics = [name for family in families for name in FAMILIES[family]]
    if "downstream" in families:
        spec = tl_spec(tokens=60, fit_tokens=30, metrics=metrics)
        board = spec.parent / "out" / "board.parquet"
    else:
        spec = toy_spec(toy_folder, "-".join(families), metrics)
        board = toy_folder / f"{'-'.join(families)}.parquet"
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    rows = pd.read_parquet(board)
    applied = {family for family in families if family != "feature_recovery" and family != "neuron_truth"
               or "downstream" not in families}
    assert set(rows["metric_family"]) == applied
    assert set(rows["metric"]) <= set(metrics)
    units = pd.read_parquet(units_path(board))
    assert list(units.columns) == UNITS_SCHEMA.names and len(units) > 0


def test_metrics_that_apply_to_no_entry_are_one_line_before_scoring(toy_folder, run_cli) -> None:
    spec = toy_spec(toy_folder, "downstream-on-toy", ["ce_increase", "kl_divergence"])
    code, out, err = run_cli("run", str(spec))
    assert code == 2 and "scoring" not in err
    assert err.strip().splitlines()[-1].startswith("saebench-poly: error: none of the metrics the spec names applies")
    assert "ce_increase (downstream)" in err and not (toy_folder / "downstream-on-toy.parquet").exists()

    spec = toy_spec(toy_folder, "partly", ["ce_increase", "l0"])
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    assert "ce_increase (downstream): no entry on this model has these metrics" in err
    assert set(pd.read_parquet(toy_folder / "partly.parquet")["metric"]) == {"l0"}


@pytest.mark.parametrize("fit_tokens", [0, 1])
def test_a_pca_baseline_with_nothing_to_fit_on_is_one_line(toy_folder, run_cli, fit_tokens) -> None:
    spec = write_toy_spec(toy_folder, name="no-fit", tokens=1000, fit_tokens=fit_tokens)
    code, out, err = run_cli("run", str(spec))
    assert code == 2 and len(err.strip().splitlines()[-1]) > 0
    assert err.strip().splitlines()[-1].startswith("saebench-poly: error: ") and "fit_tokens" in err
    assert "Traceback" not in err and not (toy_folder / "no-fit.parquet").exists()


class UnitNorms(Accumulator):
    """A third-party family: each unit's decoder norm per unit, and their mean."""

    metrics = (MetricSpec("decoder_norm_mean", 1, "neutral", "decoder_norms", "mean ||W_dec[u]||"),)
    unit_columns = ("decoder_norm",)

    def update(self, batch) -> None:
        pass

    def compute(self) -> dict[str, float]:
        return {"decoder_norm_mean": float(self.norms().mean())}

    def norms(self) -> torch.Tensor:
        return self.entry.decoder_directions().double().norm(dim=1)

    def unit_values(self) -> dict[str, torch.Tensor]:
        return {"decoder_norm": self.norms()}


class Undeclared(UnitNorms):
    metrics = (MetricSpec("undeclared_mean", 1, "neutral", "undeclared", "mean ||W_dec[u]||"),)
    unit_columns = ()

    def compute(self) -> dict[str, float]:
        return {"undeclared_mean": float(self.norms().mean())}


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch):
    def register(name: str, family: type[Accumulator]) -> None:
        monkeypatch.setitem(ACCUMULATORS._items, name, family)
        monkeypatch.setitem(ACCUMULATORS._origins, name, f"tests:{family.__name__}")

    return register


def test_a_third_party_family_declares_its_per_unit_columns(toy_folder, run_cli, registered) -> None:
    registered("decoder_norms", UnitNorms)
    spec = toy_spec(toy_folder, "norms", ["decoder_norm_mean", "l0"])
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    units = pd.read_parquet(units_path(toy_folder / "norms.parquet"))
    assert list(units.columns) == [*UNITS_SCHEMA.names, "decoder_norm"]
    rows = pd.read_parquet(toy_folder / "norms.parquet")
    means = units.groupby("entry")["decoder_norm"].mean()
    wide = rows[rows["metric"] == "decoder_norm_mean"].set_index("entry")["value"]
    pd.testing.assert_series_equal(means.sort_index(), wide.sort_index(), check_names=False)
    # another spec written into the same file keeps the column, and its own units get nulls there
    other = toy_spec(toy_folder, "other", ["l0"], output="norms.parquet")
    assert run_cli("run", str(other))[0] == 0
    units = pd.read_parquet(units_path(toy_folder / "norms.parquet"))
    assert units.loc[units["spec_name"] == "norms", "decoder_norm"].notna().all()
    assert units.loc[units["spec_name"] == "other", "decoder_norm"].isna().all()


def test_a_family_reporting_an_undeclared_per_unit_column_is_a_bug_named(toy_folder, run_cli, registered) -> None:
    registered("undeclared", Undeclared)
    spec = toy_spec(toy_folder, "undeclared", ["undeclared_mean"])
    code, out, err = run_cli("run", str(spec))  # a bug: its traceback, and the internal-error status
    assert code == 70 and "Traceback" in err
    assert re.search(r"ValueError: .*Undeclared reports the per-unit values \['decoder_norm'\]", err)
