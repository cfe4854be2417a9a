"""transformer-lens models scored on the activations their SAEs were trained on: loaded without weight processing
unless the SAEs (or the spec) ask for it, and spliced forwards that restart part-way exactly as the full forward."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import D_MLP, D_MODEL, VOCAB


@pytest.fixture(scope="module")
def shortformer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=32, d_head=4, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type="LN", positional_embedding_type="shortformer", seed=0)
    return save_hooked_transformer(HookedTransformer(cfg), tmp_path_factory.mktemp("shortformer"))


def test_a_shortformer_splice_restarting_at_a_block_reconstructs_exactly(shortformer_dir, tiny_tl_model_dir, tl_spec,
                                                                          run_cli, tmp_path) -> None:
    spec = tl_spec(hooks=["blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"], baselines=["pca"], tokens=120)
    spec.write_text(spec.read_text().replace(str(tiny_tl_model_dir), str(shortformer_dir)))
    code, out, err = run_cli("run", str(spec))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "out" / "board.parquet")
    kl = rows[rows["metric"] == "kl_divergence"].set_index("entry")["value"]
    # PCA at full width rebuilds its input to float rounding, so its splice re-runs blocks 1.. from hook_resid_pre
    assert set(kl.index) == {"pca:blocks.1.hook_resid_pre", "pca:blocks.1.hook_resid_post"}
    assert (kl.abs() < 1e-6).all(), kl


RESID = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def uncentred_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose writing weights are far from centred, so that centring them moves the residual stream."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    cfg = HookedTransformerConfig(n_layers=2, d_model=D_MODEL, n_ctx=32, d_head=4, n_heads=4, d_mlp=D_MLP, d_vocab=VOCAB,
                                  act_fn="gelu", normalization_type="LN", seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():
        model.embed.W_E.add_(1.0)
        for block in model.blocks:
            block.ln1.b.add_(0.3)
            block.mlp.b_out.add_(0.5)
    return save_hooked_transformer(model, tmp_path_factory.mktemp("uncentred"))


def load_adapter(folder: Path, **kwargs):
    import torch

    from saebench_poly.models.base import ModelConfig
    from saebench_poly.models.hooked import load_hooked_transformer

    options = {"model_from_pretrained_kwargs": kwargs} if kwargs else {}
    return load_hooked_transformer(ModelConfig(loader="transformer_lens", name=str(folder), options=options),
                                   torch.device("cpu"), torch.float32)


def load(folder: Path, **kwargs):
    return load_adapter(folder, **kwargs).model


def test_a_local_folder_loads_without_weight_processing_unless_asked(uncentred_dir) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(uncentred_dir / "model.safetensors")
    plain = load(uncentred_dir)
    assert all(torch.equal(plain.state_dict()[name], tensor) for name, tensor in saved.items())
    tokens = torch.randint(0, VOCAB, (3, 10), generator=torch.Generator().manual_seed(0))
    logits, cache = plain.run_with_cache(tokens)
    assert cache[RESID].mean(-1).abs().min() > 0.1  # the residual stream is not centred

    centred = load(uncentred_dir, center_writing_weights=True)
    centred_logits, centred_cache = centred.run_with_cache(tokens)
    torch.testing.assert_close(centred_cache[RESID].mean(-1), torch.zeros(3, 10), atol=1e-5, rtol=0)
    torch.testing.assert_close(centred_logits.log_softmax(-1), logits.log_softmax(-1), atol=1e-4, rtol=0)
    assert torch.equal(load(uncentred_dir, fold_ln=False).state_dict()["embed.W_E"], saved["embed.W_E"])


def sae_trained_with(folder: Path, **kwargs) -> Path:
    import json

    from tests.conftest import write_sae

    write_sae(folder, "topk", D_MODEL, 32, RESID, k=4)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg["metadata"]["model_from_pretrained_kwargs"] = kwargs
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return folder


def tl_board(tl_spec, tiny_tl_model_dir, model_dir, entries, extra="", **top):
    spec = tl_spec(entries=entries, hooks=[RESID], baselines=["neurons"], tokens=110, fit_tokens=0,
                   metrics=["l0", "fvu"], **top)
    spec.write_text(spec.read_text().replace(str(tiny_tl_model_dir), str(model_dir)) + extra)
    return spec


def test_the_model_loads_with_the_kwargs_its_saes_were_trained_with(uncentred_dir, tiny_tl_model_dir, tl_spec,
                                                                    run_cli, tmp_path) -> None:
    from saebench_poly.leaderboard import read_provenance

    sae_trained_with(tmp_path / "centred-sae", center_writing_weights=True)
    sae_trained_with(tmp_path / "plain-sae", fold_ln=False)  # the no-processing default, said out loud
    board = tmp_path / "out" / "board.parquet"

    def run(entries, extra="", **top):
        code, out, err = run_cli("run", str(tl_board(tl_spec, tiny_tl_model_dir, uncentred_dir, entries, extra, **top)))
        frame = pd.read_parquet(board) if code == 0 else None
        return code, err, frame

    code, err, centred = run(["disk:centred-sae"])
    assert code == 0, err
    settings = read_provenance(board).specs[centred["spec_hash"].iloc[0]]
    assert settings["model"]["options"] == {"model_from_pretrained_kwargs": {"center_writing_weights": True}}
    code, err, chosen = run(["disk:centred-sae"], '[model.options]\nmodel_from_pretrained_kwargs = {center_writing_weights = true}\n')
    assert code == 0, err
    code, err, plain = run(["disk:plain-sae"])
    assert code == 0, err
    assert centred["spec_hash"].iloc[0] == chosen["spec_hash"].iloc[0] != plain["spec_hash"].iloc[0]

    def values(frame, entry):
        return frame[frame["entry"] == entry].set_index("metric")["value"]

    pd.testing.assert_series_equal(values(centred, "centred-sae"), values(chosen, "centred-sae"))
    assert values(centred, f"neurons:{RESID}")["l0"] == values(plain, f"neurons:{RESID}")["l0"] == D_MODEL

    code, err, _ = run(["disk:centred-sae", "disk:plain-sae"])
    assert code == 2 and err.splitlines()[-1].startswith("saebench-poly: error: the SAEs were trained on differently "
                                                         "loaded models")
    code, err, _ = run(["disk:centred-sae", "disk:plain-sae"], '[model.options]\nmodel_from_pretrained_kwargs = {}\n')
    assert code == 0, err
    said = " ".join(err.split())  # rich wraps long messages
    assert "disk:centred-sae was trained with model_from_pretrained_kwargs {'center_writing_weights': True}" in said


def test_loader_option_mistakes_are_one_line(uncentred_dir, tiny_tl_model_dir, tl_spec, run_cli) -> None:
    for options, words in (("n_devices = 2", "unknown"), ("model_from_pretrained_kwargs = {n_devices = 2}",
                                                           "do not apply to a local model folder")):
        spec = tl_board(tl_spec, tiny_tl_model_dir, uncentred_dir, [], f"[model.options]\n{options}\n")
        code, out, err = run_cli("run", str(spec))
        assert code == 2 and err.splitlines()[-1].startswith("saebench-poly: error:"), err
        assert ("model_from_pretrained_kwargs" in err.splitlines()[-1]) and (words != "unknown" or "n_devices" in err)


LEFT_PADDING = "left-padding tokenizer"


@pytest.mark.parametrize("variant", [{}, {"positional_embedding_type": "shortformer"}, {"parallel_attn_mlp": True},
                                     {"normalization_type": "RMS", "use_normalization_before_and_after": True},
                                     {"attn_only": True}, {"use_hook_mlp_in": True}, LEFT_PADDING],
                         ids=["standard", "shortformer", "parallel", "post-norms", "attn-only", "hook-mlp-in",
                              "left-padding"])
def test_a_spliced_forward_restarts_where_its_hook_is_and_gives_the_full_forwards_bits(variant, tmp_path) -> None:
    """hook_resid_post and hook_mlp_out end their block, so their splices restart at the next block (after the last:
    only the unembedding) from the clean cache; other hooks restart at their own block. Bit for bit the forward
    from the tokens with the hook replaced, also where a left-padding tokenizer makes transformer-lens mask the pad
    tokens at the start of a row (a restarted forward must be given that mask)."""
    import torch
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.base import Batch
    from saebench_poly.models.hooked import save_hooked_transformer

    tokenizer = _left_padding_tokenizer() if variant == LEFT_PADDING else None
    variant = {} if variant == LEFT_PADDING else variant
    cfg = HookedTransformerConfig(**({"n_layers": 2, "d_model": D_MODEL, "n_ctx": 32, "d_head": 4, "n_heads": 4,
                                      "d_mlp": D_MLP, "d_vocab": VOCAB, "act_fn": "gelu", "normalization_type": "LN",
                                      "seed": 0} | variant))
    adapter = load_adapter(save_hooked_transformer(HookedTransformer(cfg, tokenizer=tokenizer), tmp_path / "model"))
    tokens = torch.randint(1, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    if tokenizer is not None:
        assert adapter.model.tokenizer.padding_side == "left"
        tokens[:2, :3] = adapter.model.tokenizer.pad_token_id  # rows that start with the pad token
    batch = Batch(tokens, torch.ones(3, 12, dtype=torch.bool))
    names = ("hook_resid_pre", "hook_attn_out", "hook_resid_post") + (() if cfg.attn_only else ("mlp.hook_post", "hook_mlp_out"))
    hooks = [f"blocks.{layer}.{name}" for layer in range(2) for name in names]
    clean = adapter.forward(batch, hooks)
    assert adapter._restart("blocks.1.hook_resid_post")[0] == 2 and adapter._restart("blocks.1.hook_attn_out")[0] == 1
    if not cfg.attn_only:
        assert adapter._restart("blocks.1.hook_mlp_out")[0] == 2 and adapter._restart("blocks.1.mlp.hook_post")[0] == 1

    def replacement(x: torch.Tensor) -> torch.Tensor:
        return 0.5 * x + 0.25

    for hook in hooks:
        full = adapter.model.run_with_hooks(tokens, fwd_hooks=[(hook, lambda act, hook: replacement(act))])
        assert torch.equal(adapter.forward_with_replacement(batch, clean, hook, replacement), full), hook


def _left_padding_tokenizer():
    """A word-level tokenizer over the test vocabulary that pads on the left (id 0 is its pad token)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, **{f"t{i}": i for i in range(1, VOCAB)}}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t1")),
                                   pad_token="<pad>", padding_side="left")
