"""Where another trainer's hookpoint lands in the model being scored.

Other trainers name the activations an SAE was trained on by a module of the Hugging Face model: sparsify by a
module path inside the base model (``model.base_model``: ``layers.5``, ``h.5.mlp``, ``embed_tokens``), and read
the module's output; ``layers.N`` is the output of block N (sparsify's default hookpoints are ``<the list of
blocks>.N``, whatever the model calls that list). `module_output_hook` maps such a path to a hook of the adapter,
one row of `MODULE_HOOKS` per model family:

- ``hf``: the module itself, its path prefixed with the base model's (``transformer.h.5`` for a GPT-2 LM head
  model); ``layers.N...`` also names the N-th entry of the base model's list of blocks (its outermost
  ``ModuleList`` of ``config.num_hidden_layers`` blocks), e.g. ``transformer.h.N`` (GPT-2), ``encoder.layer.N``
  (BERT).
- ``transformer_lens``: ``<blocks>.N`` -> ``blocks.N.hook_resid_post``, ``<blocks>.N.mlp`` ->
  ``blocks.N.hook_mlp_out``, ``<blocks>.N.self_attn`` (or ``attn``, ``attention``) -> ``blocks.N.hook_attn_out``,
  the token embedding module (``embed_tokens``, ``wte``, ``embed_in``, ``embeddings.word_embeddings``) ->
  ``hook_embed``; ``<blocks>`` is any of ``layers``, ``h``, ``blocks``, ``layer`` (with any prefix). A model with
  norms after its MLP and attention (Gemma 2 and 3, ``use_normalization_before_and_after``) has no hook of their
  raw outputs (``hook_mlp_out`` and ``hook_attn_out`` come after those norms): no mapping there.
- other families: no mapping (the spec gives the entry's hook).

A transcoder reads a module's input (`module_input_hook`): for ``hf``, the module whose output is that very tensor
(found by one dry run on two tokens: GPT-2's ``h.N.mlp`` reads ``transformer.h.N.ln_2``); for
``transformer_lens``, ``<blocks>.N`` reads ``blocks.N.hook_resid_pre``, and a block's MLP or attention has no hook
for its input (the LayerNorm's output after its scale and shift), so the spec must give it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from saebench_poly.models.base import ModelAdapter

_TL_BLOCK = re.compile(r"^(?:.*\.)?(?:layers|h|blocks|layer)\.(\d+)(?:\.(mlp|self_attn|attn|attention))?$")
_TL_PARTS = {None: "hook_resid_post", "mlp": "hook_mlp_out", "self_attn": "hook_attn_out", "attn": "hook_attn_out",
             "attention": "hook_attn_out"}
_TL_EMBEDDINGS = frozenset({"embed_tokens", "wte", "embed_in", "embeddings.word_embeddings"})
_LAYERS_ALIAS = re.compile(r"^layers\.(\d+)((?:\..+)?)$")


def _transformer_lens_hook(adapter: ModelAdapter, path: str) -> str | None:
    if path in _TL_EMBEDDINGS:
        return "hook_embed"
    match = _TL_BLOCK.match(path)
    if match is None:
        return None
    if match.group(2) is not None and getattr(adapter.model.cfg, "use_normalization_before_and_after", False):  # type: ignore[attr-defined]
        return None
    return f"blocks.{match.group(1)}.{_TL_PARTS[match.group(2)]}"


def _hf_hook(adapter: ModelAdapter, path: str) -> str | None:
    from torch import nn

    model = adapter.model  # type: ignore[attr-defined]
    modules = dict(model.named_modules())
    base = model.base_model
    prefix = next((name for name, module in modules.items() if module is base), "")
    joined = f"{prefix}.{path}" if prefix else path
    if joined in modules:
        return joined
    match = _LAYERS_ALIAS.match(path)
    n_layers = getattr(model.config, "num_hidden_layers", None)
    if match is None or n_layers is None:
        return None
    lists = [name for name, module in base.named_modules() if isinstance(module, nn.ModuleList) and len(module) == n_layers]
    if not lists:
        return None
    layer_list = min(lists, key=lambda name: name.count("."))
    candidate = ".".join(part for part in (prefix, layer_list, match.group(1)) if part) + match.group(2)
    return candidate if candidate in modules else None


def _transformer_lens_input_hook(adapter: ModelAdapter, path: str) -> str | None:
    match = _TL_BLOCK.match(path)
    return f"blocks.{match.group(1)}.hook_resid_pre" if match and match.group(2) is None else None


def _hf_input_hook(adapter: ModelAdapter, path: str) -> str | None:
    import torch

    target = _hf_hook(adapter, path)
    if target is None:
        return None
    model = adapter.model  # type: ignore[attr-defined]
    modules = dict(model.named_modules())
    produced: dict[int, tuple[str, torch.Tensor]] = {}  # id -> (first module to output it, the tensor, kept alive)
    found: list[str | None] = []

    def record(name: str) -> Callable[..., None]:
        def hook(module: object, args: object, output: object) -> None:
            tensor = output[0] if isinstance(output, tuple) and output else output
            if isinstance(tensor, torch.Tensor):
                produced.setdefault(id(tensor), (name, tensor))
        return hook

    def read_input(module: object, args: tuple, kwargs: dict) -> None:
        first = args[0] if args else next(iter(kwargs.values()), None)
        if isinstance(first, torch.Tensor) and not found:
            producer = produced.get(id(first))
            found.append(producer[0] if producer is not None and producer[1] is first else None)

    handles = [modules[name].register_forward_hook(record(name)) for name in modules if name and name != target]
    handles.append(modules[target].register_forward_pre_hook(read_input, with_kwargs=True))
    try:
        with torch.no_grad():
            model(torch.zeros((1, 2), dtype=torch.long, device=adapter.device))
    except Exception:  # noqa: BLE001 - a model that cannot run on two zero tokens has no mapping
        return None
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


MODULE_HOOKS: dict[str, Callable[[ModelAdapter, str], str | None]] = {
    "hf": _hf_hook,
    "transformer_lens": _transformer_lens_hook,
}
MODULE_INPUT_HOOKS: dict[str, Callable[[ModelAdapter, str], str | None]] = {
    "hf": _hf_input_hook,
    "transformer_lens": _transformer_lens_input_hook,
}


def module_output_hook(adapter: ModelAdapter, path: str) -> str | None:
    """The adapter's hook that reads the output of the base-model module ``path`` (the module docstring), or None
    when this model family has no mapping or the model no such module."""
    mapper = MODULE_HOOKS.get(adapter.family)
    return mapper(adapter, path) if mapper else None


def module_input_hook(adapter: ModelAdapter, path: str) -> str | None:
    """The adapter's hook whose activations are the input of the base-model module ``path`` (the module
    docstring), or None when there is none."""
    mapper = MODULE_INPUT_HOOKS.get(adapter.family)
    return mapper(adapter, path) if mapper else None


__all__ = ["MODULE_HOOKS", "MODULE_INPUT_HOOKS", "module_input_hook", "module_output_hook"]
