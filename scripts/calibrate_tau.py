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

from saebench_poly.metrics.polysemanticity import DEFAULT_TAU
from saebench_poly.models.toy import load_toy_model_folder
from saebench_poly.run import run_benchmark
from saebench_poly.spec import BenchmarkSpec, LoadedSpec

REPOSITORY = Path(__file__).resolve().parent.parent
BENCHMARK = REPOSITORY / "benchmarks" / "toy-superposition.toml"
TRUTH_COMPONENT = 0.2
SWEEP = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.92, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99)


def neuron_behaviours(seed: int, fraction: float, scratch: Path) -> tuple[np.ndarray, np.ndarray]:
    """(true number of features ``[n_hidden]``, K at each tau of SWEEP ``[n_hidden, len(SWEEP)]``) for one seed."""
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
    truth = (load_toy_model_folder(folder).true_feature_directions().T > TRUTH_COMPONENT).sum(dim=1).numpy()
    return truth, np.array(units["n_behaviours_sweep"].tolist())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5, help="toy models trained with seeds 0..N-1")
    parser.add_argument("--fraction", type=float, default=0.75, help="activation fraction of the characteristic examples")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = [neuron_behaviours(seed, args.fraction, Path(scratch)) for seed in range(args.seeds)]
    truth = np.concatenate([t for t, _ in results])
    k = np.concatenate([b for _, b in results])
    benchmark_truth, benchmark_k = results[0]
    print(f"{len(truth)} neurons of {args.seeds} toy models; true features per neuron: {truth.tolist()}")
    print(f"{'tau':>6} {'K = truth':>10} {'(benchmark)':>12} {'mono/poly':>10} {'mean |K-truth|':>15}  K of the benchmark's neurons")
    agreement = (k == truth[:, None]).mean(axis=0)
    for i, tau in enumerate(SWEEP):
        on_benchmark = (benchmark_k[:, i] == benchmark_truth).mean()
        binary = ((k[:, i] == 1) == (truth == 1)).mean()
        print(f"{tau:6.3f} {agreement[i]:10.1%} {on_benchmark:12.1%} {binary:10.1%} {np.abs(k[:, i] - truth).mean():15.2f}  "
              f"{benchmark_k[:, i].tolist()}")
    chosen = SWEEP[int(np.argmax(agreement))]
    print(f"chosen tau = {chosen} (K = truth for {agreement.max():.1%} of the neurons); "
          f"DEFAULT_TAU = {DEFAULT_TAU}: {'the same' if chosen == DEFAULT_TAU else 'DIFFERENT, update it'}")


if __name__ == "__main__":
    main()
