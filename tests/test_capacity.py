"""Capacity (Scherlis et al. 2022) and per-neuron participation ratios against answers known by construction."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from saebench_poly.metrics import EntryBatch
from saebench_poly.metrics.capacity import Capacity, CapacityOptions, capacity, neuron_participation_ratio, tile_shape


def all_live(width: int) -> torch.Tensor:
    return torch.ones(width, dtype=torch.bool)


def capacities(directions: torch.Tensor, **kwargs) -> torch.Tensor:
    return capacity(directions, all_live(directions.shape[0]), 0.1, **kwargs).capacity


def polygon(k: int, scale: float = 1.0) -> torch.Tensor:
    angles = torch.arange(k, dtype=torch.float64) * 2 * math.pi / k
    return scale * torch.stack([angles.cos(), angles.sin()], dim=1)


def dense_reference(directions: torch.Tensor, live: torch.Tensor, threshold: float):
    """The definitions computed with the whole Gram matrix, and components by depth-first search."""
    unit = directions.double() / directions.double().norm(dim=1, keepdim=True)
    gram = unit @ unit.T
    c_all = 1 / gram.square().sum(dim=1)
    c_live = 1 / (gram.square() * live.double()).sum(dim=1)
    adjacency = (gram.abs() > threshold) & live.unsqueeze(0) & live.unsqueeze(1)
    label = [-1] * len(live)
    for start in range(len(live)):
        if not live[start] or label[start] >= 0:
            continue
        stack, label[start] = [start], start
        while stack:
            node = stack.pop()
            for other in adjacency[node].nonzero().flatten().tolist():
                if label[other] < 0:
                    label[other] = start
                    stack.append(other)
    sizes = {root: label.count(root) for root in set(label) if root >= 0}
    block_size = torch.tensor([sizes[r] if r >= 0 else math.nan for r in label], dtype=torch.float64)
    return c_all, torch.where(live, c_live, math.nan), block_size, sorted(sizes.values())


def test_known_capacities() -> None:
    torch.testing.assert_close(capacities(torch.tensor([[1.0, 2.0], [-1.0, -2.0]])), torch.full((2,), 0.5, dtype=torch.float64))
    torch.testing.assert_close(capacities(polygon(5, scale=3.0)), torch.full((5,), 0.4, dtype=torch.float64))
    for k in (2, 3, 7):
        copies = torch.tensor([[0.3, -1.2, 0.5]]).repeat(k, 1)
        torch.testing.assert_close(capacities(copies), torch.full((k,), 1 / k, dtype=torch.float64))
    orthogonal, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(capacities(orthogonal.T[:4] * torch.tensor([[1.0], [2], [3], [4]], dtype=torch.float64)),
                               torch.ones(4, dtype=torch.float64))


def test_a_zero_direction_has_no_capacity_and_takes_none() -> None:
    result = capacity(torch.tensor([[1.0, 0], [0, 0], [0, 1.0]]), all_live(3), 0.1)
    torch.testing.assert_close(result.capacity, torch.tensor([1.0, 0, 1], dtype=torch.float64))
    assert torch.isnan(result.block_size[1]) and result.block_sizes.tolist() == [1, 1]


@pytest.mark.parametrize("seed", range(5))
def test_capacity_sums_to_at_most_the_dimension_on_random_dictionaries(seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    d = 8
    for width in (4, 8, 32, 200):
        c = capacities(torch.randn(width, d, generator=generator))
        assert bool(((c > 0) & (c <= 1)).all())
        assert float(c.sum()) <= min(width, d) + 1e-9


def test_blockwise_equals_the_dense_computation() -> None:
    generator = torch.Generator().manual_seed(1)
    directions = torch.randn(300, 16, generator=generator)
    directions[40:60] = directions[0] + 0.05 * torch.randn(20, 16, generator=generator)  # a tight cluster
    live = torch.rand(300, generator=generator) > 0.2
    c_all, c_live, block_size, sizes = dense_reference(directions, live, threshold=0.5)
    for max_tile in (7 * 16, 1000, 10**9):
        result = capacity(directions, live, 0.5, max_tile_elements=max_tile)
        torch.testing.assert_close(result.capacity, c_all, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(result.capacity_live, c_live, rtol=1e-12, atol=1e-12, equal_nan=True)
        torch.testing.assert_close(result.block_size, block_size, equal_nan=True)
        assert sorted(result.block_sizes.tolist()) == sizes


def test_a_large_decoder_is_processed_in_bounded_tiles() -> None:
    directions = torch.randn(8192, 64, generator=torch.Generator().manual_seed(2))
    budget = 2**20
    shapes: list[tuple[int, int]] = []
    result = capacity(directions, all_live(8192), 0.5, max_tile_elements=budget, observe_tile=shapes.append)
    rows, cols = tile_shape(8192, 64, budget)
    assert max(r * c for r, c in shapes) <= budget and rows * 64 <= budget and cols * 64 <= budget
    # the upper triangle only, block by block: every unordered pair seen in exactly one tile
    assert sum(r * c for r, c in shapes) == sum(min(rows, 8192 - r) * (8192 - r) for r in range(0, 8192, rows))
    assert sum(r * c for r, c in shapes) < 0.6 * 8192 * 8192
    assert float(result.capacity.sum()) <= 64 + 1e-9
    # the 65,536 x 2,304 decoder of the issue: tiles and their operands stay far below 2 GB of float64
    rows, cols = tile_shape(65_536, 2_304, 2**24)
    assert 8 * (rows * cols + rows * 2_304 + cols * 2_304) < 2**29


def test_blocks_of_a_block_semi_orthogonal_dictionary() -> None:
    # a pentagon in dims 0-1, an antipodal pair in dim 2, a triangle in dims 3-4, three orthogonal singles
    pentagon = torch.zeros(5, 8, dtype=torch.float64)
    pentagon[:, :2] = polygon(5)
    pair = torch.zeros(2, 8, dtype=torch.float64)
    pair[:, 2] = torch.tensor([1.0, -1.0])
    triangle = torch.zeros(3, 8, dtype=torch.float64)
    triangle[:, 3:5] = polygon(3)
    singles = torch.eye(8, dtype=torch.float64)[5:]
    directions = torch.cat([pentagon, pair, triangle, singles])
    result = capacity(directions, all_live(13), 0.1)
    assert sorted(result.block_sizes.tolist()) == [1, 1, 1, 2, 3, 5]
    block_capacity = [float(result.capacity[s].sum()) for s in (slice(0, 5), slice(5, 7), slice(7, 10))]
    assert block_capacity == pytest.approx([2, 1, 2])  # a block's capacities sum to its dimension
    assert float(result.capacity.sum()) == pytest.approx(8)


def test_dead_units_take_capacity_over_all_units_but_not_over_live_ones() -> None:
    directions = torch.tensor([[1.0, 0], [1.0, 0], [0, 1.0]])
    result = capacity(directions, torch.tensor([True, False, True]), 0.1)
    torch.testing.assert_close(result.capacity, torch.tensor([0.5, 0.5, 1], dtype=torch.float64))
    torch.testing.assert_close(result.capacity_live, torch.tensor([1, math.nan, 1], dtype=torch.float64), equal_nan=True)
    assert result.block_sizes.tolist() == [1, 1]


def test_neuron_participation_ratio_counts_the_features_on_each_neuron() -> None:
    # neuron 0 carries two equally frequent features, neuron 1 one, neuron 2 none
    directions = torch.tensor([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0]])
    ratio, load = neuron_participation_ratio(directions, torch.tensor([0.5, 0.5, 1.0]))
    torch.testing.assert_close(ratio[:2], torch.tensor([2.0, 1.0], dtype=torch.float64))
    assert torch.isnan(ratio[2]) and load.tolist() == [1.0, 1.0, 0.0]
    ratio, _ = neuron_participation_ratio(directions, torch.tensor([0.9, 0.1, 1.0]))
    assert float(ratio[0]) == pytest.approx(1 / (0.9**2 + 0.1**2))
    # a unit direction spread evenly over 4 neurons puts 1 feature on each
    ratio, _ = neuron_participation_ratio(torch.full((1, 4), 0.5), torch.ones(1))
    torch.testing.assert_close(ratio, torch.ones(4, dtype=torch.float64))


def feed(accumulator, z: torch.Tensor, batch_size: int) -> dict[str, float]:
    for chunk in z.split(batch_size):
        accumulator.update(EntryBatch(x=chunk, z=chunk, x_hat=chunk))
    return accumulator.compute()


def test_capacity_accumulator_on_a_neuron_space_dictionary() -> None:
    # 3 latents on 2 neurons: latents 0 and 1 share neuron 0 (an antipodal pair), latent 2 owns neuron 1, latent 3
    # duplicates latent 2 but never fires
    directions = torch.tensor([[1.0, 0], [-2.0, 0], [0, 1.0], [0, 1.0]])
    entry = SimpleNamespace(hook="neurons", width=4, decoder_directions=lambda: directions)
    adapter = SimpleNamespace(comparison_neuron_hook=lambda hook: hook)
    z = torch.zeros(100, 4)
    z[:50, 0], z[50:, 1], z[::4, 2] = 1.0, 2.0, 0.5
    values = [feed(Capacity(entry, adapter), z, size) for size in (1, 7, 64)]
    assert values[0] == values[1] == values[2]
    expected = {
        "capacity_mean": 0.5, "capacity_mean_live": (0.5 + 0.5 + 1) / 3, "capacity_sum_over_d": 1.0,
        "capacity_sum_over_d_live": 1.0, "dimensions_per_feature": 2 / 3, "capacity_blocks": 2.0,
        "capacity_block_size_mean": 1.5, "capacity_block_size_median": 1.5, "capacity_block_size_max": 2.0,
        "capacity_singleton_fraction": 1 / 3, "capacity_block_threshold": 0.1,
        "neuron_pr_mean": 1.5, "neuron_pr_median": 1.5, "neuron_pr_polysemantic_fraction": 0.5,
    }
    assert values[0] == pytest.approx(expected)
    units = Capacity(entry, adapter)
    feed(units, z, 64)
    assert units.unit_values()["capacity_block_size"].tolist()[:3] == [2, 2, 1]
    off_neurons = Capacity(entry, SimpleNamespace(comparison_neuron_hook=lambda hook: "mlp"))
    assert "neuron_pr_mean" not in feed(off_neurons, z, 64)
    strict = Capacity(entry, adapter, CapacityOptions(polysemantic_pr=2.5))
    assert feed(strict, z, 64)["neuron_pr_polysemantic_fraction"] == 0
