"""Rate in bits per token (sum_i H_b(f_i) + L0 * B) against answers known by construction."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from saebench_poly.metrics import EntryBatch
from saebench_poly.metrics.rate import Rate, RateOptions, binary_entropy_bits
from saebench_poly.sources.base import BasisEntry


def rate(z: torch.Tensor, batch_size: int, bits_per_value: float = 16.0) -> dict[str, float]:
    accumulator = Rate(SimpleNamespace(width=z.shape[1]), None, RateOptions(bits_per_value=bits_per_value))
    for chunk in z.split(batch_size):
        accumulator.update(EntryBatch(x=chunk, z=chunk, x_hat=chunk))
    return accumulator.compute()


def test_binary_entropy() -> None:
    p = torch.tensor([0.0, 0.5, 1.0, 0.25])
    expected = [0, 1, 0, -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))]
    assert binary_entropy_bits(p).tolist() == pytest.approx(expected)


def test_rate_of_a_code_with_known_firing_frequencies() -> None:
    # unit 0 fires on half the tokens (1 bit), unit 1 always (0 bits), unit 2 never, unit 3 on a quarter
    z = torch.zeros(1000, 4)
    z[::2, 0], z[:, 1], z[::4, 3] = 0.3, -2.0, 5.0
    h_quarter = -(0.25 * math.log2(0.25) + 0.75 * math.log2(0.75))
    l0 = 0.5 + 1 + 0.25
    for batch_size in (1, 7, 64):
        values = rate(z, batch_size, bits_per_value=8)
        assert values == pytest.approx({"rate_index_bits": 1 + h_quarter, "rate_value_bits": 8 * l0,
                                        "rate_bits_per_token": 1 + h_quarter + 8 * l0, "rate_bits_per_value": 8})


def test_a_dense_basis_costs_width_times_bits_per_value() -> None:
    x = torch.randn(300, 6, generator=torch.Generator().manual_seed(0)) + 2
    rotation, _ = torch.linalg.qr(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)))
    entry = BasisEntry(name="random:h", uri="random:h", kind="random", hook="h", basis=rotation.T)
    accumulator = Rate(entry, None)
    for chunk in x.split(64):
        accumulator.update(EntryBatch(x=chunk, z=entry.encode(chunk), x_hat=chunk))
    values = accumulator.compute()
    assert values["rate_bits_per_token"] == 6 * 16 and values["rate_index_bits"] == 0


def test_bits_per_value_is_a_spec_option_that_changes_the_spec_hash(tl_spec, run_cli) -> None:
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec

    default = load_spec(tl_spec(tokens=40, metrics=["l0", "rate_bits_per_token", "rate_bits_per_value"]))
    eight = load_spec(tl_spec(tokens=40, metrics=["l0", "rate_bits_per_token", "rate_bits_per_value"],
                              extra="[metric_options.rate]\nbits_per_value = 8"))
    assert default.spec.settings_hash() != eight.spec.settings_hash()
    wide = run_benchmark(eight, write=False).rows.pivot_table(index="entry", columns="metric", values="value")
    assert (wide["rate_bits_per_value"] == 8).all()
    dense = wide.loc["random:blocks.0.hook_resid_post"]
    assert dense["rate_bits_per_token"] == pytest.approx(8 * dense["l0"])

    code, _, err = run_cli("run", str(tl_spec(extra="[metric_options.rate]\nbits = 8")))
    assert code == 2 and "unknown option 'bits' in metric_options.rate (it takes: bits_per_value)" in err
    code, _, err = run_cli("run", str(tl_spec(extra="[metric_options.rates]\nbits_per_value = 8")))
    assert code == 2 and "did you mean 'rate'" in err
    code, _, err = run_cli("run", str(tl_spec(extra="[metric_options.rate]\nbits_per_value = -1")))
    assert code == 2 and "metric_options.rate.bits_per_value" in err
