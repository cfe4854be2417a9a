"""Streaming first and second moments of activations, merged batch by batch in float64."""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
        comoment_b = centered.T @ centered
        if self.mean is None:
            self.count, self.mean, self.comoment = n_b, mean_b, comoment_b
            return
        total = self.count + n_b
        delta = mean_b - self.mean
        self.comoment = self.comoment + comoment_b + torch.outer(delta, delta) * (self.count * n_b / total)
        self.mean = self.mean + delta * (n_b / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        return self.comoment / max(self.count - 1, 1)
