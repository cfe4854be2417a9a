"""The table of sae-lens architectures covers sae-lens's registries and says true things about each class; hook_z
SAEs, transcoders and AbsTopK SAEs are scored on what they were trained on, end to end through the CLI."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from saebench_poly.errors import UserError
from saebench_poly.leaderboard import units_path
from saebench_poly.metrics.feature_recovery import FeatureRecovery
from saebench_poly.models import ModelConfig
from saebench_poly.models.hooked import load_hooked_transformer
from saebench_poly.sources import SourceContext, load_entry
from saebench_poly.sources.architectures import ARCHITECTURES
from saebench_poly.sources.base import SAEEntry
from tests.conftest import D_MODEL, write_sae

HOOK_Z = "blocks.0.attn.hook_z"
ATTN_OUT = "blocks.0.hook_attn_out"
N_HEADS, D_HEAD = 4, 4


def _registries() -> tuple[dict, dict]:
    import sae_lens  # noqa: F401 - importing sae_lens fills its registries
    from sae_lens.registry import SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY

    return SAE_CLASS_REGISTRY, SAE_TRAINING_CLASS_REGISTRY


def _instance(architecture: str, d_in: int = 8, d_sae: int = 32):
    """A seeded random inference SAE of ``architecture`` (sae-lens's own class and config)."""
    sae_class, config_class = _registries()[0][architecture]
    fields = config_class.__dataclass_fields__
    options = {"k": 4} if "k" in fields else {}
    if "d_out" in fields:  # a transcoder: sae-lens refuses b_dec subtracted from its input
        options.update(d_out=d_in, apply_b_dec_to_input=False)
    cfg = config_class(d_in=d_in, d_sae=d_sae, **options)
    torch.manual_seed(0)
    sae = sae_class(cfg)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name == "threshold":
                param.fill_(0.01)
            else:
                param.copy_(torch.randn_like(param) * 0.3)
    return sae.eval()


def test_the_table_knows_every_architecture_sae_lens_registers() -> None:
    inference, training = _registries()
    unknown = sorted((set(inference) | set(training)) - set(ARCHITECTURES))
    assert not unknown, f"add these sae-lens architectures to saebench_poly/sources/architectures.py: {unknown}"
    for name in training.keys() - inference.keys():
        assert ARCHITECTURES[name].loads_as in inference, name
    for name in inference:
        assert not ARCHITECTURES[name].training_only, name


@pytest.mark.parametrize("architecture", sorted(_registries()[0]))
def test_each_row_says_what_its_sae_lens_class_does(architecture: str) -> None:
    from sae_lens.saes.transcoder import Transcoder

    row = ARCHITECTURES[architecture]
    sae_class = _registries()[0][architecture][0]
    assert row.transcoder == issubclass(sae_class, Transcoder)
    if not row.per_token:
        return
    sae = _instance(architecture)
    assert row.skip == hasattr(sae, "W_skip")
    if row.embedding_bias is not None:
        assert getattr(sae, row.embedding_bias).shape == (sae.cfg.d_sae,)
    x = torch.randn(256, sae.cfg.d_in, generator=torch.Generator().manual_seed(1))
    z = sae.encode(x)
    assert (z < 0).any() == row.signed, "a signed architecture's latents fire negative, the others' never do"
    if row.embedding_bias is not None:
        # the neuron-embedding identity: sum_k h_k w_uk + b_u, h = process_sae_in(x), is the latent's pre-activation
        pre = sae.process_sae_in(x) @ sae.W_enc + getattr(sae, row.embedding_bias)
        if row.embedding_bias == "b_enc":
            _, cache = sae.run_with_cache(x, names_filter="hook_sae_acts_pre")
            torch.testing.assert_close(cache["hook_sae_acts_pre"], pre)
        else:  # the gate path decides which latents fire
            assert (z != 0).any() and (pre[z != 0] > 0).all()


def test_an_architecture_the_table_does_not_know_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    sae = _instance("standard")
    monkeypatch.setattr(type(sae.cfg), "architecture", classmethod(lambda cls: "brand_new"))
    with pytest.raises(UserError, match="'brand_new', which saebench_poly's table of architectures"):
        SAEEntry(sae, name="x", uri="disk:x", hook="h")


def test_a_temporal_sae_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="encoder reads whole contexts"):
        SAEEntry(SimpleNamespace(cfg=SimpleNamespace(architecture=lambda: "temporal")), name="t", uri="disk:t", hook="h")


@pytest.fixture(scope="module")
def adapter(tiny_tl_model_dir: Path):
    return load_hooked_transformer(ModelConfig(loader="transformer_lens", name=str(tiny_tl_model_dir)), torch.device("cpu"), torch.float32)


def _context(adapter, base_dir: Path) -> SourceContext:
    return SourceContext(adapter=adapter, device=torch.device("cpu"), dtype=torch.float32, seed=0, base_dir=base_dir)


def test_a_hook_z_sae_encodes_the_flattened_heads_as_sae_lens_encodes_the_heads(adapter, tmp_path: Path) -> None:
    from sae_lens import SAE

    write_sae(tmp_path / "z", "standard", N_HEADS * D_HEAD, 32, HOOK_Z, reshape_activations="hook_z")
    entry = load_entry("disk:z", _context(adapter, tmp_path))
    heads = torch.randn(10, N_HEADS, D_HEAD)
    reference = SAE.load_from_disk(tmp_path / "z")  # reshaping on: takes [..., heads, d_head]
    z = entry.encode(heads.flatten(1))
    torch.testing.assert_close(z, reference.encode(heads))
    torch.testing.assert_close(entry.decode(z), reference.decode(reference.encode(heads)).flatten(1))


def test_a_hook_z_sae_is_scored_through_the_cli(tl_spec, run_cli, tmp_path: Path) -> None:
    write_sae(tmp_path / "z", "standard", N_HEADS * D_HEAD, 32, HOOK_Z, reshape_activations="hook_z")
    code, out, err = run_cli("run", str(tl_spec(entries=["disk:z"], hooks=[HOOK_Z])))
    assert code == 0, err
    rows = pd.read_parquet(tmp_path / "out" / "board.parquet")
    wide = rows.pivot_table(index="entry", columns="metric", values="value")
    assert math.isfinite(wide.loc["z", "fvu"]) and wide.loc["z", "fvu"] > 0
    assert math.isfinite(wide.loc["z", "kl_divergence"])


def _exact_transcoder(adapter, folder: Path) -> Path:
    """A ReLU transcoder from ``hook_z`` to ``hook_attn_out`` that is exact: z = [relu(x), relu(-x)],
    W_dec = [W_O; -W_O], b_dec = b_O, so x_hat = x W_O + b_O = the attention output."""
    from sae_lens.saes.transcoder import Transcoder, TranscoderConfig

    d = N_HEADS * D_HEAD
    attn = adapter.model.blocks[0].attn
    w_o = attn.W_O.detach().reshape(d, D_MODEL)
    cfg = TranscoderConfig(d_in=d, d_sae=2 * d, d_out=D_MODEL, apply_b_dec_to_input=False)
    cfg.metadata.hook_name, cfg.metadata.hook_name_out = HOOK_Z, ATTN_OUT
    sae = Transcoder(cfg)
    with torch.no_grad():
        eye = torch.eye(d)
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.b_enc.zero_()
        sae.W_dec.copy_(torch.cat([w_o, -w_o], dim=0))
        sae.b_dec.copy_(attn.b_O.detach())
    sae.save_model(folder)
    return folder


def test_a_transcoder_is_scored_against_its_output_hook_and_spliced_there(tl_spec, run_cli, adapter, tmp_path: Path) -> None:
    _exact_transcoder(adapter, tmp_path / "tc")
    entry = load_entry("disk:tc", _context(adapter, tmp_path))
    assert (entry.hook, entry.output_hook, entry.d_in, entry.d_out) == (HOOK_Z, ATTN_OUT, 16, D_MODEL)
    code, out, err = run_cli("run", str(tl_spec(entries=["disk:tc"], hooks=[HOOK_Z])))
    assert code == 0, err
    wide = pd.read_parquet(tmp_path / "out" / "board.parquet").pivot_table(index="entry", columns="metric", values="value")
    assert wide.loc["tc", "fvu"] == pytest.approx(0, abs=1e-5)
    assert wide.loc["tc", "kl_divergence"] == pytest.approx(0, abs=1e-5)
    assert wide.loc["tc", "ce_loss_recovered"] == pytest.approx(1, abs=1e-3)


def test_a_transcoder_without_an_output_hook_is_refused(adapter, tmp_path: Path) -> None:
    write_sae(tmp_path / "tc", "transcoder", D_MODEL, 32, "blocks.0.hook_resid_mid", d_out=D_MODEL,
              apply_b_dec_to_input=False)
    with pytest.raises(UserError, match="metadata.hook_name_out"):
        load_entry("disk:tc", _context(adapter, tmp_path))


def test_a_skip_transcoder_reconstructs_as_its_forward_does(adapter, tmp_path: Path) -> None:
    from sae_lens import SAE

    write_sae(tmp_path / "skip", "skip_transcoder", D_MODEL, 32, "blocks.0.hook_resid_mid", d_out=D_MODEL,
              apply_b_dec_to_input=False, seed=3)
    sae = SAE.load_from_disk(tmp_path / "skip")
    sae.cfg.metadata.hook_name_out = "blocks.0.hook_mlp_out"
    sae.save_model(tmp_path / "skip")
    entry = load_entry("disk:skip", _context(adapter, tmp_path))
    x = torch.randn(20, D_MODEL)
    torch.testing.assert_close(entry.reconstruct(x, entry.encode(x)), sae(x))
    assert not torch.allclose(entry.decode(entry.encode(x)), sae(x))


def test_abstopk_latents_that_fire_only_negatively_get_examples(tl_spec, run_cli, tmp_path: Path) -> None:
    from sae_lens import SAE

    write_sae(tmp_path / "abs", "abstopk", D_MODEL, 16, "blocks.0.hook_resid_post", k=2)
    sae = SAE.load_from_disk(tmp_path / "abs")
    with torch.no_grad():
        sae.b_enc[0] = -50.0  # latent 0: always the largest |pre-activation|, always negative
    sae.save_model(tmp_path / "abs")
    code, out, err = run_cli("run", str(tl_spec(entries=["disk:abs"])))
    assert code == 0, err
    units = pd.read_parquet(units_path(tmp_path / "out" / "board.parquet"))
    latent = units[(units["entry"] == "abs") & (units["unit"] == 0)].iloc[0]
    assert latent["max_activation"] < -40  # it never fires positively
    assert latent["n_examples"] > 0 and latent["poly_status"] != "dead"


def test_feature_recovery_of_signed_units_does_not_depend_on_their_signs() -> None:
    truth = torch.eye(3)
    adapter = SimpleNamespace(true_feature_directions=lambda hook: truth)

    def recovery(decoder: torch.Tensor, signed: bool) -> dict[str, float]:
        entry = SimpleNamespace(hook="h", output_hook="h", signed_units=signed, decoder_directions=lambda: decoder)
        return FeatureRecovery(entry, adapter).compute()

    flipped = torch.diag(torch.tensor([1.0, -1.0, -1.0]))
    assert recovery(flipped, signed=True) == recovery(torch.eye(3), signed=True) == {"mean_max_cosine": 1.0, "fraction_recovered": 1.0}
    assert recovery(flipped, signed=False) == {"mean_max_cosine": pytest.approx(1 / 3), "fraction_recovered": pytest.approx(1 / 3)}


def test_an_entry_point_that_takes_a_built_in_name_is_refused_naming_both(run_cli, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from saebench_poly.sources import SOURCES

    dist = tmp_path / "site" / "hostile_plugin-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: hostile-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[saebench_poly.sources]\ndisk = hostile_plugin:load\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(SOURCES, "_entry_points_loaded", False)
    monkeypatch.setattr(SOURCES, "_items", dict(SOURCES._items))
    monkeypatch.setattr(SOURCES, "_origins", dict(SOURCES._origins))
    code, out, err = run_cli("list")
    assert code != 0 and "Traceback" not in err
    message = err.strip()
    assert len(message.splitlines()) == 1 and message.startswith("saebench-poly: error:")
    assert "'disk' is registered twice" in message and "saebench_poly.sources.sae_lens_sources:load_disk" in message
    assert "hostile_plugin:load (package hostile-plugin)" in message
