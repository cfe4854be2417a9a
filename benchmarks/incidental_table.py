"""The table of the incidental-polysemanticity benchmark (Lecomte et al. 2023), from its leaderboard.

    saebench-poly run incidental-polysemanticity
    python benchmarks/incidental_table.py [leaderboards/incidental-polysemanticity.parquet]

One row per (n, m) pair; counts are polysemantic neurons per trained copy (the hook's count over its copies divided
by their number), so that they compare with n^2 / (4m):

- weights: Lecomte et al.'s count (>= 2 features with 0.8 <= |W_ik| <= 1.2 on the neuron);
- true-feature PR: the project's per-neuron participation ratio (capacity family) with the true features as the
  dictionary, PR_k >= 1.5 on a loaded neuron; "agree" is the fraction of neurons that it and the weight count
  classify alike;
- embeddings (when the neuron-embedding metrics ran): neurons with K >= 2 behaviours (Foote 2024), and their
  agreement with the weight count, over all neurons and over the neurons that hold at least one feature by weight.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pandas as pd

DEFAULT = Path(__file__).resolve().parent.parent / "leaderboards" / "incidental-polysemanticity.parquet"


def table(board: Path) -> pd.DataFrame:
    from saebench_poly.leaderboard import units_path

    rows = pd.read_parquet(board)
    rows = rows[rows["entry_kind"] == "neurons"]
    units = pd.read_parquet(units_path(board))
    units = units[units["entry_kind"] == "neurons"]
    wide = rows.pivot_table(index="hook", columns="metric", values="value")
    records = []
    for hook, values in wide.iterrows():
        n, m = (int(v) for v in re.fullmatch(r"n(\d+)_m(\d+)", hook).groups())
        width = int(rows.loc[rows["hook"] == hook, "width"].iloc[0])
        copies = width // m
        per_copy = width / copies
        by_weights = values["neuron_truth_weights_polysemantic_fraction"] * per_copy
        record = {
            "n": n, "m": m, "n^2/(4m)": n * n / (4 * m), "weights": by_weights,
            "weights / n^2/(4m)": by_weights / (n * n / (4 * m)),
            "true-feature PR": values["neuron_truth_polysemantic_fraction"] * per_copy,
            "PR agree": values["neuron_truth_agreement"],
        }
        neurons = units[units["hook"] == hook]
        if "n_behaviours" in neurons and neurons["n_behaviours"].notna().any():
            weight_poly = neurons["neuron_truth_features_by_weights"] >= 2
            holds = neurons["neuron_truth_features_by_weights"] >= 1
            embed_poly = (neurons["poly_status"] == "ok") & (neurons["n_behaviours"] >= 2)
            record["embeddings"] = embed_poly.sum() / copies
            record["emb. agree"] = (embed_poly == weight_poly).mean()
            record["emb. agree (holding)"] = (embed_poly == weight_poly)[holds].mean()
        records.append(record)
    return pd.DataFrame(records).sort_values(["n", "m"]).reset_index(drop=True)


def markdown(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table, numbers to 3 significant digits."""
    cells = [[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def main() -> None:
    board = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    print(markdown(table(board)))


if __name__ == "__main__":
    main()
