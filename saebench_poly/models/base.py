"""What every model adapter provides to the activation pass.

An adapter wraps one model (transformer-lens, Hugging Face, or a toy model) behind the same small interface:
run a batch once and return the activations at the requested hooks; optionally re-run it with one hook's
activations replaced (for the downstream cost of a reconstruction).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from saebench_poly.errors import UserError


@dataclass
class Batch:
    """One batch of model inputs.

    ``inputs``: token ids ``[batch, context]`` for language models, feature values ``[batch, n_features]`` for toy
    models. ``score_mask``: ``[batch, positions]`` bool, True where a position is scored: not the BOS a run
    prepends, nor a token the spec's ``ignore_tokens`` excludes (by default the model's special tokens).
    """

    inputs: torch.Tensor
    score_mask: torch.Tensor

    def to(self, device: torch.device | str) -> Batch:
        return Batch(self.inputs.to(device), self.score_mask.to(device))


@dataclass
class ForwardOutput:
    """The clean pass of one batch: activations ``[batch, positions, width]`` per hook, the logits
    ``[batch, positions, vocab]`` when the model is a language model, and adapter-private state that lets a spliced
    re-run start part-way (``resume``)."""

    activations: dict[str, torch.Tensor]
    logits: torch.Tensor | None = None
    resume: dict[str, Any] = field(default_factory=dict)


Replacement = Callable[[torch.Tensor], torch.Tensor]

# The tokenizer (or model config) attributes that name structural special tokens, which are not text: sae-lens's
# `get_special_token_ids` (BOS, EOS, pad, SEP, decoder start) plus BERT's CLS and mask. Additional special tokens
# (chat-template markers) are left out, as sae-lens leaves them out.
SPECIAL_TOKEN_ATTRIBUTES = ("bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "cls_token_id",
                            "mask_token_id", "decoder_start_token_id")


def special_token_ids(*holders: Any) -> set[int]:
    """The ids that the `SPECIAL_TOKEN_ATTRIBUTES` of ``holders`` (tokenizers, model configs; None is skipped) name,
    one id or a list of them (a config's ``eos_token_id = [128001, 128009]``, Llama 3)."""
    found = set()
    for holder in holders:
        for attribute in SPECIAL_TOKEN_ATTRIBUTES:
            named = getattr(holder, attribute, None) if holder is not None else None
            for token_id in named if isinstance(named, (list, tuple)) else [named]:
                if isinstance(token_id, int) and not isinstance(token_id, bool):
                    found.add(token_id)
    return found


@dataclass(frozen=True)
class UnitInputs:
    """The linear map that computes the pre-activations of a set of units (Foote 2024's neuron embeddings use it):

        pre[b, t, u] = capture(batch, activations)[b, t, :] @ weight[u] + bias[u]

    ``capture`` returns h ``[batch, positions, d_h]`` of a batch, the exact tensor that the units' input weights
    multiply; ``weight`` is ``[width, d_h]`` and ``bias`` ``[width]``. ``source`` names h in words (for example
    ``blocks.0.ln2.hook_normalized``), for the docs and error messages. ``hook``: the hook whose activations
    ``capture`` reads (`ModelAdapter.hook_activations`): from ``activations`` (hook -> ``[batch, positions, width]``)
    when the caller passes the batch's forward there, so that one forward serves several units' inputs (the pass after
    the scoring pass does), else from a forward of its own; None when ``capture`` runs the model its own way or not
    at all (it then ignores ``activations``). With a ``hook``, ``transform`` maps the hook's activations to h row by row
    (``capture`` is ``transform`` of them; None: h is the hook's activations), so that one store of the hook's rows
    serves every unit set that reads the hook (the pass after the scoring pass keeps one). ``signed``: the units are the
    pre-activations themselves (no nonlinearity follows, as in Lecomte et al.'s linear hidden layer), so both signs
    are activity and they are read on both sides, as PCA directions are."""

    source: str
    weight: torch.Tensor
    bias: torch.Tensor
    capture: Callable[..., torch.Tensor]
    hook: str | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    signed: bool = False


class ModelAdapter(ABC):
    """A model the benchmark can run. Subclasses set ``model_id``, ``revision`` and ``family``, and
    ``bos_token_id`` when their tokenizer has one (the id a run prepends to each context)."""

    model_id: str
    revision: str | None = None
    bos_token_id: int | None = None
    family: str = "unknown"
    supports_downstream: bool = False

    @abstractmethod
    def hook_names(self) -> list[str]:
        """Every hook this model can report."""

    def special_token_ids(self) -> set[int]:
        """The ids of the model's structural special tokens (`SPECIAL_TOKEN_ATTRIBUTES` of its tokenizer, and its
        ``bos_token_id``): what a spec's ``ignore_tokens = "special"`` leaves unscored."""
        return special_token_ids(getattr(self, "tokenizer", None)) | ({self.bos_token_id} - {None})

    def hook_activations(self, batch: Batch, hook: str, activations: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``activations[hook]`` when the caller already ran ``batch`` (the forward it hands over), else
        ``forward(batch, [hook], logits=False).activations[hook]``."""
        if activations is not None and hook in activations:
            return activations[hook]
        return self.forward(batch, [hook], logits=False).activations[hook]

    @abstractmethod
    def hook_width(self, hook: str) -> int:
        """Width of the activations at ``hook``; a `UserError` naming close hooks when the model has no such hook."""

    @abstractmethod
    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        """Run the model once on ``batch`` and capture ``hooks`` (plus what `forward_with_replacement` needs).
        With ``logits=False`` the adapter may stop after the last layer that a hook needs."""

    def units_of(self, hook: str) -> str:
        """The hook that names the units at ``hook``: two hooks that output the same tensor name one unit set (one
        neurons row). ``hook`` itself by default."""
        return hook

    def comparison_neuron_hook(self, hook: str) -> str | None:
        """The hook of the raw neurons that an SAE at ``hook`` is compared with (None if the model has none)."""
        return None

    def units_caveat(self, hook: str) -> str | None:
        """What a user must know about the units at ``hook`` that its name does not say (a run prints it), or None."""
        return None

    def forward_with_replacement(
        self, batch: Batch, clean: ForwardOutput, hook: str, replacement: Replacement
    ) -> torch.Tensor:
        """Logits ``[batch, positions, vocab]`` with the activations at ``hook`` replaced by
        ``replacement(activations)`` (a new tensor: ``activations`` may be the clean forward's own, which it must
        leave as they are); only for adapters with ``supports_downstream``."""
        raise NotImplementedError(f"{self.family} models do not support spliced forward passes")

    def synthetic_batches(self, n_samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """Batches of inputs that the model samples itself (toy models only), deterministic for a seed."""
        raise NotImplementedError(f"{self.family} models do not sample their own inputs: give the spec a dataset")

    def true_feature_directions(self, hook: str) -> torch.Tensor | None:
        """``[n_features, width]`` directions of the model's known true features at ``hook`` (toy models only)."""
        return None

    def true_feature_weights(self, hook: str) -> torch.Tensor | None:
        """``[n_features, width]`` raw weights from each true feature to each unit at ``hook`` (the matrix whose
        entries Lecomte et al. 2023 threshold to count features per neuron), for toy models that have one."""
        return None

    def neuron_inputs(self, hook: str) -> UnitInputs | None:
        """How the raw units at ``hook`` are computed from an earlier tensor (`UnitInputs`), or None when they have
        no input weights of their own (a residual-stream dimension)."""
        return None

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the model's weights live."""

    def describe(self) -> dict[str, Any]:
        """Provenance of the model for leaderboard rows."""
        return {"model_id": self.model_id, "model_revision": self.revision or "", "model_family": self.family}


class ModelConfig(BaseModel):
    """The model of a benchmark spec.

    ``loader`` names a registered model loader; ``name`` is a hub id or a local folder (relative paths resolve
    against the spec's folder); ``options`` are the loader's own settings (for example a toy model's size).
    """

    model_config = ConfigDict(extra="forbid")

    loader: str
    name: str
    revision: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)


CONFIG_FILENAME = "config.json"
WEIGHTS_FILENAME = "model.safetensors"


def model_folder_files(folder: Path, kind: str) -> tuple[Path, Path]:
    """``(config.json, model.safetensors)`` of a local model folder; a `UserError` naming the missing file
    (``kind`` with its article: "a toy model")."""
    config_path, weights_path = folder / CONFIG_FILENAME, folder / WEIGHTS_FILENAME
    for path in (config_path, weights_path):
        if not path.is_file():
            raise UserError(f"{folder} is not {kind} folder: {path.name} is missing")
    return config_path, weights_path
