"""SAEBench's side of `bench_saebench.py`: run in a Python that has sae-bench 0.6.0 (not this project).

Loads the model and SAE that `bench_saebench.py` wrote into FOLDER, feeds SAEBench's core eval the same token rows
through a minimal activation store (the rows in order, as `ActivationsStore.get_batch_tokens` hands them), times
its reconstruction phase (`get_downstream_reconstruction_metrics`: CE and KL with the SAE spliced in and with the
hook zero-ablated; the BOS position keeps its activations, as in ours: ``exclude_special_tokens_from_reconstruction``) and its sparsity phase (`get_sparsity_and_variance_metrics`), and prints one JSON line.

    python saebench_side.py FOLDER
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sae_bench.custom_saes.relu_sae import ReluSAE
from sae_bench.evals.core import main as core
from safetensors.torch import load_file
from transformer_lens import HookedTransformer, HookedTransformerConfig


class RowStore:
    """The part of sae-lens's `ActivationsStore` that SAEBench's core eval reads: successive rows of tokens."""

    def __init__(self, rows: torch.Tensor, batch_prompts: int) -> None:
        self.rows, self.next = rows, 0
        self.context_size = rows.shape[1]
        self.store_batch_size_prompts = batch_prompts

    def get_batch_tokens(self, n: int) -> torch.Tensor:
        batch = self.rows[self.next : self.next + n]
        if len(batch) < n:
            raise RuntimeError(f"token rows ran out at row {self.next}")
        self.next += n
        return batch

    def reset_input_dataset(self) -> None:
        self.next = 0


def main(folder: Path) -> None:
    setup = json.loads((folder / "setup.json").read_text())
    torch.set_num_threads(setup["threads"])
    model = HookedTransformer(HookedTransformerConfig(**setup["model"]))
    model.load_state_dict(load_file(folder / "model.safetensors"))
    model.eval()
    weights = load_file(folder / "sae" / "sae_weights.safetensors")
    sae = ReluSAE(setup["d_in"], setup["d_sae"], "bench", setup["layer"], torch.device("cpu"), torch.float32,
                  hook_name=setup["hook"])
    sae.load_state_dict({name: weights[name] for name in ("W_enc", "b_enc", "W_dec", "b_dec")})
    rows = torch.tensor(np.stack(pd.read_parquet(folder / "tokens.parquet")["input_ids"].to_numpy()))
    batch, ignore = setup["batch_prompts"], {setup["bos"]}
    store = RowStore(rows, batch)
    times: dict[str, list[float]] = {"reconstruction": [], "sparsity": []}
    for _ in range(setup["repeats"]):
        store.reset_input_dataset()
        start = time.perf_counter()
        recon = core.get_downstream_reconstruction_metrics(
            sae, model, store, compute_kl=True, compute_ce_loss=True, n_batches=setup["recon_rows"] // batch,
            eval_batch_size_prompts=batch, ignore_tokens=ignore, exclude_special_tokens_from_reconstruction=True)
        times["reconstruction"].append(time.perf_counter() - start)
        store.reset_input_dataset()
        start = time.perf_counter()
        sparsity, _ = core.get_sparsity_and_variance_metrics(
            sae, model, store, n_batches=setup["sparsity_rows"] // batch, compute_l2_norms=True,
            compute_sparsity_metrics=True, compute_variance_metrics=True,
            compute_featurewise_density_statistics=False, eval_batch_size_prompts=batch, model_kwargs={},
            ignore_tokens=ignore)
        times["sparsity"].append(time.perf_counter() - start)
    print(json.dumps({"seconds": {phase: statistics.median(t) for phase, t in times.items()},
                      "metrics": {**recon, **{k: float(v) for k, v in sparsity.items()}}}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
