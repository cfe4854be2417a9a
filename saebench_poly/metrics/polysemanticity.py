"""Polysemanticity of every unit from neuron embeddings (Foote 2024, "Tackling Polysemanticity with Neuron
Embeddings", arXiv 2411.08166; `papers.md` section 1).

A unit u computes a = f(w_u . h + b_u) from a tensor h of the model (`Entry.unit_inputs` says which, per case:
for transformer-lens MLP neurons the MLP input normalised by its LayerNorm, with the LayerNorm's scale and shift
folded into W_in and b_in; for Hugging Face neurons the input of the Linear that produces them and its weight row;
for SAE latents ``sae.process_sae_in(x)`` and W_enc, with b_enc, or b_gate for gated SAEs; for PCA and random
directions the centred hook activations and the basis vector; raw units without input weights of their own, such as
residual-stream dimensions, have none). The neuron embedding of an example (context c, token t*) is

    e_u(c) = h(c, t*) ⊙ w_u            so that   sum_k e_u(c)_k + b_u = the unit's pre-activation at t*.

The embedding lives in the space of the unit's own input: for raw neurons the layer's input, for SAE latents and
baseline directions the hook's space.

Characteristic examples (`saebench_poly.metrics.examples`, exact and independent of batching): the contexts whose
maximum activity of u is > 0 and >= f M_u (f = ``activation_fraction`` = 0.75, M_u = u's maximum over all scored
tokens), one per context at its most active token, a seeded uniform sample of at most S = ``max_examples`` = 100.
A unit's activity is its code z, except for signed units (`Entry.signed_units`: PCA and random directions, whose
two sides are equally directions of the data), whose activity is |z|: their examples come from both sides, and an
example's embedding keeps its sign (the sum identity gives z < 0 on the negative side), so the two sides fall into
different behaviours unless their embeddings agree.
The sample's keys hash the option ``seed`` (not the spec's ``seed``), the unit and the context.
Behaviours (`saebench_poly.metrics.behaviours`): a partition of u's examples by the cosines of their embeddings,
by the rule of ``rule``: ``average_null`` (default) joins groups by average linkage while their mean cross cosine
exceeds the ``null_quantile`` (0.9) quantile of the cosines between u's embeddings of ``null_tokens`` (128) null
tokens, a seeded uniform sample of the scored tokens (`NullSample`), every embedding taken of the input's deviation
from the null tokens' coordinate-wise median input m (e_u(c) = (h(c, t*) - m) ⊙ w_u, whose sum is the
pre-activation less w_u . m + b_u): a constant offset of the unit's inputs (an SAE whose b_dec is not the data's
centre) would otherwise be shared by every embedding and raise every cosine alike; and a group so formed is split
in two, top-down along its tree, where its halves A and B resemble each other less than they resemble themselves:
mean cos(A, B) < ``split_ratio`` (0.7) x sqrt(w(A) w(B)), w the mean cosine within a half, both halves holding at
least ``split_share`` (0.1) of the examples and two (latents that absorb two features); ``components`` (Foote's rule, his
embedding as it is) takes the connected components of the graph with an edge where cos > ``tau``. With n = the
number of examples and p_k = |behaviour k| / n:

Per unit (per-unit table; null for units with no embedding, and K, exp(H) and the rest null for units with none):
- ``n_examples`` = min(S, #characteristic contexts);
- ``n_behaviours`` = K_u, the number of behaviours; ``n_behaviours_sweep`` = K_u at each cut of the rule's sweep
  (``null_quantile_sweep`` or ``tau_sweep``, listed in ``cut_sweep``); ``behaviour_rule`` names the rule and its
  parameters, ``behaviour_cut`` the unit's cosine cut (c_u(q), or tau);
- ``effective_behaviours`` = exp(H(p)) = exp(-sum_k p_k ln p_k), between 1 and K;
- ``largest_behaviour_share`` = max_k p_k;
- ``mean_example_cosine`` = mean over pairs i != j of cos(e_i, e_j) (null with one example);
- ``behaviour_sizes`` and ``central_examples``: the behaviours, largest first, and the (context, position) of each
  one's central example (the member with the largest summed cosine similarity to its behaviour), so that a user can
  look the examples up (context: index in the scored data, counted from 0; position: the token in it);
- ``example_contexts``, ``example_positions``, ``example_behaviours``: every example and its behaviour (an index
  into ``behaviour_sizes``);
- ``poly_status``: ``ok``; ``too_few_examples`` (n < ``min_examples``: dead or nearly dead units, never
  monosemantic); ``too_weak`` (M_u < ``weak_fraction`` = 0.01 x the 0.99 quantile of the maxima of the entry's units
  with examples: a unit that carries almost nothing); ``no_embedding`` (a unit with no input weights of its own,
  such as a residual-stream dimension).

Per entry (leaderboard), over the ``ok`` units (NaN when there are none; entries whose units have no embedding get
none of these rows): mean and median of exp(H) and of K, the mean largest share, the fraction of all units that are
monosemantic (``ok`` and K = 1), the fractions with too few examples and too weak, and the share of ``ok`` units
whose K equals their example count (saturated). Ten examples is our choice: with fewer, K can only be small and the
shares are too coarse to compare.

The default rule and setting were chosen on the known answers of `saebench_poly.metrics.polysemanticity_truth`
(`scripts/poly_ground_truth.py`).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saebench_poly.example_windows import StoredMembers, members_from_behaviours
from saebench_poly.metrics.base import (
    Accumulator,
    AfterPass,
    EntryBatch,
    ExampleWindows,
    MetricSpec,
    PostPass,
    RowRequest,
    Rows,
    WindowRequest,
    Windows,
)
from saebench_poly.metrics.behaviours import AVERAGE_NULL, COMPONENTS, Behaviours, NullCosines, unit_behaviours
from saebench_poly.metrics.examples import Examples, ExampleSelector, example_keys
from saebench_poly.models.base import UnitInputs

if TYPE_CHECKING:
    from saebench_poly.sources.base import Entry

# The default rule and its one setting, chosen on the ground-truth cases of
# `saebench_poly.metrics.polysemanticity_truth` (`python scripts/poly_ground_truth.py` prints them; the README has the
# table): average linkage cut at the NULL_QUANTILE quantile of the unit's null cosines.
DEFAULT_RULE = AVERAGE_NULL
NULL_QUANTILE = 0.9
NULL_QUANTILE_SWEEP = (0.5, 0.8, 0.95, 0.98, 0.99, 0.999)
NULL_TOKENS = 128
# A behaviour of the null cut is split in two where its halves resemble each other less than SPLIT_RATIO x how much
# each resembles itself, each half holding at least SPLIT_SHARE of the unit's examples (and two)
# (`saebench_poly.metrics.behaviours.average_linkage`).
SPLIT_RATIO = 0.7
SPLIT_SHARE = 0.1
# Foote's fixed-threshold rule, kept so that his numbers can be reproduced (0.975 was the best tau on the 8-d toy of
# superposition; it saturates in wider spaces: README).
DEFAULT_TAU = 0.975
TAU_SWEEP = (0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99)
# Keys of the null sample: the option seed mixed with this salt, so that the null tokens are not tied to the examples.
NULL_SALT = 0x6E756C6C
# Memory bounds of the embedding stage; the results do not depend on them. The h rows of the chosen examples are
# asked for, with their code windows, for as many units at a time as fit CACHE_BYTES (counted at 4 bytes a value for
# each entry, shared among the entries; the pass stores the rows of a hook once for all the entries that read it), the
# model being re-run once per round of such groups; the [units, n, d] embeddings and [units, n, n] graphs go in
# chunks of CHUNK_BYTES.
CACHE_BYTES = 2**32
CHUNK_BYTES = 2**27

OK, TOO_FEW_EXAMPLES, TOO_WEAK, NO_EMBEDDING = "ok", "too_few_examples", "too_weak", "no_embedding"


class PolysemanticityOptions(BaseModel):
    """``[metric_options.polysemanticity]``: the behaviour rule (``average_null``, the default, or Foote's
    ``components``) and its cut (``null_quantile`` and its sweep; ``tau`` and its sweep for ``components``), the number of
    null tokens, Foote's activation fraction (0.75) and sample size (100), the fewest examples for a unit to be
    summarised, the fraction of the entry's typical maximum below which a unit is too weak, and the seed of the
    samples' keys."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rule: Literal["average_null", "components"] = DEFAULT_RULE
    null_quantile: float = Field(NULL_QUANTILE, ge=0, le=1)
    null_quantile_sweep: tuple[float, ...] = NULL_QUANTILE_SWEEP
    null_tokens: int = Field(NULL_TOKENS, ge=2)
    split_ratio: float = Field(SPLIT_RATIO, ge=0)
    split_share: float = Field(SPLIT_SHARE, ge=0, le=1)
    tau: float = Field(DEFAULT_TAU, ge=-1, lt=1)
    tau_sweep: tuple[float, ...] = TAU_SWEEP
    activation_fraction: float = Field(0.75, gt=0, le=1)
    max_examples: int = Field(100, ge=1)
    min_examples: int = Field(10, ge=1)
    weak_fraction: float = Field(0.01, ge=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> PolysemanticityOptions:
        if any(not -1 <= tau < 1 for tau in self.tau_sweep):
            raise ValueError("every tau of tau_sweep must lie in [-1, 1)")
        if any(not 0 <= q <= 1 for q in self.null_quantile_sweep):
            raise ValueError("every quantile of null_quantile_sweep must lie in [0, 1]")
        if self.min_examples > self.max_examples:
            raise ValueError(f"min_examples ({self.min_examples}) exceeds max_examples ({self.max_examples})")
        return self

    @property
    def cuts(self) -> tuple[float, ...]:
        """The rule's cut, then its sweep: null quantiles for ``average_null``, taus for ``components``."""
        if self.rule == COMPONENTS:
            return (self.tau, *self.tau_sweep)
        return (self.null_quantile, *self.null_quantile_sweep)

    def describe_rule(self) -> str:
        """The rule and its parameters, in words, as the per-unit table records it with every number."""
        if self.rule == COMPONENTS:
            return f"components(cos > tau={self.tau:g})"
        return (f"average_null(q={self.null_quantile:g}, null_tokens={self.null_tokens}, centred at their median, "
                f"split_ratio={self.split_ratio:g}, split_share={self.split_share:g})")


class Polysemanticity(Accumulator):
    """Neuron-embedding behaviours of every unit (module docstring): per unit in the per-unit table, summaries as
    metrics. Foote 2024, arXiv 2411.08166."""

    metrics = (
        MetricSpec("mean_effective_behaviours", 4, "lower", "polysemanticity",
                   "mean over units with enough examples (and not too weak) of exp(H(behaviour sizes)), the behaviours "
                   "of their examples' neuron embeddings by the rule of behaviour_rule (Foote 2024)", bounds=(1, math.inf)),
        MetricSpec("median_effective_behaviours", 4, "lower", "polysemanticity",
                   "median over units with enough examples of exp(H(behaviour sizes))", bounds=(1, math.inf)),
        MetricSpec("mean_behaviours", 4, "lower", "polysemanticity",
                   "mean over units with enough examples of K, the number of behaviours", bounds=(1, math.inf)),
        MetricSpec("median_behaviours", 4, "lower", "polysemanticity",
                   "median over units with enough examples of K", bounds=(1, math.inf)),
        MetricSpec("mean_largest_behaviour_share", 4, "higher", "polysemanticity",
                   "mean over units with enough examples of the largest behaviour's share of the examples",
                   bounds=(0, 1)),
        MetricSpec("monosemantic_fraction", 4, "higher", "polysemanticity",
                   "fraction of all units with enough examples, not too weak, and K = 1", bounds=(0, 1)),
        MetricSpec("too_few_examples_fraction", 2, "lower", "polysemanticity",
                   "fraction of units with fewer characteristic examples than min_examples (dead or nearly dead)",
                   bounds=(0, 1)),
        MetricSpec("too_weak_fraction", 1, "lower", "polysemanticity",
                   "fraction of units whose maximum is below weak_fraction x the 0.99 quantile of the entry's unit "
                   "maxima (units that carry almost nothing)", bounds=(0, 1)),
        MetricSpec("saturated_fraction", 3, "lower", "polysemanticity",
                   "fraction of the units with enough examples whose K equals their example count (every example "
                   "its own behaviour: the rule resolves nothing)", bounds=(0, 1)),
    )
    Options = PolysemanticityOptions
    transient = ("entry", "adapter", "inputs")

    def __init__(self, entry, adapter, options: PolysemanticityOptions | None = None) -> None:
        super().__init__(entry, adapter)
        self.options = options or PolysemanticityOptions()
        self.cuts = self.options.cuts
        self.inputs: UnitInputs | None = entry.unit_inputs(adapter)
        self.signed = entry.signed_units or (self.inputs is not None and self.inputs.signed)
        self.selector = self.null = None
        if self.inputs is not None:
            self.selector = ExampleSelector(entry.width, self.options.activation_fraction, self.options.max_examples,
                                            self.options.seed)
            self.null = NullSample(self.options.null_tokens, self.options.seed)
        self.examples: Examples | None = None
        self.behaviours: Behaviours | None = None
        # the examples kept with their windows, by group of units (`after_pass` with windows)
        self.stored: list[tuple[StoredMembers, Windows]] | None = None

    def update(self, batch: EntryBatch) -> None:
        if self.selector is None:
            return
        if batch.context is None or batch.position is None:
            raise ValueError("polysemanticity needs each scored row's context and position (EntryBatch.context, .position)")
        activity = batch.z.abs() if self.signed else batch.z
        # a sparse batch's non-zero entries, which other families share, are the only candidates (|z| too)
        active = batch.active_entries() if batch.is_sparse() else None
        self.selector.update(activity, batch.context, batch.position, active)
        self.null.update(batch.context, batch.position)

    def merge(self, other: Polysemanticity) -> None:
        if self.selector is not None:
            self.selector.merge(other.selector)
            self.null.merge(other.null)

    def after_pass(self, plan: PostPass) -> AfterPass | None:
        """Select the examples, ask the pass for the h rows of the examples and of the null tokens
        (`saebench_poly.revisit`), and find the behaviours. The rows are asked for a group of units at a time, as
        many as fit `CACHE_BYTES` shared among the ``plan.peers`` (one round of the pass each); the results do not
        depend on how the units are grouped. With ``plan.windows``, each group also asks for the code windows of
        its examples, and keeps those of each behaviour's central example and first members (`stored`)."""
        if self.selector is None:
            return None
        return self._rounds(plan)

    def _rounds(self, plan: PostPass) -> AfterPass:
        self.examples = self.selector.result(self.inputs.weight.device)
        self.selector.release()  # its candidates are dead weight from here on
        self.behaviours = _no_behaviours(self.examples, len(self.cuts))
        self.stored = [] if plan.windows is not None else None
        # an example's values: its h row, and its code window when windows are asked for
        values = self.inputs.weight.shape[1] + (0 if plan.windows is None else plan.windows.before + plan.windows.after + 1)
        rows = max(self.options.max_examples, CACHE_BYTES // (4 * values * max(plan.peers, 1)))
        for start, end in _unit_groups(self.examples.count, rows):
            group = _ExampleRows(self.examples, start, end, self.null.result())
            windows = None if plan.windows is None else _window_request(self.entry, self.examples, start, end, plan.windows)
            group.rows = yield group.request(self.inputs, windows)
            _group_behaviours(self.behaviours, start, group, self.inputs, self.options)
            if plan.windows is not None:
                members = members_from_behaviours(self.examples, self.behaviours, plan.windows.members, start, end)
                self.stored.append((members, group.rows.windows.select(_window_rows(self.examples, start, end, members))))

    def _results(self) -> tuple[Examples, Behaviours]:
        if self.behaviours is None:
            raise RuntimeError("the pass after the scoring pass (saebench_poly.revisit) must run before the results are read")
        return self.examples, self.behaviours

    def _weak(self, examples: Examples) -> torch.Tensor:
        """Units with examples whose maximum is below ``weak_fraction`` x the 0.99 quantile of the maxima of the
        entry's units with examples."""
        has = examples.count > 0
        if not bool(has.any()):
            return has
        reference = examples.maximum[has].quantile(0.99)
        return has & (examples.maximum < self.options.weak_fraction * reference)

    def _status(self, examples: Examples) -> np.ndarray:
        count = examples.count.cpu().numpy()
        status = np.where(count >= self.options.min_examples, OK, TOO_FEW_EXAMPLES).astype(object)
        status[self._weak(examples).cpu().numpy() & (count >= self.options.min_examples)] = TOO_WEAK
        return status

    def compute(self) -> dict[str, float]:
        if self.inputs is None:
            return {}
        examples, behaviours = self._results()
        status = torch.from_numpy(self._status(examples) == OK).to(examples.count.device)
        k = behaviours.n_behaviours[:, 0][status].to(torch.float64)
        effective = behaviours.effective[status]

        def summary(values: torch.Tensor, how: str) -> float:
            if values.numel() == 0:
                return math.nan
            return float(values.mean() if how == "mean" else values.quantile(0.5))

        saturated = k == examples.count[status].to(torch.float64)
        return {
            "mean_effective_behaviours": summary(effective, "mean"),
            "median_effective_behaviours": summary(effective, "median"),
            "mean_behaviours": summary(k, "mean"),
            "median_behaviours": summary(k, "median"),
            "mean_largest_behaviour_share": summary(behaviours.largest_share[status], "mean"),
            "monosemantic_fraction": float((k == 1).sum()) / self.entry.width,
            "too_few_examples_fraction": float((examples.count < self.options.min_examples).sum()) / self.entry.width,
            "too_weak_fraction": float(self._weak(examples).sum()) / self.entry.width,
            "saturated_fraction": float(saturated.to(torch.float64).mean()) if saturated.numel() else math.nan,
        }

    def unit_values(self) -> dict[str, Any]:
        """The per-unit columns. Membership, for a reader that shows each behaviour's examples: ``example_contexts``
        and ``example_positions`` list the unit's examples (in sample order), ``example_behaviours`` the behaviour
        of each (an index into ``behaviour_sizes`` and ``central_examples``, largest behaviour 0)."""
        width = self.entry.width
        if self.inputs is None:
            return {"poly_status": np.full(width, NO_EMBEDDING, dtype=object)}
        examples, behaviours = self._results()
        count = examples.count.cpu().numpy()
        has = count > 0
        sweep = list(self.cuts[1:])
        n_behaviours = behaviours.n_behaviours.cpu().numpy()
        sizes = behaviours.sizes.cpu().numpy()
        central = behaviours.central.clamp_min(0)
        contexts = examples.context.gather(1, central).cpu().numpy()
        positions = examples.position.gather(1, central).cpu().numpy()
        n_components = (sizes > 0).sum(axis=1)
        k = pd.array(n_behaviours[:, 0], dtype="Int64")
        k[~has] = pd.NA
        all_contexts, all_positions = examples.context.cpu().numpy(), examples.position.cpu().numpy()
        membership = behaviours.members.cpu().numpy()
        return {
            "poly_status": self._status(examples),
            "n_examples": count.astype(np.int64),
            "n_behaviours": k,
            "behaviour_rule": np.full(width, self.options.describe_rule(), dtype=object),
            "behaviour_cut": behaviours.cut.cpu().numpy(),
            "cut_sweep": [sweep] * width,
            "n_behaviours_sweep": _rows(n_behaviours[:, 1:].tolist(), has),
            "effective_behaviours": behaviours.effective.cpu().numpy(),
            "largest_behaviour_share": behaviours.largest_share.cpu().numpy(),
            "mean_example_cosine": behaviours.mean_cosine.cpu().numpy(),
            "behaviour_sizes": _rows([row[:k] for row, k in zip(sizes.tolist(), n_components, strict=True)], has),
            "central_examples": _rows(
                [[{"context": c, "position": p} for c, p in zip(cs[:k], ps[:k], strict=True)]
                 for cs, ps, k in zip(contexts.tolist(), positions.tolist(), n_components, strict=True)], has),
            "example_contexts": _rows([row[:n] for row, n in zip(all_contexts.tolist(), count, strict=True)], has),
            "example_positions": _rows([row[:n] for row, n in zip(all_positions.tolist(), count, strict=True)], has),
            "example_behaviours": _rows([row[:n] for row, n in zip(membership.tolist(), count, strict=True)], has),
        }


class NullSample:
    """The null tokens of an entry: the ``size`` scored tokens (context, position) with the smallest keys
    hash(seed ^ `NULL_SALT`, position, context) (`example_keys`), a seeded uniform sample of the scored tokens
    (bottom-k), streamed: independent of the batch size and order."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed ^ NULL_SALT
        self.key = self.context = self.position = None

    def update(self, context: torch.Tensor, position: torch.Tensor) -> None:
        self._keep(example_keys(self.seed, position, context), context, position)

    def merge(self, other: NullSample) -> None:
        """Fold in a sample of other tokens: the smallest keys of both are those of one sample fed every batch."""
        if other.key is not None:
            self._keep(other.key, other.context, other.position)

    def _keep(self, keys: torch.Tensor, context: torch.Tensor, position: torch.Tensor) -> None:
        if self.key is not None:
            keys = torch.cat([self.key, keys.to(self.key.device)])
            context = torch.cat([self.context, context.to(self.key.device)])
            position = torch.cat([self.position, position.to(self.key.device)])
        order = torch.sort(keys, stable=True).indices[: self.size]
        self.key, self.context, self.position = keys[order], context[order], position[order]

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(context, position) of the null tokens, by key."""
        if self.key is None:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        return self.context, self.position


def _rows(values: list[Any], present: np.ndarray) -> list[Any]:
    return [value if keep else None for value, keep in zip(values, present, strict=True)]


def _no_behaviours(examples: Examples, n_cuts: int) -> Behaviours:
    """Results for units without examples, which the groups fill in for the others."""
    width, sample = examples.context.shape
    device = examples.context.device
    return Behaviours(
        n_behaviours=torch.zeros((width, n_cuts), dtype=torch.int64, device=device),
        cut=torch.full((width,), torch.nan, dtype=torch.float64, device=device),
        effective=torch.full((width,), torch.nan, dtype=torch.float64, device=device),
        largest_share=torch.full((width,), torch.nan, dtype=torch.float64, device=device),
        mean_cosine=torch.full((width,), torch.nan, dtype=torch.float64, device=device),
        sizes=torch.zeros((width, sample), dtype=torch.int64, device=device),
        central=torch.full((width, sample), -1, dtype=torch.int64, device=device),
        members=torch.full((width, sample), -1, dtype=torch.int64, device=device),
    )


def _unit_groups(count: torch.Tensor, rows_per_group: int) -> list[tuple[int, int]]:
    """Consecutive units [start, end) with examples, whose examples number at most ``rows_per_group`` (or one unit)."""
    reached = torch.cumsum(count, 0)
    groups, start, width = [], 0, count.shape[0]
    while start < width:
        before = int(reached[start - 1]) if start else 0
        end = max(start + 1, int(torch.searchsorted(reached, before + rows_per_group, right=True)))
        if int(reached[end - 1]) > before:
            groups.append((start, end))
        start = end
    return groups


class _ExampleRows:
    """The h rows at every distinct (context, position) of the examples of units [start, end) and of the null
    tokens (``rows``, the pass's answer to `request`); ``index`` ``[units, S]`` gives each example's row,
    ``null_index`` ``[m]`` each null token's."""

    def __init__(self, examples: Examples, start: int, end: int, null: tuple[torch.Tensor, torch.Tensor]) -> None:
        context, position = examples.context[start:end], examples.position[start:end]
        null_context, null_position = (part.to(context.device) for part in null)
        self.valid = context >= 0
        positions = torch.cat([position[self.valid], null_position])
        self.span = int(positions.max()) + 1
        keys = torch.cat([context[self.valid] * self.span + position[self.valid], null_context * self.span + null_position])
        self.pairs, inverse = torch.unique(keys, return_inverse=True)
        examples_here = int(self.valid.sum())
        self.index = torch.zeros_like(context)
        self.index[self.valid] = inverse[:examples_here]
        self.null_index = inverse[examples_here:]
        self.rows: Rows | None = None

    def request(self, inputs: UnitInputs, windows: WindowRequest | None) -> RowRequest:
        """The rows to ask the pass for: every distinct (context, position), by context."""
        return RowRequest(inputs=inputs, context=self.pairs // self.span, position=self.pairs % self.span,
                          windows=windows)


def _window_request(entry: Entry, examples: Examples, start: int, end: int, shape: ExampleWindows) -> WindowRequest:
    """The windows of every example of units [start, end), by unit and sample order (each may be kept)."""
    units, index = (examples.context[start:end] >= 0).nonzero(as_tuple=True)
    return WindowRequest(entry=entry, unit=units + start, context=examples.context[start:end][units, index],
                         position=examples.position[start:end][units, index], before=shape.before, after=shape.after)


def _window_rows(examples: Examples, start: int, end: int, members: StoredMembers) -> torch.Tensor:
    """Each kept member's row in `_window_request`'s windows of units [start, end)."""
    valid = examples.context[start:end].cpu() >= 0
    row = torch.cumsum(valid.flatten(), 0).reshape(valid.shape) - 1
    return row[members.unit - start, members.sample]


def _group_behaviours(out: Behaviours, start: int, group: _ExampleRows, inputs: UnitInputs,
                      options: PolysemanticityOptions) -> None:
    """The behaviours of a group's units, in chunks by increasing example count (`_chunks_by_count`), each cut to
    its largest count (the examples are packed to the left), so that latents with few examples cost little."""
    rows_of = group.rows.take
    count = group.valid.sum(dim=1)
    null = options.rule == AVERAGE_NULL
    m = group.null_index.numel() if null else 0
    # average_null reads every input as its deviation from the null tokens' coordinate-wise median input (`centre`)
    null_rows = rows_of(group.null_index).to(torch.float64) if null else None
    centre = null_rows.quantile(0.5, dim=0) if null and m else 0.0
    chunks = _chunks_by_count(count, inputs.weight.shape[1])
    if null and chunks:  # the cuts of every unit with examples at once (they depend on its weights alone)
        ordered = torch.cat(chunks)
        cuts = torch.empty((len(count), len(options.cuts)), dtype=torch.float64, device=count.device)
        cuts[ordered] = NullCosines(null_rows - centre).cut(inputs.weight[start + ordered], options.cuts)
    for rows in chunks:
        n = int(count[rows[-1]])
        weight = inputs.weight[start + rows].to(torch.float64)
        # (h - centre) ⊙ w_u, in place on the float64 copy of the rows (a [U, n, d] chunk is tens of MB: each new
        # one costs its pages' faults)
        embeddings = rows_of(group.index[rows, :n]).to(torch.float64, copy=True).sub_(centre).mul_(weight[:, None, :])
        _write(out, start + rows, unit_behaviours(embeddings, group.valid[rows, :n], options.rule, options.cuts,
                                                  cuts[rows] if null else None, options.split_ratio,
                                                  options.split_share))


def _chunks_by_count(count: torch.Tensor, d_h: int) -> list[torch.Tensor]:
    """The positions of the units with examples, by increasing count, cut into chunks of U units with n = the
    chunk's largest count such that U n (2 d_h + 8 n) float64 values fit `CHUNK_BYTES` (at least one unit)."""
    order = torch.argsort(count, stable=True)
    order = order[count[order] > 0]
    counts = count[order].tolist()

    def fits(n: int) -> int:
        return max(1, CHUNK_BYTES // (8 * n * (2 * d_h + 8 * n)))

    chunks, first = [], 0
    while first < len(counts):
        size = fits(counts[first])
        while size > 1 and size > fits(counts[min(first + size, len(counts)) - 1]):
            size = fits(counts[min(first + size, len(counts)) - 1])
        chunks.append(order[first : first + size])
        first += size
    return chunks


def _write(out: Behaviours, units: torch.Tensor, chunk: Behaviours) -> None:
    """Store a chunk's results for ``units``; its per-example columns are padded to the sample size."""
    for name in ("n_behaviours", "cut", "effective", "largest_share", "mean_cosine"):
        getattr(out, name)[units] = getattr(chunk, name)
    n = chunk.sizes.shape[1]
    out.sizes[units, :n] = chunk.sizes
    out.central[units, :n] = chunk.central
    out.members[units, :n] = chunk.members
