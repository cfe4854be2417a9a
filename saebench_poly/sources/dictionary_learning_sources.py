"""SAEs trained with saprmarks' dictionary_learning: ``dictionary_learning:<folder>``.

Layout (``trainSAE``): ``<save_dir>/trainer_<i>/`` holds ``config.json`` = ``{"trainer": {"dict_class",
"activation_dim", "dict_size", "k", "layer", "submodule_name", "lm_name", ...}, "buffer": {"io", ...}}`` and
``ae.pt``, the dictionary's ``state_dict`` saved with ``torch.save``. ``ae.pt`` is a pickle: it is read with
``torch.load(weights_only=True)`` only, which unpickles tensors and plain containers and nothing else; a file that
needs more is refused, never unpickled. There is no safetensors route for these checkpoints.

Each dictionary class becomes the sae-lens SAE that computes the same encode and decode (dictionary_learning's own
formulas, x the activations, L the dictionary size):

| dict_class | dictionary_learning | sae-lens SAE |
|---|---|---|
| AutoEncoder | f = ReLU(encoder(x - bias)), x_hat = decoder(f) + bias | standard, b_dec = bias, b_dec subtracted from x |
| AutoEncoderNew | f = ReLU(encoder(x)), x_hat = decoder(f) (with its bias) | standard, b_dec = decoder.bias, not subtracted |
| AutoEncoderTopK | f = TopK_k(ReLU(encoder(x - b_dec))), x_hat = decoder(f) + b_dec | topk with k = the ``k`` buffer |
| BatchTopKSAE | at inference f = a (a > threshold), a = ReLU(encoder(x - b_dec)) | jumprelu, threshold [L] = the scalar |
| MatryoshkaBatchTopKSAE | f = a (a > threshold), a = ReLU((x - b_dec) W_enc + b_enc), x_hat = f W_dec + b_dec | jumprelu, threshold [L] = the scalar |
| JumpReluAutoEncoder | f = ReLU(pre (pre > threshold)), pre = x W_enc + b_enc, x_hat = f W_dec + b_dec | jumprelu, b_dec not subtracted |
| GatedAutoEncoder | e = encoder(x - decoder_bias); f = [e + gate_bias > 0] ReLU(exp(r_mag) e + mag_bias); x_hat = decoder(f) + decoder_bias | gated, b_gate = gate_bias, b_mag = mag_bias |

``encoder.weight`` [L, d] is W_enc^T and ``decoder.weight`` [d, L] is W_dec^T; every tensor's shape is checked against
``activation_dim`` and ``dict_size``, and the state dict must hold exactly the class's keys. A BatchTopK or
Matryoshka dictionary whose threshold is still negative (never set during training) is refused: at inference it
would be a dense ReLU, not the SAE that was trained. The Matryoshka groups (``group_sizes``) only shape the training
loss; every group is active at inference.

The hook: the entry's hook in the spec, else ``trainer.submodule_name`` read as the output of a block's part:
``resid_post_layer_N`` -> the output of block N, ``mlp_out_layer_N`` / ``attn_out_layer_N`` -> its MLP / attention
output (mapped by `saebench_poly.sources.hookpoints`), or the name of one of the model's hooks; a dictionary trained
on a module's input (``buffer.io = "in"``) needs the spec's hook, and a transcoder (``"in_and_out"``) is refused.
The recorded sha256 is that of ``ae.pt``.
"""

from __future__ import annotations

import json
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from saebench_poly.errors import UserError, first_line
from saebench_poly.sources.base import SAEEntry, SourceContext, checkpoint_folder, file_sha256
from saebench_poly.sources.hookpoints import module_output_hook
from saebench_poly.sources.sae_lens_sources import checked_entry

CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "ae.pt"
_SUBMODULE = re.compile(r"^(resid_post|mlp_out|attn_out)_layer_?(\d+)$")
_SUBMODULE_PATHS = {"resid_post": "layers.{n}", "mlp_out": "layers.{n}.mlp", "attn_out": "layers.{n}.attn"}


@dataclass(frozen=True)
class DictClass:
    """One dictionary_learning class: its state-dict keys with their shapes (``d``: activation_dim, ``L``:
    dict_size, ``()``: a scalar buffer, ``G``: any length) and the builder of the equal sae-lens SAE."""

    keys: dict[str, tuple[str, ...]]
    build: Callable[[dict[str, torch.Tensor], int, int, Path], Any]


def _standard(subtract_input_bias: bool) -> Callable[[dict[str, torch.Tensor], int, int, Path], Any]:
    def build(state: dict[str, torch.Tensor], d: int, latents: int, path: Path) -> Any:
        from sae_lens.saes.standard_sae import StandardSAE, StandardSAEConfig

        sae = StandardSAE(StandardSAEConfig(d_in=d, d_sae=latents, apply_b_dec_to_input=subtract_input_bias))
        b_dec = state["bias"] if subtract_input_bias else state["decoder.bias"]
        return _loaded(sae, W_enc=state["encoder.weight"].T, b_enc=state["encoder.bias"],
                       W_dec=state["decoder.weight"].T, b_dec=b_dec)

    return build


def _topk(state: dict[str, torch.Tensor], d: int, latents: int, path: Path) -> Any:
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    k = int(state["k"])
    if not 0 < k <= latents:
        raise UserError(f"{path}: k = {k} must be in 1..dict_size ({latents})")
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=latents, k=k, apply_b_dec_to_input=True))
    return _loaded(sae, W_enc=state["encoder.weight"].T, b_enc=state["encoder.bias"], W_dec=state["decoder.weight"].T,
                   b_dec=state["b_dec"])


def _jumprelu(state: dict[str, torch.Tensor], d: int, latents: int, path: Path, *, subtract_input_bias: bool,
              W_enc: torch.Tensor, b_enc: torch.Tensor, W_dec: torch.Tensor) -> Any:
    from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig

    threshold = state["threshold"]
    if threshold.dim() == 0:  # BatchTopK and Matryoshka: one threshold for every latent, calibrated in training
        if float(threshold) < 0:
            raise UserError(f"{path} has threshold {float(threshold)}: it was never set during training (it is set "
                            "from threshold_start_step on), so at inference this dictionary is a dense ReLU")
        threshold = threshold.expand(latents)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=latents, apply_b_dec_to_input=subtract_input_bias))
    return _loaded(sae, W_enc=W_enc, b_enc=b_enc, W_dec=W_dec, b_dec=state["b_dec"], threshold=threshold)


def _batch_topk(state: dict[str, torch.Tensor], d: int, latents: int, path: Path) -> Any:
    return _jumprelu(state, d, latents, path, subtract_input_bias=True, W_enc=state["encoder.weight"].T,
                     b_enc=state["encoder.bias"], W_dec=state["decoder.weight"].T)


def _matryoshka(state: dict[str, torch.Tensor], d: int, latents: int, path: Path) -> Any:
    groups = state["group_sizes"]
    if int(groups.sum()) != latents or bool((groups <= 0).any()):
        raise UserError(f"{path}: group_sizes {groups.tolist()} must be positive and sum to dict_size ({latents})")
    return _jumprelu(state, d, latents, path, subtract_input_bias=True, W_enc=state["W_enc"], b_enc=state["b_enc"],
                     W_dec=state["W_dec"])


def _jumprelu_autoencoder(state: dict[str, torch.Tensor], d: int, latents: int, path: Path) -> Any:
    return _jumprelu(state, d, latents, path, subtract_input_bias=False, W_enc=state["W_enc"], b_enc=state["b_enc"],
                     W_dec=state["W_dec"])


def _gated(state: dict[str, torch.Tensor], d: int, latents: int, path: Path) -> Any:
    from sae_lens.saes.gated_sae import GatedSAE, GatedSAEConfig

    sae = GatedSAE(GatedSAEConfig(d_in=d, d_sae=latents, apply_b_dec_to_input=True))
    return _loaded(sae, W_enc=state["encoder.weight"].T, b_gate=state["gate_bias"], b_mag=state["mag_bias"],
                   r_mag=state["r_mag"], W_dec=state["decoder.weight"].T, b_dec=state["decoder_bias"])


_LINEAR_ENCODER = {"encoder.weight": ("L", "d"), "encoder.bias": ("L",), "decoder.weight": ("d", "L")}
_PARAMETER_ENCODER = {"W_enc": ("d", "L"), "b_enc": ("L",), "W_dec": ("L", "d"), "b_dec": ("d",)}

DICT_CLASSES: dict[str, DictClass] = {
    "AutoEncoder": DictClass({**_LINEAR_ENCODER, "bias": ("d",)}, _standard(subtract_input_bias=True)),
    "AutoEncoderNew": DictClass({**_LINEAR_ENCODER, "decoder.bias": ("d",)}, _standard(subtract_input_bias=False)),
    "AutoEncoderTopK": DictClass({**_LINEAR_ENCODER, "b_dec": ("d",), "k": (), "threshold": ()}, _topk),
    "BatchTopKSAE": DictClass({**_LINEAR_ENCODER, "b_dec": ("d",), "k": (), "threshold": ()}, _batch_topk),
    "MatryoshkaBatchTopKSAE": DictClass({**_PARAMETER_ENCODER, "k": (), "threshold": (), "group_sizes": ("G",)},
                                        _matryoshka),
    "JumpReluAutoEncoder": DictClass({**_PARAMETER_ENCODER, "threshold": ("L",)}, _jumprelu_autoencoder),
    "GatedAutoEncoder": DictClass({"encoder.weight": ("L", "d"), "decoder.weight": ("d", "L"), "decoder_bias": ("d",),
                                   "r_mag": ("L",), "gate_bias": ("L",), "mag_bias": ("L",)}, _gated),
}


def load_dictionary_learning(argument: str, context: SourceContext) -> SAEEntry:
    """A dictionary_learning trainer folder (see the module docstring)."""
    folder = checkpoint_folder(argument, context, "dictionary_learning checkpoint")
    for filename in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        if not (folder / filename).is_file():
            raise UserError(f"{folder} is not a dictionary_learning trainer folder: {filename} is missing")
    config = _read_config(folder / CONFIG_FILENAME)
    trainer = config["trainer"]
    dict_class = DICT_CLASSES[trainer["dict_class"]]
    d, latents = trainer["activation_dim"], trainer["dict_size"]
    path = folder / WEIGHTS_FILENAME
    state = _read_state_dict(path)
    _check_state(state, dict_class, d, latents, path)
    if "k" in state and isinstance(trainer.get("k"), int) and int(state["k"]) != trainer["k"]:
        raise UserError(f"{path} has k = {int(state['k'])} but {CONFIG_FILENAME} says k = {trainer['k']}")
    sae = dict_class.build(state, d, latents, path)
    hook = context.hook or _hook(config, folder, context)
    sae.cfg.metadata.hook_name = hook
    name = f"{folder.parent.name}/{folder.name}" if re.fullmatch(r"trainer_\d+", folder.name) else folder.name
    return checked_entry(sae, name=name, uri=f"dictionary_learning:{argument}", context=context,
                         sha256=file_sha256(path), hook=hook)


def _read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON: {first_line(err)}") from None
    trainer = config.get("trainer") if isinstance(config, dict) else None
    if not isinstance(trainer, dict):
        raise UserError(f"{path} has no \"trainer\" object: it is not a dictionary_learning config.json")
    dict_class = trainer.get("dict_class")
    if dict_class not in DICT_CLASSES:
        raise UserError(f"{path}: dict_class {dict_class!r} is not one saebench_poly can score "
                        f"({', '.join(DICT_CLASSES)})")
    for key in ("activation_dim", "dict_size"):
        if not isinstance(trainer.get(key), int) or trainer[key] <= 0:
            raise UserError(f"{path}: trainer.{key} must be a positive integer (got {trainer.get(key)!r})")
    return config


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """``torch.load(weights_only=True)``: tensors and plain containers only; anything else is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise UserError(f"{path} needs more than tensors to load, and saebench_poly unpickles nothing else "
                        f"(torch.load weights_only=True: {first_line(err)})") from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise UserError(f"{path} is not a readable torch.save file: {first_line(err)}") from None
    if isinstance(state, dict) and {"ae", "optimizer", "step"} <= set(state):
        raise UserError(f"{path} is a training backup (step {state['step']}), not a finished dictionary: its weights "
                        "are not scaled for raw activations; finish training or use a checkpoints/ae_<step>.pt")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return state


def _check_state(state: dict[str, torch.Tensor], dict_class: DictClass, d: int, latents: int, path: Path) -> None:
    expected = set(dict_class.keys)
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise UserError(f"{path} does not hold this dictionary class's tensors (missing {missing}, unexpected {extra})")
    sizes = {"d": d, "L": latents}
    for key, dims in dict_class.keys.items():
        shape = tuple(state[key].shape)
        if len(shape) != len(dims) or any(sizes.get(dim, size) != size for dim, size in zip(dims, shape, strict=True)):
            want = [sizes.get(dim, dim) for dim in dims]
            raise UserError(f"{path}: {key} has shape {list(shape)}, expected {want} "
                            f"(activation_dim={d}, dict_size={latents} in {CONFIG_FILENAME})")
        if state[key].is_floating_point() and not torch.isfinite(state[key]).all():
            raise UserError(f"{path}: {key} has non-finite values (NaN or inf): the checkpoint is broken")


def _hook(config: dict[str, Any], folder: Path, context: SourceContext) -> str:
    trainer, buffer = config["trainer"], config.get("buffer") or {}
    io = buffer.get("io", "out") if isinstance(buffer, dict) else "out"
    if io == "in_and_out":
        raise UserError(f"{folder} is a dictionary_learning transcoder (buffer.io = \"in_and_out\"): not supported")
    submodule = str(trainer.get("submodule_name") or "")
    hook = None
    if io == "out":
        match = _SUBMODULE.match(submodule)
        if match:
            hook = module_output_hook(context.adapter, _SUBMODULE_PATHS[match.group(1)].format(n=match.group(2)))
        elif submodule in context.adapter.hook_names():
            hook = submodule
    if hook is None:
        reads = "the input of" if io == "in" else "the output of"
        raise UserError(f"{folder} was trained on {reads} submodule {submodule!r} (layer {trainer.get('layer')}), "
                        f"which saebench_poly cannot place in model {context.adapter.model_id!r}: give the entry a "
                        "hook in the spec")
    return hook


def _loaded(sae: Any, **tensors: torch.Tensor) -> Any:
    """``sae`` with exactly ``tensors`` as its state (float32)."""
    sae.load_state_dict({key: value.detach().to(torch.float32).contiguous() for key, value in tensors.items()})
    return sae


__all__ = ["CONFIG_FILENAME", "DICT_CLASSES", "WEIGHTS_FILENAME", "load_dictionary_learning"]
