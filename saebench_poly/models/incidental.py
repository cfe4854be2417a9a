"""The toy model of incidental polysemanticity (Lecomte et al. 2023, "What Causes Polysemanticity? An Alternative
Origin Story of Mixed Selectivity from Incidental Causes", arXiv 2312.03096).

n features, m >= n neurons, W ``[n, m]``: the hidden layer (the neurons) is h = W^T x and the output
y = ReLU(W W^T x). The inputs are the n one-hot vectors; the loss is the sum of squared errors over all of them plus
lambda ||W||_1 (lambda = 1e-3), trained full-batch with AdamW (lr 1e-3, torch's default weight decay of 0.01, which
the authors' code keeps) for 7,500 steps, from W ~ N(0, 1/m). With more neurons than features no neuron *has* to be
shared, yet some end up holding two features: a pair of features whose largest initial weights fall on the same
neuron, with opposite signs so that the ReLU hides their interference. The birthday argument predicts about
n^2 / (4m) such neurons (Lecomte et al. count a feature on neuron k when 0.8 <= |W_ik| <= 1.2).

As a benchmark model, each (n, m) pair of ``[model.options] pairs`` is a hook named ``n<n>_m<m>``. A hook holds
``instances`` independently initialised copies side by side (the authors train 16 at once): its width is
m * instances, its features n * instances, and its weight matrix the block-diagonal of the copies, so counts over
the hook are sums over the copies (and n^2 / (4m) per copy sums to (n I)^2 / (4 m I) for the hook). The inputs are
the one-hot features in turn: the t-th scored sample is feature t mod (n * instances) of every hook, so each
feature is equally frequent (to within one sample). The neurons are linear in x, so their activations are the rows
of W; the true feature directions are those rows, normalised.

A trained model is a folder with ``config.json`` (its `IncidentalConfig`) and ``model.safetensors`` (one tensor
``[instances, n, m]`` per hook), trained into place on first use and reused while the options are unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from saebench_poly.errors import UserError, first_line
from saebench_poly.files import with_new_file_permissions
from saebench_poly.models.base import (
    CONFIG_FILENAME,
    WEIGHTS_FILENAME,
    Batch,
    ForwardOutput,
    ModelAdapter,
    ModelConfig,
    UnitInputs,
    model_folder_files,
)
from saebench_poly.threads import single_thread

Pair = tuple[Annotated[int, Field(gt=0)], Annotated[int, Field(gt=0)]]


class IncidentalConfig(BaseModel):
    """``[model.options]`` of the ``incidental`` loader: the (n features, m neurons) pairs and their training."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pairs: tuple[Pair, ...] = ((64, 64), (64, 128), (128, 256), (128, 512))
    instances: int = Field(4, gt=0, description="independent copies of each pair, side by side in its hook")
    l1: float = Field(1e-3, ge=0)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    steps: int = Field(7500, gt=0)
    seed: int = 0

    @field_validator("pairs")
    @classmethod
    def _check_pairs(cls, pairs: tuple[Pair, ...]) -> tuple[Pair, ...]:
        if not pairs:
            raise ValueError("give at least one (n, m) pair")
        for n, m in pairs:
            if m < n:
                raise ValueError(f"pair ({n}, {m}): the incidental regime needs m >= n (more neurons than features)")
        if len(set(pairs)) != len(pairs):
            raise ValueError("a pair is listed twice")
        return pairs


def hook_name(n: int, m: int) -> str:
    return f"n{n}_m{m}"


def train_pair(n: int, m: int, cfg: IncidentalConfig, advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """``[instances, n, m]`` trained weights of one pair (float32, CPU), seeded by ``cfg.seed``, n and m;
    ``advance(1)`` is called after each step. Trained in float64, so that CPUs whose kernels sum in other orders
    (AVX2, AVX-512) give the same weights.

    All instances train at once: the loss is a sum over instances and AdamW acts elementwise, so this is the same
    as training each alone."""
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}:{n}:{m}".encode()).digest()[:8], "little") % 2**63
    generator = torch.Generator().manual_seed(seed)
    weights = torch.nn.Parameter((torch.randn(cfg.instances, n, m, generator=generator) / m**0.5).double())
    optimizer = torch.optim.AdamW([weights], lr=cfg.lr, weight_decay=cfg.weight_decay)
    target = torch.eye(n, dtype=torch.float64)
    with single_thread():
        for _ in range(cfg.steps):
            # the batch is the n one-hot inputs, so the hidden layer is W itself and the output ReLU(W W^T)
            output = torch.relu(weights @ weights.transpose(1, 2))
            loss = (output - target).square().sum() + cfg.l1 * weights.abs().sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if advance is not None:
                advance(1)
    return weights.detach().float()


def features_per_neuron(weights: torch.Tensor, low: float = 0.8, high: float = 1.2) -> torch.Tensor:
    """Lecomte et al.'s count: for ``weights`` ``[n, m]``, the number of features i with low <= |W_ik| <= high on
    each neuron k (``[m]``, int64). A neuron with two or more is polysemantic."""
    magnitude = weights.abs()
    return ((magnitude >= low) & (magnitude <= high)).sum(dim=0)


class IncidentalAdapter(ModelAdapter):
    """Trained incidental-polysemanticity models as one benchmark model, one hook per (n, m) pair."""

    family = "incidental"

    def __init__(self, weights: dict[str, torch.Tensor], model_id: str, revision: str | None = None) -> None:
        # per hook: the block-diagonal [n I, m I] weights of its instances
        self.weights = {hook: torch.block_diag(*w.unbind(0)) for hook, w in weights.items()}
        self.model_id = model_id
        self.revision = revision

    def hook_names(self) -> list[str]:
        return list(self.weights)

    def _weights(self, hook: str) -> torch.Tensor:
        if hook not in self.weights:
            raise UserError(f"incidental model {self.model_id} has no hook {hook!r} (it has {', '.join(self.weights)})")
        return self.weights[hook]

    def hook_width(self, hook: str) -> int:
        return self._weights(hook).shape[1]

    def n_features(self, hook: str) -> int:
        return self._weights(hook).shape[0]

    @torch.no_grad()
    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        """``activations[hook]``: ``[batch, 1, m I]``, the row of W of each sample's feature; no logits."""
        index = batch.inputs[:, 0].to(self.device)
        activations = {}
        for hook in hooks:
            weights = self._weights(hook)
            activations[hook] = weights[index % weights.shape[0]].unsqueeze(1)
        return ForwardOutput(activations=activations)

    def comparison_neuron_hook(self, hook: str) -> str:
        self._weights(hook)
        return hook

    @property
    def device(self) -> torch.device:
        return next(iter(self.weights.values())).device

    def synthetic_batches(self, n_samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """Sample indices 0 .. n_samples - 1 as ``[batch, 1]`` int64: every hook reads sample t as its feature
        t mod (n I). Deterministic; ``seed`` is not needed."""
        for start in range(0, n_samples, batch_size):
            size = min(batch_size, n_samples - start)
            yield Batch(inputs=torch.arange(start, start + size).unsqueeze(1), score_mask=torch.ones(size, 1, dtype=torch.bool))

    def true_feature_weights(self, hook: str) -> torch.Tensor:
        """``[n I, m I]``: W_ik, the activation of neuron k on feature i."""
        return self._weights(hook)

    def true_feature_directions(self, hook: str) -> torch.Tensor:
        """The rows of W, normalised: the direction each feature takes in neuron space."""
        weights = self._weights(hook)
        return weights / weights.norm(dim=1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)

    def neuron_inputs(self, hook: str) -> UnitInputs:
        """The neurons h = W^T x: h is the one-hot feature vector x ``[batch, 1, n I]``, w_k = W[:, k], no bias; linear,
        so signed (a feature with W_ik < 0 is as much on neuron k as one with W_ik > 0)."""
        weights = self._weights(hook)

        def capture(batch: Batch, activations: object = None) -> torch.Tensor:  # reads no hook
            index = batch.inputs[:, 0].to(weights.device) % weights.shape[0]
            return torch.nn.functional.one_hot(index, weights.shape[0]).to(weights.dtype).unsqueeze(1)

        return UnitInputs(source="the one-hot feature vector x", weight=weights.T, bias=torch.zeros(weights.shape[1],
                          dtype=weights.dtype, device=weights.device), capture=capture, signed=True)


def load_incidental_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> IncidentalAdapter:
    """The ``incidental`` model loader: ``cfg.name`` is a folder, ``cfg.options`` an `IncidentalConfig`.

    A missing (or empty) folder gets freshly trained models; an existing one must hold models trained with the same
    options. ``revision`` is a hash of the weights; a spec that gives one must match it."""
    folder = Path(cfg.name)
    try:
        wanted = IncidentalConfig(**cfg.options)
    except ValidationError as error:
        problem = error.errors()[0]
        where = ".".join(str(part) for part in problem["loc"]) or "options"
        raise UserError(f"invalid options for incidental model {folder}: {where}: {problem['msg']}") from None
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        _train_into(folder, wanted)
    config_path, weights_path = model_folder_files(folder, "an incidental model")
    try:
        found = IncidentalConfig.model_validate_json(config_path.read_text())
        weights = load_file(weights_path)
    except (ValidationError, SafetensorError, OSError) as error:
        raise UserError(f"{folder} does not hold a readable incidental model ({first_line(error)}); delete it to retrain") from None
    if found != wanted:
        raise UserError(f"incidental model {folder} was trained with {found.model_dump()}, but the spec asks for "
                        f"{wanted.model_dump()}; delete the folder to retrain, or change the options to match")
    revision = hashlib.sha256(weights_path.read_bytes()).hexdigest()[:12]
    if cfg.revision is not None and cfg.revision != revision:
        raise UserError(f"incidental model {folder} has revision {revision}, but the spec asks for {cfg.revision}")
    ordered = {hook_name(n, m): weights[hook_name(n, m)].to(device=device, dtype=dtype) for n, m in wanted.pairs}
    return IncidentalAdapter(ordered, f"incidental-polysemanticity/{folder.name}", revision)


def _train_into(folder: Path, cfg: IncidentalConfig) -> None:
    """Train every pair and save next to ``folder``, then rename, so an interrupted run leaves no partial model."""
    staging = folder.parent / f".saebench-tmp-{folder.name}-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    # a progress bar on a terminal only (the loader has no reporter; this takes a minute or two on 2 CPU cores)
    with tqdm(total=len(cfg.pairs) * cfg.steps, desc="training the incidental models", unit="step", disable=None) as bar:
        trained = {hook_name(n, m): train_pair(n, m, cfg, bar.update).contiguous() for n, m in cfg.pairs}
    save_file(trained, staging / WEIGHTS_FILENAME)
    with_new_file_permissions(staging / WEIGHTS_FILENAME)
    (staging / CONFIG_FILENAME).write_text(json.dumps(cfg.model_dump(), indent=2) + "\n")
    if folder.exists():
        folder.rmdir()
    staging.rename(folder)
