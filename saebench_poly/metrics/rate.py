"""Rate: the description length of an entry's code in bits per token (Mencattini, Montagna & Locatello 2026, "The
Rate-Distortion-Polysemanticity Tradeoff in SAEs"; the MDL view of Ayonrinde et al. 2024, arXiv 2410.11179).

With f_i the firing frequency of unit i on the N scored tokens (fraction of tokens with z_ti != 0),
H_b(p) = -p log2 p - (1 - p) log2 (1 - p) the binary entropy (0 at p = 0 and p = 1), L0 = sum_i f_i, and B the bits
spent on each non-zero value:

    rate_index_bits = sum_i H_b(f_i)       bits per token to say which units fire (each unit's on/off coded
                                            independently at its own frequency: an upper bound on the entropy of
                                            the active set)
    rate_value_bits = L0 * B               bits per token for the values of the units that fire
    rate_bits_per_token = rate_index_bits + rate_value_bits

B defaults to 16 (a value stored in bfloat16 or float16, the precision SAEs are commonly served in); set it with
``[metric_options.rate] bits_per_value``, and `rate_bits_per_value` reports the B used. A dense basis whose units are
never exactly zero (PCA, a random rotation, GELU neurons) has f_i = 1 for every unit, so its rate is exactly
width * B; ReLU neurons, whose zeros cost no value bits, come out below that, as any sparse code does.
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from saebench_poly.metrics.base import Accumulator, EntryBatch, MetricSpec


class RateOptions(BaseModel):
    """``[metric_options.rate]`` in a spec."""

    model_config = ConfigDict(extra="forbid")
    bits_per_value: float = Field(16.0, gt=0, description="B: bits per non-zero value")


def binary_entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """H_b(p) in bits, elementwise, with H_b(0) = H_b(1) = 0."""
    p = p.to(torch.float64)
    q = 1 - p
    inside = (p > 0) & (q > 0)
    p_safe, q_safe = torch.where(inside, p, 0.5), torch.where(inside, q, 0.5)
    return torch.where(inside, -p_safe * torch.log2(p_safe) - q_safe * torch.log2(q_safe), 0.0)


class Rate(Accumulator):
    """Bits per token of the code: sum_i H_b(f_i) + L0 * B (module docstring). `update` counts firing per unit."""

    Options = RateOptions
    metrics = (
        MetricSpec("rate_bits_per_token", 1, "lower", "rate", "sum_i H_b(f_i) + L0 * B bits per token (B = bits per value, default 16)", bounds=(0, math.inf)),
        MetricSpec("rate_index_bits", 1, "lower", "rate", "sum_i H_b(f_i): bits per token saying which units fire", bounds=(0, math.inf)),
        MetricSpec("rate_value_bits", 1, "lower", "rate", "L0 * B: bits per token for the values of the units that fire", bounds=(0, math.inf)),
        MetricSpec("rate_bits_per_value", 1, "neutral", "rate", "B, the bits per value used (option bits_per_value)", bounds=(0, math.inf)),
    )

    def __init__(self, entry, adapter, options: RateOptions | None = None) -> None:
        super().__init__(entry, adapter)
        self.options = options or RateOptions()
        self.tokens = 0
        self.active_counts: torch.Tensor | None = None

    def update(self, batch: EntryBatch) -> None:
        counts = batch.firing_counts()
        self.active_counts = counts.clone() if self.active_counts is None else self.active_counts + counts
        self.tokens += batch.z.shape[0]

    def merge(self, other: Rate) -> None:
        if other.active_counts is not None:
            self.active_counts = other.active_counts.clone() if self.active_counts is None \
                else self.active_counts + other.active_counts
        self.tokens += other.tokens

    def compute(self) -> dict[str, float]:
        if not self.tokens:
            return {}
        frequency = self.active_counts.to(torch.float64) / self.tokens
        index_bits = float(binary_entropy_bits(frequency).sum())
        value_bits = float(frequency.sum()) * self.options.bits_per_value
        return {"rate_bits_per_token": index_bits + value_bits, "rate_index_bits": index_bits,
                "rate_value_bits": value_bits, "rate_bits_per_value": self.options.bits_per_value}
