"""Train SAEs with sae-lens's own training SAEs and `SAETrainer`, for the toy-model ground truth and the tests.

The training loop, losses and inference conversion are sae-lens's (`sae_lens.training.sae_trainer.SAETrainer`,
set up as in `sae_lens.synthetic.training.train_toy_sae`); this module only maps a small typed config onto them.
The result is the inference SAE that `TrainingSAE.save_inference_model` writes, read back with `SAE.load_from_disk`;
``sae.save_model(folder)`` writes it again as ``cfg.json`` + ``sae_weights.safetensors``.

sae-lens converts at the end of training: a ``batchtopk`` SAE becomes a ``jumprelu`` inference SAE whose threshold
is the learned global top-k threshold (so its L0 is k on average, not per input), and a ``topk`` SAE folds its
decoder norms into the encoder.
"""

from __future__ import annotations

import functools
import tempfile
from collections.abc import Iterator
from typing import Any, Literal
from unittest import mock

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sae_lens import SAE, LoggingConfig, SAETrainer
from sae_lens.config import SAETrainerConfig
from sae_lens.registry import get_sae_training_class
from sae_lens.training import sae_trainer
from tqdm.auto import tqdm

from saebench_poly.errors import UserError

Architecture = Literal["standard", "topk", "batchtopk", "jumprelu", "gated"]

# The sparsity setting each architecture needs, and every setting it uses; the others must be left unset.
_REQUIRED: dict[str, str] = {
    "standard": "l1_coefficient",
    "gated": "l1_coefficient",
    "topk": "k",
    "batchtopk": "k",
    "jumprelu": "l0_coefficient",
}
_USED: dict[str, set[str]] = {
    "standard": {"l1_coefficient", "sparsity_warm_up_steps"},
    "gated": {"l1_coefficient", "sparsity_warm_up_steps"},
    "topk": {"k"},
    "batchtopk": {"k"},
    "jumprelu": {"l0_coefficient", "sparsity_warm_up_steps", "jumprelu_init_threshold", "jumprelu_bandwidth"},
}
_ARCHITECTURE_SETTINGS: set[str] = set().union(*_USED.values())


class SAETrainingConfig(BaseModel):
    """One SAE to train; set the sparsity field its architecture needs and no other architecture's settings.

    ``l1_coefficient``: standard (L1 of latents weighted by decoder norms, Anthropic's April 2024 update) and gated
    (Rajamanoharan et al. 2024a); ``k``: topk (Gao et al. 2024) and batchtopk (Bussmann et al. 2024, k on average
    over the batch); ``l0_coefficient``, ``jumprelu_init_threshold``, ``jumprelu_bandwidth``: jumprelu (Rajamanoharan
    et al. 2024b; the last two default to sae-lens's). ``sparsity_warm_up_steps`` ramps the L1/L0 coefficient
    linearly from 0. As sae-lens trains: Adam (0.9, 0.999) at a constant ``lr``, gradients clipped at norm 1,
    decoder rows initialised at norm 0.1 and the encoder as their transpose.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    architecture: Architecture
    d_sae: int = Field(gt=0)
    l1_coefficient: float | None = Field(None, gt=0)
    k: int | None = Field(None, gt=0)
    l0_coefficient: float | None = Field(None, gt=0)
    jumprelu_init_threshold: float = Field(0.01, ge=0)
    jumprelu_bandwidth: float = Field(0.05, gt=0)
    sparsity_warm_up_steps: int = Field(0, ge=0)
    training_samples: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    lr: float = Field(gt=0)
    seed: int = 0
    # The dtype of training (weights, optimiser state, data; the SAE is saved in float32). float64 makes the
    # trained weights the same on CPUs whose kernels sum in other orders (AVX2 vs AVX-512): in float32 a TopK
    # selection that flips on a last-bit difference sends two trainings apart.
    dtype: Literal["float32", "float64"] = "float32"

    @model_validator(mode="after")
    def _check_sparsity_setting(self) -> SAETrainingConfig:
        needed = _REQUIRED[self.architecture]
        if getattr(self, needed) is None:
            raise ValueError(f"a {self.architecture} SAE needs {needed}")
        unused = (_ARCHITECTURE_SETTINGS - _USED[self.architecture]) & self.model_fields_set
        if unused:
            raise ValueError(f"a {self.architecture} SAE does not use {', '.join(sorted(unused))}; remove it")
        if self.k is not None and self.k > self.d_sae:
            raise ValueError(f"k={self.k} is larger than d_sae={self.d_sae}")
        if self.training_samples < self.batch_size:
            raise ValueError(f"training_samples={self.training_samples} is less than one batch of {self.batch_size}")
        return self

    def sae_lens_options(self) -> dict[str, Any]:
        """The architecture's own fields of its sae-lens ``*TrainingSAEConfig``."""
        if self.architecture in ("standard", "gated"):
            return {"l1_coefficient": self.l1_coefficient, "l1_warm_up_steps": self.sparsity_warm_up_steps}
        if self.architecture in ("topk", "batchtopk"):
            return {"k": self.k}
        return {
            "l0_coefficient": self.l0_coefficient,
            "l0_warm_up_steps": self.sparsity_warm_up_steps,
            "jumprelu_init_threshold": self.jumprelu_init_threshold,
            "jumprelu_bandwidth": self.jumprelu_bandwidth,
        }


def train_sae(
    cfg: SAETrainingConfig,
    d_in: int,
    data: Iterator[torch.Tensor],
    device: str | torch.device = "cpu",
    hook_name: str | None = None,
    model_name: str | None = None,
) -> SAE[Any]:
    """Train ``cfg`` on ``data`` (``[batch_size, d_in]`` float tensors) and return the inference SAE.

    Initialisation is seeded with ``cfg.seed`` without touching the caller's global RNG; the data iterator brings
    its own seeding. ``hook_name`` and ``model_name`` go into the SAE's metadata.
    """
    training_sae_cls, training_cfg_cls = get_sae_training_class(cfg.architecture)
    sae_cfg = training_cfg_cls(d_in=d_in, d_sae=cfg.d_sae, device=str(device), dtype=cfg.dtype, **cfg.sae_lens_options())
    if hook_name is not None:
        sae_cfg.metadata.hook_name = hook_name
    if model_name is not None:
        sae_cfg.metadata.model_name = model_name
    trainer_cfg = SAETrainerConfig(
        total_training_samples=cfg.training_samples,
        train_batch_size_samples=cfg.batch_size,
        lr=cfg.lr,
        lr_end=cfg.lr,
        lr_scheduler_name="constant",
        device=str(device),
        logger=LoggingConfig(log_to_wandb=False),
    )
    forked = [torch.device(device)] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=forked):
        torch.manual_seed(cfg.seed)
        training_sae = training_sae_cls(sae_cfg)
        # sae-lens draws its own tqdm bar, one line per update when stderr is not a terminal; the caller reports
        # progress through the data iterator instead.
        with mock.patch.object(sae_trainer, "tqdm", functools.partial(tqdm, disable=True)):
            SAETrainer(cfg=trainer_cfg, sae=training_sae, data_provider=_checked(data, cfg, d_in)).fit()
    training_sae.to(torch.float32)  # trained in float64 or not, saved in float32 as every other SAE
    with tempfile.TemporaryDirectory(prefix=".saebench-tmp-") as folder:
        training_sae.save_inference_model(folder)
        return SAE.load_from_disk(folder, device=str(device))


def _checked(data: Iterator[torch.Tensor], cfg: SAETrainingConfig, d_in: int) -> Iterator[torch.Tensor]:
    """``data``, failing with one line when a batch has the wrong shape or the data runs out early."""
    seen = 0
    for batch in data:
        if batch.shape != (cfg.batch_size, d_in):
            raise UserError(
                f"SAE {cfg.name!r}: training batch has shape {tuple(batch.shape)}, expected ({cfg.batch_size}, {d_in})"
            )
        seen += batch.shape[0]
        yield batch.to(getattr(torch, cfg.dtype))
    raise UserError(f"SAE {cfg.name!r}: training data ran out after {seen} of {cfg.training_samples} samples")
