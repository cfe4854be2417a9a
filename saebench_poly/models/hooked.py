"""transformer-lens `HookedTransformer` models: from the hub by name, or from a local folder.

A local folder holds ``config.json`` (the `HookedTransformerConfig` fields) and ``model.safetensors`` (the state
dict), plus optionally a Hugging Face tokenizer's files; `save_hooked_transformer` writes one.

Models load the way sae-lens trains SAEs on them (and SAEBench evaluates them): without weight processing
(`HookedTransformer.from_pretrained_no_processing`, not ``from_pretrained``, whose folding and centring change the
activations at most hooks), plus the option ``model_from_pretrained_kwargs`` (an SAE's
``cfg.metadata.model_from_pretrained_kwargs``, e.g. ``{center_writing_weights = true}``; `saebench_poly.run`
fills it from the spec's SAEs). A local folder's weights are used as saved, processed only by the flags of
`PROCESSING_FLAGS` that those kwargs set. Hooks are
transformer-lens hook names (``blocks.0.mlp.hook_post``); activations with a head axis (``attn.hook_z``) are
flattened to ``[batch, positions, heads * d_head]`` as sae-lens does for its ``hook_z`` SAEs.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saebench_poly.errors import UserError, first_line
from saebench_poly.files import with_new_file_permissions
from saebench_poly.hub import is_offline_error
from saebench_poly.integrity import content_sha256
from saebench_poly.models.base import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    Batch,
    ForwardOutput,
    ModelAdapter,
    ModelConfig,
    Replacement,
    UnitInputs,
    model_folder_files,
)

_BLOCK_HOOK = re.compile(r"^blocks\.(\d+)\.")
_MLP_NEURON_HOOK = re.compile(r"^blocks\.(\d+)\.mlp\.hook_(pre|post)$")
_POS_EMBED_HOOK = "hook_pos_embed"
# The weight processing of `HookedTransformer.from_pretrained` that `from_pretrained_no_processing` turns off.
PROCESSING_FLAGS = ("fold_ln", "center_writing_weights", "center_unembed", "fold_value_biases",
                    "refactor_factored_attn_matrices")


class TransformerLensOptions(BaseModel):
    """Options of the ``transformer_lens`` loader: ``model_from_pretrained_kwargs``, passed to
    `HookedTransformer.from_pretrained_no_processing` (a local folder takes the `PROCESSING_FLAGS` only)."""

    model_config = ConfigDict(extra="forbid")

    model_from_pretrained_kwargs: dict[str, Any] = Field(default_factory=dict)


def normalized_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """``kwargs`` in name order, without the processing flags that are False (``from_pretrained_no_processing``'s
    defaults): two loads of the same model compare equal exactly when their normalised kwargs do."""
    return {key: value for key, value in sorted((kwargs or {}).items()) if not (key in PROCESSING_FLAGS and value is False)}


def save_hooked_transformer(model: Any, folder: str | Path) -> Path:
    """Write ``model`` (a `HookedTransformer`) as a local folder that `load_hooked_transformer` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v) for k, v in model.cfg.to_dict().items()}
    (folder / CONFIG_FILENAME).write_text(json.dumps(config, indent=1, default=str))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILENAME)
    with_new_file_permissions(folder / WEIGHTS_FILENAME)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    return folder


def _load_local(folder: Path, device: torch.device, dtype: torch.dtype, kwargs: dict[str, Any] | None = None) -> Any:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    config_path, weights_path = model_folder_files(folder, "a transformer-lens model")
    try:
        raw = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{config_path} is not valid JSON ({err.msg} at line {err.lineno})") from None
    if raw.get("trust_remote_code"):
        raise UserError(f"{config_path} sets trust_remote_code: saebench-poly never runs code from a model folder; "
                        "remove the key (the tokenizer is read from the folder's own tokenizer files)")
    known = HookedTransformerConfig.__dataclass_fields__
    # tokenizer_name would make transformer-lens fetch a tokenizer by that name (and run its code when
    # trust_remote_code is set): a local folder's tokenizer comes from its own files only, or there is none.
    ignored = ("n_params", "device", "tokenizer_name", "trust_remote_code")
    raw = {k: v for k, v in raw.items() if k in known and k not in ignored}
    raw["dtype"] = dtype
    raw["device"] = str(device)
    try:
        cfg = HookedTransformerConfig(**raw)
    except (TypeError, ValueError, AssertionError) as err:
        raise UserError(f"{config_path} is not a valid HookedTransformerConfig: {err}") from None
    tokenizer = _local_tokenizer(folder)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False)
    try:
        state = load_file(weights_path)
    except (SafetensorError, OSError) as err:
        raise UserError(f"{weights_path} is not a readable safetensors file ({first_line(err)})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{weights_path} does not match {config_path}: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    kwargs = normalized_kwargs(kwargs)
    others = sorted(set(kwargs) - set(PROCESSING_FLAGS))
    if others:
        raise UserError(f"model_from_pretrained_kwargs {others} do not apply to a local model folder ({folder}); it "
                        f"takes {', '.join(PROCESSING_FLAGS)}")
    if kwargs:
        model.load_and_process_state_dict(model.state_dict(), **{flag: bool(kwargs.get(flag)) for flag in PROCESSING_FLAGS})
    return model.to(dtype, print_details=False).to(device, print_details=False)


def _local_tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"the tokenizer in {folder} cannot be loaded: {first_line(err)} "
                        "(saebench-poly never runs a tokenizer's own code)") from None


def _load_from_hub(name: str, revision: str | None, device: torch.device, dtype: torch.dtype,
                   kwargs: dict[str, Any]) -> Any:
    from transformer_lens import HookedTransformer

    try:
        return HookedTransformer.from_pretrained_no_processing(name, revision=revision, device=str(device), dtype=dtype,
                                                               **kwargs)
    except Exception as err:  # noqa: BLE001 - the hub stack raises many types; all mean "could not fetch"
        if is_offline_error(err):
            raise UserError(
                f"model {name!r} could not be loaded: the Hugging Face hub is unreachable "
                "(offline); pass a local model folder instead"
            ) from None
        raise UserError(f"model {name!r} could not be loaded by transformer-lens: {first_line(err)}") from None


class HookedTransformerAdapter(ModelAdapter):
    """A transformer-lens model. Splicing restarts part-way from the clean forward's cache (`_restart`: after the
    hook's block for the hooks that end it, else at its block from ``hook_resid_pre``; ``start_at_layer``, with the
    cached positional embedding for shortformer models and the attention mask of a left-padding tokenizer), so a
    reconstruction's downstream cost re-runs only the layers after it."""

    family = "transformer_lens"
    supports_downstream = True

    def __init__(self, model: Any, model_id: str, revision: str | None) -> None:
        self.model = model.eval()
        self.model_id = model_id
        self.revision = revision
        self.tokenizer = model.tokenizer
        self.bos_token_id = getattr(model.tokenizer, "bos_token_id", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def hook_names(self) -> list[str]:
        """The hooks that fire in a forward pass (some exist only with config flags, e.g. ``attn.hook_result``)
        with one activation per position."""
        return sorted(self._widths)

    @cached_property
    def _shapes(self) -> dict[str, tuple[torch.Size, torch.Size]]:
        """The shape of every hook's activations in dry runs on 2 and on 3 tokens."""
        caches = []
        for n_tokens in (2, 3):
            tokens = torch.zeros((1, n_tokens), dtype=torch.long, device=self.device)
            with torch.no_grad():
                caches.append(self.model.run_with_cache(tokens)[1])
        return {name: (act.shape, caches[1][name].shape) for name, act in caches[0].items()}

    @cached_property
    def _widths(self) -> dict[str, int]:
        """The hooks whose activations are ``[batch, position, ...]`` and their widths (the product of the rest):
        the second axis follows the number of tokens, nothing else does. Attention patterns and scores
        (``[batch, head, query, key]``) are left out."""
        return {name: int(two[2:].numel()) for name, (two, three) in self._shapes.items()
                if two[1] == 2 and three[1] == 3 and two[2:] == three[2:]}

    def hook_width(self, hook: str) -> int:
        if hook in self._widths:
            return self._widths[hook]
        if hook in self._shapes:
            raise UserError(f"hook {hook!r} of model {self.model_id!r} is not [batch, position, width] activations "
                            "(attention patterns are [batch, head, query, key]); pick another hook")
        if hook in self.model.hook_dict:
            raise UserError(f"hook {hook!r} of model {self.model_id!r} does not fire with this model's configuration")
        close = difflib.get_close_matches(hook, self.hook_names(), n=3, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; `saebench-poly hooks` lists them"
        raise UserError(f"model {self.model_id!r} has no hook {hook!r}{hint}")

    def comparison_neuron_hook(self, hook: str) -> str | None:
        """``blocks.L.*`` -> ``blocks.L.mlp.hook_post``: the MLP hidden units of the same block (None for
        attention-only models or hooks outside a block)."""
        match = _BLOCK_HOOK.match(hook)
        if match is None or self.model.cfg.attn_only:
            return None
        return f"blocks.{match.group(1)}.mlp.hook_post"

    def neuron_inputs(self, hook: str) -> UnitInputs | None:
        """The MLP neurons of block L (``blocks.L.mlp.hook_post``, or ``hook_pre``) of a pre-norm model.

        h = ``blocks.L.ln2.hook_normalized``: the MLP input before the LayerNorm's scale and shift (centred and
        divided by its RMS; RMSNorm only divides). w_u = ln2.w ⊙ W_in[:, u] and b_u = b_in[u] + ln2.b · W_in[:, u]:
        the scale and shift folded into W_in as transformer-lens's ``fold_ln`` folds them, so that sum_k h_k w_uk + b_u
        is ``blocks.L.mlp.hook_pre``. A model loaded with ``fold_ln`` (ln2 is ``LNPre``/``RMSPre``, with no
        parameters) has them folded already, and W_in, b_in are used as they are. Without normalisation h is the
        MLP's input itself (``hook_resid_mid``, or ``hook_resid_pre`` for parallel attention and MLP). Gated MLPs:
        the gate path, w_u = ln2.w ⊙ W_gate[:, u], b_u = ln2.b · W_gate[:, u] (``hook_pre`` is its pre-activation).
        None for any other hook, and for attention-only, post-norm and mixture-of-experts models.
        """
        from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

        match = _MLP_NEURON_HOOK.match(hook)
        cfg = self.model.cfg
        if match is None or cfg.attn_only or cfg.original_architecture in POST_NORM_ARCHITECTURES:
            return None
        layer = int(match.group(1))
        block = self.model.blocks[layer]
        matrix = getattr(block.mlp, "W_gate" if cfg.gated_mlp else "W_in", None)
        if not isinstance(matrix, torch.Tensor) or matrix.dim() != 2:
            return None
        matrix = matrix.detach().to(torch.float64)
        bias = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
        if not cfg.gated_mlp:
            bias = bias + block.mlp.b_in.detach().to(torch.float64)
        if hasattr(block.ln2, "hook_normalized"):
            source = f"blocks.{layer}.ln2.hook_normalized"
            scale, shift = getattr(block.ln2, "w", None), getattr(block.ln2, "b", None)
            if shift is not None:
                bias = bias + shift.detach().to(torch.float64) @ matrix
            if scale is not None:
                matrix = scale.detach().to(torch.float64)[:, None] * matrix
        else:
            source = f"blocks.{layer}.hook_resid_{'pre' if cfg.parallel_attn_mlp else 'mid'}"

        def capture(batch: Batch, activations: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
            return self.hook_activations(batch.to(self.device), source, activations)

        return UnitInputs(source=source, weight=matrix.T.contiguous(), bias=bias, capture=capture, hook=source)

    def _check_tokens(self, inputs: torch.Tensor) -> None:
        cfg = self.model.cfg
        if inputs.shape[1] > cfg.n_ctx:
            raise UserError(f"context_size {inputs.shape[1]} is longer than model {self.model_id!r} takes (n_ctx {cfg.n_ctx}): "
                            f"set context_size to at most {cfg.n_ctx}")
        if inputs.numel() and (inputs.min() < 0 or inputs.max() >= cfg.d_vocab):
            bad = int(inputs.max()) if inputs.max() >= cfg.d_vocab else int(inputs.min())
            raise UserError(f"token id {bad} is outside model {self.model_id!r}'s vocabulary (ids 0..{cfg.d_vocab - 1}): "
                            "the token data were made for another tokenizer")

    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        self._check_tokens(batch.inputs)
        resume_hooks = {name for h in hooks for name in self._restart(h)[1]}
        if resume_hooks and self.model.cfg.positional_embedding_type == "shortformer":
            # shortformer models add the positional embedding to each block's attention input, not to the
            # residual stream: a forward restarted part-way needs it given again
            resume_hooks.add(_POS_EMBED_HOOK)
        names = sorted(set(hooks) | resume_hooks)
        blocks = [int(m.group(1)) for m in map(_BLOCK_HOOK.match, hooks) if m]
        stop = max(blocks) + 1 if not logits and len(blocks) == len(hooks) else None
        with torch.no_grad():
            output, cache = self.model.run_with_cache(batch.inputs, names_filter=names, stop_at_layer=stop)
        acts = {h: _flatten_heads(cache[h]) for h in hooks}
        return ForwardOutput(activations=acts, logits=output if stop is None else None,
                             resume={h: cache[h] for h in resume_hooks})

    def forward_with_replacement(
        self, batch: Batch, clean: ForwardOutput, hook: str, replacement: Replacement
    ) -> torch.Tensor:
        def replace(act: torch.Tensor, hook: Any = None) -> torch.Tensor:  # noqa: ARG001 - transformer-lens signature
            return replacement(_flatten_heads(act)).reshape(act.shape).to(act.dtype)

        layer, cached = self._restart(hook)
        with torch.no_grad():
            if layer is None:
                return self.model.run_with_hooks(batch.inputs, fwd_hooks=[(hook, replace)])
            restart = {"start_at_layer": layer, "tokens": batch.inputs,
                       "shortformer_pos_embed": clean.resume.get(_POS_EMBED_HOOK),
                       "attention_mask": self._attention_mask(batch.inputs)}
            if hook in cached:  # the hook ends its block: the residual entering the next block, from the clean cache
                *addends, own = (clean.resume[name] for name in cached)
                residual = replace(own)  # `Replacement`s return a new tensor: the clean cache stays as it is
                if addends:
                    residual = sum(addends[1:], addends[0]) + residual  # as the block sums them, left to right
                return self.model(residual, **restart)
            return self.model.run_with_hooks(clean.resume[cached[0]], fwd_hooks=[(hook, replace)], **restart)

    def _attention_mask(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The attention mask that transformer-lens builds itself for a forward from ``tokens`` with a left-padding
        tokenizer (pad tokens at the start of a row are not attended to), which a forward restarted part-way must be
        given; None where it builds none."""
        tokenizer = self.model.tokenizer
        if tokenizer is None or tokenizer.padding_side != "left":
            return None
        from transformer_lens import utils

        return utils.get_attention_mask(tokenizer, tokens, self.model.cfg.default_prepend_bos)

    def _restart(self, hook: str) -> tuple[int | None, tuple[str, ...]]:
        """Where a forward spliced at ``hook`` restarts, and the clean activations it restarts from: ``(None, ())``
        outside the blocks (the whole forward); after block L for the hooks that end it (``hook_resid_post``, and
        ``hook_mlp_out`` of a `TransformerBlock`, whose residual stream out is hook_resid_mid + hook_mlp_out, or
        hook_resid_pre + hook_attn_out + hook_mlp_out with a parallel MLP), from those addends and the hook's own clean
        value (last); else at block L from its ``hook_resid_pre``."""
        from transformer_lens.components import TransformerBlock

        match = _BLOCK_HOOK.match(hook)
        if match is None:
            return None, ()
        layer = int(match.group(1))
        block = f"blocks.{layer}."
        if hook == f"{block}hook_resid_post":
            return layer + 1, (hook,)
        if hook == f"{block}hook_mlp_out" and type(self.model.blocks[layer]) is TransformerBlock:
            if self.model.cfg.parallel_attn_mlp:
                return layer + 1, (f"{block}hook_resid_pre", f"{block}hook_attn_out", hook)
            return layer + 1, (f"{block}hook_resid_mid", hook)
        return layer, (f"{block}hook_resid_pre",)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "tokenizer": getattr(self.tokenizer, "name_or_path", "") or ""}


def _flatten_heads(act: torch.Tensor) -> torch.Tensor:
    return act.reshape(*act.shape[:2], -1)


def load_hooked_transformer(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> HookedTransformerAdapter:
    """A transformer-lens model from a local folder (``config.json`` + ``model.safetensors``) or the hub, without
    weight processing beyond what ``options.model_from_pretrained_kwargs`` asks for (module docstring)."""
    try:
        options = TransformerLensOptions.model_validate(cfg.options)
    except ValidationError as err:
        problem = err.errors()[0]
        where = ".".join(str(part) for part in problem["loc"])
        raise UserError(f"transformer_lens model option {where!r}: {problem['msg']} "
                        "(known options: model_from_pretrained_kwargs)") from None
    kwargs = normalized_kwargs(options.model_from_pretrained_kwargs)
    folder = Path(cfg.name)
    if folder.is_dir():
        model = _load_local(folder, device, dtype, kwargs)
        # a local folder's revision is the sha256 of what it holds: the same files are the same model wherever they lie
        return HookedTransformerAdapter(model, model_id=folder.name, revision=content_sha256(folder))
    if folder.is_absolute() or cfg.name.startswith("."):
        raise UserError(f"model folder {cfg.name} does not exist")
    return HookedTransformerAdapter(_load_from_hub(cfg.name, cfg.revision, device, dtype, kwargs), cfg.name, cfg.revision)
