"""Cost of the neuron-embedding polysemanticity metric (`saebench_poly.metrics.polysemanticity`), measured in one run
on the data and model of `bench_pass.py`:

(a) bare pass: the model forward plus every SAE's encode and decode;
(b) the full `run` with every metric except the polysemanticity family;
(c) the full `run` with every metric.

Prints tokens per second of each, the ratios to the bare pass, and where (c) spends its extra time: the selection
of characteristic examples inside the scoring pass, the stage after it (re-running the chosen contexts once for the
examples' rows and the stored examples' token windows, the embeddings and the behaviour graphs,
`saebench_poly.revisit`), and the stored examples' rows built from those windows (`saebench_poly.example_windows`). The first run in a process pays one-off warm-up costs,
and a shared machine's speed drifts: (a), (b) and (c) take turns ``--repeats`` times, and the fastest of each counts.

    python benchmarks/perf/bench_polysemanticity.py [--device cpu|cuda] [--tokens N] [--d-model D] [--d-sae M]
"""

from __future__ import annotations

import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pass import bare_pass, benchmark_arguments, build_inputs, timed  # noqa: E402

from saebench_poly.run import CHARACTERISTIC_EXAMPLES_TASK as STAGE  # noqa: E402
from saebench_poly.run import STORED_EXAMPLES_TASK  # noqa: E402

FAMILY = "polysemanticity"


class TimingReporter:
    """Records the wall time of each task a run reports (`saebench_poly.run.Reporter`)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.seconds = device, {}

    @contextmanager
    def task(self, description: str, total: int | None):
        with timed(self.device) as elapsed:
            yield lambda _n: None
        self.seconds[description.split(" ")[0] if description.startswith("scoring") else description] = elapsed()

    def message(self, text: str) -> None:
        pass


def full_run(loaded, metrics: list[str] | None) -> tuple[int, float, dict[str, float]]:
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import with_overrides

    device = torch.device(loaded.spec.device)
    reporter = TimingReporter(device)
    with timed(device) as elapsed:
        result = run_benchmark(with_overrides(loaded, {"metrics": metrics}), reporter, write=False)
    return result.tokens_scored, elapsed(), reporter.seconds


def main() -> None:
    parser = benchmark_arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from saebench_poly.metrics import all_metrics
    from saebench_poly.spec import load_spec

    others = [name for name, (spec, _) in all_metrics().items() if spec.family != FAMILY]
    with tempfile.TemporaryDirectory() as scratch:
        spec_path, hooks = build_inputs(Path(scratch), args)
        loaded = load_spec(spec_path)
        device = torch.device(args.device)
        bare_pass(loaded, device)  # warm-up: first-call allocations and kernel selection
        runs = {"bare": [], "without": [], "with": []}
        for _ in range(args.repeats):
            runs["bare"].append(bare_pass(loaded, device))
            runs["without"].append(full_run(loaded, others)[1:])
            runs["with"].append(full_run(loaded, None)[1:])
        tokens, bare_seconds = min(runs["bare"], key=lambda run: run[1])
        without_seconds, without = min(runs["without"], key=lambda run: run[0])
        with_seconds, with_ = min(runs["with"], key=lambda run: run[0])
    bare_rate = tokens / bare_seconds
    print(f"device {args.device}; model {args.layers} layers x d_model {args.d_model}, 2 TopK SAEs of {args.d_sae} "
          f"latents at {', '.join(hooks)} (+ the baselines a run adds); {tokens} tokens")
    print(f"(a) bare pass (forward + SAE encode/decode):        {bare_rate:12,.0f} tokens/s")
    for label, seconds in (("(b) full run without polysemanticity:", without_seconds),
                           ("(c) full run with polysemanticity:   ", with_seconds)):
        print(f"{label}             {tokens / seconds:12,.0f} tokens/s  ({seconds / bare_seconds:.2f}x the bare pass's time)")
    selection = with_["scoring"] - without["scoring"]
    print(f"polysemanticity adds {with_seconds - without_seconds:.2f} s = {(with_seconds - without_seconds) / bare_seconds:.2f}x "
          f"the bare pass: selection in the scoring pass {selection:.2f} s ({selection / bare_seconds:.2f}x), "
          f"embeddings, behaviours and the stored examples' windows after it (one re-run of the selected contexts) "
          f"{with_[STAGE]:.2f} s ({with_[STAGE] / bare_seconds:.2f}x)")
    stored = with_[STORED_EXAMPLES_TASK]
    print(f"the stored examples' rows (from the windows the re-run read) {stored:.2f} s ({stored / bare_seconds:.2f}x)")


if __name__ == "__main__":
    main()
