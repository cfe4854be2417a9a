"""Ground truth for the neuron-embedding polysemanticity metric (`saebench_poly.metrics.polysemanticity`): cases
whose true behaviour counts are known by construction, scored by the metric's own accumulator (selection in one
streamed pass, then the re-run of the chosen contexts, as a run does). `scripts/poly_ground_truth.py` prints their
table; `tests/test_polysemanticity_truth.py` holds the bars.

1. ``synthetic``: sae-lens's synthetic data (`sae_lens.synthetic.SyntheticModel`, the generator of SynthSAEBench):
   x = sum_k a_k d_k + bias. A unit with input weights w_u (its pre-activation is w_u . h + b_u, h = x - b_dec for an
   SAE) takes from feature k the contribution a_k (d_k . w_u); an example's *dominant feature* is the feature of the
   largest contribution (times the sign of the unit's code for signed units), and the unit's true behaviour count is
   the number of distinct dominant features that each account for at least 10% of its examples. A unit none of whose
   dominant features reaches 10% is *diffuse* (a sum of many small contributions, as a random direction is): it has
   no finite true count and is reported apart. Entries: an oracle SAE (sae-lens StandardSAE whose encoder rows are
   the true dictionary, `init_sae_to_match_feature_dict`), sae-lens SAEs trained on the data (`trained_saes`), a
   random-init sae-lens SAE, a random rotation (signed), and the coordinate basis (the raw dimensions: no input
   weights of their own, so no embedding).
2. ``exclusive``: mutually exclusive features in a toy of superposition: each sample has one active feature, the
   neurons are ReLU(W x) with more features than neurons. Each example has one feature, so the true count is the
   number of distinct features among a neuron's examples.
3. ``incidental``: Lecomte et al.'s model (`saebench_poly.models.incidental`), whose hidden units are linear (read on
   both sides); the truth is the weight rule (0.8 <= |W_ik| <= 1.2), and neurons holding no feature must come out
   too weak or without examples.
4. ``permuted``: the oracle SAE with its decoder rows permuted: its polysemanticity (encoder only) is unchanged while
   its FVU collapses.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from saebench_poly.metrics.base import EntryBatch
from saebench_poly.metrics.polysemanticity import OK, Polysemanticity, PolysemanticityOptions
from saebench_poly.models.base import Batch, ForwardOutput, ModelAdapter, UnitInputs
from saebench_poly.revisit import revisit_accumulators
from saebench_poly.sources.base import BasisEntry, Entry, NeuronEntry, SAEEntry

HOOK = "x"
TRUTH_SHARE = 0.1


class SampleAdapter(ModelAdapter):
    """A model whose activations at hook ``x`` are stored samples ``[N, D]``: each sample is a context of one
    token. The inputs of a batch are the samples' indices ``[batch, 1]``."""

    model_id, family = "samples", "ground-truth"

    def __init__(self, samples: torch.Tensor) -> None:
        self.samples = samples

    def hook_names(self) -> list[str]:
        return [HOOK]

    def hook_width(self, hook: str) -> int:
        return self.samples.shape[1]

    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        return ForwardOutput(activations={HOOK: self.samples[batch.inputs[:, 0]].unsqueeze(1)})

    @property
    def device(self) -> torch.device:
        return self.samples.device

    def batches(self, batch_size: int = 4096) -> Iterator[Batch]:
        for start in range(0, self.samples.shape[0], batch_size):
            index = torch.arange(start, min(start + batch_size, self.samples.shape[0]))
            yield Batch(index.unsqueeze(1), torch.ones(len(index), 1, dtype=torch.bool))

    def contexts(self, indices: torch.Tensor, batch_size: int = 4096) -> Iterator[tuple[torch.Tensor, Batch]]:
        for chunk in torch.unique(indices.cpu()).split(batch_size):
            yield chunk, Batch(chunk.unsqueeze(1), torch.ones(len(chunk), 1, dtype=torch.bool))


def score(adapter: ModelAdapter, entries: Sequence[Entry], batches: Sequence[Batch],
          options: PolysemanticityOptions | None = None) -> list[Polysemanticity]:
    """The metric's accumulators of ``entries``, fed ``batches`` in one pass and revisited together."""
    accumulators = [Polysemanticity(entry, adapter, options) for entry in entries]
    contexts = 0
    with torch.no_grad():
        for batch in batches:
            x = adapter.forward(batch, [HOOK], logits=False).activations[HOOK]
            context, position = batch.score_mask.nonzero(as_tuple=True)
            rows = x[batch.score_mask]
            for entry, accumulator in zip(entries, accumulators, strict=True):
                z = entry.encode(rows)
                accumulator.update(EntryBatch(x=rows, z=z, x_hat=rows, context=context + contexts, position=position))
            contexts += batch.score_mask.shape[0]
        revisit_accumulators(adapter, accumulators, adapter.contexts)
    return accumulators


def dominant_truth(accumulator: Polysemanticity, features: torch.Tensor, dictionary: torch.Tensor,
                   codes: torch.Tensor | None = None, share: float = TRUTH_SHARE) -> tuple[np.ndarray, np.ndarray]:
    """Per unit, the number of distinct dominant features (module docstring) that hold >= ``share`` of its examples,
    and the share of its examples whose dominant feature is one of them; -1 and NaN for units without examples.
    ``features`` ``[N, F]``: a_k of every sample; ``dictionary`` ``[F, D]``: d_k; ``codes`` ``[N, width]``: the
    units' codes, needed for signed units (the contribution times the code's sign)."""
    examples = accumulator.examples
    weight = accumulator.inputs.weight.to(torch.float64)  # [width, D]
    loading = dictionary.to(torch.float64) @ weight.T  # [F, width]: d_k . w_u
    truth = np.full(weight.shape[0], -1, dtype=np.int64)
    covered = np.full(weight.shape[0], np.nan)
    for unit in torch.nonzero(examples.count > 0).flatten().tolist():
        chosen = examples.context[unit, : int(examples.count[unit])]
        contribution = features[chosen].to(torch.float64) * loading[:, unit]
        if accumulator.signed and codes is not None:
            contribution = contribution * torch.sign(codes[chosen, unit]).to(torch.float64)[:, None]
        dominant = contribution.argmax(dim=1)
        shares = torch.bincount(dominant).to(torch.float64) / len(chosen)
        held = shares >= share if share > 0 else shares > 0
        truth[unit] = int(held.sum())
        covered[unit] = float(shares[held].sum())
    return truth, covered


@dataclass
class EntryScore:
    """One entry of a case: its per-unit table (with ``truth`` where known) and its summaries."""

    case: str
    entry: str
    units: pd.DataFrame
    summary: dict[str, float]

    def row(self) -> dict[str, Any]:
        """The entry's line of the table: units with enough examples, their share with K = truth (among units with a
        true count), Spearman(K, truth), diffuse units, mean exp(H), saturated share, too weak / too few."""
        units = self.units
        ok = units[units["poly_status"] == OK] if "poly_status" in units else units.iloc[:0]
        row = {"case": self.case, "entry": self.entry, "units": len(units), "ok": len(ok)}
        if "truth" in units and len(ok):
            known = ok[ok["truth"] >= 1]
            row |= _agreement(known)
            row["diffuse"] = int((ok["truth"] == 0).sum())
            row["mean_truth"] = float(known["truth"].mean()) if len(known) else math.nan
        row["mean_K"] = self.summary.get("mean_behaviours", math.nan)
        row["mean_eff"] = self.summary.get("mean_effective_behaviours", math.nan)
        row["saturated"] = self.summary.get("saturated_fraction", math.nan)
        row["too_weak"] = self.summary.get("too_weak_fraction", math.nan)
        row["too_few"] = self.summary.get("too_few_examples_fraction", math.nan)
        return row


def pooled_row(scores: Sequence[EntryScore], name: str, entries: Sequence[str], min_covered: float = 0.0) -> dict[str, Any]:
    """One line for the units of ``entries`` pooled: those with enough examples and a true count (whose truth's
    features hold at least ``min_covered`` of their examples, `dominant_truth`'s second value), their share with
    K = truth and Spearman(K, truth) over all of them."""
    known = pd.concat([score.units[(score.units["poly_status"] == OK) & (score.units["truth"] >= 1)
                                   & (score.units["covered"] >= min_covered)]
                       for score in scores if score.entry in entries])
    return {"case": scores[0].case, "entry": name} | _agreement(known)


def _agreement(known: pd.DataFrame) -> dict[str, float]:
    """Over units with a true count: how many, their share with K = truth, Spearman(K, truth)."""
    return {"with_truth": len(known),
            "K=truth": float((known["n_behaviours"] == known["truth"]).mean()) if len(known) else math.nan,
            "spearman": spearman(known["n_behaviours"].to_numpy(float), known["truth"].to_numpy(float))}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    if len(a) < 2:
        return math.nan
    ranks = [pd.Series(v).rank().to_numpy() for v in (a, b)]
    if ranks[0].std() == 0 or ranks[1].std() == 0:
        return math.nan
    return float(np.corrcoef(ranks[0], ranks[1])[0, 1])


def _frame(accumulator: Polysemanticity, truth: tuple[np.ndarray, np.ndarray] | None = None) -> pd.DataFrame:
    frame = pd.DataFrame(accumulator.unit_values())
    if truth is not None:
        frame["truth"], frame["covered"] = truth
    return frame


# --- case 1: sae-lens synthetic data ------------------------------------------------------------------------------


@dataclass
class Synthetic:
    """A sae-lens synthetic model and samples from it: x ``[N, D]``, feature activations ``[N, F]``."""

    model: Any
    x: torch.Tensor
    features: torch.Tensor

    @property
    def dictionary(self) -> torch.Tensor:
        return self.model.feature_dict.feature_vectors.detach()

    @property
    def bias(self) -> torch.Tensor:
        return self.model.feature_dict.bias.detach()


SYNTHETIC_FEATURES, SYNTHETIC_DIM = 2048, 256


def synthetic_data(num_features: int = SYNTHETIC_FEATURES, hidden_dim: int = SYNTHETIC_DIM, samples: int = 40_000,
                   seed: int = 0) -> Synthetic:
    """A small SynthSAEBench-style configuration: Zipfian firing probabilities from 0.02 down to 0.002 (L0 about
    4.9 with 2,048 features), magnitudes 1 +- 0.3, a bias of norm 1, random unit feature directions."""
    from sae_lens.synthetic import SyntheticModel, SyntheticModelConfig, ZipfianFiringProbabilityConfig

    cfg = SyntheticModelConfig(num_features=num_features, hidden_dim=hidden_dim,
                               firing_probability=ZipfianFiringProbabilityConfig(exponent=0.5, max_prob=0.02, min_prob=0.002),
                               std_firing_magnitudes=0.3, mean_firing_magnitudes=1.0, bias=1.0, seed=seed)
    model = SyntheticModel(cfg)
    torch.manual_seed(seed)
    x, features = model.sample_with_features(samples)
    features = features.to_dense() if features.is_sparse else features
    return Synthetic(model=model, x=x.detach(), features=features.detach())


def standard_sae(d_in: int, d_sae: int, seed: int) -> Any:
    """A sae-lens StandardSAE with its own random initialisation."""
    from sae_lens import StandardSAE, StandardSAEConfig

    torch.manual_seed(seed)
    return StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))


def oracle_sae(data: Synthetic) -> Any:
    """The true dictionary as a sae-lens StandardSAE: W_enc = W_dec^T = the feature directions, b_dec = the bias,
    b_enc = -0.4."""
    from sae_lens.synthetic import init_sae_to_match_feature_dict

    sae = standard_sae(data.dictionary.shape[1], data.dictionary.shape[0], 0)
    init_sae_to_match_feature_dict(sae, data.model.feature_dict)
    with torch.no_grad():
        sae.b_dec.copy_(data.bias)
        sae.b_enc.fill_(-0.4)  # above the interference of the other features (about 0.2), below a firing (1)
    return sae


def permuted_decoder(sae: Any, seed: int = 0) -> Any:
    """A copy of ``sae`` whose decoder rows are permuted (latent u writes latent pi(u)'s direction)."""
    import copy

    permuted = copy.deepcopy(sae)
    order = torch.randperm(sae.W_dec.shape[0], generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        permuted.W_dec.copy_(sae.W_dec[order])
    return permuted


# The trained SAEs of case 1 (`trained_saes`), trained once by `train_synthetic_sae` and committed: training them
# takes about 20 minutes of one CPU core each, too long for the test suite. `scripts/poly_ground_truth.py --retrain`
# writes them again.
TRAINED_FOLDER = Path(__file__).resolve().parents[2] / "benchmarks" / "poly-ground-truth"


@dataclass(frozen=True)
class SyntheticTraining:
    """How a case-1 SAE is trained: a sae-lens TopK SAE of ``width`` latents at ``k``, on ``samples`` fresh samples
    of the synthetic model (seed 0, `SYNTHETIC_FEATURES` features in d = `SYNTHETIC_DIM`), batches of 1,024, Adam at
    a constant ``lr``, initialised from torch's seed ``seed``; its decoder bias starts at the mean of the samples of
    ``synthetic_data(samples=20_000)``."""

    k: int
    seed: int
    width: int = 2048
    samples: int = 4_096_000
    lr: float = 1e-3

    @property
    def file(self) -> str:
        return f"topk{self.k}-w{self.width}.safetensors"

    @property
    def name(self) -> str:
        return f"topk k={self.k}, {self.width} latents"

    def metadata(self) -> dict[str, str]:
        return {"training": json.dumps({**asdict(self), "features": SYNTHETIC_FEATURES, "dim": SYNTHETIC_DIM},
                                       sort_keys=True)}


# Two sparsities at the width of the dictionary, and a narrow SAE (a quarter of the features) whose latents must
# absorb several features each.
TRAINED = (SyntheticTraining(k=8, seed=8), SyntheticTraining(k=24, seed=24),
           SyntheticTraining(k=4, seed=4, width=512, samples=2_048_000))


def train_synthetic_sae(training: SyntheticTraining) -> Any:
    """A sae-lens TopK SAE trained on the synthetic model with sae-lens's `train_toy_sae` (`SyntheticTraining`). The
    decoder bias starts at the data mean: sae-lens starts it at 0, and then the model's bias (norm 1, shared by every
    input) decides the top k of every input alike and most latents die early (96% dead after 300k samples)."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.synthetic import train_toy_sae

    data = synthetic_data(samples=20_000)
    with torch.random.fork_rng():
        torch.manual_seed(training.seed)
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=data.x.shape[1], d_sae=training.width, k=training.k))
        with torch.no_grad():
            sae.b_dec.copy_(data.x.mean(dim=0))
        train_toy_sae(sae, data.model.feature_dict, data.model.activation_generator,
                      training_samples=training.samples, batch_size=1024, lr=training.lr)
    return sae.eval()


def save_trained(sae: Any, training: SyntheticTraining, folder: Path = TRAINED_FOLDER) -> Path:
    """Write ``sae``'s weights (float16, to keep the repository small) with ``training`` in the metadata,
    temp-then-rename."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / training.file
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({name: p.detach().to(torch.float16).contiguous() for name, p in sae.state_dict().items()},
              str(temporary), metadata=training.metadata())
    temporary.chmod(0o644)
    temporary.replace(path)
    return path


def trained_saes(trainings: Sequence[SyntheticTraining] = TRAINED, folder: Path = TRAINED_FOLDER) -> dict[str, Any]:
    """The committed case-1 SAEs (`TRAINED_FOLDER`), as sae-lens TopK training SAEs in eval mode, float32. A file
    trained with other settings than ``trainings`` is refused."""
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from safetensors import safe_open

    saes = {}
    for training in trainings:
        path = folder / training.file
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run python scripts/poly_ground_truth.py --retrain")
        with safe_open(str(path), "pt") as stored:
            if stored.metadata() != training.metadata():
                raise ValueError(f"{path} was trained with {stored.metadata()}, not {training.metadata()}: "
                                 "run python scripts/poly_ground_truth.py --retrain")
            weights = {name: stored.get_tensor(name).to(torch.float32) for name in stored.keys()}
        sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=SYNTHETIC_DIM, d_sae=training.width, k=training.k))
        sae.load_state_dict(weights)
        saes[training.name] = sae.eval()
    return saes


def synthetic_case(data: Synthetic, trained: dict[str, Any] | None = None, options: PolysemanticityOptions | None = None,
                   random_width: int = 1024) -> list[EntryScore]:
    """Case 1 (and 4): every entry scored on the same samples, with its true counts."""
    d = data.x.shape[1]
    oracle = oracle_sae(data)
    saes = {"oracle": oracle, **(trained or {}), "random-init": standard_sae(d, random_width, 1),
            "oracle, permuted decoder": permuted_decoder(oracle)}
    entries: list[Entry] = [SAEEntry(sae, name, f"truth:{name}", HOOK) for name, sae in saes.items()]
    rotation = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(2)))[0]
    entries.append(BasisEntry(name="random rotation", uri="truth:rotation", kind="random", hook=HOOK, basis=rotation,
                              center=data.x.mean(dim=0)))
    entries.append(NeuronEntry(name="coordinate basis", uri="truth:coordinates", kind="neurons", hook=HOOK,
                               basis=torch.eye(d)))
    adapter = SampleAdapter(data.x)
    accumulators = score(adapter, entries, list(adapter.batches()), options)
    scores = []
    for entry, accumulator in zip(entries, accumulators, strict=True):
        if accumulator.inputs is None:
            scores.append(EntryScore("synthetic", entry.name, _frame(accumulator), accumulator.compute()))
            continue
        codes = entry.encode(data.x) if accumulator.signed else None
        truth = dominant_truth(accumulator, data.features, data.dictionary, codes)
        scores.append(EntryScore("synthetic", entry.name, _frame(accumulator, truth), accumulator.compute()))
    return scores


def fvu(entry: Entry, x: torch.Tensor) -> float:
    """sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 (the `fvu` metric's definition), on all of ``x``."""
    with torch.no_grad():
        x_hat = entry.decode(entry.encode(x))
    return float(((x - x_hat) ** 2).sum() / ((x - x.mean(dim=0)) ** 2).sum())


# --- case 2: mutually exclusive features --------------------------------------------------------------------------


class ExclusiveAdapter(SampleAdapter):
    """A toy of superposition: features x ``[N, F]`` (hook ``x``), neurons ReLU(W x) ``[N, m]`` (hook ``h``), W
    ``[m, F]``; the neurons' input is x and their weights the rows of W (`neuron_inputs`)."""

    def __init__(self, features: torch.Tensor, weights: torch.Tensor) -> None:
        super().__init__(features)
        self.weights = weights

    def hook_names(self) -> list[str]:
        return [HOOK, "h"]

    def hook_width(self, hook: str) -> int:
        return self.weights.shape[0] if hook == "h" else self.samples.shape[1]

    def forward(self, batch: Batch, hooks: Sequence[str], logits: bool = True) -> ForwardOutput:
        x = self.samples[batch.inputs[:, 0]].unsqueeze(1)
        return ForwardOutput(activations={HOOK: x, "h": torch.relu(x @ self.weights.T)})

    def neuron_inputs(self, hook: str) -> UnitInputs | None:
        if hook != "h":
            return None
        return UnitInputs(source="x", weight=self.weights, bias=torch.zeros(self.weights.shape[0]),
                          capture=lambda batch, activations=None: self.hook_activations(batch, HOOK, activations),
                          hook=HOOK)


def exclusive_case(num_features: int = 512, neurons: int = 64, samples: int = 40_000,
                   options: PolysemanticityOptions | None = None) -> EntryScore:
    """Case 2: each sample has exactly one active feature (uniformly drawn, magnitude uniform in [0.5, 1]); the
    neurons ReLU(W x) of a random W ``[64, 512]`` (N(0, 1) entries) each hold several features in superposition. An
    example's feature is its one active feature, so the true count is the number of distinct features among a
    neuron's examples."""
    generator = torch.Generator().manual_seed(4)
    which = torch.randint(num_features, (samples,), generator=generator)
    magnitude = 0.5 + 0.5 * torch.rand(samples, generator=generator)
    features = torch.nn.functional.one_hot(which, num_features).to(torch.float32) * magnitude[:, None]
    weights = torch.randn(neurons, num_features, generator=generator)
    adapter = ExclusiveAdapter(features, weights)
    entry = NeuronEntry(name="neurons:h", uri="truth:exclusive", kind="neurons", hook="h", basis=torch.eye(neurons))
    accumulators = Polysemanticity(entry, adapter, options)
    contexts = 0
    for batch in adapter.batches():
        z = adapter.forward(batch, ["h"]).activations["h"][:, 0]
        context = torch.arange(contexts, contexts + z.shape[0])
        accumulators.update(EntryBatch(x=z, z=z, x_hat=z, context=context, position=torch.zeros_like(context)))
        contexts += z.shape[0]
    revisit_accumulators(adapter, [accumulators], adapter.contexts)
    truth = dominant_truth(accumulators, features, torch.eye(num_features), share=0)
    return EntryScore("exclusive", entry.name, _frame(accumulators, truth), accumulators.compute())


# --- case 3: Lecomte et al.'s incidental model --------------------------------------------------------------------


def incidental_case(n: int = 32, m: int = 64, instances: int = 8, repeats: int = 16,
                    options: PolysemanticityOptions | None = None) -> EntryScore:
    """Case 3: the incidental model trained with the fast settings of its tests (L1 0.01, lr 0.01, 1,000 steps), its
    neurons scored on every one-hot input (each ``repeats`` times over), the truth by the weight rule."""
    from saebench_poly.models.incidental import IncidentalAdapter, IncidentalConfig, features_per_neuron, train_pair

    weights = train_pair(n, m, IncidentalConfig(pairs=((n, m),), instances=instances, l1=0.01, lr=0.01, steps=1000))
    hook = f"n{n}_m{m}"
    adapter = IncidentalAdapter({hook: weights}, "incidental-truth")
    entry = NeuronEntry(name=f"neurons:{hook}", uri="truth:incidental", kind="neurons", hook=hook,
                        basis=torch.eye(m * instances))
    accumulator = Polysemanticity(entry, adapter, options)
    samples = repeats * n * instances
    for batch in adapter.synthetic_batches(samples, 256, 0):
        z = adapter.forward(batch, [hook]).activations[hook][:, 0]
        context = batch.inputs[:, 0]
        accumulator.update(EntryBatch(x=z, z=z, x_hat=z, context=context, position=torch.zeros_like(context)))

    def contexts(indices: torch.Tensor) -> Iterator[tuple[torch.Tensor, Batch]]:
        for chunk in torch.unique(indices.cpu()).split(256):
            yield chunk, Batch(chunk.unsqueeze(1), torch.ones(len(chunk), 1, dtype=torch.bool))

    revisit_accumulators(adapter, [accumulator], contexts)
    block = adapter.true_feature_weights(hook)
    counts = features_per_neuron(block).numpy()
    frame = _frame(accumulator, (counts, np.where(counts > 0, 1.0, np.nan)))
    frame["holds"] = frame["truth"] >= 1
    return EntryScore("incidental", entry.name, frame, accumulator.compute())


def incidental_row(score_: EntryScore) -> dict[str, Any]:
    """Agreement with the weight rule over neurons holding a feature (K = count, status ok), and the share of empty
    neurons that come out too weak or with too few examples."""
    units = score_.units
    holding, empty = units[units["holds"]], units[~units["holds"]]
    agree = (holding["poly_status"] == OK) & (holding["n_behaviours"] == holding["truth"])
    quiet = empty["poly_status"].isin(["too_weak", "too_few_examples"])
    return {"case": "incidental", "entry": score_.entry, "units": len(units), "holding": len(holding),
            "K=truth": float(agree.mean()), "empty": len(empty), "empty quiet": float(quiet.mean()) if len(empty) else math.nan}
