"""Coding geometry (Marshall & Kirchner 2024): eigenspectrum, power-law exponent and participation ratio of a code,
against spectra known by construction."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from saebench_poly.metrics import EntryBatch
from saebench_poly.metrics.geometry import CodeGeometry, GeometryOptions, StreamingCovariance, TokenSample, fit_window


def with_spectrum(eigenvalues: torch.Tensor, n: int, seed: int = 0, shift: float = 3.0) -> torch.Tensor:
    """``n`` rows whose sample covariance has exactly ``eigenvalues``: whitened Gaussian rows (their sample
    covariance is the identity), scaled, rotated at random and shifted."""
    generator = torch.Generator().manual_seed(seed)
    width = eigenvalues.numel()
    gaussian = torch.randn(n, width, dtype=torch.float64, generator=generator)
    q, _ = torch.linalg.qr(gaussian - gaussian.mean(dim=0))
    white = q * (n - 1) ** 0.5
    rotation, _ = torch.linalg.qr(torch.randn(width, width, dtype=torch.float64, generator=generator))
    return (white * eigenvalues.sqrt()) @ rotation.T + shift


def geometry(z: torch.Tensor, batch_size: int, **options) -> dict[str, float]:
    accumulator = CodeGeometry(SimpleNamespace(width=z.shape[1]), None, GeometryOptions(**options))
    for chunk in z.split(batch_size):
        accumulator.update(EntryBatch(x=chunk, z=chunk, x_hat=chunk))
    return accumulator.compute()


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_a_power_law_spectrum_gives_its_exponent_back(alpha: float) -> None:
    width = 400
    eigenvalues = torch.arange(1, width + 1, dtype=torch.float64) ** -alpha
    values = geometry(with_spectrum(eigenvalues, 600), 128)
    assert values["spectrum_alpha"] == pytest.approx(alpha, abs=0.02)
    assert (values["spectrum_alpha_rank_min"], values["spectrum_alpha_rank_max"]) == (10, 200)
    expected_pr = float(eigenvalues.sum() ** 2 / eigenvalues.square().sum())
    assert values["spectrum_participation_ratio"] == pytest.approx(expected_pr, rel=1e-9)
    assert values["spectrum_tokens"] == 600


def test_gaussian_samples_of_a_power_law_give_its_exponent_back() -> None:
    width, n = 128, 50_000
    eigenvalues = torch.arange(1, width + 1, dtype=torch.float64) ** -1.0
    z = torch.randn(n, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * eigenvalues.sqrt()
    assert geometry(z, 4096)["spectrum_alpha"] == pytest.approx(1.0, abs=0.02)


def test_isotropic_data_have_a_participation_ratio_equal_to_the_width() -> None:
    z = with_spectrum(torch.ones(64, dtype=torch.float64), 300)
    assert geometry(z, 50)["spectrum_participation_ratio"] == pytest.approx(64, rel=1e-9)


def test_spectrum_does_not_depend_on_batch_size_or_a_constant_shift() -> None:
    z = torch.randn(500, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2)) @ torch.randn(
        40, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = geometry(z, 500)
    for batch_size, shift in ((1, 0.0), (7, 0.0), (64, 1000.0)):
        assert geometry(z + shift, batch_size) == pytest.approx(reference, rel=1e-6)


def test_the_fit_window_of_narrow_and_rank_deficient_codes() -> None:
    decreasing = torch.arange(1000, 0, -1, dtype=torch.float64)
    assert fit_window(decreasing, 1000, 10, 500, 5) == (10, 500)
    assert fit_window(decreasing[:32], 32, 10, 500, 5) == (10, 16)
    assert fit_window(decreasing[:8], 8, 10, 500, 5) == (1, 8)  # the toy's 8 neurons: every rank
    deficient = torch.cat([decreasing[:12], torch.full((52,), 1e-20)])
    assert fit_window(deficient, 64, 10, 500, 5) == (1, 12)  # window cut at the last positive eigenvalue
    assert fit_window(torch.tensor([1.0, 0.0]), 2, 10, 500, 5) == (0, 0)


def test_an_exact_power_law_over_ranks_1_to_8_for_a_toy_width() -> None:
    eigenvalues = torch.arange(1, 9, dtype=torch.float64) ** -1.5
    values = geometry(with_spectrum(eigenvalues, 100), 16)
    assert values["spectrum_alpha"] == pytest.approx(1.5, abs=1e-9)
    assert (values["spectrum_alpha_rank_min"], values["spectrum_alpha_rank_max"]) == (1, 8)


def sparse_code(n: int, width: int, active: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.zeros(n, width, dtype=torch.float64)
    index = torch.rand(n, width, generator=generator).argsort(dim=1)[:, :active]
    return z.scatter_(1, index, torch.rand(n, active, dtype=torch.float64, generator=generator) + 0.5)


def test_sparse_and_dense_batches_give_the_exact_covariance() -> None:
    z = sparse_code(700, 256, 4, seed=4)
    z[:100] += 0.1  # these rows are dense and go through the dense path
    covariance = StreamingCovariance()
    for chunk in z.split(64):
        covariance.update(chunk)
    assert covariance.sparse_count and covariance.dense.count
    torch.testing.assert_close(covariance.covariance(), torch.cov(z.T), rtol=1e-10, atol=1e-12)


def test_sparse_rows_with_unequal_counts_give_the_exact_covariance() -> None:
    z = sparse_code(700, 256, 6, seed=6)
    z[torch.rand(z.shape, generator=torch.Generator().manual_seed(7)) < 0.3] = 0  # rows hold 0 to 6 entries
    assert len(set((z != 0).sum(dim=1).tolist())) >= 4
    z[5] = 0  # and one none
    covariance = StreamingCovariance()
    for chunk in z.split(64):
        covariance.update(chunk)
    assert covariance.sparse_count == 700 and not covariance.dense.count
    torch.testing.assert_close(covariance.covariance(), torch.cov(z.T), rtol=1e-10, atol=1e-12)


def test_a_batchs_shared_active_entries_give_the_same_covariance_and_firing_counts() -> None:
    z = sparse_code(700, 256, 4, seed=5)
    alone, shared = StreamingCovariance(), StreamingCovariance()
    for chunk in z.split(64):
        batch = EntryBatch(x=chunk, z=chunk, x_hat=chunk)
        assert batch.is_sparse()
        alone.update(chunk)
        shared.update(chunk, batch.active_entries())
        torch.testing.assert_close(batch.firing_counts(), (chunk != 0).sum(dim=0), rtol=0, atol=0)
    torch.testing.assert_close(shared.covariance(), alone.covariance(), rtol=0, atol=0)
    torch.testing.assert_close(shared.covariance(), torch.cov(z.T), rtol=1e-10, atol=1e-12)
    dense = EntryBatch(x=z, z=z + 0.1, x_hat=z)
    assert not dense.is_sparse()
    torch.testing.assert_close(dense.firing_counts(), (z + 0.1 != 0).sum(dim=0), rtol=0, atol=0)


def test_wide_codes_use_a_uniform_token_sample_whose_spectrum_is_exact() -> None:
    z = sparse_code(1500, 200, 6, seed=5)
    options = {"max_exact_width": 128, "sample_size": 300}
    sampled = [geometry(z, size, **options) for size in (1, 7, 1000)]
    assert sampled[0] == pytest.approx(sampled[1], rel=1e-9) and sampled[0] == pytest.approx(sampled[2], rel=1e-9)
    sample = TokenSample(300, seed=0)
    for chunk in z.split(333):
        sample.update(chunk)
    chosen = sample.rows.to_dense()
    assert chosen.shape == (300, 200) and sample.sparse
    exact = torch.linalg.eigvalsh(torch.cov(chosen.T)).flip(0)
    torch.testing.assert_close(sample.covariance_eigenvalues()[:200], exact, rtol=1e-9, atol=1e-12)
    # every sampled row is a row of z, each at most once, and the sample is not just the first rows
    matches = (chosen.unsqueeze(1) == z.unsqueeze(0)).all(dim=2)
    assert bool((matches.sum(dim=1) >= 1).all()) and int(matches.any(dim=0).nonzero().max()) > 1000
    # a sample as large as the data is the data: the same numbers as the exact path
    everything = geometry(z, 256, max_exact_width=128, sample_size=1500)
    assert everything == pytest.approx(geometry(z, 256, max_exact_width=200), rel=1e-8)
    assert sampled[0]["spectrum_tokens"] == 300 and sampled[0]["spectrum_alpha_rank_max"] <= 100


def test_a_square_orthonormal_basis_shares_the_spectrum_of_its_inputs() -> None:
    from saebench_poly.sources.base import BasisEntry

    x = torch.randn(900, 24, generator=torch.Generator().manual_seed(6)) @ torch.randn(
        24, 24, generator=torch.Generator().manual_seed(7)) + 5
    rotation, _ = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(8)))
    entry = BasisEntry(name="r", uri="random:h", kind="random", hook="h", basis=rotation.T.float(), center=x.mean(dim=0))
    shared = CodeGeometry(entry, None)
    assert shared.of_inputs
    # the reference: the same spectrum from z computed in float64
    direct = CodeGeometry(SimpleNamespace(width=24), None)
    for chunk in x.split(128):
        z = entry.encode(chunk)
        shared.update(EntryBatch(x=chunk, z=z, x_hat=entry.decode(z)))
        z64 = (chunk.double() - entry.center.double()) @ rotation
        direct.update(EntryBatch(x=z64, z=z64, x_hat=z64))
    assert shared.compute() == pytest.approx(direct.compute(), rel=1e-5)


def test_units_that_never_fire_add_exact_zero_eigenvalues() -> None:
    z = sparse_code(600, 120, 3, seed=9)
    z[:, 100:] = 0  # 20 dead units
    covariance = StreamingCovariance()
    for chunk in z.split(100):
        covariance.update(chunk)
    from saebench_poly.metrics.geometry import covariance_eigenvalues

    eigenvalues = covariance_eigenvalues(covariance.covariance())
    torch.testing.assert_close(eigenvalues, torch.linalg.eigvalsh(torch.cov(z.T)).flip(0), rtol=1e-9, atol=1e-12)
    assert bool((eigenvalues[-20:] == 0).all())
