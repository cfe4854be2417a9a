"""Streaming first and second moments of activations, merged batch by batch in float64."""

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


@dataclass
class Moments:
    """Streaming mean and covariance of a hook's activations in float64 (Chan et al.'s pairwise update of the
    co-moment matrix C = sum_t (x_t - mean)(x_t - mean)^T)."""

    count: int = 0
    mean: torch.Tensor | None = None
    comoment: torch.Tensor | None = None

    def update(self, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b = x.mean(dim=0)
        centered = x - mean_b
        self.count, self.mean, self.comoment = chan_merge(self.count, self.mean, self.comoment, n_b, mean_b,
                                                          centered.T @ centered)

    def merge(self, other: Moments) -> None:
        """Fold in the moments of other rows (disjoint from these)."""
        self.count, self.mean, self.comoment = chan_merge(self.count, self.mean, self.comoment, other.count,
                                                          other.mean, other.comoment)

    def covariance(self) -> torch.Tensor:
        return self.comoment / max(self.count - 1, 1)
