"""Side by side with SAEBench's core eval (sae-bench 0.6.0) on identical inputs, phase by phase.

A random 2-layer transformer-lens model (d_model 64, the size of SAEBench's own test model) and a random
512-latent ReLU SAE (sae-lens ``standard``: relu((x - b_dec) W_enc + b_enc)) on ``blocks.0.hook_mlp_out``; the
same token rows of 128 (BOS first, ignored by both) go to both. sae-bench lives in its own Python (it pins
``numpy<2``, ``datasets<4``): pass it as ``--saebench-python`` (or ``SAEBENCH_PYTHON``); without it the script says
so and stops. `saebench_side.py` runs SAEBench's two phases there; this script runs ours in this process:

- reconstruction phase, ``--recon-rows`` rows: theirs CE and KL with the SAE spliced in and the hook zero-ablated;
  ours ``run`` with the core and downstream metrics (the same forwards);
- sparsity phase, ``--sparsity-rows`` rows: theirs L0, L1, L2 ratio, explained variance, MSE, cosine; ours
  ``run`` with the core metrics;
- whole core eval: the two phases; our full suite (every metric family) on both phases' rows.

Wall seconds, medians of ``--repeats``, at each ``--threads``; theirs time the phases alone, ours the whole ``run``
(loading the model and SAE, the pass, writing the leaderboard) and its scoring pass alone (their phase's work, less
the metrics' final ``compute``). Then every metric that both compute, side by side.

    python benchmarks/perf/bench_saebench.py --saebench-python /path/to/python [--threads 1 2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_suite import TimingReporter  # noqa: E402

HOOK, LAYER, BOS, VOCAB, CONTEXT, D_SAE, BATCH = "blocks.0.hook_mlp_out", 0, 0, 1000, 128, 512, 16
MODEL = {"n_layers": 2, "d_model": 64, "n_ctx": CONTEXT, "d_head": 16, "n_heads": 4, "d_mlp": 256, "d_vocab": VOCAB,
         "act_fn": "gelu", "normalization_type": "LN", "seed": 0}
CORE = ["l0", "cosine_similarity", "mse", "fvu", "relative_l2_error", "l2_norm_ratio", "dead_fraction", "dense_fraction"]
DOWNSTREAM = ["ce_increase", "ce_loss_recovered", "kl_divergence"]
# (ours, theirs, how theirs maps onto ours, note)
AGREEMENT = [
    ("l0", "l0", lambda m: m["l0"], "same definition"),
    ("cosine_similarity", "cossim", lambda m: m["cossim"], "same definition: mean over tokens of cos(x, x_hat)"),
    ("l2_norm_ratio", "l2_ratio", lambda m: m["l2_ratio"], "same definition"),
    ("mse", "mse", lambda m: m["mse"], "theirs = ours x d / the batch's scored tokens"),
    ("fvu", "1 - explained_variance", lambda m: 1 - m["explained_variance"], "theirs is not shift-invariant"),
    ("ce_increase", "ce_loss_with_sae - ce_loss_without_sae",
     lambda m: m["ce_loss_with_sae"] - m["ce_loss_without_sae"], "same definition"),
    ("ce_loss_recovered", "ce_loss_score", lambda m: m["ce_loss_score"], "they zero-ablate the BOS position too"),
    ("kl_divergence", "kl_div_with_sae", lambda m: m["kl_div_with_sae"], "theirs includes the last position"),
]


def build(folder: Path, rows: int) -> None:
    """The model, SAE and token rows that both sides read."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from safetensors.torch import save_file
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    model = HookedTransformer(HookedTransformerConfig(**MODEL))
    save_hooked_transformer(model, folder / "tl-model")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    torch.manual_seed(0)
    sae = StandardSAE(StandardSAEConfig(d_in=MODEL["d_model"], d_sae=D_SAE, apply_b_dec_to_input=True))
    with torch.no_grad():
        sae.W_enc.normal_(0, MODEL["d_model"] ** -0.5)
        sae.W_dec.copy_(sae.W_enc.T / sae.W_enc.T.norm(dim=1, keepdim=True))
        sae.b_enc.fill_(-1.0)
        sae.b_dec.normal_(0, 0.01)
    sae.cfg.metadata.hook_name = HOOK
    sae.save_model(folder / "sae")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, VOCAB, size=(rows, CONTEXT))
    ids[:, 0] = BOS
    pd.DataFrame({"input_ids": list(ids)}).to_parquet(folder / "tokens.parquet")


def spec(folder: Path, name: str, rows: int, metrics: list[str] | None) -> Path:
    path = folder / f"{name}.toml"
    listed = "" if metrics is None else f"metrics = {json.dumps(metrics)}\n"
    path.write_text(
        f'name = "{name}"\ntokens = {rows * CONTEXT}\nfit_tokens = 0\ncontext_size = {CONTEXT}\nprepend_bos = false\n'
        f'bos_token_id = {BOS}\nbatch_size = {BATCH}\ndevice = "cpu"\nbaselines = []\nentries = ["disk:sae"]\n'
        f'output = "{name}.parquet"\n{listed}'
        '[model]\nloader = "transformer_lens"\nname = "tl-model"\n[dataset]\nkind = "tokens"\npath = "tokens.parquet"\nshuffle_buffer = 0\n'
    )
    return path


def ours(path: Path) -> tuple[float, float, dict[str, float]]:
    """Wall seconds of one `run` of the spec and of its scoring pass alone, and its values."""
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec

    loaded = load_spec(path)
    loaded.output_path.unlink(missing_ok=True)
    reporter = TimingReporter(time.perf_counter)
    start = time.perf_counter()
    run_benchmark(loaded, reporter)
    seconds = time.perf_counter() - start
    board = pd.read_parquet(loaded.output_path)
    return seconds, reporter.seconds["scoring"], dict(zip(board["metric"], board["value"], strict=True))


def theirs(python: str, folder: Path, threads: int, repeats: int, recon_rows: int, sparsity_rows: int) -> dict:
    setup = {"model": MODEL, "d_in": MODEL["d_model"], "d_sae": D_SAE, "layer": LAYER, "hook": HOOK, "bos": BOS,
             "batch_prompts": BATCH, "threads": threads, "repeats": repeats, "recon_rows": recon_rows,
             "sparsity_rows": sparsity_rows}
    (folder / "setup.json").write_text(json.dumps(setup))
    side = Path(__file__).resolve().parent / "saebench_side.py"
    done = subprocess.run([python, str(side), str(folder)], capture_output=True, text=True, check=False)
    if done.returncode:
        sys.exit(f"SAEBench's side failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saebench-python", default=os.environ.get("SAEBENCH_PYTHON"))
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--recon-rows", type=int, default=48, help="rows of the reconstruction phase (6,144 tokens)")
    parser.add_argument("--sparsity-rows", type=int, default=480, help="rows of the sparsity phase (61,440 tokens)")
    args = parser.parse_args()
    python = args.saebench_python
    probe = python and shutil.which(python) and subprocess.run([python, "-c", "import sae_bench"], capture_output=True,
                                                                check=False).returncode == 0
    if not probe:
        print("skipped: no Python with sae-bench (pass --saebench-python or set SAEBENCH_PYTHON; README, Performance)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        build(folder, max(args.recon_rows, args.sparsity_rows) + args.recon_rows)
        specs = {"reconstruction": spec(folder, "recon", args.recon_rows, CORE + DOWNSTREAM),
                 "sparsity": spec(folder, "sparsity", args.sparsity_rows, CORE),
                 "full suite": spec(folder, "full", args.recon_rows + args.sparsity_rows, None)}
        tokens = {"reconstruction": args.recon_rows * CONTEXT, "sparsity": args.sparsity_rows * CONTEXT}
        tokens["whole"] = tokens["full suite"] = tokens["reconstruction"] + tokens["sparsity"]
        print(f"{MODEL['n_layers']} layers, d_model {MODEL['d_model']}, a {D_SAE}-latent ReLU SAE on {HOOK}; rows of "
              f"{CONTEXT} (BOS ignored); wall seconds, median of {args.repeats}; tokens/s counts every row position")
        print("| work | threads | SAEBench tok/s | ours tok/s: run / pass | ours / SAEBench: run / pass |\n"
              "|---|---|---|---|---|")
        values: dict[str, float] = {}
        for threads in args.threads:
            torch.set_num_threads(threads)
            them = theirs(python, folder, threads, args.repeats, args.recon_rows, args.sparsity_rows)
            seconds: dict[str, list[float]] = {work: [] for work in specs}
            passes: dict[str, list[float]] = {work: [] for work in specs}
            for _ in range(args.repeats):
                for work, path in specs.items():
                    elapsed, scoring, measured = ours(path)
                    seconds[work].append(elapsed)
                    passes[work].append(scoring)
                    if work != "full suite":
                        values.update(measured)
            mine = {work: statistics.median(s) for work, s in seconds.items()}
            mine_pass = {work: statistics.median(s) for work, s in passes.items()}
            mine["whole"] = mine["reconstruction"] + mine["sparsity"]
            mine_pass["whole"] = mine_pass["reconstruction"] + mine_pass["sparsity"]
            theirs_s = {**them["seconds"], "whole": sum(them["seconds"].values())}
            for work in ("reconstruction", "sparsity", "whole", "full suite"):
                rate, pass_rate = tokens[work] / mine[work], tokens[work] / mine_pass[work]
                base = tokens[work] / theirs_s["whole" if work == "full suite" else work]
                label = {"full suite": "our full suite vs their core eval"}.get(work, f"{work} phase")
                print(f"| {label}, {tokens[work]:,} tokens | {threads} | {base:,.0f} | {rate:,.0f} / {pass_rate:,.0f} | "
                      f"{rate / base:.2f} / {pass_rate / base:.2f} |")
        print("\n| ours | SAEBench | ours | SAEBench | difference | note |\n|---|---|---|---|---|---|")
        for mine_name, their_name, read, note in AGREEMENT:
            a, b = values[mine_name], read(them["metrics"])
            print(f"| `{mine_name}` | `{their_name}` | {a:.6g} | {b:.6g} | {abs(a - b):.2g} | {note} |")


if __name__ == "__main__":
    main()
