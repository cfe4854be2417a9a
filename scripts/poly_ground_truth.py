"""Print the polysemanticity metric's ground-truth table (issue 13 §2; the cases and their truths are in
`saebench_poly.metrics.polysemanticity_truth`), for the default rule or any other setting.

Columns: ``ok`` units with enough examples (not too weak); ``with_truth`` those with a true count (a dominant
feature holding >= 10% of their examples; ``diffuse`` the others); ``K=truth`` the share of units with a true
count whose K equals it (incidental: among neurons holding a feature, status ok); ``spearman`` Spearman(K, truth)
over them; ``mean_eff`` the entry's mean_effective_behaviours; ``saturated`` the share of ok units with K = their
example count; ``empty quiet`` the share of Lecomte's empty neurons that are too weak or have too few examples.
The trained SAEs (sae-lens TopK at k = 8 and 24 with 2,048 latents, and k = 4 with 512, trained on the synthetic
model) are read from `benchmarks/poly-ground-truth/`; ``--retrain`` trains them again and writes them there (about
20 minutes each on one CPU core, the narrow one 6).

    python scripts/poly_ground_truth.py [--retrain] [--rule components --tau 0.975] [--null-quantile 0.9]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pandas as pd

from saebench_poly.metrics import polysemanticity_truth as truth
from saebench_poly.metrics.polysemanticity import PolysemanticityOptions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = PolysemanticityOptions()
    parser.add_argument("--rule", default=defaults.rule, choices=["average_null", "components"])
    parser.add_argument("--null-quantile", type=float, default=defaults.null_quantile)
    parser.add_argument("--tau", type=float, default=defaults.tau)
    parser.add_argument("--samples", type=int, default=20_000, help="synthetic samples scored")
    parser.add_argument("--retrain", action="store_true", help="train the SAEs of benchmarks/poly-ground-truth again")
    args = parser.parse_args()
    options = PolysemanticityOptions(rule=args.rule, null_quantile=args.null_quantile, tau=args.tau)
    start = time.perf_counter()
    if args.retrain:
        for training in truth.TRAINED:
            print(f"trained {truth.save_trained(truth.train_synthetic_sae(training), training)}")
    rows = [truth.incidental_row(truth.incidental_case(options=options)), truth.exclusive_case(options=options).row()]
    data = truth.synthetic_data(samples=args.samples)
    scores = truth.synthetic_case(data, truth.trained_saes(), options)
    rows += [score.row() for score in scores]
    saes = ["oracle", *(training.name for training in truth.TRAINED)]
    every = [*saes, "random-init", "random rotation"]
    rows += [truth.pooled_row(scores, "pooled: oracle and trained SAEs", saes),
             truth.pooled_row(scores, "pooled: and random-init, rotation", every),
             truth.pooled_row(scores, "pooled: all, truth covers >= half", every, min_covered=0.5)]
    table = pd.DataFrame(rows)
    print(f"rule: {options.describe_rule()}; synthetic: {truth.SYNTHETIC_FEATURES} features in d = {truth.SYNTHETIC_DIM}, {args.samples} samples")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}", na_rep=""))
    print(f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
