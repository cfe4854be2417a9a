"""The metric interface: accumulators fed batch by batch, each defining one or more registered metrics.

An `Accumulator` sees every scored batch of one entry once (`update`) and then reports its metrics (`compute`),
a pure function of what it was fed. Sums are kept in float64 on the entry's device, so results do not depend on
the batch size beyond float rounding. Each metric it reports is described by a `MetricSpec`: a name, a version
(bumped whenever the definition changes), a direction and the definition itself.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from saebench_poly.models.base import ModelAdapter
    from saebench_poly.sources.base import Entry

Direction = Literal["higher", "lower", "neutral"]


@dataclass(frozen=True)
class MetricSpec:
    """One leaderboard metric. ``direction``: which way is better (``neutral``: no better way, e.g. a ratio whose
    ideal is 1). ``definition``: the formula, shown by ``saebench-poly list``."""

    name: str
    version: int
    direction: Direction
    family: str
    definition: str


@dataclass
class DownstreamBatch:
    """Per-position next-token statistics for one entry on one batch, over positions that are scored and have a
    next token (float64): clean cross-entropy, cross-entropy with the reconstruction spliced in, with the hook
    zero-ablated, and KL(clean || spliced)."""

    ce_clean: torch.Tensor
    ce_spliced: torch.Tensor
    ce_zero_ablated: torch.Tensor
    kl: torch.Tensor


@dataclass
class EntryBatch:
    """What an entry produced on one batch, at its scored positions: activations ``x`` ``[N, d_in]``, code ``z``
    ``[N, width]``, reconstruction ``x_hat`` ``[N, d_in]``, where each row came from (``context`` ``[N]``: the
    context's index in the scored data, counted from 0 across batches; ``position`` ``[N]``: the token's position in
    it), and downstream statistics when requested."""

    x: torch.Tensor
    z: torch.Tensor
    x_hat: torch.Tensor
    context: torch.Tensor | None = None
    position: torch.Tensor | None = None
    downstream: DownstreamBatch | None = None


class Accumulator(ABC):
    """Streams over an entry's batches and reports the metrics in ``metrics``."""

    metrics: ClassVar[tuple[MetricSpec, ...]]
    needs_downstream: ClassVar[bool] = False

    def __init__(self, entry: Entry, adapter: ModelAdapter) -> None:
        self.entry = entry
        self.adapter = adapter

    @classmethod
    def applies(cls, entry: Entry, adapter: ModelAdapter) -> bool:
        """Whether these metrics are defined for this entry on this model."""
        return True

    @abstractmethod
    def update(self, batch: EntryBatch) -> None:
        """Fold one batch in."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Metric name -> value."""

    def unit_values(self) -> dict[str, torch.Tensor]:
        """Per-unit columns ``[width]`` for the per-unit table (none by default)."""
        return {}
