"""The analysis of `scripts/poly_real_model.py` on tiny per-unit tables whose answers are known by construction: the
K = n share, the headline numbers, the bootstrap interval of SAE minus neurons, the spread over runs, and the split
of the text into two disjoint slices."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "poly_real_model.py"
_spec = importlib.util.spec_from_file_location("poly_real_model", SCRIPT)
poly_real_model = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(poly_real_model)

NEURONS = "neurons:h"


def units(entry: str, rows: list[tuple[str, int, int, float]]) -> pd.DataFrame:
    """Per-unit rows (status, n_examples, K, exp(H)) of one entry, as the units Parquet holds them."""
    table = pd.DataFrame(rows, columns=["poly_status", "n_examples", "n_behaviours", "effective_behaviours"])
    table["n_behaviours"] = table["n_behaviours"].astype("Int64")
    table.insert(0, "entry", entry)
    table.insert(1, "unit", range(len(table)))
    return table


def test_k_equals_count_share_counts_only_ok_units() -> None:
    table = units("sae", [("ok", 10, 10, 10.0), ("ok", 20, 3, 2.5), ("ok", 12, 12, 12.0), ("ok", 30, 1, 1.0),
                          ("too_few_examples", 4, 4, 4.0), ("too_weak", 15, 15, 15.0)])
    assert poly_real_model.saturated_share(table) == pytest.approx(2 / 4)
    assert np.isnan(poly_real_model.saturated_share(table[table["poly_status"] != "ok"]))


def test_entry_summary_of_a_constructed_entry() -> None:
    table = units("sae", [("ok", 40, 1, 1.0), ("ok", 50, 3, 2.0), ("ok", 30, 2, 3.0),
                          ("too_few_examples", 2, 1, 1.0), ("too_few_examples", 0, pd.NA, np.nan)])
    summary = poly_real_model.entry_summary(table)
    assert summary["ok"] == 3 and summary["units"] == 5
    assert summary["mean_eff"] == pytest.approx(2.0) and summary["median_eff"] == pytest.approx(2.0)
    assert summary["mono"] == pytest.approx(1 / 5)  # of all units, as the leaderboard's monosemantic_fraction
    assert summary["too_few"] == pytest.approx(2 / 5)
    assert summary["median_n_live"] == pytest.approx(35)  # 40, 50, 30, 2: the dead unit (0 examples) left out
    assert summary["K=n"] == 0


def test_bootstrap_interval_of_a_difference_known_by_construction() -> None:
    rng = np.random.default_rng(1)
    sae, neurons = rng.normal(2.0, 1.0, 4000), rng.normal(3.0, 1.0, 4000)
    difference, low, high = poly_real_model.bootstrap_difference(sae, neurons, samples=1000)
    assert difference == pytest.approx(sae.mean() - neurons.mean())
    # the standard error of the difference is sqrt(2 / 4000) = 0.0224: the interval is +-1.96 of it
    assert low < difference < high
    assert (high - low) / 2 == pytest.approx(1.96 * np.sqrt(2 / 4000), rel=0.1)
    constant = poly_real_model.bootstrap_difference(np.full(50, 1.5), np.full(80, 4.0))
    assert constant == pytest.approx((-2.5, -2.5, -2.5))


def test_summary_table_and_spread() -> None:
    table = pd.concat([
        units(NEURONS, [("ok", 20, 4, 4.0), ("ok", 20, 2, 2.0)]),
        units("sae", [("ok", 20, 1, 1.0), ("ok", 20, 1, 1.0), ("too_few_examples", 3, 1, 1.0)]),
    ])
    summary = poly_real_model.summary_table(table, NEURONS, samples=200).set_index("entry")
    assert summary.loc["sae", "minus_neurons"] == pytest.approx(-2.0)
    assert summary.loc["sae", "ci_low"] <= -2.0 <= summary.loc["sae", "ci_high"]
    assert np.isnan(summary.loc[NEURONS, "minus_neurons"])
    other = summary.reset_index().assign(mean_eff=[3.5, 1.0])
    spread = poly_real_model.spread_table({"seed 0": summary.reset_index(), "seed 1": other}, NEURONS).set_index("entry")
    assert spread.loc[NEURONS, "range"] == pytest.approx(0.5) and spread.loc["sae", "range"] == 0
    assert (spread.loc["sae", "minus_neurons_min"], spread.loc["sae", "minus_neurons_max"]) == pytest.approx((-2.5, -2.0))


def test_split_documents_gives_disjoint_slices_that_meet_their_targets() -> None:
    lengths = [10] * 100
    a, b = poly_real_model.split_documents(lengths, 600, 300)
    assert sorted(a + b) == list(range(100)) and not set(a) & set(b)
    assert sum(lengths[i] for i in a) >= 600 and sum(lengths[i] for i in b) >= 300
    assert a[:3] == [0, 2, 3] and b[:2] == [1, 4]  # interleaved, two to one
    with pytest.raises(SystemExit, match="holds 1,000 tokens"):
        poly_real_model.split_documents(lengths, 900, 300)


def test_paragraphs_of_a_text_with_or_without_blank_lines() -> None:
    prose = ["A paragraph of prose that is long enough to be kept by the filter, with words and nothing else.",
             "Another paragraph of prose, also long enough to be kept, about something else entirely, in words."]
    assert poly_real_model.paragraphs(["\n\n".join(p.replace(", ", ",\n") for p in prose)]) == prose
    assert poly_real_model.paragraphs(["\n".join(prose + prose[:1] + ["x = [1, 2, 3]"])]) == prose


def test_the_script_describes_its_arguments() -> None:
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert "--sae-width" in done.stdout and "--seeds" in done.stdout
