"""The rate-distortion(-polysemanticity) frontier on hand-made leaderboards whose frontier is known."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from saebench_poly import leaderboard
from saebench_poly.frontier import pareto_optimal, recompute_frontier


def rows(points: dict[str, tuple[float, ...]], model: str = "m", hook: str = "h", spec_hash: str = "s",
         run_id: str = "r") -> pd.DataFrame:
    """Long rows for entries given as (rate, fvu[, mean_effective_behaviours]), plus an unrelated metric."""
    records = []
    for entry, values in points.items():
        names = ["rate_bits_per_token", "fvu", "mean_effective_behaviours"][: len(values)] + ["l0"]
        for metric, value in zip(names, [*values, 3.0], strict=True):
            records.append({"run_id": run_id, "entry": entry, "model_id": model, "hook": hook, "spec_hash": spec_hash,
                            "metric": metric, "value": value})
    return pd.DataFrame(records)


def flags(frame: pd.DataFrame, column: str = "pareto_rate_distortion") -> dict[str, object]:
    result = recompute_frontier(frame).drop_duplicates(["run_id", "entry"])
    assert (recompute_frontier(frame).groupby(["run_id", "entry"])[column].nunique(dropna=False) == 1).all()
    return {e: (None if pd.isna(v) else bool(v)) for e, v in zip(result["entry"], result[column], strict=True)}


def test_pareto_optimal_points() -> None:
    points = np.array([[1, 5], [2, 3], [3, 3], [4, 1], [5, 5], [2, 3]])
    # (3,3) is dominated by (2,3); (5,5) by everything; the tied (2,3) pair are both optimal
    assert pareto_optimal(points).tolist() == [True, True, False, True, False, True]
    # float rounding is a tie, not a win: an exact reconstruction at 1e-15 is not dominated by one at 0
    assert pareto_optimal(np.array([[128.0, 9e-15], [128.0, 0.0]])).tolist() == [True, True]
    assert pareto_optimal(np.array([[128.0, 9e-15], [77.0, 0.0]])).tolist() == [False, True]


def test_two_way_frontier_of_a_hand_made_leaderboard() -> None:
    frame = rows({"a": (10, 0.5), "b": (20, 0.2), "c": (30, 0.25), "d": (5, 0.9), "e": (40, 0.2), "f": (20, math.nan)})
    assert flags(frame) == {"a": True, "b": True, "c": False, "d": True, "e": False, "f": None}
    assert flags(frame, "pareto_rate_distortion_polysemanticity") == dict.fromkeys("abcdef")


def test_three_way_frontier_uses_polysemanticity_when_present() -> None:
    # c is dominated in (rate, fvu) by b but is the most monosemantic, so it is on the 3-way frontier
    frame = rows({"a": (10, 0.5, 4.0), "b": (20, 0.2, 3.0), "c": (30, 0.25, 1.5), "d": (40, 0.3, 2.0)})
    frame = pd.concat([frame, rows({"n": (96, 0.0)})], ignore_index=True)  # no neuron-embedding value
    assert flags(frame) == {"a": True, "b": True, "c": False, "d": False, "n": True}
    assert flags(frame, "pareto_rate_distortion_polysemanticity") == {"a": True, "b": True, "c": True, "d": False, "n": None}


def test_entries_are_compared_only_within_their_model_hook_and_settings() -> None:
    best = rows({"a": (1, 0.1)})
    others = [rows({"b": (50, 0.9)}, model="other"), rows({"c": (50, 0.9)}, hook="other"),
              rows({"d": (50, 0.9)}, spec_hash="other"), rows({"e": (50, 0.9)}, run_id="r2")]
    assert flags(pd.concat([best, *others], ignore_index=True)) == {"a": True, "b": True, "c": True, "d": True, "e": False}


def test_every_write_recomputes_the_flags(tl_spec, tmp_path) -> None:
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec, with_overrides

    loaded = load_spec(tl_spec(tokens=60))
    run_benchmark(loaded)
    board = pd.read_parquet(loaded.output_path)
    assert pq.read_schema(loaded.output_path).field("pareto_rate_distortion").type == "bool"
    flagged = board.drop_duplicates("entry").set_index("entry")["pareto_rate_distortion"]
    # the raw neurons of the spec's hook reconstruct exactly, so nothing on that hook has a lower fvu at their rate
    assert flagged["neurons:blocks.0.hook_resid_post"] and flagged.notna().all()
    assert board["pareto_rate_distortion_polysemanticity"].isna().all() or "mean_effective_behaviours" in set(board["metric"])

    # a second spec with the same settings scores the same entries again: they replace the first run's (a board holds
    # one entry per name and spec hash), and the flags are recomputed to the same values
    run_benchmark(with_overrides(loaded, {"name": "again"}))
    again = pd.read_parquet(loaded.output_path).drop_duplicates("entry")
    assert set(again["spec_name"]) == {"again"}
    assert again.set_index("entry")["pareto_rate_distortion"].sort_index().equals(flagged.sort_index())


def test_an_empty_leaderboard_gets_typed_null_columns() -> None:
    frame = leaderboard.LEADERBOARD_SCHEMA.empty_table().to_pandas().drop(columns=["pareto_rate_distortion"])
    result = recompute_frontier(frame)
    assert str(result["pareto_rate_distortion"].dtype) == "boolean" and len(result) == 0
