"""Capacity of a dictionary's directions (Scherlis et al. 2022, "Polysemanticity and Capacity in Neural Networks",
arXiv 2210.01892) and the effective number of features on each neuron.

Notation: W_i in R^D the decoder direction of unit i (`Entry.decoder_directions`: the rows of an SAE's W_dec, the
basis vectors of a neuron, PCA or random basis), m units, f_i unit i's firing frequency on the scored tokens (the
fraction of tokens with z_i != 0), *live* units those with f_i > 0.

**Normalisation.** Every direction is unit-normalised first, W_i <- W_i / ||W_i|| (a zero row stays zero). An SAE's
decoder norms are arbitrary (they trade off with the encoder's scale, and sae-lens architectures normalise them
differently), so capacity is a property of the directions alone. Then

    C_i = (W_i . W_i)^2 / sum_j (W_i . W_j)^2 = 1 / sum_j cos^2(W_i, W_j)       (C_i = 0 for a zero row)

with j over all units including i. 0 <= C_i <= 1 and sum_i C_i <= rank(W) <= D. C_i equals Elhage et al.'s (2022)
feature dimensionality. Known values: k identical directions 1/k each, an antipodal pair 1/2, a regular pentagon in
2-D 2/5, an orthogonal set 1.

- capacity_mean / capacity_sum_over_d: mean_i C_i and sum_i C_i / D over all m units (dead units take capacity).
- capacity_mean_live / capacity_sum_over_d_live: the same for the dictionary restricted to live units (C recomputed
  with j over live units only): a dead unit never writes, so it should not crowd the live ones.
- dimensions_per_feature = D / ||W_live||_F^2 = D / #live nonzero directions (Elhage et al.'s D / ||W||_F^2, where
  a represented feature has ||W_i|| ~ 1 and a dropped one ~ 0; here a live unit counts 1 and a dead one 0).
- Block-semi-orthogonal structure: live directions i, j interfere when |cos(W_i, W_j)| > threshold (default 0.1, the
  option ``block_threshold``); the blocks are the connected components of that graph. capacity_blocks = their number;
  capacity_block_size_mean / _median / _max over blocks (a median of an even count is the mean of the middle two);
  capacity_singleton_fraction = fraction of live units alone in their block; capacity_block_threshold reports the
  threshold used. Dead units and zero directions are in no block.
- Per neuron, for dictionaries whose input space is a neuron space (the entry's hook is the neurons it is compared
  with, `ModelAdapter.comparison_neuron_hook`): with D_ik the unit-normalised directions,
  load_k = sum_i f_i D_ik^2 and PR_k = load_k^2 / sum_i (f_i D_ik^2)^2, the effective number of features on neuron k
  (papers.md section 2, our choice; dead units have f_i = 0 and drop out). Neurons whose load is below 10% of the
  mean load are *unloaded* (no feature writes to them and their PR is noise). PR_k counts units: a feature that
  the dictionary splits over (or duplicates in) several latents counts once per latent, weighted by each one's
  frequency, so PR_k is the number of features on the neuron only for a dictionary that recovers them one to one
  (the raw neurons' own true-feature count is `saebench_poly.metrics.neuron_truth`). neuron_pr_mean / neuron_pr_median
  over loaded neurons; neuron_pr_polysemantic_fraction = #{loaded k : PR_k >= 1.5} / D (the option
  ``polysemantic_pr``). The per-neuron values themselves do not fit the per-unit table, whose rows are the entry's
  own units (latents), not the neurons: `neuron_participation_ratio` returns them from the weights and firing
  frequencies, and where the model knows its features the raw-neuron entry's rows carry the true-feature version
  (`saebench_poly.metrics.neuron_truth`).

**Memory.** The Gram matrix is never held: `gram_tiles` yields its upper triangle (each tile standing for its
transpose too, which halves the products) in tiles of at most ``max_tile_elements`` float64
entries (default 2^24, 128 MiB), converting the rows of each tile from the stored weights on the fly; a tile's
operands hold at most as many entries again. A 65,536 x 2,304 float32 decoder (576 MiB) is scored with a peak
resident memory of 1.2 GiB for the whole process on CPU (measured); on a GPU, 1M latents need their weights (9 GB
in float32 at D = 2,304) plus the same tiles. On CPU the 2 x 10^13 flops of that Gram matrix take minutes (about 15 on 2
busy cores); they are spent once per entry, at `compute`. Components are merged tile by tile with a vectorised union-find
(hooking to the smaller root, then pointer jumping), so edges are never collected either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field

from saebench_poly.metrics.base import Accumulator, EntryBatch, MetricSpec

LOADED_FRACTION_OF_MEAN = 0.1
_NEURON_BLOCK_ROWS = 4096


class CapacityOptions(BaseModel):
    """``[metric_options.capacity]`` in a spec."""

    model_config = ConfigDict(extra="forbid")
    block_threshold: float = Field(0.1, gt=0, lt=1, description="|cos| above which two live directions interfere")
    polysemantic_pr: float = Field(1.5, ge=1, description="PR_k at or above which a neuron counts as polysemantic")
    max_tile_elements: int = Field(2**24, ge=1, description="largest Gram tile held at once, in float64 entries")


@dataclass
class CapacityResult:
    """Per unit ``[m]`` (float64): C over all units, C over live units (NaN for dead ones), the size of the unit's
    block (NaN for dead or zero directions), and which units are in a block (live, nonzero); per block: its size."""

    capacity: torch.Tensor
    capacity_live: torch.Tensor
    block_size: torch.Tensor
    in_block: torch.Tensor
    block_sizes: torch.Tensor


def _unit_rows(directions: torch.Tensor, rows: slice, norms: torch.Tensor) -> torch.Tensor:
    block = directions[rows].to(torch.float64)
    return block / norms[rows].clamp_min(torch.finfo(torch.float64).tiny).unsqueeze(1)


def row_norms(directions: torch.Tensor, block_rows: int = _NEURON_BLOCK_ROWS) -> torch.Tensor:
    """||W_i|| in float64, ``[m]``, computed a block of rows at a time."""
    return torch.cat([directions[s : s + block_rows].to(torch.float64).norm(dim=1) for s in range(0, directions.shape[0], block_rows)])


def tile_shape(width: int, d_in: int, max_tile_elements: int) -> tuple[int, int]:
    """Rows and columns of the Gram tiles: at most ``max_tile_elements`` entries per tile, and per operand."""
    rows = max(1, min(width, 1024, max_tile_elements // max(d_in, 1)))
    cols = max(1, min(width, max_tile_elements // max(rows, d_in)))
    return rows, cols


def gram_tiles(directions: torch.Tensor, max_tile_elements: int, norms: torch.Tensor | None = None,
               upper: bool = False) -> Iterator[tuple[slice, slice, torch.Tensor]]:
    """(row slice, column slice, cosine tile) for the whole Gram matrix of the unit-normalised ``directions``,
    tile by tile, in float64; with ``upper``, for each block of rows only the columns from its first row on (the
    matrix is symmetric: the other entries are the transposes of these)."""
    width, d_in = directions.shape
    norms = row_norms(directions) if norms is None else norms
    rows, cols = tile_shape(width, d_in, max_tile_elements)
    for r in range(0, width, rows):
        row_slice = slice(r, min(r + rows, width))
        left = _unit_rows(directions, row_slice, norms)
        for c in range(r if upper else 0, width, cols):
            col_slice = slice(c, min(c + cols, width))
            yield row_slice, col_slice, left @ _unit_rows(directions, col_slice, norms).T


def _roots(parent: torch.Tensor) -> torch.Tensor:
    """Point every node at its root, in place (pointer jumping; parents only ever point to smaller ids)."""
    while True:
        grand = parent[parent]
        if torch.equal(grand, parent):
            return parent
        parent.copy_(grand)


def _union(parent: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> None:
    """Merge the components of each edge (u, v): hook the larger root under the smaller, until all agree."""
    while u.numel():
        _roots(parent)
        ru, rv = parent[u], parent[v]
        differ = ru != rv
        if not differ.any():
            return
        u, v, ru, rv = u[differ], v[differ], ru[differ], rv[differ]
        parent.scatter_reduce_(0, torch.maximum(ru, rv), torch.minimum(ru, rv), reduce="amin")


def capacity(directions: torch.Tensor, live: torch.Tensor, block_threshold: float, max_tile_elements: int = 2**24,
             observe_tile: Callable[[tuple[int, int]], None] | None = None) -> CapacityResult:
    """Scherlis et al.'s C_i over all units and over live units, and the interference blocks of live units
    (module docstring). ``directions`` ``[m, D]`` in any dtype and device; ``live`` ``[m]`` bool. ``observe_tile``,
    when given, is called with each tile's shape (for memory tests)."""
    width = directions.shape[0]
    device = directions.device
    live = live.to(device)
    norms = row_norms(directions)
    nonzero = norms > 0
    connected = live & nonzero
    # columns: all units, live units; one product gives both sums of squared cosines
    weights = torch.stack([torch.ones(width, dtype=torch.float64, device=device), live.to(torch.float64)], dim=1)
    sums = torch.zeros(width, 2, dtype=torch.float64, device=device)
    parent = torch.arange(width, device=device)
    for rows, cols, tile in gram_tiles(directions, max_tile_elements, norms, upper=True):
        if observe_tile is not None:
            observe_tile(tuple(tile.shape))
        squared = tile.square()
        sums[rows] += squared @ weights[cols]
        # columns past the row block: their entries (i, j) also stand for (j, i), which no tile holds
        past = min(max(rows.stop - cols.start, 0), squared.shape[1])
        if past < squared.shape[1]:
            sums[cols.start + past : cols.stop] += squared[:, past:].T @ weights[rows]
        i, j = (tile.abs() > block_threshold).nonzero(as_tuple=True)
        i, j = i + rows.start, j + cols.start
        # each undirected edge once (j > i), between live nonzero directions only
        keep = (j > i) & connected[i] & connected[j]
        if keep.any():
            _union(parent, i[keep], j[keep])
    sum_all, sum_live = sums.unbind(dim=1)
    roots = _roots(parent)
    sizes = torch.bincount(roots[connected], minlength=width).to(torch.float64)
    capacity_all = torch.where(nonzero, 1.0 / sum_all.clamp_min(1.0), 0.0)
    capacity_live = torch.where(nonzero, 1.0 / sum_live.clamp_min(1.0), 0.0)
    capacity_live = torch.where(live, capacity_live, torch.nan)
    block_size = torch.where(connected, sizes[roots], torch.nan)
    return CapacityResult(capacity_all, capacity_live, block_size, connected, sizes[sizes > 0])


def neuron_participation_ratio(directions: torch.Tensor, frequency: torch.Tensor,
                               block_rows: int = _NEURON_BLOCK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per neuron k of the input space: (PR_k, load_k), both ``[D]`` float64, with D_ik the unit-normalised
    ``directions`` ``[m, D]`` and ``frequency`` ``[m]`` the weights f_i: load_k = sum_i f_i D_ik^2,
    PR_k = load_k^2 / sum_i (f_i D_ik^2)^2 (NaN when load_k = 0). Streams over blocks of units."""
    width, d_in = directions.shape
    frequency = frequency.to(directions.device, torch.float64)
    norms = row_norms(directions, block_rows)
    load = torch.zeros(d_in, dtype=torch.float64, device=directions.device)
    square = torch.zeros_like(load)
    for start in range(0, width, block_rows):
        rows = slice(start, min(start + block_rows, width))
        weighted = frequency[rows].unsqueeze(1) * _unit_rows(directions, rows, norms).square()
        load += weighted.sum(dim=0)
        square += weighted.square().sum(dim=0)
    ratio = torch.where(square > 0, load.square() / square.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)
    return ratio, load


def loaded_neurons(load: torch.Tensor) -> torch.Tensor:
    """Neurons whose load is at least 10% of the mean load (bool ``[D]``)."""
    return load >= LOADED_FRACTION_OF_MEAN * load.mean()


def is_neuron_space(entry, adapter) -> bool:
    """Whether ``entry``'s hook is the model's neurons (the hook its SAEs are compared with)."""
    return adapter is not None and adapter.comparison_neuron_hook(entry.hook) == entry.hook


class Capacity(Accumulator):
    """Scherlis et al. 2022 capacity of the decoder directions, their interference blocks, and the effective number
    of features per neuron for dictionaries on a neuron space; definitions in the module docstring. `update` only
    counts firing (z != 0) per unit, to tell live units from dead ones and to weight PR_k. Capacity describes how a
    dictionary shares its dimensions, which an overcomplete SAE must do: its metrics have no better direction."""

    Options = CapacityOptions
    metrics = (
        MetricSpec("capacity_mean", 1, "neutral", "capacity", "mean_i C_i, C_i = 1 / sum_j cos^2(W_i, W_j) over all units (unit-normalised decoder rows)", bounds=(0, 1)),
        MetricSpec("capacity_mean_live", 1, "neutral", "capacity", "mean over live units of C_i computed among live units only", bounds=(0, 1)),
        MetricSpec("capacity_sum_over_d", 1, "neutral", "capacity", "sum_i C_i / d_in over all units (<= 1)", bounds=(0, 1)),
        MetricSpec("capacity_sum_over_d_live", 1, "neutral", "capacity", "sum of C_i among live units / d_in (<= 1)", bounds=(0, 1)),
        MetricSpec("dimensions_per_feature", 1, "neutral", "capacity", "d_in / ||W_live||_F^2 = d_in / #live units (unit rows)", bounds=(0, math.inf)),
        MetricSpec("capacity_blocks", 1, "neutral", "capacity", "connected components of live directions with |cos| > block threshold", bounds=(0, math.inf)),
        MetricSpec("capacity_block_size_mean", 1, "neutral", "capacity", "mean number of live units per block", bounds=(1, math.inf)),
        MetricSpec("capacity_block_size_median", 1, "neutral", "capacity", "median number of live units per block", bounds=(1, math.inf)),
        MetricSpec("capacity_block_size_max", 1, "neutral", "capacity", "live units in the largest block", bounds=(1, math.inf)),
        MetricSpec("capacity_singleton_fraction", 1, "neutral", "capacity", "fraction of live units alone in their block", bounds=(0, 1)),
        MetricSpec("capacity_block_threshold", 1, "neutral", "capacity", "the |cos| threshold of the blocks (option block_threshold, default 0.1)", bounds=(0, 1)),
        MetricSpec("neuron_pr_mean", 1, "neutral", "capacity", "neuron-space entries: mean over loaded neurons of PR_k = (sum_i f_i D_ik^2)^2 / sum_i (f_i D_ik^2)^2", bounds=(1, math.inf)),
        MetricSpec("neuron_pr_median", 1, "neutral", "capacity", "neuron-space entries: median over loaded neurons of PR_k", bounds=(1, math.inf)),
        MetricSpec("neuron_pr_polysemantic_fraction", 1, "neutral", "capacity", "neuron-space entries: #{loaded neurons with PR_k >= 1.5} / d_in", bounds=(0, 1)),
    )

    def __init__(self, entry, adapter, options: CapacityOptions | None = None) -> None:
        super().__init__(entry, adapter)
        self.options = options or CapacityOptions()
        self.tokens = 0
        self.active_counts: torch.Tensor | None = None
        self._result: CapacityResult | None = None

    def update(self, batch: EntryBatch) -> None:
        counts = batch.firing_counts()
        self.active_counts = counts.clone() if self.active_counts is None else self.active_counts + counts
        self.tokens += batch.z.shape[0]

    def merge(self, other: Capacity) -> None:
        if other.active_counts is not None:
            self.active_counts = other.active_counts.clone() if self.active_counts is None \
                else self.active_counts + other.active_counts
            self._result = None
        self.tokens += other.tokens

    def _live(self, width: int, device: torch.device) -> torch.Tensor:
        if self.active_counts is None:
            return torch.zeros(width, dtype=torch.bool, device=device)
        return (self.active_counts > 0).to(device)

    def result(self) -> CapacityResult:
        if self._result is None:
            directions = self.entry.decoder_directions().detach()
            self._result = capacity(directions, self._live(directions.shape[0], directions.device),
                                    self.options.block_threshold, self.options.max_tile_elements)
        return self._result

    def compute(self) -> dict[str, float]:
        directions = self.entry.decoder_directions().detach()
        d_in = directions.shape[1]
        result = self.result()
        live = self._live(directions.shape[0], directions.device)
        n_blocked = int(result.in_block.sum())
        blocks = result.block_sizes
        nan = float("nan")
        values = {
            "capacity_mean": float(result.capacity.mean()),
            "capacity_sum_over_d": float(result.capacity.sum()) / d_in,
            "capacity_mean_live": float(result.capacity_live[live].mean()) if live.any() else nan,
            "capacity_sum_over_d_live": float(result.capacity_live[live].sum()) / d_in,
            "dimensions_per_feature": d_in / n_blocked if n_blocked else nan,
            "capacity_blocks": float(blocks.numel()),
            "capacity_block_size_mean": float(blocks.mean()) if n_blocked else nan,
            "capacity_block_size_median": float(blocks.quantile(0.5)) if n_blocked else nan,
            "capacity_block_size_max": float(blocks.max()) if n_blocked else nan,
            "capacity_singleton_fraction": float((blocks == 1).sum()) / n_blocked if n_blocked else nan,
            "capacity_block_threshold": self.options.block_threshold,
        }
        if is_neuron_space(self.entry, self.adapter):
            values.update(self.neuron_values(directions))
        return values

    def neuron_values(self, directions: torch.Tensor) -> dict[str, float]:
        frequency = torch.zeros(directions.shape[0], dtype=torch.float64) if self.active_counts is None \
            else self.active_counts.to(torch.float64) / self.tokens
        ratio, load = neuron_participation_ratio(directions, frequency)
        loaded = loaded_neurons(load) & ratio.isfinite()
        chosen = ratio[loaded]
        return {
            "neuron_pr_mean": float(chosen.mean()) if chosen.numel() else float("nan"),
            "neuron_pr_median": float(chosen.quantile(0.5)) if chosen.numel() else float("nan"),
            "neuron_pr_polysemantic_fraction": float((chosen >= self.options.polysemantic_pr).sum()) / ratio.numel(),
        }

    def unit_values(self) -> dict[str, torch.Tensor]:
        result = self.result()
        return {"capacity": result.capacity, "capacity_live": result.capacity_live,
                "capacity_block_size": result.block_size}

