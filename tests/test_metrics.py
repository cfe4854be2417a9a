"""Metrics against answers known by construction, and their invariances (batch size, constant shift)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from saebench_poly.metrics import EntryBatch, all_metrics
from saebench_poly.metrics.base import DownstreamBatch
from saebench_poly.metrics.core import Reconstruction, Sparsity, row_dots
from saebench_poly.metrics.downstream import Downstream
from saebench_poly.metrics.feature_recovery import FeatureRecovery
from saebench_poly.metrics.moments import Moments, symmetric_gram
from saebench_poly.sources.base import BasisEntry, NeuronEntry, SAEEntry
from tests.conftest import write_sae


def feed(accumulator, entry, x: torch.Tensor, batch_size: int) -> dict[str, float]:
    for start in range(0, x.shape[0], batch_size):
        chunk = x[start : start + batch_size]
        z = entry.encode(chunk)
        accumulator.update(EntryBatch(x=chunk, z=z, x_hat=entry.decode(z)))
    return accumulator.compute()


def sae_entry(tmp_path, architecture: str, d_in: int = 8, d_sae: int = 64, **options) -> SAEEntry:
    from sae_lens import SAE

    sae = SAE.load_from_disk(write_sae(tmp_path / architecture, architecture, d_in, d_sae, "h", **options))
    return SAEEntry(sae, name=architecture, uri=f"disk:{architecture}", hook="h")


def test_identity_dictionary_has_zero_fvu_and_mse() -> None:
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    entry = NeuronEntry(name="n", uri="neurons:h", kind="neurons", hook="h", basis=torch.eye(6))
    values = feed(Reconstruction(entry, None), entry, x, 64)
    assert values["fvu"] == 0 and values["mse"] == 0 and values["relative_l2_error"] == 0
    assert values["cosine_similarity"] == pytest.approx(1, abs=1e-12)
    assert values["l2_norm_ratio"] == pytest.approx(1, abs=1e-12)


def test_fvu_of_the_per_dimension_mean_is_one_and_mse_is_the_mean_variance() -> None:
    x = torch.randn(1000, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 2, 3, 4]) + 7
    mean = x.mean(dim=0)
    accumulator = Reconstruction(SimpleNamespace(d_in=4), None)
    for chunk in x.split(37):
        accumulator.update(EntryBatch(x=chunk, z=chunk, x_hat=mean.expand_as(chunk)))
    values = accumulator.compute()
    assert values["fvu"] == pytest.approx(1, rel=1e-12)
    assert values["mse"] == pytest.approx(float(x.var(dim=0, unbiased=False).mean()), rel=1e-12)


def test_means_over_no_token_are_nan_not_perfect() -> None:
    """Tokens with x = 0 enter no per-token ratio, and positions without a next token no downstream mean: with none
    left, those metrics are undefined (NaN), not 0 (which would rank as a perfect reconstruction)."""
    reconstruction = Reconstruction(SimpleNamespace(d_in=4), None)
    zeros = torch.zeros(6, 4)
    reconstruction.update(EntryBatch(x=zeros, z=zeros, x_hat=zeros + 0.5))
    values = reconstruction.compute()
    assert values["mse"] == pytest.approx(0.25) and math.isnan(values["fvu"])
    assert all(math.isnan(values[name]) for name in ("cosine_similarity", "relative_l2_error", "l2_norm_ratio"))
    downstream = Downstream(SimpleNamespace(), None)
    empty = torch.zeros(0, dtype=torch.float64)
    downstream.update(EntryBatch(x=zeros, z=zeros, x_hat=zeros,
                                 downstream=DownstreamBatch(ce_clean=empty, ce_spliced=empty, ce_zero_ablated=empty, kl=empty)))
    assert all(math.isnan(value) for value in downstream.compute().values())


def test_topk_sae_has_l0_equal_to_k(tmp_path) -> None:
    entry = sae_entry(tmp_path, "topk", k=5)
    x = torch.randn(300, 8, generator=torch.Generator().manual_seed(2))
    values = feed(Sparsity(entry, None), entry, x, 64)
    assert values["l0"] == 5


def test_dead_and_dense_fractions_count_units_by_construction() -> None:
    # unit 0 always fires, unit 1 fires on 5% of tokens, unit 2 never, unit 3 on 50%.
    n = 1000
    z = torch.zeros(n, 4)
    z[:, 0] = 1
    z[: n // 20, 1] = 2
    z[::2, 3] = 0.5
    accumulator = Sparsity(SimpleNamespace(width=4), None)
    for chunk in z.split(333):
        accumulator.update(EntryBatch(x=chunk, z=chunk, x_hat=chunk))
    values = accumulator.compute()
    assert values == {"l0": pytest.approx(1 + 0.05 + 0.5), "dead_fraction": 0.25, "dense_fraction": 0.5}
    torch.testing.assert_close(accumulator.unit_values()["firing_frequency"], torch.tensor([1, 0.05, 0, 0.5], dtype=torch.float64))


def test_fvu_is_unchanged_by_a_constant_shift_of_activations_and_decoder_bias(tmp_path) -> None:
    entry = sae_entry(tmp_path, "standard", d_sae=32)
    entry.to(torch.device("cpu"), torch.float64)
    x = torch.randn(800, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    before = feed(Reconstruction(entry, None), entry, x, 100)
    shift = 1000.0
    with torch.no_grad():
        entry.sae.b_dec += shift
    after = feed(Reconstruction(entry, None), entry, x + shift, 100)
    assert before["fvu"] == pytest.approx(after["fvu"], rel=1e-9)
    assert before["mse"] == pytest.approx(after["mse"], rel=1e-9)
    assert 0 < before["fvu"] < 10


@pytest.mark.parametrize("accumulator_class", [Sparsity, Reconstruction])
def test_metrics_do_not_depend_on_batch_size(tmp_path, accumulator_class) -> None:
    entry = sae_entry(tmp_path, "jumprelu", d_sae=48)
    x = torch.randn(448, 8, generator=torch.Generator().manual_seed(4)) + 0.5
    results = [feed(accumulator_class(entry, None), entry, x, size) for size in (1, 7, 64)]
    for name in results[0]:
        for other in results[1:]:
            assert other[name] == pytest.approx(results[0][name], rel=1e-6, abs=1e-12), name


def test_streaming_moments_match_the_dense_covariance() -> None:
    x = torch.randn(1000, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) + 100
    moments = Moments()
    for chunk in x.split(13):
        moments.update(chunk)
    torch.testing.assert_close(moments.mean, x.mean(dim=0))
    torch.testing.assert_close(moments.covariance(), torch.cov(x.T))


def test_moments_of_parts_merge_to_the_moments_of_the_whole() -> None:
    x = torch.randn(3000, 16, generator=torch.Generator().manual_seed(6)) * 2 + 300
    exact = torch.cov(x.double().T)
    for size in (1, 64, 3000):
        moments = Moments()
        for chunk in x.split(size):
            moments.merge(Moments.of(chunk))
        assert moments.comoment.dtype == torch.float64 and moments.count == 3000
        torch.testing.assert_close(moments.covariance(), exact, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_moments_leave_their_rows_and_the_merged_moments_unchanged(dtype) -> None:
    x = torch.randn(50, 4, dtype=dtype, generator=torch.Generator().manual_seed(8)) + 3
    kept = x.clone()
    batch = Moments.of(x)
    assert torch.equal(x, kept)  # a float64 input is not centred in place
    shared = (batch.mean.clone(), batch.comoment.clone())
    first, second = Moments(), Moments()
    for moments in (first, second):  # two accumulators merge the same batch's moments, then more rows
        moments.merge(batch)
        moments.update(x[:10] * 2)
    assert torch.equal(batch.mean, shared[0]) and torch.equal(batch.comoment, shared[1])
    assert torch.equal(first.comoment, second.comoment)
    torch.testing.assert_close(first.covariance(), torch.cov(torch.cat([x, x[:10] * 2]).double().T))


@pytest.mark.parametrize("shape", [(2048, 1536), (7, 3), (1, 5000)])
def test_row_dots_are_vecdot_bit_for_bit(shape) -> None:
    generator = torch.Generator().manual_seed(shape[1])
    a, b = (torch.randn(*shape, dtype=torch.float64, generator=generator) for _ in range(2))
    assert torch.equal(row_dots(a, b), torch.linalg.vecdot(a, b))
    assert torch.equal(row_dots(a, a), torch.linalg.vecdot(a, a))


@pytest.mark.parametrize("width", [1, 255, 256, 257, 600])
def test_the_blocked_gram_matrix_is_the_matrix_product(width) -> None:
    x = torch.randn(300, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    gram = symmetric_gram(x)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-13, atol=1e-12)


def test_feature_recovery_of_a_perfect_and_an_orthogonal_dictionary() -> None:
    truth = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0, 0]])  # the third feature was dropped
    adapter = SimpleNamespace(true_feature_directions=lambda hook: truth)

    def recovery(decoder: torch.Tensor) -> dict[str, float]:
        entry = SimpleNamespace(hook="hidden", output_hook="hidden", signed_units=False, decoder_directions=lambda: decoder)
        return FeatureRecovery(entry, adapter).compute()

    assert recovery(torch.tensor([[2.0, 0, 0, 0], [0, 0.5, 0, 0], [0, 0, 1, 1]])) == {"mean_max_cosine": 1.0, "fraction_recovered": 1.0}
    assert recovery(torch.tensor([[0, 0, 1.0, 0], [0, 0, 0, 1.0]])) == {"mean_max_cosine": 0.0, "fraction_recovered": 0.0}
    half = recovery(torch.tensor([[1.0, 0, 0, 0], [0, math.cos(0.5), math.sin(0.5), 0]]))
    assert half["mean_max_cosine"] == pytest.approx((1 + math.cos(0.5)) / 2)
    assert half["fraction_recovered"] == 0.5


def test_every_metric_states_its_definition_and_direction() -> None:
    for name, (spec, accumulator) in all_metrics().items():
        assert spec.definition and spec.direction in ("higher", "lower", "neutral") and spec.version >= 1
        assert accumulator.__doc__, name


def test_a_full_rank_basis_reproduces_its_input_and_an_sae_does_not() -> None:
    from saebench_poly.activations import reproduces

    generator = torch.Generator().manual_seed(9)
    x = torch.randn(2048, 256, generator=generator) * 3 + 20
    rotation, _ = torch.linalg.qr(torch.randn(256, 256, dtype=torch.float64, generator=generator))
    entry = BasisEntry(name="r", uri="random:h", kind="random", hook="h", basis=rotation.T.float(), center=x.mean(dim=0))
    assert reproduces(x, entry.decode(entry.encode(x)))
    assert reproduces(x, x.clone())
    assert not reproduces(x, x * (1 + 1e-4))
    assert not reproduces(x.half(), (x * (1 + 1e-6)).half() + 0.01)
