"""The toy model of superposition: training, sampling, ground-truth directions, storage and the adapter."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from saebench_poly.errors import UserError
from saebench_poly.models import MODEL_LOADERS, ModelConfig
from saebench_poly.models.toy import (
    ToyModelAdapter,
    ToySuperpositionConfig,
    ToySuperpositionModel,
    load_toy_model_folder,
    save_toy_model,
    train_toy_model,
)

TINY = {"train_steps": 50, "batch_size": 64}


@pytest.fixture(scope="module")
def model() -> ToySuperpositionModel:
    return train_toy_model(ToySuperpositionConfig())


def load(folder, options=None, revision=None):
    cfg = ModelConfig(loader="toy", name=str(folder), options=options or {}, revision=revision)
    return MODEL_LOADERS.get("toy")(cfg, torch.device("cpu"), torch.float32)


def test_training_reconstructs_far_better_than_predicting_zero(model):
    x = model.sample_features(50_000, torch.Generator().manual_seed(1))
    importance = model.importance()
    with torch.no_grad():
        loss = (importance * (x - model(x)) ** 2).sum(1).mean()
    zero_loss = (importance * x**2).sum(1).mean()
    assert loss < 0.25 * zero_loss


def test_model_is_in_superposition(model):
    represented = model.true_feature_directions().norm(dim=1) > 0
    assert model.cfg.n_hidden < represented.sum() < model.cfg.n_features


def test_true_directions_are_unit_or_zero_and_match_single_feature_responses(model):
    directions = model.true_feature_directions()
    norms = directions.norm(dim=1)
    assert directions.shape == (model.cfg.n_features, model.cfg.n_hidden)
    assert torch.all(((norms - 1).abs() < 1e-5) | (norms == 0))
    assert torch.all(directions >= 0)
    with torch.no_grad():
        response = model.hidden(0.7 * torch.eye(model.cfg.n_features))
    represented = norms > 0
    cosine = torch.nn.functional.cosine_similarity(response[represented], directions[represented], dim=1)
    assert torch.allclose(cosine, torch.ones_like(cosine), atol=1e-5)
    assert torch.all(response[~represented].norm(dim=1) < 0.5 * 0.7)


def test_sampled_features_have_the_configured_sparsity():
    model = ToySuperpositionModel(ToySuperpositionConfig(feature_probability=0.2))
    x = model.sample_features(100_000, torch.Generator().manual_seed(0))
    p, n = 0.2, x.numel()
    active = x > 0
    assert abs(active.float().mean().item() - p) < 5 * (p * (1 - p) / n) ** 0.5
    assert x.min() >= 0 and x.max() <= 1
    assert abs(x[active].mean().item() - 0.5) < 0.01


def test_training_is_deterministic():
    cfg = ToySuperpositionConfig(**TINY)
    assert torch.equal(train_toy_model(cfg).W, train_toy_model(cfg).W)
    assert not torch.equal(train_toy_model(cfg).W, train_toy_model(cfg.model_copy(update={"seed": 1})).W)


def test_synthetic_batches_do_not_depend_on_batch_size(model):
    adapter = ToyModelAdapter(model, "toy-superposition/test")
    runs = {size: list(adapter.synthetic_batches(300, size, seed=3)) for size in (1, 7, 64)}
    samples = {size: torch.cat([batch.inputs for batch in batches]) for size, batches in runs.items()}
    assert samples[1].shape == (300, model.cfg.n_features)
    assert torch.equal(samples[1], samples[7]) and torch.equal(samples[1], samples[64])
    assert [len(batch.inputs) for batch in runs[64]] == [64, 64, 64, 64, 44]
    assert all(batch.score_mask.dtype == torch.bool and batch.score_mask.all() for batch in runs[7])
    assert runs[7][0].score_mask.shape == (7, 1)
    other_seed = torch.cat([batch.inputs for batch in adapter.synthetic_batches(300, 64, seed=4)])
    assert not torch.equal(samples[1], other_seed)


def test_adapter_reports_the_hidden_neurons(model):
    adapter = ToyModelAdapter(model, "toy-superposition/test")
    batch = next(adapter.synthetic_batches(16, 16, seed=0))
    output = adapter.forward(batch, ["hidden"])
    assert adapter.hook_names() == ["hidden"]
    assert adapter.hook_width("hidden") == model.cfg.n_hidden
    assert output.activations["hidden"].shape == (16, 1, model.cfg.n_hidden)
    assert torch.equal(output.activations["hidden"][:, 0], model.hidden(batch.inputs).detach())
    assert output.logits is None
    assert adapter.comparison_neuron_hook("hidden") == "hidden"
    assert torch.equal(adapter.true_feature_directions("hidden"), model.true_feature_directions())
    with pytest.raises(UserError, match="did you mean 'hidden'"):
        adapter.forward(batch, ["hiden"])
    with pytest.raises(UserError, match="no hook 'blocks.0.mlp'"):
        adapter.true_feature_directions("blocks.0.mlp")


def test_save_and_load_round_trip(model, tmp_path):
    save_toy_model(model, tmp_path / "toy")
    loaded = load_toy_model_folder(tmp_path / "toy")
    assert sorted(p.name for p in (tmp_path / "toy").iterdir()) == ["config.json", "model.safetensors"]
    assert loaded.cfg == model.cfg
    x = model.sample_features(1000, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        assert torch.equal(loaded.hidden(x), model.hidden(x))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda folder: (folder / "config.json").unlink(), "config.json is missing"),
        (lambda folder: (folder / "model.safetensors").unlink(), "model.safetensors is missing"),
        (lambda folder: (folder / "config.json").write_text("{not json"), "not a valid toy model config"),
        (lambda folder: (folder / "config.json").write_text(json.dumps({"n_feature": 3})), "n_feature"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b"\x00" * 12), "cannot be read as safetensors"),
        (lambda folder: save_file({"W": torch.zeros(2, 2)}, folder / "model.safetensors"), "holds tensors"),
    ],
)
def test_a_damaged_folder_is_a_one_line_user_error(tmp_path, damage, message):
    save_toy_model(ToySuperpositionModel(ToySuperpositionConfig()), tmp_path)
    damage(tmp_path)
    with pytest.raises(UserError, match=message) as error:
        load_toy_model_folder(tmp_path)
    assert "\n" not in str(error.value)


def test_loader_trains_once_then_reuses_the_folder(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()  # an empty folder counts as no model yet
    first = load(folder, TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy"]
    weights_written = (folder / "model.safetensors").stat().st_mtime_ns
    second = load(folder, TINY, revision=first.revision)
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights_written
    assert torch.equal(first.model.W, second.model.W)
    assert first.describe() == {"model_id": "toy-superposition/toy", "model_revision": first.revision,
                                "model_family": "toy"}


def test_loader_refuses_a_folder_trained_with_other_options(tmp_path):
    load(tmp_path / "toy", TINY)
    with pytest.raises(UserError, match="delete the folder"):
        load(tmp_path / "toy", {**TINY, "seed": 1})
    with pytest.raises(UserError, match="revision"):
        load(tmp_path / "toy", TINY, revision="0123456789ab")
    with pytest.raises(UserError, match="n_hiden"):
        load(tmp_path / "other", {"n_hiden": 4})
