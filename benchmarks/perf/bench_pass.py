"""Throughput of the activation pass, measured in one run on the same data:

(a) bare pass: the model forward with the hooks cached, plus every SAE's encode and decode, nothing else;
(b) full `saebench-poly run` pass: the same SAEs plus the baselines it adds, every metric, the downstream splices,
    the held-out PCA fit and the Parquet write.

Prints tokens per second of each and their ratio (full / bare). The model is a transformer-lens model with random
weights and the SAEs are random sae-lens SAEs: throughput does not depend on what the weights learned.

    python benchmarks/perf/bench_pass.py [--device cpu|cuda] [--dtype float32|bfloat16] [--tokens N] [--d-model D] [--d-sae M]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch


def build_inputs(folder: Path, args: argparse.Namespace) -> tuple[Path, list[str]]:
    """A random transformer-lens model, two random TopK SAEs (resid and MLP-out of the middle block) and tokens."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    cfg = HookedTransformerConfig(
        n_layers=args.layers, d_model=args.d_model, n_ctx=args.context, d_head=64, n_heads=args.d_model // 64,
        d_mlp=4 * args.d_model, d_vocab=args.vocab, act_fn="gelu", normalization_type="LN", seed=0,
    )
    save_hooked_transformer(HookedTransformer(cfg), folder / "model")
    layer = args.layers // 2
    hooks = [f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.hook_mlp_out"]
    torch.manual_seed(0)
    for index, hook in enumerate(hooks):
        sae = TopKSAE(TopKSAEConfig(d_in=args.d_model, d_sae=args.d_sae, k=32))
        with torch.no_grad():
            for param in sae.parameters():
                param.normal_(0, 0.02)
        sae.cfg.metadata.hook_name = hook
        sae.save_model(folder / f"sae{index}")
    rng = np.random.default_rng(0)
    n_rows = 2 * args.tokens // args.context + 8
    pd.DataFrame({"input_ids": [rng.integers(1, args.vocab, args.context).tolist() for _ in range(n_rows)]}).to_parquet(
        folder / "tokens.parquet"
    )
    spec = folder / "spec.toml"
    spec.write_text(
        f'name = "perf"\ntokens = {args.tokens}\nfit_tokens = {args.tokens // 4}\ncontext_size = {args.context}\n'
        f'batch_size = {args.batch_size}\nbos_token_id = 0\ndevice = "{args.device}"\ndtype = "{args.dtype}"\n'
        f'hooks = ["{hooks[0]}"]\n'
        'entries = ["disk:sae0", "disk:sae1"]\noutput = "board.parquet"\n'
        '[model]\nloader = "transformer_lens"\nname = "model"\n'
        '[dataset]\nkind = "tokens"\npath = "tokens.parquet"\n'
    )
    return spec, hooks


def bare_pass(loaded, device: torch.device) -> tuple[int, float]:
    """Model forward with the SAE hooks cached, then each SAE's encode and decode: tokens, seconds."""
    from saebench_poly.inputs import Inputs
    from saebench_poly.models import MODEL_LOADERS
    from saebench_poly.sources import SourceContext, load_entry

    spec = loaded.spec
    dtype = getattr(torch, spec.dtype)
    adapter = MODEL_LOADERS.get(spec.model.loader)(spec.model, device, dtype)
    context = SourceContext(adapter=adapter, device=device, dtype=dtype, seed=0, base_dir=loaded.base_dir)
    saes = [load_entry(entry.uri, context) for entry in spec.entries]
    hooks = sorted({sae.hook for sae in saes})
    batches = list(Inputs(spec, adapter).batches("score"))
    tokens = 0
    with torch.no_grad(), timed(device) as elapsed:
        for batch in batches:
            batch = batch.to(device)
            output = adapter.forward(batch, hooks)
            for sae in saes:
                sae.decode(sae.encode(output.activations[sae.hook][batch.score_mask]))
            tokens += int(batch.score_mask.sum())
    return tokens, elapsed()


def _stage_printer(device: torch.device):
    """A `saebench_poly.run.Reporter` that prints each stage's wall time as it ends, after a CUDA synchronisation on
    a GPU (so that a run stopped at a time limit still says where its time went)."""
    from saebench_poly.run import Reporter

    class StagePrinter(Reporter):
        @contextmanager
        def task(self, description: str, total: int | None):
            with timed(device) as elapsed:
                yield lambda _n: None
            print(f"    {description}: {elapsed():.2f} s", flush=True)

    return StagePrinter()


def full_pass(loaded) -> tuple[int, float]:
    """`run_benchmark` as the CLI runs it (its stages' times printed as they end): tokens, seconds."""
    from saebench_poly.run import run_benchmark

    device = torch.device(loaded.spec.device)
    with timed(device) as elapsed:
        result = run_benchmark(loaded, _stage_printer(device))
    return result.tokens_scored, elapsed()


@contextmanager
def timed(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    finish: list[float] = []
    yield lambda: finish[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    finish.append(time.perf_counter() - start)


def benchmark_arguments(description: str | None) -> argparse.ArgumentParser:
    """The options every performance benchmark here shares: device, data size and model size."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16", "float64"), default="float32",
                        help="the spec's dtype: the model's and the entries' weights and activations")
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-sae", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=4096)
    return parser


def main() -> None:
    args = benchmark_arguments(__doc__).parse_args()

    from saebench_poly.spec import load_spec

    with tempfile.TemporaryDirectory() as scratch:
        spec_path, hooks = build_inputs(Path(scratch), args)
        loaded = load_spec(spec_path)
        device = torch.device(args.device)
        bare_pass(loaded, device)  # warm-up: first-call allocations and kernel selection
        bare_tokens, bare_seconds = bare_pass(loaded, device)
        bare_rate = bare_tokens / bare_seconds
        print(f"device {args.device}, {args.dtype}; model {args.layers} layers x d_model {args.d_model}, 2 TopK SAEs of "
              f"{args.d_sae} latents at {', '.join(hooks)}; {bare_tokens} tokens")
        print(f"(a) bare pass (forward + SAE encode/decode): {bare_rate:12,.0f} tokens/s", flush=True)
        print("(b) full run pass, by stage:", flush=True)
        full_tokens, full_seconds = full_pass(loaded)
    full_rate = full_tokens / full_seconds
    print(f"(b) full run pass (all entries and metrics): {full_rate:12,.0f} tokens/s")
    print(f"ratio full / bare: {full_rate / bare_rate:.3f}  (bare is {bare_rate / full_rate:.1f}x faster)")


if __name__ == "__main__":
    main()
