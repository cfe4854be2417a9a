"""The rate-distortion(-polysemanticity) frontier of a leaderboard (Mencattini, Montagna & Locatello 2026).

Entries are compared only with entries on the same model, hook and data: equal ``model_id``, ``hook`` and
``spec_hash`` (the hash of the evaluation settings, so the same data, token counts and metric options). An entry is
one ``(run_id, entry)``. Axes, lower is better on each:

- rate: ``rate_bits_per_token`` (`saebench_poly.metrics.rate`);
- distortion: ``fvu``, the fraction of variance unexplained (shift-invariant, comparable across hooks and models,
  and defined for every entry; the downstream costs exist only for language models);
- polysemanticity: ``mean_effective_behaviours``, the mean effective number of distinct behaviours per unit from
  neuron embeddings (Foote 2024; lower is more monosemantic).

An entry is Pareto-optimal when no other entry of its group is at least as good on every axis and strictly better
on one (so entries tied on every axis are all optimal; values equal to 1e-9 relative count as ties). ``pareto_rate_distortion`` flags the 2-way frontier among
the group's entries that have both values; ``pareto_rate_distortion_polysemanticity`` the 3-way frontier among
those that have all three. An entry missing a value (or with a NaN) has a null flag, as has every entry of a
leaderboard without neuron-embedding results in the 3-way column. Every row of an entry carries its flags.
The flags are recomputed from the whole leaderboard on every write (`saebench_poly.leaderboard.update`).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

RATE_METRIC = "rate_bits_per_token"
DISTORTION_METRIC = "fvu"
POLYSEMANTICITY_METRIC = "mean_effective_behaviours"
FRONTIERS = {
    "pareto_rate_distortion": (RATE_METRIC, DISTORTION_METRIC),
    "pareto_rate_distortion_polysemanticity": (RATE_METRIC, DISTORTION_METRIC, POLYSEMANTICITY_METRIC),
}
GROUP_COLUMNS = ["model_id", "hook", "spec_hash"]
TIE_RELATIVE = 1e-9
TIE_ABSOLUTE = 1e-12
ENTRY_COLUMNS = ["run_id", "entry"]


def pareto_optimal(points: np.ndarray) -> np.ndarray:
    """Which rows of ``points`` ``[n, axes]`` (lower is better on every axis) no other row dominates. Values that
    agree to ``TIE_RELATIVE`` (relative, with an absolute floor of ``TIE_ABSOLUTE``) count as equal, so that float
    rounding (an FVU of 1e-15 against 0) does not decide dominance."""
    points = np.asarray(points, dtype=np.float64)
    mine, other = points[:, np.newaxis, :], points[np.newaxis, :, :]
    tolerance = TIE_RELATIVE * np.maximum(np.abs(mine), np.abs(other)) + TIE_ABSOLUTE
    # [i, j]: row j is at least as good as row i on every axis, and strictly better on one
    no_worse = (other <= mine + tolerance).all(axis=2)
    better = (other < mine - tolerance).any(axis=2)
    return ~(no_worse & better).any(axis=1)


def entry_flags(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per entry (``run_id``, ``entry``) with a nullable boolean column per frontier."""
    entries = rows[ENTRY_COLUMNS + GROUP_COLUMNS].drop_duplicates(ENTRY_COLUMNS).set_index(ENTRY_COLUMNS)
    axes = sorted({metric for metrics in FRONTIERS.values() for metric in metrics})
    values = rows[rows["metric"].isin(axes)].pivot_table(index=ENTRY_COLUMNS, columns="metric", values="value",
                                                         aggfunc="first", dropna=False)
    values = values.reindex(index=entries.index, columns=axes)
    flags = pd.DataFrame(index=entries.index, columns=list(FRONTIERS), dtype="boolean")
    for _, members in entries.groupby(GROUP_COLUMNS, sort=False).groups.items():
        for column, metrics in FRONTIERS.items():
            points = values.loc[members, list(metrics)]
            complete = points.notna().all(axis=1)
            if complete.any():
                flags.loc[points.index[complete], column] = pareto_optimal(points[complete].to_numpy())
    return flags


def recompute_frontier(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` (leaderboard rows) with the frontier columns (re)computed from its own rows."""
    frame = frame.drop(columns=[c for c in FRONTIERS if c in frame.columns])
    if frame.empty:
        return frame.assign(**{column: pd.Series(dtype="boolean") for column in FRONTIERS})
    flags = entry_flags(frame)
    joined = frame.join(flags, on=ENTRY_COLUMNS)
    return joined.astype({column: "boolean" for column in FRONTIERS})
