"""Coding geometry of an entry's code z (Marshall & Kirchner 2024, "Understanding polysemanticity in neural networks
through coding theory", arXiv 2401.17975): the eigenspectrum of its covariance, its power-law exponent and its
effective dimensionality. For raw neurons the code is the activations themselves; for PCA and random rotations, the
rotated coordinates; for an SAE, its latents.

- Eigenvalues lambda_1 >= lambda_2 >= ... of Cov(z) (the unbiased covariance, divisor N - 1).
- spectrum_alpha: the exponent of lambda_n ~ n^(-alpha), by ordinary least squares of log lambda_n on log n over
  the ranks n in [spectrum_alpha_rank_min, spectrum_alpha_rank_max], both reported. The default window is ranks
  10 to min(500, floor(width / 2)) (options ``rank_min``, ``rank_max``; Stringer et al. 2019 fit ranks 11 to 500),
  cut at the last positive eigenvalue (a rank-deficient code, e.g. one with dead latents, has numerically zero ones:
  below 1e-10 lambda_1). When that leaves fewer than ``min_fit_ranks`` (default 5) ranks, the fit uses every
  positive eigenvalue, ranks 1 to the last positive one: so the toy model's 8 neurons are fitted over ranks 1 to 8,
  while 32 latents keep ranks 10 to 16. Fewer than 2 positive eigenvalues: NaN.
- spectrum_participation_ratio = (sum_n lambda_n)^2 / sum_n lambda_n^2, between 1 and the width (= width for an
  isotropic code).
- spectrum_tokens: the number of tokens the covariance rests on.

**Exact and sampled.** While the width is at most ``max_exact_width`` (default 4096) the covariance is exact over
all N scored tokens: streaming sums merged across batches in float64 with Chan et al.'s update (dense codes through
`saebench_poly.metrics.moments.Moments`, each batch's product in float64; sparse codes, at most
width / 32 active units per token, through the float64 sum of the outer products of their active entries, one
triangle of them, which is the same number computed faster). For a square orthonormal basis (raw neurons, PCA,
random rotation: z = (x - c) B^T) Cov(z) = B Cov(x) B^T has the eigenvalues of Cov(x), and those entries share one
Cov(x) per hook and batch. Units whose covariance row is exactly zero (never active) add exact zero eigenvalues
and are left out of the decomposition. Wider codes use a uniform
sample of ``sample_size`` tokens (default 4096, without replacement): each token gets a pseudo-random key from its
index in the scored data and ``seed`` (splitmix64), and the tokens with the smallest keys are kept (bottom-k
sampling), so the sample does not depend on the batch size. The eigenvalues are then exactly those of the sample's
covariance, computed from the centred S x S Gram matrix of the sampled rows (same nonzero eigenvalues as the
width x width covariance); at most S - 1 of them are nonzero, so the window is cut there as well.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from saebench_poly.metrics.base import SPARSE_FRACTION, Accumulator, EntryBatch, MetricSpec
from saebench_poly.metrics.moments import Moments, chan_merge
from saebench_poly.sources.base import BasisEntry

ZERO_EIGENVALUE = 1e-10
# Outer products of at most this many entries are formed at once by the sparse path.
_OUTER_CHUNK = 1 << 22
_SPLITMIX = (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


class GeometryOptions(BaseModel):
    """``[metric_options.geometry]`` in a spec."""

    model_config = ConfigDict(extra="forbid")
    rank_min: int = Field(10, ge=1, description="first rank of the power-law fit")
    rank_max: int = Field(500, ge=2, description="last rank of the power-law fit (also at most width / 2)")
    min_fit_ranks: int = Field(5, ge=2, description="fewer ranks than this in the window: fit all positive ones")
    max_exact_width: int = Field(4096, ge=1, description="widest code whose covariance is exact over all tokens")
    sample_size: int = Field(4096, ge=2, description="tokens sampled for wider codes")
    seed: int = Field(0, description="seed of the token sample")


class StreamingCovariance:
    """Exact float64 covariance of rows fed batch by batch; batches of sparse rows skip the dense product."""

    def __init__(self) -> None:
        self.dense = Moments()
        self.sparse_count = 0
        self.sparse_sum: torch.Tensor | None = None
        self.sparse_outer: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return self.dense.count + self.sparse_count

    def update(self, z: torch.Tensor, active_entries: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fold in the rows ``z``; ``active_entries``: their non-zero entries' ``(rows, units)`` in ``z.nonzero``
        order, when the caller has them (`EntryBatch.active_entries`)."""
        n, width = z.shape
        if n == 0:
            return
        if active_entries is None:
            if torch.count_nonzero(z) > z.numel() * SPARSE_FRACTION:  # then some row is too
                self.dense.update(z)
                return
            active_entries = z.nonzero(as_tuple=True)
        rows, units = active_entries
        per_row = torch.bincount(rows, minlength=n)
        most = int(per_row.max()) if rows.numel() else 0
        if most > width * SPARSE_FRACTION:
            self.dense.update(z)
            return
        if self.sparse_sum is None:
            self.sparse_sum = torch.zeros(width, dtype=torch.float64, device=z.device)
            self.sparse_outer = torch.zeros(width * width, dtype=torch.float64, device=z.device)
        self.sparse_count += n
        active_values = z[rows, units].to(torch.float64)
        self.sparse_sum.index_add_(0, units, active_values)
        if most == 0:
            return
        # each row's active entries in increasing unit order, padded with zeros to the batch's most: [n, most]
        if rows.numel() == n * most:  # as many in every row (a TopK code): the entries are already that matrix
            index, values = units.view(n, most), active_values.view(n, most)
        else:
            slot = torch.arange(rows.numel(), device=z.device) - (torch.cumsum(per_row, 0) - per_row)[rows]
            index = torch.zeros(n, most, dtype=torch.int64, device=z.device)
            values = torch.zeros(n, most, dtype=torch.float64, device=z.device)
            index[rows, slot] = units
            values[rows, slot] = active_values
        # the products of slots a <= b only: unit index[a] < index[b], the upper triangle (padding adds zeros), slot
        # a against slots a .. most - 1 as slices (a gather of the triangle's index pairs is slower)
        chunk = max(1, _OUTER_CHUNK // (most * (most + 1) // 2))
        for start in range(0, n, chunk):
            v, i = values[start : start + chunk], index[start : start + chunk]
            outer = torch.cat([v[:, a : a + 1] * v[:, a:] for a in range(most)], dim=1).reshape(-1)
            cells = torch.cat([i[:, a : a + 1] * width + i[:, a:] for a in range(most)], dim=1).reshape(-1)
            self.sparse_outer.index_add_(0, cells, outer)

    def merge_dense(self, moments: Moments) -> None:
        """Fold in the moments of a batch of rows computed elsewhere (shared by entries with the same rows)."""
        self.dense.merge(moments)

    def merge(self, other: StreamingCovariance) -> None:
        """Fold in the rows another covariance was fed."""
        self.dense.merge(other.dense)
        if other.sparse_sum is not None:
            if self.sparse_sum is None:
                self.sparse_sum, self.sparse_outer = other.sparse_sum.clone(), other.sparse_outer.clone()
            else:
                self.sparse_sum += other.sparse_sum
                self.sparse_outer += other.sparse_outer
            self.sparse_count += other.sparse_count

    def covariance(self) -> torch.Tensor:
        """The unbiased covariance ``[width, width]`` of every row fed."""
        mean, comoment = self.dense.mean, self.dense.comoment
        if self.sparse_count:
            width = self.sparse_sum.numel()
            upper = self.sparse_outer.view(width, width)
            mean_s = self.sparse_sum / self.sparse_count
            # sum z z^T - N mean mean^T from the upper triangle, built in one matrix (width^2 float64 each)
            comoment_s = upper + upper.T
            comoment_s.diagonal().sub_(upper.diagonal())
            comoment_s.addr_(mean_s, mean_s, alpha=-self.sparse_count)
            _, mean, comoment = chan_merge(self.dense.count, mean, comoment, self.sparse_count, mean_s, comoment_s)
            return comoment.div_(max(self.count - 1, 1))
        return comoment / max(self.count - 1, 1)


def covariance_eigenvalues(covariance: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of a covariance matrix, descending. Units whose row is exactly zero (never active, or constant)
    contribute exactly zero eigenvalues: the decomposition runs on the other rows and columns only."""
    keep = (covariance != 0).any(dim=1)
    kept = int(keep.sum())
    if kept == covariance.shape[0]:
        return torch.linalg.eigvalsh(covariance).flip(0)
    eigenvalues = torch.linalg.eigvalsh(covariance[keep][:, keep]) if kept else covariance.new_zeros(0)
    zeros = covariance.new_zeros(covariance.shape[0] - kept)
    return torch.sort(torch.cat([eigenvalues, zeros]), descending=True).values


def sample_keys(start: int, count: int, seed: int) -> torch.Tensor:
    """63-bit pseudo-random keys (int64) of the tokens with indices start .. start + count - 1: splitmix64 of the
    index, offset by the seed. A function of the index alone, so every batching of the data gives the same keys."""
    gamma, mix1, mix2 = (np.uint64(c) for c in _SPLITMIX)
    x = np.arange(start + 1, start + count + 1, dtype=np.uint64) * gamma + np.uint64(seed % 2**64) * mix2
    x = (x ^ (x >> np.uint64(30))) * mix1
    x = (x ^ (x >> np.uint64(27))) * mix2
    x = x ^ (x >> np.uint64(31))
    return torch.from_numpy((x >> np.uint64(1)).astype(np.int64))


class TokenSample:
    """A uniform sample without replacement of at most ``size`` rows: those with the smallest `sample_keys`.
    Rows are held sparse when the first batch has at most 1/32 of its entries non-zero, else dense."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self.seen = 0
        self.keys: torch.Tensor | None = None
        self.rows: torch.Tensor | None = None
        self.sparse: bool | None = None

    def update(self, z: torch.Tensor, first: int | None = None) -> None:
        """Offer the rows ``z``, tokens ``first`` .. ``first + len(z) - 1`` of the scored data (by default those
        after the rows fed so far)."""
        first = self.seen if first is None else first
        keys = sample_keys(first, z.shape[0], self.seed)
        self.seen = first + z.shape[0]
        if self.keys is not None and self.keys.numel() >= self.size:
            chosen = keys < self.keys.max()
            if not chosen.any():
                return
            keys, z = keys[chosen], z[chosen.to(z.device)]
        if self.sparse is None:
            self.sparse = bool((z != 0).sum() <= z.numel() * SPARSE_FRACTION)
        rows = z.detach().to_sparse() if self.sparse else z.detach().clone()
        if self.keys is not None:
            keys, rows = torch.cat([self.keys, keys]), torch.cat([self.rows, rows])
        if keys.numel() > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, rows = keys[keep], rows.index_select(0, keep.to(rows.device))
        self.keys, self.rows = keys, rows.coalesce() if self.sparse else rows

    def merge(self, other: TokenSample) -> None:
        """Fold in another sample of other tokens (their indices global, `update`'s ``first``): the smallest keys of
        both are the smallest keys of all the tokens, so the merged sample is the one of a single pass."""
        if other.keys is None:
            return
        rows = other.rows
        if self.keys is None:
            self.keys, self.rows, self.sparse = other.keys, rows, other.sparse
            return
        rows = (rows if rows.is_sparse else rows.to_sparse()) if self.sparse else (rows.to_dense() if rows.is_sparse else rows)
        keys, rows = torch.cat([self.keys, other.keys]), torch.cat([self.rows, rows])
        if keys.numel() > self.size:
            keep = torch.topk(keys, self.size, largest=False).indices
            keys, rows = keys[keep], rows.index_select(0, keep.to(rows.device))
        self.keys, self.rows = keys, rows.coalesce() if self.sparse else rows

    def covariance_eigenvalues(self) -> torch.Tensor:
        """Eigenvalues (descending, float64) of the sampled rows' unbiased covariance: the nonzero ones, from the
        centred Gram matrix H X X^T H / (S - 1), H = I - 11^T / S."""
        rows = self.rows.to(torch.float64)
        if self.sparse:
            with warnings.catch_warnings():
                # torch.sparse.mm converts to CSR internally and warns that CSR is in beta; the product is exact
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                gram = torch.sparse.mm(rows, rows.t()).to_dense()
        else:
            gram = rows @ rows.T
        centred = gram - gram.mean(dim=0, keepdim=True) - gram.mean(dim=1, keepdim=True) + gram.mean()
        eigenvalues = torch.linalg.eigvalsh(centred / max(rows.shape[0] - 1, 1))
        return eigenvalues.flip(0)


def fit_window(eigenvalues: torch.Tensor, width: int, rank_min: int, rank_max: int, min_ranks: int) -> tuple[int, int]:
    """The ranks (1-based, inclusive) of the power-law fit; (0, 0) when fewer than 2 eigenvalues are positive."""
    top = float(eigenvalues[0]) if eigenvalues.numel() else 0.0
    positive = int((eigenvalues > ZERO_EIGENVALUE * top).sum()) if top > 0 else 0
    low, high = rank_min, min(rank_max, width // 2, positive)
    if high - low + 1 < min_ranks:
        low, high = 1, positive
    return (low, high) if high - low + 1 >= 2 else (0, 0)


def power_law_exponent(eigenvalues: torch.Tensor, low: int, high: int) -> float:
    """alpha of lambda_n ~ n^(-alpha): minus the least-squares slope of log lambda_n on log n, n = low .. high."""
    ranks = torch.arange(low, high + 1, dtype=torch.float64)
    x = ranks.log()
    y = eigenvalues[low - 1 : high].to(torch.float64).log()
    x, y = x - x.mean(), y - y.mean()
    return float(-(x * y).sum() / x.square().sum())


def participation_ratio(eigenvalues: torch.Tensor) -> float:
    """(sum lambda)^2 / sum lambda^2, negative round-off clipped to 0."""
    lam = eigenvalues.to(torch.float64).clamp_min(0)
    square = float(lam.square().sum())
    return float(lam.sum()) ** 2 / square if square > 0 else float("nan")


class CodeGeometry(Accumulator):
    """Eigenspectrum of Cov(z), its power-law exponent and participation ratio (module docstring)."""

    Options = GeometryOptions
    metrics = (
        MetricSpec("spectrum_alpha", 1, "neutral", "geometry", "alpha of lambda_n ~ n^-alpha, least squares of log lambda on log n over the rank window"),
        MetricSpec("spectrum_alpha_rank_min", 1, "neutral", "geometry", "first rank of the alpha fit (default window 10 .. min(500, width / 2))", bounds=(1, math.inf)),
        MetricSpec("spectrum_alpha_rank_max", 1, "neutral", "geometry", "last rank of the alpha fit", bounds=(1, math.inf)),
        MetricSpec("spectrum_participation_ratio", 1, "neutral", "geometry", "(sum lambda)^2 / sum lambda^2 of Cov(z): effective dimensionality", bounds=(1, math.inf)),
        MetricSpec("spectrum_tokens", 1, "neutral", "geometry", "tokens the covariance rests on (all scored, or a 4096-token sample above width 4096)", bounds=(0, math.inf)),
    )

    def __init__(self, entry, adapter, options: GeometryOptions | None = None) -> None:
        super().__init__(entry, adapter)
        self.options = options or GeometryOptions()
        self.exact = entry.width <= self.options.max_exact_width
        self.covariance = StreamingCovariance() if self.exact else None
        self.sample = None if self.exact else TokenSample(self.options.sample_size, self.options.seed)
        # z = (x - c) B^T with B square and orthonormal: Cov(z) = B Cov(x) B^T has the eigenvalues of Cov(x), which
        # the entries of one hook (its neurons, PCA, random rotation) share, batch by batch (`EntryBatch.per_hook`)
        self.of_inputs = self.exact and isinstance(entry, BasisEntry) and entry.width == entry.d_in

    def update(self, batch: EntryBatch) -> None:
        if self.of_inputs:
            self.covariance.merge_dense(batch.per_hook("moments", lambda x: Moments.of(x.detach())))
            return
        z = batch.z.detach()
        if self.exact and batch.is_sparse():
            self.covariance.update(z, batch.active_entries())
        elif self.exact:  # the batch has counted its active entries: no second count in `update`
            self.covariance.dense.update(z)
        else:
            self.sample.update(z, batch.first_token)

    def merge(self, other: CodeGeometry) -> None:
        if self.exact:
            self.covariance.merge(other.covariance)
        else:
            self.sample.merge(other.sample)

    def eigenvalues(self) -> tuple[torch.Tensor, int]:
        """Eigenvalues of Cov(z), descending, and the number of tokens they rest on."""
        if self.exact:
            if self.covariance.count < 2:
                return torch.zeros(0, dtype=torch.float64), self.covariance.count
            return covariance_eigenvalues(self.covariance.covariance()), self.covariance.count
        if self.sample.keys is None or self.sample.keys.numel() < 2:
            return torch.zeros(0, dtype=torch.float64), 0
        return self.sample.covariance_eigenvalues(), int(self.sample.keys.numel())

    def compute(self) -> dict[str, float]:
        eigenvalues, tokens = self.eigenvalues()
        eigenvalues = eigenvalues.cpu()
        low, high = fit_window(eigenvalues, self.entry.width, self.options.rank_min, self.options.rank_max,
                               self.options.min_fit_ranks)
        nan = float("nan")
        return {
            "spectrum_alpha": power_law_exponent(eigenvalues, low, high) if high else nan,
            "spectrum_alpha_rank_min": float(low) if high else nan,
            "spectrum_alpha_rank_max": float(high) if high else nan,
            "spectrum_participation_ratio": participation_ratio(eigenvalues) if eigenvalues.numel() else nan,
            "spectrum_tokens": float(tokens),
        }
