"""One convention for neuron embeddings across adapters: the same GPT-2 weights, loaded through Hugging Face and
converted to transformer-lens, give the same embeddings and the same per-unit polysemanticity results."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saebench_poly.models import Batch, ModelConfig
from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import GPT2Config, GPT2LMHeadModel

    from saebench_poly.models.hooked import save_hooked_transformer

    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    with torch.no_grad():  # LayerNorm scales and shifts away from 1 and 0, so that folding them matters
        for block in hf.transformer.h:
            block.ln_2.weight.normal_(1.0, 0.3)
            block.ln_2.bias.normal_(0.0, 0.5)
    root = tmp_path_factory.mktemp("gpt2-both")
    hf.save_pretrained(root / "hf", safe_serialization=True)
    cfg = HookedTransformerConfig(n_layers=2, d_model=16, d_head=8, n_heads=2, d_mlp=64, d_vocab=32, n_ctx=16,
                                  act_fn="gelu_new", normalization_type="LN", eps=1e-5,
                                  original_architecture="GPT2LMHeadModel")
    tl = HookedTransformer(cfg)
    tl.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    save_hooked_transformer(tl, root / "tl")
    rng = np.random.default_rng(0)
    pd.DataFrame({"input_ids": [rng.integers(0, 32, size=16).tolist() for _ in range(120)]}).to_parquet(root / "ids.parquet")
    return {"hf": root / "hf", "tl": root / "tl", "ids": root / "ids.parquet", "root": root}


HOOKS = {"hf": "transformer.h.1.mlp.act", "tl": "blocks.1.mlp.hook_post"}
LOADERS = {"hf": "hf", "tl": "transformer_lens"}


def test_the_same_neurons_have_the_same_embeddings_through_both_adapters(folders) -> None:
    from saebench_poly.models import MODEL_LOADERS

    batch = Batch(torch.randint(0, 32, (3, 10), generator=torch.Generator().manual_seed(1)), torch.ones(3, 10, dtype=torch.bool))
    embeddings, neurons = {}, {}
    for kind in ("hf", "tl"):
        adapter = MODEL_LOADERS.get(LOADERS[kind])(ModelConfig(loader=LOADERS[kind], name=str(folders[kind])), CPU, torch.float32)
        inputs = adapter.neuron_inputs(HOOKS[kind])
        h = inputs.capture(batch).double()
        embeddings[kind] = h[:, :, None, :] * inputs.weight.double()[None, None]
        neurons[kind] = adapter.forward(batch, [HOOKS[kind]], logits=False).activations[HOOKS[kind]]
    torch.testing.assert_close(neurons["hf"], neurons["tl"], atol=1e-5, rtol=0)
    torch.testing.assert_close(embeddings["hf"], embeddings["tl"], atol=1e-5, rtol=1e-5)


def test_the_same_neurons_have_the_same_per_unit_results_through_both_adapters(folders) -> None:
    units = {}
    for kind in ("hf", "tl"):
        spec = folders["root"] / f"{kind}.toml"
        spec.write_text(f'''
name = "gpt2-{kind}"
tokens = 1500
fit_tokens = 0
context_size = 16
prepend_bos = false
ignore_tokens = []
device = "cpu"
hooks = ["{HOOKS[kind]}"]
baselines = ["neurons"]
metrics = ["mean_effective_behaviours", "l0"]
output = "{kind}.parquet"
[model]
loader = "{LOADERS[kind]}"
name = "{folders[kind]}"
[dataset]
kind = "tokens"
path = "{folders['ids']}"
''')
        result = run_benchmark(load_spec(spec), write=False)
        units[kind] = result.units.set_index("unit").sort_index()
    assert (units["hf"]["poly_status"] == "ok").sum() > 10
    for column in ("poly_status", "n_examples", "n_behaviours", "effective_behaviours"):
        pd.testing.assert_series_equal(units["hf"][column], units["tl"][column], check_exact=False, rtol=1e-6)
