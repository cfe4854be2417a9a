"""Choose the default tau of the neuron-embedding polysemanticity metric on known answers, and print the evidence.

The known answers: the toy model of superposition of `benchmarks/toy-superposition.toml` (its model options and
its number of scored samples), trained with seeds 0..N-1 (seed 0 is the benchmark's own model). A hidden neuron's
true number of features is the number of represented features whose unit direction in neuron space has a component
above 0.2 on it (`ToySuperpositionModel.true_feature_directions`; the rule of `saebench_poly.models.toy`).

The rule: score the raw neurons of every model with the polysemanticity metric at each tau of the sweep (Foote's
selection: activation fraction 0.75, at most 100 examples); the default tau is the tau at which K(tau) equals the true
number of features for the most neurons (ties: the smaller tau). The script prints, per tau, that agreement, the
agreement on the benchmark's own model, the agreement on "monosemantic or not" (K = 1 iff one true feature) and the
mean |K - truth|, then the chosen tau and whether it is `DEFAULT_TAU`.

It also prints why exact agreement is out of reach on this toy, measured on the same scored samples: for each
neuron with several true features, the largest activation one of its features can give alone (its weight, as
x_i <= 1) over the neuron's maximum M, and the share of its characteristic contexts (activation >= fraction x M) in
which two or more of its true features are active.

    python scripts/calibrate_tau.py [--seeds 5] [--fraction 0.75]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import tomllib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch

from saebench_poly.inputs import Inputs
from saebench_poly.metrics.polysemanticity import DEFAULT_TAU, PolysemanticityOptions
from saebench_poly.models.toy import ToyModelAdapter, load_toy_model_folder
from saebench_poly.run import run_benchmark
from saebench_poly.spec import BenchmarkSpec, LoadedSpec

REPOSITORY = Path(__file__).resolve().parent.parent
BENCHMARK = REPOSITORY / "benchmarks" / "toy-superposition.toml"
TRUTH_COMPONENT = 0.2
SWEEP = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99)


def neuron_behaviours(seed: int, fraction: float, scratch: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For one seed, per hidden neuron: the true number of features, K at each tau of SWEEP ``[n_hidden, len(SWEEP)]``,
    the largest single-feature activation over M, and the share of characteristic contexts with >= 2 true features."""
    benchmark = tomllib.loads(BENCHMARK.read_text())
    folder = scratch / f"toy-seed{seed}"
    spec = BenchmarkSpec.model_validate({
        "name": "calibrate-tau", "tokens": benchmark["tokens"], "fit_tokens": 0, "batch_size": benchmark["batch_size"],
        "seed": benchmark["seed"], "hooks": benchmark["hooks"], "baselines": ["neurons"], "device": "cpu",
        "metrics": ["mean_behaviours"], "dataset": {"kind": "synthetic"},
        "model": {"loader": "toy", "name": str(folder), "options": {**benchmark["model"]["options"], "seed": seed}},
        "metric_options": {"polysemanticity": {"tau_sweep": list(SWEEP), "activation_fraction": fraction}},
    })
    units = run_benchmark(LoadedSpec(spec=spec, path=scratch / "spec.toml"), write=False).units
    model = load_toy_model_folder(folder)
    carries = model.true_feature_directions().T > TRUTH_COMPONENT  # [n_hidden, n_features]
    x = torch.cat([batch.inputs for batch in Inputs(spec, ToyModelAdapter(model, "calibration")).batches("score")])
    with torch.no_grad():
        z = model.hidden(x)
    maximum = z.amax(dim=0)
    characteristic = (z >= fraction * maximum) & (z > 0)
    together = ((x[:, None, :] > 0) & carries).sum(dim=-1) >= 2
    conjunction_share = (characteristic & together).sum(dim=0) / characteristic.sum(dim=0).clamp_min(1)
    single = (torch.relu(model.W.detach()) * carries).amax(dim=1) / maximum
    return (carries.sum(dim=1).numpy(), np.array(units["n_behaviours_sweep"].tolist()), single.numpy(),
            conjunction_share.numpy())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="toy models trained with seeds 0..N-1")
    parser.add_argument("--fraction", type=float, default=PolysemanticityOptions().activation_fraction, help="activation fraction of the characteristic examples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = [neuron_behaviours(seed, args.fraction, Path(scratch)) for seed in range(args.seeds)]
    truth, k, single, conjunctions = (np.concatenate(parts) for parts in zip(*results, strict=True))
    benchmark_truth, benchmark_k = results[0][:2]
    print(f"{len(truth)} neurons of {args.seeds} toy models; true features per neuron: {truth.tolist()}")
    print(f"{'tau':>6} {'K = truth':>10} {'(benchmark)':>12} {'mono/poly':>10} {'mean |K-truth|':>15}  K of the benchmark's neurons")
    agreement = (k == truth[:, None]).mean(axis=0)
    for i, tau in enumerate(SWEEP):
        on_benchmark = (benchmark_k[:, i] == benchmark_truth).mean()
        binary = ((k[:, i] == 1) == (truth == 1)).mean()
        print(f"{tau:6.3f} {agreement[i]:10.1%} {on_benchmark:12.1%} {binary:10.1%} {np.abs(k[:, i] - truth).mean():15.2f}  "
              f"{benchmark_k[:, i].tolist()}")
    several = truth >= 2
    print(f"the {several.sum()} neurons with several true features: one feature alone reaches at most "
          f"{single[several].min():.2f}-{single[several].max():.2f} of the neuron's maximum (mean {single[several].mean():.2f}; "
          f"a characteristic example needs {args.fraction}); {conjunctions[several].mean():.1%} of their characteristic "
          f"contexts have two or more of their features active (the {len(truth) - several.sum()} others: "
          f"{conjunctions[~several].mean():.1%})")
    chosen = SWEEP[int(np.argmax(agreement))]
    print(f"chosen tau = {chosen} (K = truth for {agreement.max():.1%} of the neurons)", end="; ")
    default_fraction = PolysemanticityOptions().activation_fraction
    if args.fraction != default_fraction:
        print(f"DEFAULT_TAU is calibrated at the default fraction {default_fraction}, not {args.fraction}")
    else:
        print(f"DEFAULT_TAU = {DEFAULT_TAU}: {'the same' if chosen == DEFAULT_TAU else 'DIFFERENT, update it'}")


if __name__ == "__main__":
    main()
