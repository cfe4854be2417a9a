"""Print the polysemanticity metric's ground-truth table (issue 13 §2; the cases and their truths are in
`saebench_poly.metrics.polysemanticity_truth`), for the default rule or any other setting.

Columns: ``ok`` units with enough examples (not too weak); ``with_truth`` those with a true count (a dominant
feature holding >= 10% of their examples; ``diffuse`` the others); ``K=truth`` the share of units with a true
count whose K equals it (incidental: among neurons holding a feature, status ok); ``spearman`` Spearman(K, truth)
over them; ``mean_eff`` the entry's mean_effective_behaviours; ``saturated`` the share of ok units with K = their
example count; ``empty quiet`` the share of Lecomte's empty neurons that are too weak or have too few examples.
Trained SAEs (sae-lens TopK at k = 8 and 24, trained on the synthetic model) are cached under ``--cache``; without
``--trained`` they are left out (training them takes minutes).

    python scripts/poly_ground_truth.py [--trained] [--rule components --tau 0.975] [--null-quantile 0.9]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from saebench_poly.metrics import polysemanticity_truth as truth
from saebench_poly.metrics.polysemanticity import PolysemanticityOptions

REPOSITORY = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PolysemanticityOptions()
    parser.add_argument("--rule", default=defaults.rule, choices=["average_null", "components"])
    parser.add_argument("--null-quantile", type=float, default=defaults.null_quantile)
    parser.add_argument("--tau", type=float, default=defaults.tau)
    parser.add_argument("--samples", type=int, default=40_000, help="synthetic samples scored")
    parser.add_argument("--trained", action="store_true", help="also score sae-lens SAEs trained on the synthetic data")
    parser.add_argument("--cache", type=Path, default=REPOSITORY / "benchmarks" / ".artifacts" / "poly-ground-truth")
    args = parser.parse_args()
    options = PolysemanticityOptions(rule=args.rule, null_quantile=args.null_quantile, tau=args.tau)
    start = time.perf_counter()
    rows = [truth.incidental_row(truth.incidental_case(options=options)), truth.exclusive_case(options=options).row()]
    data = truth.synthetic_data(samples=args.samples)
    trained = truth.trained_saes(data, cache=args.cache) if args.trained else None
    rows += [score.row() for score in truth.synthetic_case(data, trained, options)]
    table = pd.DataFrame(rows)
    print(f"rule: {options.describe_rule()}; synthetic: 4096 features in d = 256, {args.samples} samples")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
