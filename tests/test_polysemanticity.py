"""Neuron-embedding polysemanticity (Foote 2024): the embedding identity for every kind of unit, the exact selection of
characteristic examples, behaviours on inputs with known answers, and the toy benchmark's neurons against its SAEs."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from saebench_poly.inputs import Inputs
from saebench_poly.metrics import EntryBatch
from saebench_poly.metrics.behaviours import (
    NullCosines,
    average_linkage,
    connected_components,
    cosine_similarities,
    row_quantiles,
    unit_behaviours,
)
from saebench_poly.metrics.examples import ExampleSelector, example_keys
from saebench_poly.metrics.polysemanticity import Polysemanticity, PolysemanticityOptions
from saebench_poly.models import Batch, ModelConfig
from saebench_poly.models.base import ForwardOutput, ModelAdapter, UnitInputs
from saebench_poly.models.hooked import HookedTransformerAdapter, load_hooked_transformer
from saebench_poly.revisit import revisit_accumulators
from saebench_poly.run import run_benchmark
from saebench_poly.sources import SourceContext, load_entry
from saebench_poly.sources.base import BasisEntry
from saebench_poly.spec import load_spec, with_overrides
from tests.conftest import D_MODEL, copy_of_toy_spec, write_sae

CPU = torch.device("cpu")
RESID = "blocks.0.hook_resid_post"
REPOSITORY = Path(__file__).resolve().parent.parent


def token_batch(vocab: int = 32, contexts: int = 3, length: int = 8, seed: int = 0) -> Batch:
    tokens = torch.randint(1, vocab, (contexts, length), generator=torch.Generator().manual_seed(seed))
    return Batch(tokens, torch.ones(contexts, length, dtype=torch.bool))


def pre_activation_from_embeddings(inputs: UnitInputs, batch: Batch) -> torch.Tensor:
    """sum_k e_u(x)_k + b_u with e_u(x) = h(x) ⊙ w_u, at every token: ``[batch, positions, width]``."""
    h = inputs.capture(batch).to(torch.float64)
    embeddings = h[..., None, :] * inputs.weight.to(torch.float64)
    return embeddings.sum(dim=-1) + inputs.bias.to(torch.float64)


# --- the identity sum(e) + b = the unit's pre-activation ----------------------------------------------------------


@pytest.mark.parametrize(("normalization", "gated", "fold"), [("LN", False, False), ("LN", False, True), ("RMS", True, False)])
def test_identity_for_transformer_lens_neurons(normalization: str, gated: bool, fold: bool) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=16, n_ctx=16, d_head=4, n_heads=4, d_mlp=24, d_vocab=32,
                                  act_fn="gelu", normalization_type=normalization, gated_mlp=gated, seed=0)
    model = HookedTransformer(cfg)
    with torch.no_grad():  # LayerNorm scale and shift and b_in away from their (trivial) initial values
        for name, param in model.named_parameters():
            if ".ln" in name or name.endswith("b_in"):
                param.add_(torch.randn_like(param) * 0.3)
    if fold:
        model.process_weights_(fold_ln=True, center_writing_weights=False, center_unembed=False)
    adapter = HookedTransformerAdapter(model, "tiny", None)
    inputs = adapter.neuron_inputs("blocks.1.mlp.hook_post")
    assert inputs.source == "blocks.1.ln2.hook_normalized"
    batch = token_batch()
    _, cache = model.run_with_cache(batch.inputs, names_filter=["blocks.1.mlp.hook_pre"])
    torch.testing.assert_close(pre_activation_from_embeddings(inputs, batch), cache["blocks.1.mlp.hook_pre"].double(),
                               atol=1e-5, rtol=0)
    assert adapter.neuron_inputs(RESID) is None  # a residual-stream dimension has no input weights


@pytest.mark.parametrize(("architecture", "neurons", "linear", "source"), [
    # GPT-2's c_fc reads ln_2's output: its scale and shift are folded into the weights, as transformer-lens does
    ("gpt2", "transformer.h.1.mlp.act", "transformer.h.1.mlp.c_fc", "normalised input of transformer.h.1.ln_2"),
    ("llama", "model.layers.0.mlp.act_fn", "model.layers.0.mlp.gate_proj", "input of model.layers.0.mlp.gate_proj"),
])
def test_identity_for_hugging_face_neurons(tmp_path: Path, architecture: str, neurons: str, linear: str,
                                           source: str) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from saebench_poly.models.hf import load_hf_model

    torch.manual_seed(0)
    if architecture == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2))
    model.save_pretrained(tmp_path, safe_serialization=True)
    adapter = load_hf_model(ModelConfig(loader="hf", name=str(tmp_path)), CPU, torch.float32)
    inputs = adapter.neuron_inputs(neurons)
    assert inputs.source == source
    batch = token_batch()
    outputs: list[torch.Tensor] = []
    handle = adapter.model.get_submodule(linear).register_forward_hook(lambda module, args, output: outputs.append(output.detach()))
    try:
        adapter.forward(batch, [neurons])
    finally:
        handle.remove()
    torch.testing.assert_close(pre_activation_from_embeddings(inputs, batch), outputs[0].double(), atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tl_adapter(tiny_tl_model_dir: Path) -> HookedTransformerAdapter:
    return load_hooked_transformer(ModelConfig(loader="transformer_lens", name=str(tiny_tl_model_dir)), CPU, torch.float32)


def batchtopk_checkpoint(folder: Path) -> Path:
    """A BatchTopK training checkpoint; the ``disk:`` source loads it as sae-lens converts it (JumpReLU)."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    torch.manual_seed(0)
    sae = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_MODEL, d_sae=32, k=4))
    sae.cfg.metadata.hook_name = RESID
    with torch.no_grad():
        sae.W_enc.mul_(30)  # sae-lens initialises it at norm 0.01 per latent: too small to fire on these activations
        sae.topk_threshold.fill_(0.05)
    sae.save_model(folder)
    return folder


@pytest.mark.parametrize(("architecture", "options"), [
    ("standard", {}), ("standard", {"apply_b_dec_to_input": False, "normalize_activations": "layer_norm"}),
    ("topk", {"k": 4}), ("topk", {"k": 4, "rescale_acts_by_decoder_norm": True}), ("batchtopk", {}),
    ("jumprelu", {}), ("gated", {}),
])
def test_identity_for_every_sae_lens_architecture(tl_adapter, tmp_path: Path, architecture: str, options: dict) -> None:
    if architecture == "batchtopk":
        batchtopk_checkpoint(tmp_path / "sae")
    else:
        write_sae(tmp_path / "sae", architecture, D_MODEL, 32, RESID, **options)
    entry = load_entry("disk:sae", SourceContext(adapter=tl_adapter, device=CPU, dtype=torch.float32, seed=0, base_dir=tmp_path))
    sae = entry.sae
    batch = token_batch()
    ours = pre_activation_from_embeddings(entry.unit_inputs(tl_adapter), batch)
    x = tl_adapter.forward(batch, [RESID], logits=False).activations[RESID]
    with torch.no_grad():
        _, cache = sae.run_with_cache(x, names_filter=["hook_sae_acts_pre"])
        z = sae.encode(x)
    pre = cache["hook_sae_acts_pre"].double()
    if architecture == "gated":  # ours is the gate path; the hook holds the magnitude path, W_enc exp(r_mag) and b_mag
        magnitude = (ours - sae.b_gate.double()) * sae.r_mag.double().exp() + sae.b_mag.double()
        torch.testing.assert_close(magnitude, pre, atol=1e-5, rtol=0)
        assert torch.equal(z > 0, (ours > 0) & (pre > 0))
        return
    if options.get("rescale_acts_by_decoder_norm"):
        pre = pre * sae.W_dec.double().norm(dim=-1)
    torch.testing.assert_close(ours, pre, atol=1e-5, rtol=0)
    active = z > 0
    assert active.any() and entry.architecture == ("jumprelu" if architecture == "batchtopk" else architecture)
    torch.testing.assert_close(ours[active], z[active].double(), atol=1e-5, rtol=0)  # an active latent is its pre-activation


# --- exact selection of characteristic examples ---------------------------------------------------------------------


def splitmix64(x: int) -> int:
    mask = 2**64 - 1
    x = (x + 0x9E3779B97F4A7C15) & mask
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
    return x ^ (x >> 31)


def brute_force_sample(z: torch.Tensor, context: torch.Tensor, position: torch.Tensor, fraction: float, size: int,
                       seed: int) -> list[list[tuple[int, int]]]:
    """The definition, unit by unit in plain Python: per context its max and first argmax, the contexts at or above
    fraction x the unit's max (and > 0), then the `size` with the smallest keys."""
    samples = []
    for unit in range(z.shape[1]):
        best: dict[int, tuple[float, int]] = {}
        for row in range(z.shape[0]):
            c, p, value = int(context[row]), int(position[row]), float(z[row, unit])
            if c not in best or value > best[c][0] or (value == best[c][0] and p < best[c][1]):
                best[c] = (value, p)
        top = max(value for value, _ in best.values())
        chosen = [(c, p) for c, (value, p) in best.items() if value > 0 and value >= fraction * top]
        key = {c: splitmix64((splitmix64((splitmix64(seed) + unit) % 2**64) + c) % 2**64) >> 2 for c, _ in chosen}
        samples.append(sorted(chosen, key=lambda pair: (key[pair[0]], pair[0]))[:size])
    return samples


def streamed_sample(z, context, position, fraction, size, seed, batch_contexts, order=None, device=CPU, sparse=False):
    """``sparse``: each batch also hands over its non-zero entries, as a sparse batch's `EntryBatch` does."""
    selector = ExampleSelector(z.shape[1], fraction, size, seed)
    n_contexts = int(context.max()) + 1
    starts = list(range(0, n_contexts, batch_contexts))
    for start in (starts if order is None else [starts[i] for i in order(len(starts))]):
        rows = (context >= start) & (context < start + batch_contexts)
        codes = z[rows].to(device)
        active = codes.bool().nonzero(as_tuple=True) if sparse else None
        selector.update(codes, context[rows].to(device), position[rows].to(device), active)
    result = selector.result()
    counts = result.count.tolist()
    return [list(zip(result.context[u, : counts[u]].tolist(), result.position[u, : counts[u]].tolist(), strict=True))
            for u in range(z.shape[1])]


@pytest.fixture(scope="module")
def codes() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes of 12 units on 240 contexts of 5 tokens: dense, sparse, signed, tied, dead and never-positive units."""
    generator = torch.Generator().manual_seed(0)
    n, width = 240 * 5, 12
    z = torch.randn(n, width, generator=generator) * torch.linspace(0.5, 3, width)
    z[:, 0] = torch.randint(3, (n,), generator=generator).to(z.dtype)  # ties, across contexts and within them
    z[:, 1] = 0.0  # dead
    z[:, 2] = -torch.rand(n, generator=generator)  # never positive
    z[:, 3] = torch.rand(n, generator=generator)  # dense: most contexts qualify, the sample is full
    z[:, 4] = torch.relu(z[:, 4] - 2)  # nearly dead: a few contexts qualify
    context = torch.arange(240).repeat_interleave(5)
    position = torch.arange(5).repeat(240)
    return z, context, position


def test_the_null_cut_is_the_quantile_of_the_units_own_null_cosines() -> None:
    """`NullCosines.cut` against its definition: the quantiles of cos(D_a ⊙ w_u, D_b ⊙ w_u) over the pairs a < b,
    with a zero embedding (a null token whose deviation is zero on the unit's weights) at cosine 0."""
    generator = torch.Generator().manual_seed(3)
    deviations = torch.randn(20, 12, dtype=torch.float64, generator=generator)
    deviations[4] = 0.0  # a null token at the centre
    weight = torch.randn(5, 12, dtype=torch.float64, generator=generator)
    weight[1, :6] = 0.0
    deviations[7, 6:] = 0.0  # zero on unit 1's weights
    quantiles = (0.9, 0.5, 0.99)
    embeddings = deviations[None] * weight[:, None, :]
    cosines = cosine_similarities(embeddings, torch.ones(embeddings.shape[:2], dtype=torch.bool))
    first, second = torch.triu_indices(20, 20, offset=1)
    expected = cosines[:, first, second].quantile(torch.tensor(quantiles, dtype=torch.float64), dim=1).T
    torch.testing.assert_close(NullCosines(deviations).cut(weight, quantiles), expected, rtol=0, atol=1e-12)
    assert cosines[1, 7, 3] == 0 and cosines[0, 4, 2] == 0


def test_row_quantiles_are_torchs_quantiles() -> None:
    generator = torch.Generator().manual_seed(4)
    values = torch.rand(7, 301, dtype=torch.float64, generator=generator)
    values[2, :150] = 0.5  # ties
    values[5, 3] = torch.nan
    quantiles = (0.9, 0.0, 0.5, 0.999, 1.0)
    expected = values.quantile(torch.tensor(quantiles, dtype=torch.float64), dim=1).T
    torch.testing.assert_close(row_quantiles(values, quantiles), expected, rtol=0, atol=0, equal_nan=True)


def test_example_keys_are_splitmix64() -> None:
    for seed, unit, context in [(0, 0, 0), (3, 5, 123_456_789), (-1, 2**20, 2**40)]:
        expected = splitmix64((splitmix64((splitmix64(seed % 2**64) + unit) % 2**64) + context) % 2**64) >> 2
        assert int(example_keys(seed, torch.tensor([unit]), torch.tensor([context]))[0]) == expected


def test_selection_is_the_definition_whatever_the_batch_size_and_order(codes) -> None:
    z, context, position = codes
    reference = brute_force_sample(z, context, position, 0.75, 10, seed=3)
    counts = [len(sample) for sample in reference]
    assert counts[0] == counts[3] == 10 and counts[1] == counts[2] == 0 and 0 < counts[4] < 10
    for batch_contexts in (1, 7, 64):
        assert streamed_sample(z, context, position, 0.75, 10, 3, batch_contexts) == reference, batch_contexts
    shuffled = lambda n: random.Random(1).sample(range(n), n)  # noqa: E731
    assert streamed_sample(z, context, position, 0.75, 10, 3, 7, order=shuffled) == reference
    assert streamed_sample(z, context, position, 0.75, 10, 3, 7, sparse=True) == reference  # from the active entries
    assert streamed_sample(z, context, position, 0.75, 10, 4, 7) != reference  # another seed, another sample


def test_pruning_the_store_unit_by_unit_changes_nothing(codes, monkeypatch) -> None:
    from saebench_poly.metrics import examples

    z, context, position = codes
    reference = streamed_sample(z, context, position, 0.75, 10, 3, 1)
    monkeypatch.setattr(examples, "PRUNE_CHUNK", 1)  # one unit per chunk
    assert streamed_sample(z, context, position, 0.75, 10, 3, 1) == reference
    # and the pruned store itself, column by column
    selector = ExampleSelector(z.shape[1], 0.75, 10, 3)
    selector._pruned_capacity = 10**9  # no pruning while fed
    selector.update(z, context, position)
    stores = []
    for chunk in (1, 10**9):
        copy = ExampleSelector(z.shape[1], 0.75, 10, 3)
        for name in ("maximum", "context", "position", "activation"):
            setattr(copy, name, getattr(selector, name).clone())
        monkeypatch.setattr(examples, "PRUNE_CHUNK", chunk)
        copy._prune(copy._threshold())
        stores.append([copy.context, copy.position, copy.activation])
    assert stores[0][0].shape[1] < selector.context.shape[1]  # it pruned
    assert all(torch.equal(a, b) for a, b in zip(*stores, strict=True))


def test_the_store_grows_in_place_with_room_to_spare(codes) -> None:
    z, context, position = codes
    selector = ExampleSelector(z.shape[1], 0.75, 10, 3)
    selector._pruned_capacity = 10**9  # no pruning while fed
    for rows in torch.arange(len(z)).split(7):
        before = selector.context
        selector.update(z[rows], context[rows], position[rows])
        assert selector.used <= selector.context.shape[1]
        if before is not None and selector.context.shape == before.shape:
            assert selector.context.data_ptr() == before.data_ptr()  # written in place: no copy of the store
    assert selector.context.shape[1] > selector.used  # room to spare, all padding
    assert (selector.context[:, selector.used :] == -1).all()
    assert (selector.activation[:, selector.used :] == -torch.inf).all()
    assert selector.position.dtype == torch.int32 and not hasattr(selector, "key")  # 20 bytes a candidate


# --- behaviours on known answers ------------------------------------------------------------------------------------


class PatternAdapter(ModelAdapter):
    """A model whose activations at hook ``x`` are its inputs: contexts of 3 positions, 4 dimensions."""

    model_id, family = "patterns", "test"

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def hook_names(self) -> list[str]:
        return ["x"]

    def hook_width(self, hook: str) -> int:
        return self.data.shape[-1]

    def forward(self, batch: Batch, hooks, logits: bool = True) -> ForwardOutput:
        self.forwards = getattr(self, "forwards", 0) + 1
        return ForwardOutput(activations={"x": batch.inputs})

    @property
    def device(self) -> torch.device:
        return self.data.device

    def contexts(self, indices: torch.Tensor, batch_size: int = 16) -> Iterator[tuple[torch.Tensor, Batch]]:
        indices = torch.unique(indices.cpu())
        for chunk in indices.split(batch_size):
            inputs = self.data[chunk.to(self.data.device)]
            yield chunk, Batch(inputs, torch.ones(inputs.shape[:2], dtype=torch.bool, device=inputs.device))


def pattern_data(patterns: list[list[float]], contexts: int = 300, seed: int = 0) -> torch.Tensor:
    """Each context: one pattern (drawn at random) times an amplitude in [0.5, 1] at a random position, small noise
    elsewhere and on top."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.tensor(patterns)
    data = 0.01 * torch.rand(contexts, 3, 4, generator=generator)
    which = torch.randint(len(patterns), (contexts,), generator=generator)
    where = torch.randint(3, (contexts,), generator=generator)
    amplitude = 0.5 + 0.5 * torch.rand(contexts, generator=generator)
    data[torch.arange(contexts), where] += amplitude[:, None] * basis[which]
    return data


class PositiveDirections(BasisEntry):
    """Directions read on their positive side only, as neurons are (`Entry.signed_units` False)."""

    @property
    def signed_units(self) -> bool:
        return False


def behaviours_of(data: torch.Tensor, basis: torch.Tensor | None = None, signed: bool = False, **options) -> pd.DataFrame:
    """The per-unit polysemanticity of directions, by default w = (1, 1, 1, 1) / 2, which every pattern drives, and
    -w, which nothing drives on its positive side (dead), read as neurons are; ``signed``: read on both sides."""
    adapter = PatternAdapter(data)
    if basis is None:
        direction = torch.full((1, 4), 0.5, device=data.device)
        basis = torch.cat([direction, -direction])
    kind = BasisEntry if signed else PositiveDirections
    entry = kind(name="directions", uri="test:directions", kind="random", hook="x", basis=basis.to(data.device))
    (accumulator,) = scored_accumulators(adapter, [entry], PolysemanticityOptions(**options))
    revisit_accumulators(adapter, [accumulator], adapter.contexts)
    return pd.DataFrame(accumulator.unit_values()), accumulator.compute()


def scored_accumulators(adapter: PatternAdapter, entries: list[BasisEntry], options: PolysemanticityOptions) -> list[Polysemanticity]:
    """One Polysemanticity accumulator per entry, fed every context of the adapter's data (not yet revisited)."""
    accumulators = [Polysemanticity(entry, adapter, options) for entry in entries]
    for indices, batch in adapter.contexts(torch.arange(adapter.data.shape[0]), batch_size=32):
        context, position = batch.score_mask.nonzero(as_tuple=True)
        x = batch.inputs[batch.score_mask]
        for entry, accumulator in zip(entries, accumulators, strict=True):
            accumulator.update(EntryBatch(x=x, z=entry.encode(x), x_hat=x, context=indices.to(x.device)[context],
                                          position=position))
    return accumulators


def test_a_unit_driven_by_two_orthogonal_patterns_has_two_behaviours_and_by_one_pattern_one() -> None:
    two, two_summary = behaviours_of(pattern_data([[1, 1, 0, 0], [0, 0, 1, 1]]))
    one, one_summary = behaviours_of(pattern_data([[1, 1, 0, 0]]))
    assert two.loc[0, "n_examples"] == one.loc[0, "n_examples"] == 100
    assert two.loc[0, "n_behaviours"] == 2 and one.loc[0, "n_behaviours"] == 1
    assert 1.8 < two.loc[0, "effective_behaviours"] <= 2 and one.loc[0, "effective_behaviours"] == 1
    assert sum(two.loc[0, "behaviour_sizes"]) == 100 and len(two.loc[0, "central_examples"]) == 2
    assert abs(two.loc[0, "mean_example_cosine"] - 0.5) < 0.1 and one.loc[0, "mean_example_cosine"] > 0.99
    sweep = dict(zip(two.loc[0, "cut_sweep"], two.loc[0, "n_behaviours_sweep"], strict=True))
    # more behaviours only at cuts near the null's top; at q = 0.5 the cut is about 0 (centred noise in 4 dimensions),
    # the cross cosine of orthogonal patterns, and they may join
    assert all(sweep[q] == 2 for q in sweep if 0.8 <= q <= 0.95)
    assert list(sweep.values()) == sorted(sweep.values())
    # the dead direction has no examples: too few, never monosemantic
    assert two.loc[1, "poly_status"] == "too_few_examples" and two.loc[1, "n_examples"] == 0
    assert pd.isna(two.loc[1, "n_behaviours"]) and two.loc[1, "behaviour_sizes"] is None
    assert two_summary["monosemantic_fraction"] == 0 and one_summary["monosemantic_fraction"] == 0.5
    assert one_summary["too_few_examples_fraction"] == 0.5 and two_summary["mean_behaviours"] == 2


def test_a_signed_direction_is_characterised_on_both_sides() -> None:
    """w = (1, 1, -1, -1) / 2: pattern A drives it up, pattern B down. Read on both sides (PCA and random
    directions are), its examples come from A and B, two behaviours; read on its positive side, A alone."""
    data = pattern_data([[1, 1, 0, 0], [0, 0, 1, 1]])
    basis = torch.tensor([[0.5, 0.5, -0.5, -0.5]])
    both, _ = behaviours_of(data, basis, signed=True)
    positive, _ = behaviours_of(data, basis, signed=False)
    assert both.loc[0, "n_behaviours"] == 2 and positive.loc[0, "n_behaviours"] == 1
    sides = {bool(data[c["context"], c["position"]][:2].sum() > 0.1) for c in both.loc[0, "central_examples"]}
    assert sides == {True, False}  # one behaviour on each side
    assert all(35 < size < 65 for size in both.loc[0, "behaviour_sizes"])


def test_central_examples_are_real_examples_of_each_behaviour() -> None:
    data = pattern_data([[1, 1, 0, 0], [0, 0, 1, 1]])
    units, _ = behaviours_of(data, max_examples=40)
    for central, size in zip(units.loc[0, "central_examples"], units.loc[0, "behaviour_sizes"], strict=True):
        x = data[central["context"], central["position"]]
        assert x.sum() > 0.5 * 0.75  # a most-active token of its context
        assert size >= 1
    patterns = {int(data[c["context"], c["position"]][:2].sum() < 0.1) for c in units.loc[0, "central_examples"]}
    assert patterns == {0, 1}  # one central example of each pattern


def test_connected_components_of_a_path_a_star_and_isolated_nodes() -> None:
    n = 6
    adjacency = torch.zeros(3, n, n, dtype=torch.bool)
    for i in range(n - 1):  # a path 5 - 4 - ... - 0: the slowest case for label propagation
        adjacency[0, i, i + 1] = adjacency[0, i + 1, i] = True
    adjacency[1, 5, :4] = adjacency[1, :4, 5] = True  # a star centred on 5, and node 4 alone
    labels = connected_components(adjacency)
    assert labels.tolist() == [[0] * 6, [0, 0, 0, 0, 4, 0], list(range(6))]
    result = unit_behaviours(torch.eye(4).expand(2, 4, 4), torch.tensor([[True] * 4, [True, True, False, False]]),
                             "components", [0.5])
    assert result.n_behaviours[:, 0].tolist() == [4, 2] and result.effective.tolist() == pytest.approx([4, 2])


# --- runs ---------------------------------------------------------------------------------------------------------


def test_the_re_run_gives_each_batch_one_forward_for_every_hook_and_entry(tl_spec, tmp_path: Path, monkeypatch) -> None:
    """An SAE at the residual stream, its PCA and random baselines, and the MLP neurons (read at
    ln2 of its block): every batch of the re-run after the pass is one forward of the transformer-lens model."""
    from transformer_lens import HookedTransformer

    import saebench_poly.revisit as revisit

    write_sae(tmp_path / "resid-sae", "standard", D_MODEL, 24, RESID)
    counts = {"batches": 0, "forwards": 0, "rounds": 0}
    read, forward = revisit.read_rows, HookedTransformer.run_with_cache

    def counted_read(adapter, requests, contexts):
        def counted_contexts(indices):
            for item in contexts(indices):
                counts["batches"] += 1
                yield item
        counts["filling"], counts["rounds"] = True, counts["rounds"] + 1
        rows = read(adapter, requests, counted_contexts)
        counts["filling"] = False
        return rows

    def counted_forward(self, *args, **kwargs):
        counts["forwards"] += bool(counts.get("filling"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(revisit, "read_rows", counted_read)
    monkeypatch.setattr(HookedTransformer, "run_with_cache", counted_forward)
    result = run_benchmark(load_spec(tl_spec(entries=["disk:resid-sae"], tokens=300)), write=False)
    assert {"resid-sae", f"pca:{RESID}", f"random:{RESID}", "neurons:blocks.0.mlp.hook_post"} <= set(result.units["entry"])
    assert counts["rounds"] == 1  # one re-run after the pass, for every entry
    assert counts["batches"] > 0 and counts["forwards"] == counts["batches"]


def test_run_reports_every_unit_and_says_plainly_which_have_no_embedding(tl_spec, tmp_path: Path) -> None:
    write_sae(tmp_path / "resid-sae", "standard", D_MODEL, 24, RESID)
    loaded = load_spec(tl_spec(entries=["disk:resid-sae"], tokens=300))
    result = run_benchmark(loaded)
    units = pd.read_parquet(result.output.with_name("board.units.parquet"))
    status = units.groupby("entry")["poly_status"].agg(set)
    assert status[f"neurons:{RESID}"] == {"no_embedding"}  # a residual-stream dimension has no input weights
    resid = units[units["entry"] == f"neurons:{RESID}"]
    assert resid["n_behaviours"].isna().all() and resid["central_examples"].isna().all()
    poly_rows = result.rows[result.rows["metric_family"] == "polysemanticity"]
    assert f"neurons:{RESID}" not in set(poly_rows["entry"])
    assert {"resid-sae", "neurons:blocks.0.mlp.hook_post", f"pca:{RESID}", f"random:{RESID}"} <= set(poly_rows["entry"])
    assert set(poly_rows["metric"]) >= {"mean_effective_behaviours", "monosemantic_fraction", "too_few_examples_fraction"}
    described = units[units["poly_status"] != "no_embedding"]
    assert (described["n_examples"] <= 100).all() and (described["behaviour_rule"] == PolysemanticityOptions().describe_rule()).all()
    contexts = int(np.ceil(300 / 11))
    for examples in described["central_examples"].dropna():
        for example in examples:
            assert 0 <= example["context"] < contexts and 1 <= example["position"] < 12  # BOS (position 0) is never scored


def test_scored_contexts_are_the_contexts_that_were_scored(tl_spec, tl_adapter) -> None:
    spec = load_spec(tl_spec(tokens=300, batch_size=4)).spec
    inputs = Inputs(spec, tl_adapter)
    every = torch.cat([b.inputs for b in inputs.batches("score")])
    wanted = torch.tensor([26, 0, 5, 6, 7, 13, 5])
    fetched = list(inputs.scored_contexts(wanted, batch_size=3))
    assert [len(i) for i, _ in fetched] == [3, 3] and torch.equal(torch.cat([i for i, _ in fetched]), torch.unique(wanted))
    assert torch.equal(torch.cat([b.inputs for _, b in fetched]), every[torch.unique(wanted)])


@pytest.mark.slow
def test_foote_rule_on_the_toy_benchmark_gives_polysemantic_neurons_more_behaviours_than_single_feature_latents(tmp_path) -> None:
    """Foote's fixed-tau rule, kept as an option, on the 8-d toy it was calibrated on (its numbers reproduce); the
    default rule's cut sits near 1 in so few dimensions (README)."""
    from sae_lens import SAE

    from saebench_poly.models.toy import load_toy_model_folder

    loaded = with_overrides(load_spec(copy_of_toy_spec(tmp_path)), {"tokens": 20000, "output": str(tmp_path / "toy.parquet"),  # as the end-to-end test
                                              "metric_options": {"polysemanticity": {"rule": "components"}}})
    units = run_benchmark(loaded, write=False).units
    units = units[units["poly_status"] == "ok"]
    model = load_toy_model_folder(loaded.spec.model.name)
    truth_directions = model.true_feature_directions()
    features_per_neuron = (truth_directions.T > 0.2).sum(dim=1).numpy()
    neurons = units[units["entry"] == "neurons:hidden"]
    polysemantic = neurons[features_per_neuron[neurons["unit"]] >= 2]
    represented = truth_directions[truth_directions.norm(dim=1) > 0]
    latents = []
    for trained in loaded.spec.train:
        sae = SAE.load_from_disk(loaded.artifacts_dir / "saes" / trained.name)
        decoder = sae.W_dec.detach() / sae.W_dec.detach().norm(dim=1, keepdim=True)
        single = set(np.flatnonzero((decoder @ represented.T).amax(dim=1).numpy() > 0.9))
        rows = units[units["entry"] == trained.name]
        latents.append(rows[rows["unit"].isin(single)])
    latents = pd.concat(latents)
    assert len(polysemantic) >= 3 and len(latents) >= 20
    assert polysemantic["n_behaviours"].mean() > latents["n_behaviours"].mean() + 1
    assert polysemantic["effective_behaviours"].mean() > latents["effective_behaviours"].mean()


# --- the device ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_gives_the_same_per_unit_results_as_the_cpu(codes) -> None:
    z, context, position = codes
    cuda = torch.device("cuda")
    for batch_contexts in (7, 64):
        assert streamed_sample(z, context, position, 0.75, 10, 3, batch_contexts, device=cuda) == \
            streamed_sample(z, context, position, 0.75, 10, 3, batch_contexts)
    data = pattern_data([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0]])
    on_cpu, cpu_summary = behaviours_of(data)
    on_gpu, gpu_summary = behaviours_of(data.to(cuda))
    pd.testing.assert_frame_equal(on_gpu.drop(columns=["mean_example_cosine", "effective_behaviours", "largest_behaviour_share"]),
                                  on_cpu.drop(columns=["mean_example_cosine", "effective_behaviours", "largest_behaviour_share"]))
    for column in ("mean_example_cosine", "effective_behaviours", "largest_behaviour_share"):
        np.testing.assert_allclose(on_gpu[column], on_cpu[column], rtol=1e-9)
    assert gpu_summary == pytest.approx(cpu_summary, rel=1e-9, nan_ok=True)


def test_behaviours_at_every_tau_of_a_sweep_are_the_components_of_each_graph() -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(6, 30, 5, generator=generator).relu()
    valid = torch.rand(6, 30, generator=generator) < 0.8
    valid[0] = False  # a unit without examples
    valid[1, 1:] = False  # and one with one example
    taus = [0.9, 0.3, 0.5, 0.7, 0.8, 0.95]
    result = unit_behaviours(embeddings, valid, "components", taus)
    similarity = cosine_similarities(embeddings, valid)
    pair = valid[:, :, None] & valid[:, None, :]
    for i, tau in enumerate(taus):
        labels = connected_components((similarity > tau) & pair)
        expected = ((labels == torch.arange(30)) & valid).sum(dim=1)
        assert result.n_behaviours[:, i].tolist() == expected.tolist()
    assert result.n_behaviours[:2, 0].tolist() == [0, 1] and len(set(result.n_behaviours[2:, 3].tolist())) > 1


def test_average_linkage_without_the_split_is_scipys_upgma_cut_at_every_cut() -> None:
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    from scipy.spatial.distance import squareform

    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(5, 24, 6, generator=generator) + torch.randn(5, 1, 6, generator=generator)
    valid = torch.ones(5, 24, dtype=torch.bool)
    valid[4, 17:] = False  # fewer examples in one unit
    similarity = cosine_similarities(embeddings, valid)
    cuts = torch.tensor([0.2, -0.2, 0.0, 0.4, 0.6]).expand(5, -1)
    labels, n_groups = average_linkage(similarity, valid, cuts)
    for unit in range(5):
        n = int(valid[unit].sum())
        distance = (1 - similarity[unit, :n, :n]).clamp_min(0).fill_diagonal_(0).numpy()
        tree = hierarchy.linkage(squareform(distance, checks=False), method="average")
        for column, cut in enumerate(cuts[unit].tolist()):
            expected = hierarchy.fcluster(tree, t=1 - cut, criterion="distance")
            assert n_groups[unit, column] == len(set(expected))
            if column == 0:  # the same partition, not only the same count
                ours = labels[unit, :n].numpy()
                assert len({(a, b) for a, b in zip(ours, expected, strict=True)}) == len(set(expected))


def absorbed_pair(sizes: tuple[int, int], between: float, d: int = 400, seed: int = 0) -> torch.Tensor:
    """Examples of two behaviours whose signals s_A, s_B (unit norm, cos(s_A, s_B) = ``between``) each carry half of
    an example's energy, the rest being noise: within a behaviour cos ~ 0.5, between them ~ 0.5 ``between``."""
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.linalg.qr(torch.randn(d, 2, generator=generator))[0].T
    signals = [a, between * a + (1 - between**2) ** 0.5 * b]
    rows = [signal + torch.randn(size, d, generator=generator) / d**0.5 for signal, size in zip(signals, sizes, strict=True)]
    return torch.cat(rows)[None]


def test_the_split_separates_two_behaviours_that_resemble_each_other_less_than_themselves() -> None:
    cut = torch.tensor([[0.1]])  # both pairs of behaviours are far above it

    def groups(embeddings: torch.Tensor, ratio: float, size: int = 2) -> int:
        valid = torch.ones(embeddings.shape[:2], dtype=torch.bool)
        similarity = cosine_similarities(embeddings, valid)
        return int(average_linkage(similarity, valid, cut, ratio, torch.tensor([size]))[1][0, 0])

    absorbed = absorbed_pair((30, 20), between=0.6)  # within ~0.5, between ~0.3: two absorbed features
    one = absorbed_pair((50, 0), between=0.6)
    assert groups(absorbed, 0.0) == 1 and groups(absorbed, 0.7) == 2  # the null cut alone joins them; the split not
    assert groups(one, 0.7) == 1  # a single behaviour is not split
    assert groups(absorbed, 0.7, size=21) == 1  # a side smaller than the split size stays joined
    assert groups(absorbed_pair((30, 20), between=0.9), 0.7) == 1  # alike enough: one behaviour
    # through unit_behaviours: its split size is the share of the unit's examples (at least 2)
    valid = torch.ones(1, 50, dtype=torch.bool)
    result = unit_behaviours(absorbed, valid, "average_null", [0.9], cut, split_ratio=0.7, split_share=0.1)
    assert result.n_behaviours[0, 0] == 2 and sorted(result.sizes[0, :2].tolist()) == [20, 30]
    assert unit_behaviours(absorbed, valid, "average_null", [0.9], cut, split_ratio=0.7,
                           split_share=0.5).n_behaviours[0, 0] == 1


def test_options_are_validated_with_the_key_named() -> None:
    from saebench_poly.errors import UserError
    from saebench_poly.metrics import resolve_metric_options

    chosen = resolve_metric_options({"polysemanticity": {"tau": 0.9, "max_examples": 50}})
    assert chosen[Polysemanticity] == PolysemanticityOptions(tau=0.9, max_examples=50)
    with pytest.raises(UserError, match="tua"):
        resolve_metric_options({"polysemanticity": {"tua": 0.9}})
    with pytest.raises(UserError, match="min_examples"):
        resolve_metric_options({"polysemanticity": {"min_examples": 20, "max_examples": 10}})


def test_chunking_and_cutting_chunks_to_their_largest_count_change_nothing(monkeypatch) -> None:
    """24 random directions read on their positive side have from 0 to 100 examples. One chunk cut to the largest
    count (100: the whole sample) is the reference; chunks of one unit, each cut to its own count, must agree."""
    data = pattern_data([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], contexts=400)
    basis = torch.nn.functional.normalize(torch.randn(24, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    monkeypatch.setattr("saebench_poly.metrics.polysemanticity.CHUNK_BYTES", 2**40)
    whole, _ = behaviours_of(data, basis)
    monkeypatch.setattr("saebench_poly.metrics.polysemanticity.CHUNK_BYTES", 1)
    single, _ = behaviours_of(data, basis)
    assert whole["n_examples"].max() == 100 and whole["n_examples"].min() == 0 and whole["n_examples"].nunique() > 3
    pd.testing.assert_frame_equal(whole, single)


def test_entries_at_one_hook_share_one_store_of_its_rows(monkeypatch) -> None:
    """The re-run stores the hook's activations once per distinct (context, position) that any entry at the hook
    asks for, not once per entry: three bases at one hook hold one store, of the union of their rows."""
    import saebench_poly.revisit as revisit

    data = pattern_data([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], contexts=200)
    adapter = PatternAdapter(data)
    entries = [BasisEntry(name=f"random{seed}", uri=f"test:random{seed}", kind="random", hook="x",
                          basis=torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))[0],
                          center=torch.full((4,), 0.1 * seed))
               for seed in range(3)]
    answers, read = [], revisit.read_rows

    def kept(adapter, requests, contexts):
        rows = read(adapter, requests, contexts)
        answers.append((requests, rows))
        return rows

    monkeypatch.setattr(revisit, "read_rows", kept)
    accumulators = scored_accumulators(adapter, entries, PolysemanticityOptions(max_examples=50))
    revisit_accumulators(adapter, accumulators, adapter.contexts)
    [(requests, rows)] = answers
    assert len({id(answer.store) for answer in rows}) == 1
    pairs = {(int(c), int(p)) for request in requests for c, p in zip(request.context, request.position, strict=True)}
    assert rows[0].store.shape == (len(pairs), 4) and len(pairs) < sum(r.context.numel() for r in requests)
    for request, answer, entry in zip(requests, rows, entries, strict=True):
        expected = data[request.context, request.position] - entry.center  # h = x - centre
        assert torch.equal(answer.take(torch.arange(request.context.numel())), expected)


def test_entries_at_one_hook_share_each_forward_of_the_re_run_and_grouping_changes_nothing(monkeypatch) -> None:
    """Three entries revisited together re-run each batch of the union of their contexts once. Cutting the units
    into many groups (many rounds of re-runs) and revisiting each entry alone give the same per-unit results."""
    data = pattern_data([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 1, 0], [0, 1, 0, 1]], contexts=400)
    adapter = PatternAdapter(data)
    entries = [BasisEntry(name=f"random{seed}", uri=f"test:random{seed}", kind="random", hook="x",
                          basis=torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(seed)))[0])
               for seed in range(3)]
    options = PolysemanticityOptions(max_examples=50)

    def revisited_together() -> tuple[int, int, list[pd.DataFrame]]:
        accumulators = scored_accumulators(adapter, entries, options)
        adapter.forwards = 0
        revisit_accumulators(adapter, accumulators, adapter.contexts)
        union = torch.unique(torch.cat([a.examples.context[a.examples.context >= 0] for a in accumulators]
                                       + [a.null.result()[0] for a in accumulators]))
        return adapter.forwards, -(-union.numel() // 16), [pd.DataFrame(a.unit_values()) for a in accumulators]

    forwards, batches, together = revisited_together()
    assert forwards == batches  # one forward per batch, not one per entry and batch
    alone = []
    for entry in entries:
        (accumulator,) = scored_accumulators(adapter, [entry], options)
        revisit_accumulators(adapter, [accumulator], adapter.contexts)
        alone.append(pd.DataFrame(accumulator.unit_values()))
    monkeypatch.setattr("saebench_poly.metrics.polysemanticity.CACHE_BYTES", 1)
    grouped_forwards, _, grouped = revisited_together()
    assert grouped_forwards > 2 * forwards  # a round per group of one unit
    monkeypatch.undo()
    from saebench_poly import row_spill

    reads = []
    read = row_spill.SpilledRows.__getitem__
    monkeypatch.setattr(row_spill.SpilledRows, "__getitem__", lambda self, index: reads.append(1) or read(self, index))
    monkeypatch.setattr(row_spill, "SPILL_BYTES", 0)  # every store of rows in a file
    _, _, spilled = revisited_together()
    assert reads
    for frames in (alone, grouped, spilled):
        for mine, theirs in zip(together, frames, strict=True):
            pd.testing.assert_frame_equal(mine, theirs)
