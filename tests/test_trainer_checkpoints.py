"""Checkpoints of the other trainers, laid out on disk by hand exactly as sparsify and dictionary_learning write them
(file names, keys, shapes): they load as sae-lens SAEs whose encode/decode equal the trainer's own formulas computed
from the raw tensors, map their hookpoints to the model's hooks, run through the CLI, and bad ones are one line."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
from safetensors.torch import save_file

from saebench_poly.errors import UserError
from saebench_poly.models import ModelConfig
from saebench_poly.models.hooked import load_hooked_transformer
from saebench_poly.sources import SourceContext, load_entry
from saebench_poly.sources.hookpoints import module_output_hook
from tests.conftest import D_MODEL

D, L, K = D_MODEL, 48, 4
RESID0, RESID1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def adapter(tiny_tl_model_dir: Path):
    return load_hooked_transformer(ModelConfig(loader="transformer_lens", name=str(tiny_tl_model_dir)), torch.device("cpu"), torch.float32)


def _context(adapter, base_dir: Path, hook: str | None = None) -> SourceContext:
    return SourceContext(adapter=adapter, device=torch.device("cpu"), dtype=torch.float32, seed=0, base_dir=base_dir, hook=hook)


def _randn(*shape: int, seed: int, scale: float = 0.3) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _x(n: int = 200) -> torch.Tensor:
    return _randn(n, D, seed=99, scale=1.0)


# ---------------------------------------------------------------- sparsify


def write_sparsify(folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32, **cfg) -> dict[str, torch.Tensor]:
    """``SparseCoder.save_to_disk``'s layout: cfg.json (its config plus d_in) and sae.safetensors."""
    folder.mkdir(parents=True)
    config = {"activation": "topk", "expansion_factor": 32, "normalize_decoder": True, "num_latents": L, "k": K,
              "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D, **cfg}
    (folder / "cfg.json").write_text(json.dumps(config))
    tensors = {"encoder.weight": _randn(L, D, seed=seed), "encoder.bias": _randn(L, seed=seed + 1, scale=0.05),
               "W_dec": _randn(L, D, seed=seed + 2), "b_dec": _randn(D, seed=seed + 3, scale=0.05)}
    if config["skip_connection"]:
        tensors["W_skip"] = _randn(D, D, seed=seed + 4, scale=0.1)
    save_file({key: value.to(dtype) for key, value in tensors.items()}, str(folder / "sae.safetensors"))
    return {key: value.to(dtype).to(torch.float32) for key, value in tensors.items()}


def sparsify_reference(t: dict[str, torch.Tensor], x: torch.Tensor, k: int = K, transcode: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """sparsify's SparseCoder.forward: encode = fused_encoder(x - b_dec (x for a transcoder)) = TopK(ReLU(linear)),
    decode = decoder_impl(indices, acts, W_dec.mT) + b_dec, plus x @ W_skip.mT with a skip connection."""
    pre = torch.relu(torch.nn.functional.linear(x if transcode else x - t["b_dec"], t["encoder.weight"], t["encoder.bias"]))
    values, indices = pre.topk(k, dim=-1, sorted=False)
    z = torch.zeros_like(pre).scatter_(-1, indices, values)
    x_hat = (values[..., None] * t["W_dec"][indices]).sum(dim=-2) + t["b_dec"]
    if "W_skip" in t:
        x_hat = x_hat + x @ t["W_skip"].mT
    return z, x_hat


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sparsify_sae_encodes_and_decodes_as_sparsify_does(adapter, tmp_path: Path, dtype: torch.dtype) -> None:
    tensors = write_sparsify(tmp_path / "run" / "layers.0", dtype=dtype)
    entry = load_entry("sparsify:run/layers.0", _context(adapter, tmp_path))
    assert (entry.name, entry.hook, entry.architecture, entry.width, entry.d_in) == ("run/layers.0", RESID0, "topk", L, D)
    z, x_hat = sparsify_reference(tensors, _x())
    torch.testing.assert_close(entry.encode(_x()), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entry.decode(entry.encode(_x())), x_hat, rtol=1e-5, atol=1e-5)
    assert ((entry.encode(_x()) != 0).sum(dim=1) <= K).all()
    assert len(entry.weights_sha256()) == 64


@pytest.mark.parametrize(("transcode", "skip"), [(False, True), (True, False), (True, True)])
def test_sparsify_skip_connections_and_transcoders_reconstruct_as_sparsify_does(adapter, tmp_path: Path, transcode: bool, skip: bool) -> None:
    tensors = write_sparsify(tmp_path / "run" / "layers.0", transcode=transcode, skip_connection=skip)
    entry = load_entry("sparsify:run/layers.0", _context(adapter, tmp_path))
    hooks = ("blocks.0.hook_resid_pre", RESID0) if transcode else (RESID0, RESID0)
    assert (entry.hook, entry.output_hook) == hooks
    z, x_hat = sparsify_reference(tensors, _x(), transcode=transcode)
    torch.testing.assert_close(entry.encode(_x()), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entry.reconstruct(_x(), entry.encode(_x())), x_hat, rtol=1e-5, atol=1e-5)


def test_a_sparsify_mlp_transcoder_reads_the_mlps_input(adapter, tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from saebench_poly.models.hf import HFModelAdapter

    write_sparsify(tmp_path / "run" / "layers.0.mlp", transcode=True, skip_connection=True)
    with pytest.raises(UserError, match="reads the input of 'layers.0.mlp', which has no hook in transformer_lens"):
        load_entry("sparsify:run/layers.0.mlp", _context(adapter, tmp_path))
    assert load_entry("sparsify:run/layers.0.mlp", _context(adapter, tmp_path, hook="blocks.0.hook_resid_mid")).output_hook == "blocks.0.hook_mlp_out"
    torch.manual_seed(0)
    gpt2 = HFModelAdapter(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=D, n_layer=2, n_head=2, n_positions=16)), None, "gpt2")
    entry = load_entry("sparsify:run/layers.0.mlp", _context(gpt2, tmp_path))
    assert (entry.hook, entry.output_hook) == ("transformer.h.0.ln_2", "transformer.h.0.mlp")


def test_a_sparsify_run_folder_picks_the_hookpoint_of_the_entrys_hook(adapter, tmp_path: Path) -> None:
    write_sparsify(tmp_path / "run" / "layers.0")
    tensors = write_sparsify(tmp_path / "run" / "layers.1", seed=10)
    with pytest.raises(UserError, match=r"sparsify run with 2 hookpoints \(layers.0, layers.1\): name one, e\.g\. sparsify:run/layers.0"):
        load_entry("sparsify:run", _context(adapter, tmp_path))
    entry = load_entry("sparsify:run", _context(adapter, tmp_path, hook=RESID1))
    assert entry.hook == RESID1 and entry.name == "run/layers.1"
    torch.testing.assert_close(entry.encode(_x()), sparsify_reference(tensors, _x())[0], rtol=1e-5, atol=1e-5)


def test_a_sparsify_run_is_scored_through_the_cli(tl_spec, run_cli, tmp_path: Path) -> None:
    write_sparsify(tmp_path / "run" / "layers.0")
    code, out, err = run_cli("run", str(tl_spec(entries=["sparsify:run/layers.0"])))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "out" / "board.parquet")
    sae = rows[rows["entry"] == "run/layers.0"]
    assert set(sae["hook"]) == {RESID0} and set(sae["source_uri"]) == {"sparsify:run/layers.0"}
    assert sae.set_index("metric").loc["l0", "value"] == pytest.approx(K)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cfg": {"activation": "groupmax"}}, "activation 'groupmax'"),
        ({"cfg": {"signed": True}}, "signed TopK SAE"),
        ({"drop": "W_skip", "cfg": {"skip_connection": True}}, r"holds \['W_dec', 'b_dec', 'encoder.bias', 'encoder.weight'\]"),
        ({"cfg": {"num_latents": 0, "expansion_factor": 2}}, r"encoder.weight has shape \[48, 16\], expected \[32, 16\]"),
        ({"transpose": "W_dec"}, r"W_dec has shape \[16, 48\], expected \[48, 16\]"),
        ({"drop": "b_dec"}, "a sparsify SAE holds exactly"),
        ({"name": "unembed"}, "sparsify hookpoint 'unembed' .* has no hook in transformer_lens model"),
    ],
)
def test_bad_sparsify_checkpoints_are_refused_in_one_line(adapter, tmp_path: Path, change: dict, message: str) -> None:
    folder = tmp_path / "run" / change.get("name", "layers.0")
    tensors = write_sparsify(folder, **change.get("cfg", {}))
    if "transpose" in change or "drop" in change:
        if "transpose" in change:
            tensors[change["transpose"]] = tensors[change["transpose"]].T.contiguous()
        tensors.pop(change.get("drop", ""), None)
        save_file(tensors, str(folder / "sae.safetensors"))
    with pytest.raises(UserError, match=message) as error:
        load_entry(f"sparsify:run/{folder.name}", _context(adapter, tmp_path))
    assert "\n" not in str(error.value)


def test_sparsify_hookpoints_map_to_the_models_hooks(adapter) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from saebench_poly.models.hf import HFModelAdapter

    assert [module_output_hook(adapter, p) for p in ("layers.1", "h.0.mlp", "layers.0.self_attn", "embed_tokens", "lm_head")] == [
        RESID1, "blocks.0.hook_mlp_out", "blocks.0.hook_attn_out", "hook_embed", None]
    # after Gemma-2-style post-norms, hook_mlp_out and hook_attn_out are not the modules' raw outputs: no mapping
    post_norm = SimpleNamespace(family="transformer_lens", model=SimpleNamespace(cfg=SimpleNamespace(
        use_normalization_before_and_after=True)))
    assert [module_output_hook(post_norm, p) for p in ("layers.1", "layers.0.mlp", "layers.0.self_attn")] == [
        RESID1, None, None]
    gpt2 = HFModelAdapter(GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)), None, "gpt2")
    assert [module_output_hook(gpt2, p) for p in ("h.1", "layers.1", "layers.0.mlp", "wte", "nowhere")] == [
        "transformer.h.1", "transformer.h.1", "transformer.h.0.mlp", "transformer.wte", None]


# ---------------------------------------------------------------- dictionary_learning


def _dictionary_learning_state(dict_class: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict with exactly the keys and shapes of ``dict_class``'s ``state_dict()`` (dictionary.py and
    trainers/*.py of dictionary_learning)."""
    w = {"encoder.weight": _randn(L, D, seed=seed), "encoder.bias": _randn(L, seed=seed + 1, scale=0.05),
         "decoder.weight": _randn(D, L, seed=seed + 2)}
    p = {"W_enc": _randn(D, L, seed=seed), "b_enc": _randn(L, seed=seed + 1, scale=0.05),
         "W_dec": _randn(L, D, seed=seed + 2), "b_dec": _randn(D, seed=seed + 3, scale=0.05)}
    b_dec = _randn(D, seed=seed + 3, scale=0.05)
    k, scalar_threshold = torch.tensor(K, dtype=torch.int), torch.tensor(0.2)
    return {
        "AutoEncoder": {**w, "bias": b_dec},
        "AutoEncoderNew": {**w, "decoder.bias": b_dec},
        "AutoEncoderTopK": {**w, "b_dec": b_dec, "k": k, "threshold": torch.tensor(-1.0)},
        "BatchTopKSAE": {**w, "b_dec": b_dec, "k": k, "threshold": scalar_threshold},
        "MatryoshkaBatchTopKSAE": {**p, "k": k, "threshold": scalar_threshold, "group_sizes": torch.tensor([8, 16, 24])},
        "JumpReluAutoEncoder": {**p, "threshold": torch.rand(L, generator=torch.Generator().manual_seed(seed)) * 0.2},
        "GatedAutoEncoder": {"encoder.weight": w["encoder.weight"], "decoder.weight": w["decoder.weight"],
                             "decoder_bias": b_dec, "r_mag": _randn(L, seed=seed + 4, scale=0.2),
                             "gate_bias": _randn(L, seed=seed + 5, scale=0.05), "mag_bias": _randn(L, seed=seed + 6, scale=0.05)},
    }[dict_class]


def dictionary_learning_reference(dict_class: str, s: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dictionary_learning's own encode and decode of each class (at inference: BatchTopK and Matryoshka use
    their threshold, ``use_threshold=True``)."""
    relu, linear = torch.relu, torch.nn.functional.linear
    if dict_class == "AutoEncoder":
        f = relu(linear(x - s["bias"], s["encoder.weight"], s["encoder.bias"]))
        return f, linear(f, s["decoder.weight"]) + s["bias"]
    if dict_class == "AutoEncoderNew":
        f = relu(linear(x, s["encoder.weight"], s["encoder.bias"]))
        return f, linear(f, s["decoder.weight"], s["decoder.bias"])
    if dict_class in ("AutoEncoderTopK", "BatchTopKSAE"):
        a = relu(linear(x - s["b_dec"], s["encoder.weight"], s["encoder.bias"]))
        if dict_class == "AutoEncoderTopK":
            top = a.topk(int(s["k"]), sorted=False, dim=-1)
            f = torch.zeros_like(a).scatter_(-1, top.indices, top.values)
        else:
            f = a * (a > s["threshold"])
        return f, linear(f, s["decoder.weight"]) + s["b_dec"]
    if dict_class == "MatryoshkaBatchTopKSAE":
        a = relu((x - s["b_dec"]) @ s["W_enc"] + s["b_enc"])
        f = a * (a > s["threshold"])
        return f, f @ s["W_dec"] + s["b_dec"]
    if dict_class == "JumpReluAutoEncoder":
        pre = x @ s["W_enc"] + s["b_enc"]
        f = relu(pre * (pre > s["threshold"]))
        return f, f @ s["W_dec"] + s["b_dec"]
    x_enc = linear(x - s["decoder_bias"], s["encoder.weight"])
    f = (x_enc + s["gate_bias"] > 0).float() * relu(s["r_mag"].exp() * x_enc + s["mag_bias"])
    return f, linear(f, s["decoder.weight"]) + s["decoder_bias"]


def write_dictionary_learning(folder: Path, dict_class: str, submodule: str = "resid_post_layer_0",
                              state: dict | None = None, io: str = "out") -> dict[str, torch.Tensor]:
    """``trainSAE``'s layout: trainer_<i>/config.json ({"trainer": trainer.config, "buffer": buffer.config}) and
    trainer_<i>/ae.pt (``t.save`` of the state dict)."""
    folder.mkdir(parents=True)
    state = state if state is not None else _dictionary_learning_state(dict_class)
    trainer = {"trainer_class": "SomeTrainer", "dict_class": dict_class, "activation_dim": D, "dict_size": L,
               "lr": 1e-3, "steps": 100, "seed": 0, "device": "cpu", "layer": 0, "lm_name": "tiny",
               "wandb_name": "x", "submodule_name": submodule}
    if "k" in state:
        trainer["k"] = int(state["k"])
    buffer = {"d_submodule": D, "io": io, "n_ctxs": 100, "ctx_len": 12, "refresh_batch_size": 8, "out_batch_size": 64, "device": "cpu"}
    (folder / "config.json").write_text(json.dumps({"trainer": trainer, "buffer": buffer}, indent=4))
    torch.save(state, folder / "ae.pt")
    return state


DICT_CLASSES = ["AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "MatryoshkaBatchTopKSAE",
                "JumpReluAutoEncoder", "GatedAutoEncoder"]
SAE_LENS_CLASS = {"AutoEncoder": "standard", "AutoEncoderNew": "standard", "AutoEncoderTopK": "topk",
                  "BatchTopKSAE": "jumprelu", "MatryoshkaBatchTopKSAE": "jumprelu", "JumpReluAutoEncoder": "jumprelu",
                  "GatedAutoEncoder": "gated"}


@pytest.mark.parametrize("dict_class", DICT_CLASSES)
def test_each_dictionary_class_encodes_and_decodes_as_dictionary_learning_does(adapter, tmp_path: Path, dict_class: str) -> None:
    state = write_dictionary_learning(tmp_path / "save" / "trainer_0", dict_class)
    entry = load_entry("dictionary_learning:save/trainer_0", _context(adapter, tmp_path))
    assert (entry.name, entry.hook, entry.architecture, entry.width) == ("save/trainer_0", RESID0, SAE_LENS_CLASS[dict_class], L)
    f, x_hat = dictionary_learning_reference(dict_class, state, _x())
    z = entry.encode(_x())
    assert (f != 0).any() and (f == 0).any()
    torch.testing.assert_close(z, f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entry.decode(z), x_hat, rtol=1e-5, atol=1e-5)


def test_a_dictionary_learning_sae_is_scored_through_the_cli(tl_spec, run_cli, tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "save" / "trainer_0", "AutoEncoderTopK", submodule="resid_post_layer_1")
    code, out, err = run_cli("run", str(tl_spec(entries=["dictionary_learning:save/trainer_0"])))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "out" / "board.parquet")
    sae = rows[rows["entry"] == "save/trainer_0"].set_index("metric")
    assert set(sae["hook"]) == {RESID1} and sae.loc["l0", "value"] == pytest.approx(K)


class NotATensor:
    pass


def _bad(kind: str, folder: Path) -> None:
    if kind == "pickle":
        write_dictionary_learning(folder, "AutoEncoder")
        torch.save({"bias": NotATensor()}, folder / "ae.pt")
    elif kind == "backup":
        write_dictionary_learning(folder, "AutoEncoder")
        torch.save({"step": 5, "ae": _dictionary_learning_state("AutoEncoder"), "optimizer": {}, "config": {}, "norm_factor": 1.0}, folder / "ae.pt")
    elif kind == "uncalibrated":
        write_dictionary_learning(folder, "BatchTopKSAE", state={**_dictionary_learning_state("BatchTopKSAE"), "threshold": torch.tensor(-1.0)})
    elif kind == "shape":
        state = _dictionary_learning_state("AutoEncoder")
        write_dictionary_learning(folder, "AutoEncoder", state={**state, "decoder.weight": state["decoder.weight"].T.contiguous()})
    elif kind == "keys":
        write_dictionary_learning(folder, "AutoEncoder", state=_dictionary_learning_state("AutoEncoderNew"))
    elif kind == "class":
        write_dictionary_learning(folder, "AutoEncoder")
        config = json.loads((folder / "config.json").read_text())
        config["trainer"]["dict_class"] = "IdentityDict"
        (folder / "config.json").write_text(json.dumps(config))
    elif kind == "transcoder":
        write_dictionary_learning(folder, "AutoEncoder", io="in_and_out")
    elif kind == "submodule":
        write_dictionary_learning(folder, "AutoEncoder", submodule="my_custom_place")


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("pickle", "needs more than tensors to load, and saebench_poly unpickles nothing else"),
        ("backup", "is a training backup"),
        ("uncalibrated", "threshold -1.0: it was never set during training"),
        ("shape", r"decoder.weight has shape \[48, 16\], expected \[16, 48\]"),
        ("keys", r"missing \['bias'\], unexpected \['decoder.bias'\]"),
        ("class", "dict_class 'IdentityDict' is not one saebench_poly can score"),
        ("transcoder", "is a dictionary_learning transcoder"),
        ("submodule", "submodule 'my_custom_place' .* give the entry a hook in the spec"),
    ],
)
def test_bad_dictionary_learning_checkpoints_are_refused_in_one_line(adapter, tmp_path: Path, kind: str, message: str) -> None:
    _bad(kind, tmp_path / "save" / "trainer_0")
    with pytest.raises(UserError, match=message) as error:
        load_entry("dictionary_learning:save/trainer_0", _context(adapter, tmp_path))
    assert "\n" not in str(error.value)


def test_the_spec_hook_places_a_dictionary_trained_elsewhere(adapter, tmp_path: Path) -> None:
    write_dictionary_learning(tmp_path / "t", "AutoEncoder", submodule="my_custom_place", io="in")
    assert load_entry("dictionary_learning:t", _context(adapter, tmp_path, hook=RESID1)).hook == RESID1
