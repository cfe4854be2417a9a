"""SAEs trained with EleutherAI's sparsify: ``sparsify:<folder>``.

Layout (sparsify's ``SparseCoder.save_to_disk``): a hookpoint folder holds ``cfg.json`` (``d_in``, ``num_latents``
(0: ``d_in * expansion_factor``), ``k``, ``activation``, ``multi_topk``, ``skip_connection``, ``transcode``,
``normalize_decoder``, ...) and ``sae.safetensors`` with ``encoder.weight`` [L, d], ``encoder.bias`` [L], ``W_dec``
[L, d], ``b_dec`` [d] (and ``W_skip`` [d, d] with a skip connection). A run folder holds one such folder per
hookpoint, named by the hookpoint (``layers.5``); ``sparsify:<run>`` picks the one whose hook is the entry's hook
in the spec, or the only one.

sparsify encodes ``z = TopK_k(ReLU(encoder(x - b_dec)))`` and decodes ``x_hat = z W_dec + b_dec``: exactly a sae-lens
TopK SAE (``W_enc = encoder.weight^T``, ``b_enc = encoder.bias``, ``W_dec`` as stored, ``apply_b_dec_to_input``),
which is what is built, so everything downstream is unchanged. (``multi_topk`` and ``normalize_decoder`` change
only the training loss and updates.) With ``skip_connection`` the reconstruction adds ``x W_skip^T`` of the raw
input, as sparsify's ``forward`` does. A transcoder (``transcode``) does not subtract ``b_dec`` from its input
(``apply_b_dec_to_input = false``), reads the hookpoint module's input and reconstructs its output: it is scored
against the output, spliced there. Refused with one line: ``activation = "groupmax"`` (no sae-lens class computes
it).

The hooks: the hookpoint (the folder's name) mapped to the model's hooks by `saebench_poly.sources.hookpoints`
(``layers.N`` is the output of block N: ``blocks.N.hook_resid_post`` in transformer-lens); the entry's hook in the
spec replaces the input hook (for a transcoder on transformer-lens, whose MLP input has no hook, it must be given).
The recorded sha256 is that of ``sae.safetensors``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from saebench_poly.errors import UserError, first_line
from saebench_poly.sources.base import SAEEntry, SourceContext, checkpoint_folder, file_sha256
from saebench_poly.sources.hookpoints import module_input_hook, module_output_hook
from saebench_poly.sources.sae_lens_sources import checked_entry

CONFIG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae.safetensors"
_SEED_FOLDER = re.compile(r"^seed\d+$")


def load_sparsify(argument: str, context: SourceContext) -> SAEEntry:
    """A sparsify hookpoint folder, or a run folder of them (see the module docstring)."""
    folder = checkpoint_folder(argument, context, "sparsify checkpoint")
    if not (folder / CONFIG_FILENAME).is_file():
        folder = _pick_hookpoint(folder, argument, context)
    name = f"{folder.parent.name}/{folder.name}"  # <run>/<hookpoint>: hookpoint names alone repeat across runs
    for filename in (CONFIG_FILENAME, WEIGHTS_FILENAME):
        if not (folder / filename).is_file():
            raise UserError(f"{folder} is not a sparsify checkpoint: {filename} is missing")
    hookpoint = _hookpoint(folder)
    cfg = _read_config(folder)
    sae, skip_weight = _topk_sae(folder, cfg)
    output_hook = None
    if cfg.get("transcode", False):
        output_hook = _hook_of(hookpoint, folder, context)
        hook = context.hook or module_input_hook(context.adapter, hookpoint)
        if hook is None:
            raise UserError(f"sparsify transcoder {name} reads the input of {hookpoint!r}, which has no hook in "
                            f"{context.adapter.family} model {context.adapter.model_id!r}: give the entry a hook")
    else:
        hook = context.hook or _hook_of(hookpoint, folder, context)
    sae.cfg.metadata.hook_name = hook
    return checked_entry(sae, name=name, uri=f"sparsify:{argument}", context=context,
                         sha256=file_sha256(folder / WEIGHTS_FILENAME), hook=hook, output_hook=output_hook,
                         skip_weight=skip_weight)


def _hookpoint(folder: Path) -> str:
    """The hookpoint a sparsify folder was trained on: its name (its parent's for a ``seedN`` folder of a run with
    several seeds)."""
    return folder.parent.name if _SEED_FOLDER.match(folder.name) else folder.name


def _pick_hookpoint(run: Path, argument: str, context: SourceContext) -> Path:
    candidates = sorted(p for p in run.iterdir() if p.is_dir() and (p / CONFIG_FILENAME).is_file())
    if not candidates:
        raise UserError(f"{run} is not a sparsify checkpoint: no {CONFIG_FILENAME} in it or in its sub-folders")
    if context.hook is not None:
        matching = [p for p in candidates if _hook_of(_hookpoint(p), p, context, required=False) == context.hook]
        if len(matching) == 1:
            return matching[0]
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(p.name for p in candidates)
    raise UserError(f"{run} is a sparsify run with {len(candidates)} hookpoints ({names}): name one, e.g. "
                    f"sparsify:{argument.rstrip('/')}/{candidates[0].name}")


def _hook_of(hookpoint: str, folder: Path, context: SourceContext, required: bool = True) -> str | None:
    hook = module_output_hook(context.adapter, hookpoint)
    if hook is None and required:
        raise UserError(f"sparsify hookpoint {hookpoint!r} ({folder}) has no hook in {context.adapter.family} model "
                        f"{context.adapter.model_id!r}: give the entry a hook in the spec")
    return hook


def _read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILENAME
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is not readable JSON: {first_line(err)}") from None
    if not isinstance(cfg, dict):
        raise UserError(f"{path} must hold a JSON object")
    for key in ("d_in", "k"):
        if not isinstance(cfg.get(key), int) or cfg[key] <= 0:
            raise UserError(f"{path} needs {key} as a positive integer (got {cfg.get(key)!r})")
    if cfg.get("activation", "topk") != "topk":
        raise UserError(f"{path} has activation {cfg['activation']!r}: only sparsify's topk SAEs can be scored")
    if cfg.get("signed", False):
        raise UserError(f"{path} is a signed TopK SAE: not supported")
    latents = cfg.get("num_latents") or cfg["d_in"] * cfg.get("expansion_factor", 32)
    if not isinstance(latents, int) or latents < cfg["k"]:
        raise UserError(f"{path}: num_latents {latents!r} must be an integer >= k = {cfg['k']}")
    cfg["num_latents"] = latents
    return cfg


def _topk_sae(folder: Path, cfg: dict[str, Any]) -> tuple[Any, torch.Tensor | None]:
    """The sae-lens TopK SAE and the skip connection's ``W_skip`` (None without one)."""
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = folder / WEIGHTS_FILENAME
    try:
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise UserError(f"{path} is not a readable safetensors file: {first_line(err)}") from None
    d, latents = cfg["d_in"], cfg["num_latents"]
    expected = {"encoder.weight": (latents, d), "encoder.bias": (latents,), "W_dec": (latents, d), "b_dec": (d,)}
    if cfg.get("skip_connection", False):
        expected["W_skip"] = (d, d)
    if set(tensors) != set(expected):
        raise UserError(f"{path} holds {sorted(tensors)}; a sparsify SAE holds exactly {sorted(expected)}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise UserError(f"{path}: {key} has shape {list(tensors[key].shape)}, expected {list(shape)} "
                            f"(d_in={d}, num_latents={latents} in {CONFIG_FILENAME})")
    subtract_b_dec = not cfg.get("transcode", False)
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=latents, k=cfg["k"], apply_b_dec_to_input=subtract_b_dec, dtype="float32"))
    state = {"W_enc": tensors["encoder.weight"].T, "b_enc": tensors["encoder.bias"], "W_dec": tensors["W_dec"],
             "b_dec": tensors["b_dec"]}
    sae.load_state_dict({key: value.to(torch.float32).contiguous() for key, value in state.items()})
    skip = tensors.get("W_skip")
    return sae, None if skip is None else skip.to(torch.float32).contiguous()


__all__ = ["CONFIG_FILENAME", "WEIGHTS_FILENAME", "load_sparsify"]
