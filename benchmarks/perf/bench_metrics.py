"""Cost of the capacity, geometry and rate metric families, measured in one run on the same data as
`bench_pass.py` (a random transformer-lens model and two random TopK SAEs, whose throughput does not depend on what
the weights learned):

(a) bare pass: the model forward with the hooks cached, plus every entry's encode and decode;
(b) the same pass with one metric family's accumulators fed every batch, and their `compute` at the end (capacity's
    blockwise Gram matrix, geometry's eigendecomposition), for each family alone and for all three together.

Each configuration runs ``--repeats`` times, round-robin, and its fastest pass counts (on a shared machine the
minimum is least disturbed by other processes). `compute` is a fixed cost per entry (independent of the tokens), so
the ratios improve with ``--tokens``.

The entries are the two SAEs and the raw MLP neurons they are compared with (`neurons:blocks.L.mlp.hook_post`,
dense and 4 x d_model wide), as a `run` scores them. Prints tokens per second of each and its ratio to (a).

    python benchmarks/perf/bench_metrics.py [--device cpu|cuda] [--tokens N] [--d-model D] [--d-sae M]
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

FAMILIES = (("capacity",), ("geometry",), ("rate",), ("capacity", "geometry", "rate"))


def _bench_pass():
    """`bench_pass.py` beside this file, for its inputs and timer."""
    spec = importlib.util.spec_from_file_location("bench_pass", Path(__file__).with_name("bench_pass.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(loaded, device: torch.device):
    """The model adapter, the batches of the scored data, and the entries: the spec's SAEs and their neurons."""
    from saebench_poly.inputs import Inputs
    from saebench_poly.models import MODEL_LOADERS
    from saebench_poly.sources import SourceContext, load_entry

    spec = loaded.spec
    adapter = MODEL_LOADERS.get(spec.model.loader)(spec.model, device, torch.float32)
    context = SourceContext(adapter=adapter, device=device, dtype=torch.float32, seed=0, base_dir=loaded.base_dir)
    entries = [load_entry(entry.uri, context) for entry in spec.entries]
    neuron_hooks = sorted({adapter.comparison_neuron_hook(e.hook) for e in entries} - {None})
    entries += [load_entry(f"neurons:{hook}", context) for hook in neuron_hooks]
    for entry in entries:
        entry.to(device, torch.float32)
    return adapter, list(Inputs(spec, adapter).batches("score")), entries


def timed_pass(adapter, batches, entries, families: tuple[str, ...], timer, device) -> tuple[int, float, float]:
    """One pass over ``batches`` feeding the families' accumulators, then their `compute`: tokens, seconds in all,
    seconds of the `compute` calls."""
    from saebench_poly.metrics import ACCUMULATORS, EntryBatch

    accumulators = [(entry, [ACCUMULATORS.get(name)(entry, adapter) for name in families]) for entry in entries]
    hooks = sorted({entry.hook for entry in entries})
    tokens = 0
    with torch.no_grad(), timer(device) as elapsed:
        for batch in batches:
            batch = batch.to(device)
            output = adapter.forward(batch, hooks, logits=False)
            for entry, fed in accumulators:
                x = output.activations[entry.hook][batch.score_mask]
                z = entry.encode(x)
                scored = EntryBatch(x=x, z=z, x_hat=entry.decode(z))
                for accumulator in fed:
                    accumulator.update(scored)
            tokens += int(batch.score_mask.sum())
        with timer(device) as computing:
            for _, fed in accumulators:
                for accumulator in fed:
                    accumulator.compute()
    return tokens, elapsed(), computing()


def main() -> None:
    parser = _bench_pass().benchmark_arguments(__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="passes per configuration; the fastest counts")
    args = parser.parse_args()

    from saebench_poly.spec import load_spec

    bench_pass = _bench_pass()
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as scratch:
        spec_path, hooks = bench_pass.build_inputs(Path(scratch), args)
        adapter, batches, entries = load(load_spec(spec_path), device)
        timed_pass(adapter, batches, entries, (), bench_pass.timed, device)  # warm-up
        # round-robin repeats, keeping each configuration's fastest pass: on a shared machine the minimum is the
        # estimate least disturbed by other processes
        best: dict[tuple[str, ...], tuple[int, float, float]] = {}
        for _ in range(args.repeats):
            for families in ((), *FAMILIES):
                measured = timed_pass(adapter, batches, entries, families, bench_pass.timed, device)
                if families not in best or measured[1] < best[families][1]:
                    best[families] = measured
        tokens, bare, _ = best[()]
        results = [(families, *best[families]) for families in FAMILIES]
    print(f"device {args.device}; model {args.layers} layers x d_model {args.d_model}; entries: "
          f"{', '.join(f'{e.name} ({e.width})' for e in entries)}; {tokens} tokens")
    print(f"(a) bare pass (forward + encode/decode): {tokens / bare:12,.0f} tokens/s")
    for families, fed_tokens, seconds, computing in results:
        label = " + ".join(families)
        print(f"(b) + {label:<28} {fed_tokens / seconds:12,.0f} tokens/s   ratio to bare {bare / seconds:.3f}  "
              f"(bare {bare:.2f} s; per-batch updates {seconds - computing - bare:+.2f} s; compute {computing:.2f} s)")


if __name__ == "__main__":
    main()
