"""Per-architecture facts about sae-lens SAEs, in one table (`ARCHITECTURES`), keyed by ``cfg.architecture()``.

Every architecture that sae-lens registers (``sae_lens.registry.SAE_CLASS_REGISTRY`` for inference classes,
``SAE_TRAINING_CLASS_REGISTRY`` for training-only ones) has a row; an SAE of an architecture that is not in the table
is refused (`architecture_of`), never scored on guesses. The test suite iterates over both registries, so a new
sae-lens architecture fails loudly until its row is written.

The facts, per architecture (see `Architecture`):

| architecture | activity | embedding w_u, b_u | transcoder | skip | hook_z reshaping | per token |
|---|---|---|---|---|---|---|
| standard | z | W_enc[:, u], b_enc[u] | no | no | yes | yes |
| topk | z | W_enc[:, u], b_enc[u] | no | no | yes | yes |
| abstopk | abs(z) (signed) | W_enc[:, u], b_enc[u] | no | no | yes | yes |
| jumprelu | z | W_enc[:, u], b_enc[u] | no | no | yes | yes |
| gated | z | W_enc[:, u], b_gate[u] (the gate path) | no | no | yes | yes |
| transcoder | z | W_enc[:, u], b_enc[u] | yes | no | no | yes |
| skip_transcoder | z | W_enc[:, u], b_enc[u] | yes | yes | no | yes |
| jumprelu_transcoder | z | W_enc[:, u], b_enc[u] | yes | no | no | yes |
| jumprelu_skip_transcoder | z | W_enc[:, u], b_enc[u] | yes | yes | no | yes |
| matching_pursuit | z | none (greedy, not one linear map) | no | no | yes | yes |
| temporal | z | none | no | no | yes | no: refused |
| batchtopk (training only) | loads as jumprelu | | | | | |
| matryoshka_batchtopk (training only) | loads as jumprelu | | | | | |

- **activity**: what says how active a latent is. ``abs(z)`` for AbsTopK, whose latents keep the sign of their
  pre-activation and fire on either side ("AbsTopK", arXiv 2510.00404); z itself for the others (their codes are >= 0).
- **embedding**: which encoder tensors give the unit's w_u and b_u in the neuron-embedding identity
  sum_k h_k w_uk + b_u = pre-activation (papers.md §1), with h = ``sae.process_sae_in(x)``.
- **transcoder**: the SAE reads its input hook (``metadata.hook_name``) and writes another (``metadata.hook_name_out``):
  it is scored against the output hook's activations, and spliced there downstream.
- **skip**: the reconstruction adds a linear skip ``x @ W_skip.T`` of the raw input (sae-lens adds it in ``forward``,
  not in ``decode``).
- **hook_z reshaping**: the class reshapes ``[..., heads, d_head]`` inputs when ``cfg.reshape_activations ==
  "hook_z"``. The model adapters already flatten heads, so the reshaping is turned off
  (``turn_off_forward_pass_hook_z_reshaping``, as sae-lens's and SAEBench's evals do).
- **per token**: whether ``encode`` maps each token's activations alone; a temporal SAE attends over the whole
  context and cannot be scored on the pass's token rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from saebench_poly.errors import UserError


@dataclass(frozen=True)
class Architecture:
    """The facts the benchmark needs about one sae-lens architecture (the module docstring explains each)."""

    name: str
    signed: bool = False
    embedding_bias: Literal["b_enc", "b_gate"] | None = "b_enc"
    transcoder: bool = False
    skip: bool = False
    reshapes_hook_z: bool = True
    per_token: bool = True
    loads_as: str | None = None

    @property
    def training_only(self) -> bool:
        """True for architectures that exist only as training classes and load as another (``loads_as``)."""
        return self.loads_as is not None


ARCHITECTURES: dict[str, Architecture] = {row.name: row for row in (
    Architecture("standard"),
    Architecture("topk"),
    Architecture("abstopk", signed=True),
    Architecture("jumprelu"),
    Architecture("gated", embedding_bias="b_gate"),
    Architecture("transcoder", transcoder=True, reshapes_hook_z=False),
    Architecture("skip_transcoder", transcoder=True, skip=True, reshapes_hook_z=False),
    Architecture("jumprelu_transcoder", transcoder=True, reshapes_hook_z=False),
    Architecture("jumprelu_skip_transcoder", transcoder=True, skip=True, reshapes_hook_z=False),
    Architecture("matching_pursuit", embedding_bias=None),
    Architecture("temporal", embedding_bias=None, per_token=False),
    Architecture("batchtopk", loads_as="jumprelu"),
    Architecture("matryoshka_batchtopk", loads_as="jumprelu"),
)}


def architecture_row(name: str, where: str) -> Architecture:
    """The table's row for ``name``; a `UserError` when the table does not know it (``where``: the SAE, for the
    message)."""
    row = ARCHITECTURES.get(name)
    if row is None:
        raise UserError(
            f"{where} has sae-lens architecture {name!r}, which saebench_poly's table of architectures "
            f"(saebench_poly/sources/architectures.py) does not know, so it cannot be scored faithfully; "
            f"known: {', '.join(sorted(ARCHITECTURES))}"
        )
    return row


def architecture_of(sae: Any, where: str) -> Architecture:
    """The row of an inference SAE, refusing architectures that cannot be scored token by token."""
    row = architecture_row(sae.cfg.architecture(), where)
    if row.training_only:
        raise UserError(f"{where} is a training-only {row.name} SAE: convert it with save_inference_model first")
    if not row.per_token:
        raise UserError(
            f"{where} is a {row.name} SAE, whose encoder reads whole contexts: saebench_poly scores SAEs token by "
            "token and cannot score it"
        )
    return row


def prepare_for_scoring(sae: Any, row: Architecture) -> Any:
    """Put an SAE in the state the pass feeds it: hook_z reshaping off (the adapters flatten heads already)."""
    if row.reshapes_hook_z and getattr(sae.cfg, "reshape_activations", "none") == "hook_z":
        sae.turn_off_forward_pass_hook_z_reshaping()
    return sae


__all__ = ["ARCHITECTURES", "Architecture", "architecture_of", "architecture_row", "prepare_for_scoring"]
