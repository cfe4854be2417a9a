"""SAE sources: every sae-lens architecture round-trips through ``disk:``; baselines are what they claim."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from saebench_poly.errors import UserError
from saebench_poly.models import ModelConfig
from saebench_poly.models.hooked import load_hooked_transformer
from saebench_poly.sources import SOURCES, SourceContext, load_entry
from tests.conftest import D_MLP, D_MODEL, write_sae

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def adapter(tiny_tl_model_dir: Path):
    return load_hooked_transformer(ModelConfig(loader="transformer_lens", name=str(tiny_tl_model_dir)), torch.device("cpu"), torch.float32)


def context(adapter, base_dir: Path, seed: int = 0) -> SourceContext:
    return SourceContext(adapter=adapter, device=torch.device("cpu"), dtype=torch.float32, seed=seed, base_dir=base_dir)


@pytest.mark.parametrize(
    ("architecture", "options"),
    [("standard", {}), ("topk", {"k": 3}), ("jumprelu", {}), ("gated", {})],
)
def test_disk_round_trip_gives_the_same_outputs(adapter, tmp_path: Path, architecture: str, options: dict) -> None:
    from sae_lens import SAE

    folder = write_sae(tmp_path / architecture, architecture, D_MODEL, 48, HOOK, **options)
    original = SAE.load_from_disk(folder)
    entry = load_entry(f"disk:{architecture}", context(adapter, tmp_path))
    x = torch.randn(64, D_MODEL, generator=torch.Generator().manual_seed(1))
    z = entry.encode(x)
    assert entry.architecture == architecture and entry.hook == HOOK and entry.width == 48
    assert (z != 0).any() and (z == 0).any()
    torch.testing.assert_close(z, original.encode(x), rtol=0, atol=0)
    torch.testing.assert_close(entry.decode(z), original.decode(original.encode(x)), rtol=0, atol=0)
    assert entry.weights_sha256() == hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()


def test_batchtopk_training_checkpoint_loads_as_sae_lens_converts_it(adapter, tmp_path: Path) -> None:
    from sae_lens import SAE, BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(0)
    training_sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4))
    training_sae.cfg.metadata.hook_name = HOOK
    training_sae.topk_threshold.fill_(0.2)
    training_sae.save_model(tmp_path / "btk")
    training_sae.save_inference_model(tmp_path / "reference")
    reference = SAE.load_from_disk(tmp_path / "reference")
    entry = load_entry("disk:btk", context(adapter, tmp_path))
    x = torch.randn(32, D_MODEL)
    assert entry.architecture == reference.cfg.architecture() == "jumprelu"
    torch.testing.assert_close(entry.encode(x), reference.encode(x))


@pytest.mark.parametrize("mode", ["expected_average_only_in", "covariance_whitening"])
def test_a_trainers_mid_training_checkpoint_reads_raw_activations(adapter, tmp_path: Path, mode: str) -> None:
    """sae-lens's trainer saves a checkpoint's activation normalisation beside it (activation_scaler.json); loaded,
    the SAE on raw x gives what the trainer computes: decode(encode(scale(x))) unscaled."""
    from sae_lens import SAE
    from sae_lens.training.activation_scaler import ActivationScaler, ActivationWhitening

    folder = write_sae(tmp_path / "checkpoint", "standard", D_MODEL, 48, HOOK, normalize_activations=mode)
    generator = torch.Generator().manual_seed(3)
    scaler = ActivationScaler(scaling_factor=0.25)
    if mode == "covariance_whitening":
        matrix = torch.randn(D_MODEL, D_MODEL, generator=generator, dtype=torch.float64) / D_MODEL**0.5 + torch.eye(D_MODEL)
        scaler = ActivationScaler(whitening=ActivationWhitening(
            mean=torch.randn(D_MODEL, generator=generator, dtype=torch.float64), matrix=matrix,
            inverse_matrix=torch.linalg.inv(matrix)))
    scaler.save(str(folder / "activation_scaler.json"))
    trained = SAE.load_from_disk(folder)
    entry = load_entry("disk:checkpoint", context(adapter, tmp_path))
    x = torch.randn(64, D_MODEL, generator=generator)
    z = trained.encode(scaler.scale(x))
    assert (z != 0).any() and (z == 0).any()
    torch.testing.assert_close(entry.encode(x), z, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entry.decode(entry.encode(x)), scaler.unscale(trained.decode(z)), rtol=1e-5, atol=1e-5)
    assert entry.weights_sha256() != hashlib.sha256((folder / "sae_weights.safetensors").read_bytes()).hexdigest()
    # without the statistics the SAE cannot be scored: the file that holds them is named
    missing = "activation_whitening.safetensors" if mode == "covariance_whitening" else "activation_scaler.json"
    (folder / missing).unlink()
    with pytest.raises(UserError, match=f"normalize_activations = '{mode}' but lacks .*{missing}"):
        load_entry("disk:checkpoint", context(adapter, tmp_path))


def test_neurons_are_the_identity_and_random_is_a_seeded_rotation(adapter, tmp_path: Path) -> None:
    neurons = load_entry("neurons:blocks.0.mlp.hook_post", context(adapter, tmp_path))
    x = torch.randn(10, D_MLP)
    assert torch.equal(neurons.encode(x), x) and torch.equal(neurons.decode(x), x)
    rotation = load_entry(f"random:{HOOK}", context(adapter, tmp_path, seed=3))
    basis = rotation.decoder_directions().double()
    torch.testing.assert_close(basis @ basis.T, torch.eye(D_MODEL, dtype=torch.float64), atol=1e-6, rtol=0)
    again = load_entry(f"random:{HOOK}", context(adapter, tmp_path, seed=3))
    other = load_entry(f"random:{HOOK}", context(adapter, tmp_path, seed=4))
    assert torch.equal(rotation.decoder_directions(), again.decoder_directions())
    assert not torch.equal(rotation.decoder_directions(), other.decoder_directions())
    x = torch.randn(10, D_MODEL)
    torch.testing.assert_close(rotation.decode(rotation.encode(x)), x, atol=1e-5, rtol=0)


def test_pca_fits_the_principal_axes_of_the_covariance(adapter, tmp_path: Path) -> None:
    pca = load_entry(f"pca:{HOOK}", context(adapter, tmp_path))
    assert pca.needs_fit
    axes = torch.linalg.qr(torch.randn(D_MODEL, D_MODEL, dtype=torch.float64))[0]
    variances = torch.linspace(16, 1, D_MODEL, dtype=torch.float64)
    pca.fit(torch.full((D_MODEL,), 5.0, dtype=torch.float64), axes @ torch.diag(variances) @ axes.T)
    overlap = (pca.decoder_directions().double() @ axes).abs()
    torch.testing.assert_close(overlap, torch.eye(D_MODEL, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("disk:nowhere", "does not exist"),
        ("neurons:blocks.0.mlp.hook_pots", "did you mean blocks.0.mlp.hook_post"),
        ("nerons:blocks.0.mlp.hook_post", "did you mean 'neurons'"),
        ("sae_lens:gpt2-small-res-jb/blocks.8.hook_resid_pre", "hub is unreachable"),
        ("sae_lens:gpt2-small-res-jbb/blocks.8.hook_resid_pre", "did you mean gpt2-small-res-jb"),
        ("no-scheme", "scheme:argument"),
    ],
)
def test_bad_uris_are_one_line_errors(adapter, tmp_path: Path, uri: str, message: str) -> None:
    with pytest.raises(UserError, match=message) as raised:
        load_entry(uri, context(adapter, tmp_path))
    assert "\n" not in str(raised.value)


def test_wrong_width_and_nan_weights_are_refused(adapter, tmp_path: Path) -> None:
    write_sae(tmp_path / "wide", "standard", D_MLP, 8, HOOK)
    with pytest.raises(UserError, match=r"d_in=32 but hook 'blocks.0.hook_resid_post' .* has width 16"):
        load_entry("disk:wide", context(adapter, tmp_path))
    from sae_lens import SAE

    folder = write_sae(tmp_path / "nan", "standard", D_MODEL, 8, HOOK)
    sae = SAE.load_from_disk(folder)
    with torch.no_grad():
        sae.W_enc[0, 0] = float("nan")
    sae.save_model(folder)
    with pytest.raises(UserError, match="non-finite values .* W_enc"):
        load_entry("disk:nan", context(adapter, tmp_path))


def test_registry_lists_every_builtin_scheme() -> None:
    assert SOURCES.names() == ["dictionary_learning", "disk", "neurons", "pca", "random", "sae_lens", "sparsify"]
