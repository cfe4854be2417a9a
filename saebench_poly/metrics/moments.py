"""Streaming first and second moments of activations, batch by batch, merged in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def chan_merge(count_a: int, mean_a: torch.Tensor, m2_a: torch.Tensor, count_b: int, mean_b: torch.Tensor,
               m2_b: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Chan, Golub & LeVeque (1979): the (count, mean, M2) of two disjoint sets of rows from each one's. M2 is
    either per dimension (sum_t (x_t - mean)^2, ``[d]``) or the co-moment matrix (sum_t (x_t - mean)(x_t - mean)^T,
    ``[d, d]``); its shape says which. Either side may be empty (count 0)."""
    if count_a == 0:
        return count_b, mean_b, m2_b
    if count_b == 0:
        return count_a, mean_a, m2_a
    total = count_a + count_b
    delta = mean_b - mean_a
    spread = torch.outer(delta, delta) if m2_a.dim() == 2 else delta.square()
    return total, mean_a + delta * (count_b / total), m2_a + m2_b + spread * (count_a * count_b / total)


# Column blocks of `symmetric_gram`: products of at most this many columns at a time.
GRAM_BLOCK = 256


def symmetric_gram(x: torch.Tensor) -> torch.Tensor:
    """x^T x ``[d, d]``, exactly symmetric, from the blocks on and above its diagonal only, each mirrored below it: the
    same products as one matrix product, for about (1 + 1 / b) / 2 of its multiplications with b blocks of
    `GRAM_BLOCK` columns (a BLAS's symmetric rank-k update, which torch does not expose). A diagonal block keeps its
    upper triangle, mirrored too: a BLAS need not give x_i . x_j and x_j . x_i the same rounding."""
    d = x.shape[1]
    gram = torch.empty(d, d, dtype=x.dtype, device=x.device)
    for start in range(0, d, GRAM_BLOCK):
        stop = min(start + GRAM_BLOCK, d)
        block = x[:, start:stop].T @ x[:, start:]
        gram[start:stop, start:] = block
        gram[stop:, start:stop] = block[:, stop - start :].T
        diagonal = gram[start:stop, start:stop]
        lower = torch.ones_like(diagonal, dtype=torch.bool).tril_(-1)
        diagonal.copy_(torch.where(lower, diagonal.T, diagonal))
    return gram


@dataclass
class Moments:
    """Streaming mean and covariance of rows (Chan, Golub & LeVeque 1979: the pairwise update of the co-moment
    matrix C = sum_t (x_t - mean)(x_t - mean)^T). A batch's own moments (`of`) are merged into the running ones
    (`merge`), so that moments computed once can feed several accumulators, and partial results can be combined."""

    count: int = 0
    mean: torch.Tensor | None = None
    comoment: torch.Tensor | None = None

    @classmethod
    def of(cls, x: torch.Tensor) -> Moments:
        """The moments of the rows of ``x`` ``[n, d]`` alone, in float64. (The product stays in float64: float32
        sums of 2,048 products lose the small eigenvalues of an ill-conditioned covariance, ~1e-6 of the largest.)"""
        n = x.shape[0]
        if n == 0:
            return cls()
        wide = x.to(torch.float64, copy=True)  # its own copy, centred in place
        mean = wide.mean(dim=0)
        return cls(n, mean, symmetric_gram(wide.sub_(mean)))

    def merge(self, other: Moments) -> None:
        """Fold ``other`` (moments of other rows) in; ``other`` is left unchanged. `chan_merge`'s sums, the co-moment
        updated in place (a batch's moments can be shared by several accumulators: the first merge copies them)."""
        if other.count == 0:
            return
        if self.count == 0:
            self.count, self.mean, self.comoment = other.count, other.mean.clone(), other.comoment.clone()
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        spread = torch.outer(delta, delta).mul_(self.count * other.count / total)
        self.comoment.add_(other.comoment).add_(spread)  # (C_a + C_b) + spread, as chan_merge sums them
        self.mean = self.mean + delta * (other.count / total)
        self.count = total

    def update(self, x: torch.Tensor) -> None:
        """Fold the rows of ``x`` in."""
        self.merge(Moments.of(x))

    def covariance(self) -> torch.Tensor:
        return self.comoment / max(self.count - 1, 1)
