"""A toy model of superposition with a privileged (ReLU) neuron basis, as ground truth for the benchmark.

Elhage et al. 2022, "Toy Models of Superposition", section "Superposition in a privileged basis":
x in R^n, each x_i = 0 with probability S, else uniform in [0, 1]; hidden neurons h = ReLU(W x); reconstruction
x' = ReLU(W^T h + b); loss sum_i I_i (x_i - x'_i)^2 with importance I_i = decay^i. With n_hidden < n_features and
sparse features the model packs several features onto each neuron, so its neurons are polysemantic by
construction and the true feature directions are known (`ToySuperpositionModel.true_feature_directions`).

A trained model is a folder with ``config.json`` (its `ToySuperpositionConfig`) and ``model.safetensors``.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from saebench_poly.errors import UserError
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

HIDDEN_HOOK = "hidden"
# synthetic_batches draws features in chunks of this many samples, so the samples do not depend on the batch size.
_SAMPLE_CHUNK = 4096


class ToySuperpositionConfig(BaseModel):
    """Size, feature distribution and training of a toy model.

    The defaults (20 features, 8 neurons, 1 - S = 0.1, I_i = 0.8^i) put the model into superposition with a spread
    of neurons: with seed 0 it represents 11 features on 8 neurons; six neurons respond to 3-4 features and two to
    one (a unit feature direction with a component > 0.2 on the neuron). Sparser features (1 - S = 0.05,
    I_i = 0.9^i) pack 16-18 features and make every neuron polysemantic.
    2000 Adam steps of 1024 samples at lr 1e-2 converge (the loss is within 2% of that after 6000) in ~1.5 s.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    n_features: int = Field(20, gt=0)
    n_hidden: int = Field(8, gt=0)
    feature_probability: float = Field(0.1, gt=0, le=1, description="1 - S: chance that a feature is non-zero")
    importance_decay: float = Field(0.8, gt=0, le=1, description="I_i = importance_decay ** i")
    train_steps: int = Field(2000, gt=0)
    batch_size: int = Field(1024, gt=0)
    lr: float = Field(1e-2, gt=0)
    seed: int = 0


class ToySuperpositionModel(torch.nn.Module):
    """h = ReLU(x W^T), x' = ReLU(h W + b_final); ``W`` is ``[n_hidden, n_features]``."""

    def __init__(self, cfg: ToySuperpositionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.W = torch.nn.Parameter(torch.zeros(cfg.n_hidden, cfg.n_features))
        self.b_final = torch.nn.Parameter(torch.zeros(cfg.n_features))

    def importance(self) -> torch.Tensor:
        """I_i = importance_decay ** i, ``[n_features]``."""
        exponents = torch.arange(self.cfg.n_features, dtype=self.W.dtype, device=self.W.device)
        return self.cfg.importance_decay**exponents

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons, ReLU(x W^T): ``[batch, n_features] -> [batch, n_hidden]``."""
        return torch.relu(x @ self.W.T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction, ReLU(h W + b_final): ``[batch, n_features] -> [batch, n_features]``."""
        return torch.relu(self.hidden(x) @ self.W + self.b_final)

    def sample_features(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """``[n, n_features]`` on the generator's device: each entry 0 with probability S, else uniform in [0, 1]."""
        shape = (n, self.cfg.n_features)
        active = torch.rand(shape, generator=generator, device=generator.device) < self.cfg.feature_probability
        values = torch.rand(shape, generator=generator, device=generator.device)
        return values * active

    @torch.no_grad()
    def true_feature_directions(self, min_norm: float = 0.5) -> torch.Tensor:
        """``[n_features, n_hidden]``: the unit-norm neuron response to each feature alone, ReLU(W[:, i]) / norm.

        By construction the hidden response to x = t e_i (t > 0) is t ReLU(W[:, i]), so this is the direction a
        feature occupies in neuron space. Elhage et al. read ||W_i|| ~ 1 as "represented" and ~ 0 as "dropped";
        a feature whose response norm is below ``min_norm`` (> 0) is dropped and its row is zero.
        """
        if min_norm <= 0:
            raise ValueError(f"min_norm must be positive, got {min_norm}")
        response = torch.relu(self.W.T)
        norms = response.norm(dim=1, keepdim=True)
        return torch.where(norms >= min_norm, response / norms.clamp_min(min_norm), 0.0)


def train_toy_model(cfg: ToySuperpositionConfig) -> ToySuperpositionModel:
    """Train on fresh samples each step with Adam on sum_i I_i (x_i - x'_i)^2 (mean over the batch).

    Fully determined by ``cfg.seed``: W starts Xavier-normal from a seeded generator, b_final at zero.
    """
    generator = torch.Generator().manual_seed(cfg.seed)
    model = ToySuperpositionModel(cfg)
    torch.nn.init.xavier_normal_(model.W, generator=generator)
    importance = model.importance()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    for _ in range(cfg.train_steps):
        x = model.sample_features(cfg.batch_size, generator)
        loss = (importance * (x - model(x)) ** 2).sum(dim=1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def save_toy_model(model: ToySuperpositionModel, folder: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` into ``folder`` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, folder / WEIGHTS_FILENAME)
    with_new_file_permissions(folder / WEIGHTS_FILENAME)
    (folder / CONFIG_FILENAME).write_text(json.dumps(model.cfg.model_dump(), indent=2) + "\n")


def load_toy_model_folder(folder: str | Path) -> ToySuperpositionModel:
    """Read a folder written by `save_toy_model`; a `UserError` when a file is missing or does not fit."""
    folder = Path(folder)
    config_path, weights_path = model_folder_files(folder, "a toy model")
    try:
        cfg = ToySuperpositionConfig.model_validate_json(config_path.read_text())
    except ValidationError as error:
        raise UserError(f"{config_path} is not a valid toy model config: {_first_problem(error)}") from None
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights_path} cannot be read as safetensors: {error}") from None
    model = ToySuperpositionModel(cfg)
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    found = {name: tuple(tensor.shape) for name, tensor in weights.items()}
    if found != expected:
        raise UserError(f"{weights_path} holds tensors {found}, but its config.json needs {expected}")
    model.load_state_dict(weights)
    return model.eval()


def _first_problem(error: ValidationError) -> str:
    problem = error.errors()[0]
    where = ".".join(str(part) for part in problem["loc"]) or "config"
    return f"{where}: {problem['msg']}"


class ToyModelAdapter(ModelAdapter):
    """A trained toy model as a benchmark model: one hook, ``"hidden"``, its ReLU neurons at one position."""

    family = "toy"

    def __init__(self, model: ToySuperpositionModel, model_id: str, revision: str | None = None) -> None:
        self.model = model
        self.model_id = model_id
        self.revision = revision

    def hook_names(self) -> list[str]:
        return [HIDDEN_HOOK]

    def hook_width(self, hook: str) -> int:
        if hook != HIDDEN_HOOK:
            close = difflib.get_close_matches(hook, self.hook_names(), n=1, cutoff=0.3)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UserError(f"toy model {self.model_id} has no hook {hook!r}{hint} (it has only {HIDDEN_HOOK!r})")
        return self.model.cfg.n_hidden

    @torch.no_grad()
    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        """``activations["hidden"]``: ``[batch, 1, n_hidden]``; a toy model has no logits, whatever ``logits`` asks."""
        for hook in hooks:
            self.hook_width(hook)
        x = batch.inputs.to(device=self.device, dtype=self.model.W.dtype)
        activations = {HIDDEN_HOOK: self.model.hidden(x).unsqueeze(1)} if hooks else {}
        return ForwardOutput(activations=activations)

    def comparison_neuron_hook(self, hook: str) -> str | None:
        self.hook_width(hook)
        return HIDDEN_HOOK

    @property
    def device(self) -> torch.device:
        return self.model.W.device

    def synthetic_batches(self, n_samples: int, batch_size: int, seed: int) -> Iterator[Batch]:
        """``n_samples`` fresh feature vectors in batches of ``batch_size`` (the last may be smaller), on CPU.

        Drawn in chunks of a fixed size from a generator seeded with ``seed``, so the concatenated samples depend
        on ``seed`` and ``n_samples`` only, not on ``batch_size``.
        """
        generator = torch.Generator().manual_seed(seed)
        pending = torch.empty(0, self.model.cfg.n_features)
        for start in range(0, n_samples, batch_size):
            size = min(batch_size, n_samples - start)
            while pending.shape[0] < size:
                pending = torch.cat([pending, self.model.sample_features(_SAMPLE_CHUNK, generator)])
            inputs, pending = pending[:size], pending[size:]
            yield Batch(inputs=inputs, score_mask=torch.ones(size, 1, dtype=torch.bool))

    def true_feature_directions(self, hook: str) -> torch.Tensor:
        """At ``"hidden"``, the only hook: see `ToySuperpositionModel.true_feature_directions`."""
        self.hook_width(hook)
        return self.model.true_feature_directions()

    def neuron_inputs(self, hook: str) -> UnitInputs:
        """The hidden neurons ReLU(x W^T): h is the feature vector x ``[batch, 1, n_features]``, w_u = W[u] and b_u = 0."""
        self.hook_width(hook)
        weight = self.model.W.detach()

        def capture(batch: Batch, activations: object = None) -> torch.Tensor:  # reads no hook
            return batch.inputs.to(device=weight.device, dtype=weight.dtype).unsqueeze(1)

        return UnitInputs(source="the toy model's input features", weight=weight, bias=torch.zeros_like(weight[:, 0]),
                          capture=capture)


def load_toy_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> ToyModelAdapter:
    """The ``toy`` model loader: ``cfg.name`` is a folder, ``cfg.options`` a `ToySuperpositionConfig`.

    A missing (or empty) folder gets a freshly trained model, so later runs reuse it; an existing one must have
    been trained with the same options. ``revision`` is a hash of the weights; a spec that gives one must match it.
    """
    folder = Path(cfg.name)
    try:
        wanted = ToySuperpositionConfig(**cfg.options)
    except ValidationError as error:
        raise UserError(f"invalid options for toy model {folder}: {_first_problem(error)}") from None
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        _train_into(folder, wanted)
    model = load_toy_model_folder(folder)
    if model.cfg != wanted:
        raise UserError(
            f"toy model {folder} was trained with {model.cfg.model_dump()}, but the spec asks for "
            f"{wanted.model_dump()}; delete the folder to retrain, or change the options to match"
        )
    revision = hashlib.sha256((folder / WEIGHTS_FILENAME).read_bytes()).hexdigest()[:12]
    if cfg.revision is not None and cfg.revision != revision:
        raise UserError(f"toy model {folder} has revision {revision}, but the spec asks for {cfg.revision}")
    return ToyModelAdapter(model.to(device=device, dtype=dtype), f"toy-superposition/{folder.name}", revision)


def _train_into(folder: Path, cfg: ToySuperpositionConfig) -> None:
    """Train and save next to ``folder``, then rename, so an interrupted run leaves no half-written model."""
    staging = folder.parent / f".saebench-tmp-{folder.name}-{os.getpid()}"
    save_toy_model(train_toy_model(cfg), staging)
    if folder.exists():
        folder.rmdir()
    staging.rename(folder)
