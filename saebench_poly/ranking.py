"""Ranking the entries of a leaderboard, metric by metric.

Only entries scored with the same spec hash are ranked together (other numbers are not comparable). For a metric
with a direction, an entry's rank is 1 + the number of entries strictly better (ties share a rank); a ``neutral``
metric (no better way, e.g. L0) is shown but not ranked. Without a metric to rank by, entries are ordered by their
mean rank over the directed metrics shown.

The raw-neuron baseline that an entry is set beside is the ``neurons`` entry of the same spec hash and model whose
hook shares the longest prefix with the entry's hook: the MLP neurons of the same block (``blocks.3.`` for
transformer-lens, ``transformer.h.3.`` for GPT-2 in transformers), the hidden neurons of a toy model.
"""

from __future__ import annotations

import os

import pandas as pd

from saebench_poly.errors import UserError
from saebench_poly.leaderboard import entry_keys

MEAN_RANK = "mean rank"


def wide(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per entry (index ``<run_id>/<entry>``, in order of appearance), one column per metric; entries of
    one spec hash only."""
    keyed = rows.assign(key=entry_keys(rows))
    table = keyed.pivot_table(index="key", columns="metric", values="value", sort=False, dropna=False)
    return table.reindex(list(dict.fromkeys(keyed["key"])))


def directions(rows: pd.DataFrame) -> dict[str, str]:
    """Metric -> ``higher``, ``lower`` or ``neutral``."""
    return dict(zip(rows["metric"], rows["direction"], strict=True))


def ranks(table: pd.DataFrame, direction: dict[str, str]) -> pd.DataFrame:
    """The rank of each entry on each directed metric of ``table`` (`wide`), NaN where it has no value."""
    ranked = {m: table[m].rank(method="min", ascending=direction[m] == "lower") for m in table.columns
              if direction.get(m) in ("higher", "lower")}
    return pd.DataFrame(ranked, index=table.index)


def ranked(rows: pd.DataFrame, metrics: list[str] | None = None, rank_by: str | None = None) -> pd.DataFrame:
    """Entries of one spec hash as rows, ``metrics`` (default: all) as columns, best first, with a ``rank``
    column: the rank on ``rank_by``, or the position by mean rank over the directed metrics shown."""
    direction = directions(rows)
    table = wide(rows)
    shown = [m for m in (metrics or list(table.columns)) if m in table.columns]
    table = table[shown]
    if rank_by is not None:
        if direction.get(rank_by) not in ("higher", "lower"):
            raise UserError(f"metric {rank_by!r} has no better direction (it is {direction.get(rank_by, 'absent')}): rank by another")
        order = ranks(table[[rank_by]], direction)[rank_by]
    else:
        order = ranks(table, direction).mean(axis=1)
        table = table.assign(**{MEAN_RANK: order})
    table = table.assign(rank=order).sort_values("rank", kind="stable", na_position="last")
    if rank_by is None:
        table["rank"] = range(1, len(table) + 1)
    return table


def comparison_neurons(rows: pd.DataFrame, key: str) -> str | None:
    """The key of the raw-neuron entry that entry ``key`` is compared with (see the module docstring)."""
    keys = entry_keys(rows)
    own = rows[keys == key].iloc[0]
    neurons = rows[(rows["entry_kind"] == "neurons") & (rows["spec_hash"] == own["spec_hash"]) & (rows["model_id"] == own["model_id"])]
    if neurons.empty:
        return None
    hooks = neurons.assign(key=entry_keys(neurons)).drop_duplicates("key")
    best = max(hooks.itertuples(), key=lambda r: (len(os.path.commonprefix([r.hook, own["hook"]])), r.hook == own["hook"]))
    return best.key


def standing(rows: pd.DataFrame, key: str) -> pd.DataFrame:
    """Where entry ``key`` stands among the entries of its spec hash: one row per metric with its value, rank,
    the number of entries ranked, and the value of its raw-neuron baseline (`comparison_neurons`)."""
    keys = entry_keys(rows)
    spec_hash = rows.loc[keys == key, "spec_hash"].iloc[0]
    same = rows[rows["spec_hash"] == spec_hash]
    direction = directions(same)
    table = wide(same)
    ranked_table = ranks(table, direction)
    neurons = comparison_neurons(same, key)
    records = []
    for metric in table.columns:
        if pd.isna(table.at[key, metric]):
            continue
        directed = metric in ranked_table.columns
        records.append({
            "metric": metric, "direction": direction[metric], "value": table.at[key, metric],
            "rank": int(ranked_table.at[key, metric]) if directed else None,
            "of": int(table[metric].notna().sum()),
            "neurons": table.at[neurons, metric] if neurons is not None else float("nan"),
        })
    frame = pd.DataFrame.from_records(records, columns=["metric", "direction", "value", "rank", "of", "neurons"])
    frame.attrs["neurons"] = neurons.partition("/")[2] if neurons else None
    return frame
