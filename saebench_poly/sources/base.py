"""What is scored: an `Entry` maps the activations ``x`` at one hook to a code ``z`` and a reconstruction of the
activations at its output hook (the same hook, except for transcoders).

Two kinds exist. `SAEEntry` wraps any sae-lens `SAE` (its own ``encode``/``decode``, so every architecture's
preprocessing is honoured; the per-architecture facts come from `saebench_poly.sources.architectures`). `BasisEntry` is a dense orthonormal basis B (rows are directions) with a centre c:
``z = (x - c) B^T`` and ``x_hat = z B + c``; the raw neurons (B = I, c = 0), PCA and random rotations are such bases.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from saebench_poly.errors import UserError
from saebench_poly.models.base import Batch, ModelAdapter, UnitInputs
from saebench_poly.sources.architectures import architecture_of, prepare_for_scoring


@dataclass
class SourceContext:
    """What a source needs to build its entry: the model (to check hooks), where to put it, the run's seed, the
    folder that relative paths resolve against, the hook the spec gives this entry (overrides a checkpoint's own)
    and the spec's default hook (used when a checkpoint names none)."""

    adapter: ModelAdapter
    device: torch.device
    dtype: torch.dtype
    seed: int
    base_dir: Path
    hook: str | None = None
    default_hook: str | None = None


class Entry(ABC):
    """One dictionary being scored. ``kind`` is ``sae`` or the baseline's name. ``hook`` is the hook it reads;
    ``output_hook`` (``d_out`` wide) the one it reconstructs, which is ``hook`` except for transcoders."""

    name: str
    uri: str
    kind: str
    hook: str
    architecture: str
    d_in: int
    width: int

    @property
    def output_hook(self) -> str:
        """The hook whose activations the reconstruction is compared with and spliced into."""
        return self.hook

    @property
    def d_out(self) -> int:
        """Width of the reconstruction (of `output_hook`)."""
        return self.d_in

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code ``[tokens, width]`` for activations ``[tokens, d_in]``."""

    @abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction ``[tokens, d_in]`` of a code."""

    def reconstruct(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``[tokens, d_out]`` of the output hook's activations from the input ``x`` and its code
        ``z = encode(x)``: ``decode(z)``, plus the skip connection of architectures that have one."""
        return self.decode(z)

    @abstractmethod
    def decoder_directions(self) -> torch.Tensor:
        """``[width, d_out]``: the direction each unit writes to in the output hook's space."""

    @abstractmethod
    def weights_sha256(self) -> str:
        """sha256 of the weights that define the entry (the checkpoint file for ``disk:``)."""

    @abstractmethod
    def to(self, device: torch.device, dtype: torch.dtype) -> Entry:
        """Move the entry's weights; returns self."""

    @property
    def needs_fit(self) -> bool:
        """True when the entry is fitted on held-out activations (PCA) before scoring."""
        return False

    @property
    def signed_units(self) -> bool:
        """True when both signs of a unit's code are activity (a direction read as a coordinate, such as a PCA
        component, or an AbsTopK latent), so that its magnitude |z| says how active it is, and +d and -d are the same
        direction; False when z itself does (most SAE latents, neurons)."""
        return False

    def fit(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """Fit on the held-out activations' mean and covariance (float64)."""
        raise NotImplementedError

    def unit_inputs(self, adapter: ModelAdapter) -> UnitInputs | None:
        """How each unit's pre-activation is computed from the model's activations (`UnitInputs`: the tensor h that
        its input weights multiply, the weights and the bias), for neuron embeddings; None when the units have no
        input weights of their own. An entry of another package overrides this to get embeddings."""
        return None

    def _hook_activations(self, adapter: ModelAdapter, batch: Batch, activations: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        return adapter.hook_activations(batch, self.hook, activations)

    def describe(self) -> dict[str, Any]:
        return {"entry": self.name, "source_uri": self.uri, "entry_kind": self.kind, "hook": self.hook,
                "architecture": self.architecture, "d_in": self.d_in, "width": self.width}


class SAEEntry(Entry):
    """A sae-lens SAE of any architecture in the table (`saebench_poly.sources.architectures`), scored through its
    own ``encode`` and ``decode``. A transcoder's ``output_hook`` is its ``cfg.metadata.hook_name_out`` (a
    `UserError` when it names none). A loader that knows more than the sae-lens class says (another trainer's
    transcoder built as a sae-lens TopK SAE) passes ``output_hook``, and ``skip_weight`` ``[d_out, d_in]`` for a
    linear skip connection, x_hat = decode(z) + x skip_weight^T."""

    kind = "sae"

    def __init__(self, sae: Any, name: str, uri: str, hook: str, sha256: str | None = None,
                 output_hook: str | None = None, skip_weight: torch.Tensor | None = None) -> None:
        self.facts = architecture_of(sae, f"SAE {name}")
        self.sae = prepare_for_scoring(sae.eval(), self.facts)
        self.name, self.uri, self.hook = name, uri, hook
        self.architecture = self.facts.name
        self.d_in, self.width = int(sae.cfg.d_in), int(sae.cfg.d_sae)
        self._d_out = int(getattr(sae.cfg, "d_out", self.d_in))
        self._output_hook = output_hook or hook
        if self.facts.transcoder and output_hook is None:
            self._output_hook = sae.cfg.metadata.hook_name_out
            if not self._output_hook:
                raise UserError(f"SAE {name} is a {self.architecture}, which reconstructs another hook, but its "
                                "cfg.json names none (metadata.hook_name_out): add it to the checkpoint")
        self._skip_weight = skip_weight
        self._sha256 = sha256

    @property
    def skip_weight(self) -> torch.Tensor | None:
        """``[d_out, d_in]``: the linear skip connection (sae-lens's ``W_skip`` for skip transcoders), or None."""
        return self.sae.W_skip if self.facts.skip else self._skip_weight

    @property
    def output_hook(self) -> str:
        return self._output_hook

    @property
    def d_out(self) -> int:
        return self._d_out

    @property
    def signed_units(self) -> bool:
        """True for architectures whose latents fire on both sides (AbsTopK)."""
        return self.facts.signed

    def to(self, device: torch.device, dtype: torch.dtype) -> SAEEntry:
        self.sae = self.sae.to(device=device, dtype=dtype)
        if self._skip_weight is not None:
            self._skip_weight = self._skip_weight.to(device=device, dtype=dtype)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.sae.decode(z)

    def reconstruct(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``decode(z)``, plus ``x @ skip_weight.T`` with a skip connection (as sae-lens's skip transcoders'
        ``forward`` and sparsify's add it)."""
        x_hat = self.sae.decode(z)
        skip = self.skip_weight
        if skip is not None:
            x_hat = x_hat + x.to(self.sae.dtype) @ skip.T
        return x_hat

    def decoder_directions(self) -> torch.Tensor:
        return self.sae.W_dec.detach()

    def unit_inputs(self, adapter: ModelAdapter) -> UnitInputs | None:
        """h = ``sae.process_sae_in(x)``, x the hook's activations: sae-lens's own preprocessing (b_dec subtracted
        when ``apply_b_dec_to_input``, activation normalisation). w_u = W_enc[:, u] and b_u the table's
        ``embedding_bias`` (`Architecture`): b_enc[u] for most; for gated SAEs the gate path, b_u = b_gate[u], whose
        sign decides whether the latent fires (the magnitude path, W_enc[:, u] exp(r_mag[u]), scales every embedding
        of u by one constant, so it has the same cosines). A TopK SAE with ``rescale_acts_by_decoder_norm``
        multiplies its pre-activation by ||W_dec[u]||, and so w_u and b_u too. None for architectures whose encoder
        is not one linear map (matching pursuit)."""
        sae = self.sae
        if self.facts.embedding_bias is None:
            return None
        weight = sae.W_enc.detach().T
        bias = getattr(sae, self.facts.embedding_bias).detach()
        if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
            norms = sae.W_dec.detach().norm(dim=-1)
            weight, bias = weight * norms[:, None], bias * norms

        def transform(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return sae.process_sae_in(x)

        def capture(batch: Batch, activations: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
            return transform(self._hook_activations(adapter, batch, activations))

        return UnitInputs(source=f"sae.process_sae_in({self.hook})", weight=weight, bias=bias, capture=capture,
                          hook=self.hook, transform=transform)

    def weights_sha256(self) -> str:
        if self._sha256 is None:
            tensors = dict(self.sae.state_dict())
            if self._skip_weight is not None:
                tensors["skip_weight"] = self._skip_weight
            self._sha256 = tensors_sha256(tensors)
        return self._sha256


@dataclass
class BasisEntry(Entry):
    """A dense orthonormal basis (rows of ``basis``) with centre ``center``."""

    name: str
    uri: str
    kind: str
    hook: str
    basis: torch.Tensor | None
    center: torch.Tensor | None = None
    architecture: str = field(init=False)
    d_in: int = 0
    width: int = 0

    def __post_init__(self) -> None:
        self.architecture = self.kind
        if self.basis is not None:
            self.width, self.d_in = self.basis.shape

    @property
    def needs_fit(self) -> bool:
        return self.basis is None

    @property
    def signed_units(self) -> bool:
        """A basis direction's coordinate is active on either side: +v and -v are equally directions of the data."""
        return True

    def fit(self, mean: torch.Tensor, covariance: torch.Tensor) -> None:
        """PCA: eigenvectors of the covariance, by decreasing eigenvalue, with signs fixed so that each vector's
        largest-magnitude coordinate is positive (a deterministic basis)."""
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance)
        order = torch.argsort(eigenvalues, descending=True)
        vectors = eigenvectors[:, order].T
        signs = torch.sign(vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True)))
        self.basis = (vectors * signs).to(torch.float32)
        self.center = mean.to(torch.float32)
        self.width, self.d_in = self.basis.shape

    def to(self, device: torch.device, dtype: torch.dtype) -> BasisEntry:
        assert self.basis is not None, "fit the basis before moving it"
        self.basis = self.basis.to(device=device, dtype=dtype)
        if self.center is not None:
            self.center = self.center.to(device=device, dtype=dtype)
        return self

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        centered = x if self.center is None else x - self.center
        return centered @ self.basis.T

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        x_hat = z @ self.basis
        return x_hat if self.center is None else x_hat + self.center

    def decoder_directions(self) -> torch.Tensor:
        return self.basis

    def unit_inputs(self, adapter: ModelAdapter) -> UnitInputs | None:
        """h = x - centre (x for a basis without centre), w_u = the basis vector, b_u = 0."""
        center = self.center

        def transform(x: torch.Tensor) -> torch.Tensor:
            return x - center

        def capture(batch: Batch, activations: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
            x = self._hook_activations(adapter, batch, activations)
            return x if center is None else transform(x)

        return UnitInputs(source=self.hook if center is None else f"{self.hook} - centre", weight=self.basis,
                          bias=torch.zeros_like(self.basis[:, 0]), capture=capture, hook=self.hook,
                          transform=None if center is None else transform)

    def weights_sha256(self) -> str:
        tensors = {"basis": self.basis}
        if self.center is not None:
            tensors["center"] = self.center
        return tensors_sha256(tensors)


class NeuronEntry(BasisEntry):
    """The raw units at a hook: the identity basis, so ``z = x`` and ``x_hat = x`` (computed without a matmul)."""

    @property
    def signed_units(self) -> bool:
        """A neuron's activation is its activity (for MLP neurons the nonlinearity's positive side)."""
        return False

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def unit_inputs(self, adapter: ModelAdapter) -> UnitInputs | None:
        """The model's own input weights of these units (`ModelAdapter.neuron_inputs`); None for units that have
        none, such as the dimensions of the residual stream."""
        return adapter.neuron_inputs(self.hook)


def checkpoint_folder(argument: str, context: SourceContext, what: str) -> Path:
    """The folder a source's argument names (``~`` expanded, relative paths against the spec's folder); a
    `UserError` naming ``what`` when it does not exist."""
    folder = Path(argument).expanduser()
    folder = folder if folder.is_absolute() else context.base_dir / folder
    if not folder.exists():
        raise UserError(f"{what} {argument!r} does not exist (looked at {folder})")
    if not folder.is_dir():
        raise UserError(f"{what} {argument!r} is a file: name the checkpoint's folder")
    return folder


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the tensors serialised as safetensors (float32, CPU, keys sorted): stable across devices."""
    canonical = {k: tensors[k].detach().to("cpu", torch.float32).contiguous() for k in sorted(tensors)}
    return hashlib.sha256(safetensors_bytes(canonical)).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


__all__ = ["BasisEntry", "Entry", "NeuronEntry", "SAEEntry", "SourceContext", "checkpoint_folder", "file_sha256",
           "tensors_sha256"]
