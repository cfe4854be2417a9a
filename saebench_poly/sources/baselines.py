"""Baselines that every SAE is compared with, all dense orthonormal bases of a hook's space.

- ``neurons:<hook>``: the raw units (identity basis). For an SAE on a residual-stream or MLP-output hook the run
  adds the MLP hidden units of the same block (`ModelAdapter.comparison_neuron_hook`) so raw neurons always have
  their row.
- ``pca:<hook>``: principal components of the hook's activations, fitted on a held-out slice of the data (exact
  float64 covariance, then `torch.linalg.eigh`), centred on the held-out mean.
- ``random:<hook>``: a random orthogonal rotation, Q from the QR decomposition of a Gaussian matrix with a seeded
  generator (signs fixed by diag(R) > 0, so Q is Haar-distributed): the random-projection baseline of Marshall &
  Kirchner 2024.
"""

from __future__ import annotations

import hashlib

import torch

from saebench_poly.sources.base import BasisEntry, NeuronEntry, SourceContext


def neurons(hook: str, context: SourceContext) -> NeuronEntry:
    width = context.adapter.hook_width(hook)
    identity = torch.eye(width, device=context.device, dtype=context.dtype)
    return NeuronEntry(name=f"neurons:{hook}", uri=f"neurons:{hook}", kind="neurons", hook=hook, basis=identity)


def pca(hook: str, context: SourceContext) -> BasisEntry:
    context.adapter.hook_width(hook)
    return BasisEntry(name=f"pca:{hook}", uri=f"pca:{hook}", kind="pca", hook=hook, basis=None)


def random_rotation(hook: str, context: SourceContext) -> BasisEntry:
    width = context.adapter.hook_width(hook)
    generator = torch.Generator().manual_seed(_hook_seed(context.seed, hook))
    gaussian = torch.randn(width, width, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(gaussian)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    basis = q.T.to(device=context.device, dtype=context.dtype)
    return BasisEntry(name=f"random:{hook}", uri=f"random:{hook}", kind="random", hook=hook, basis=basis)


def _hook_seed(seed: int, hook: str) -> int:
    """A per-hook seed, so two hooks of one run get different rotations that do not depend on entry order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{hook}".encode()).digest()[:8], "little") % (2**63)
