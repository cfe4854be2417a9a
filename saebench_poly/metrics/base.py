"""The metric interface: accumulators fed batch by batch, each defining one or more registered metrics.

An `Accumulator` sees every scored batch of one entry once (`update`) and then reports its metrics (`compute`),
a pure function of what it was fed. Sums are kept in float64 on the entry's device, so results do not depend on
the batch size beyond float rounding. Each metric it reports is described by a `MetricSpec`: a name, a version
(bumped whenever the definition changes), a direction and the definition itself.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from saebench_poly.models.base import Batch, ModelAdapter, UnitInputs
    from saebench_poly.sources.base import Entry

Direction = Literal["higher", "lower", "neutral"]
# Scored contexts looked up by index: ``contexts(indices)`` takes context indices as `EntryBatch.context` counts them
# and yields (the indices of one batch, that batch), in increasing order (`saebench_poly.inputs.Inputs.scored_contexts`).
ScoredContexts = Callable[[torch.Tensor], Iterator[tuple[torch.Tensor, "Batch"]]]


@dataclass(frozen=True)
class WindowRequest:
    """Code windows of some examples, read in the run of the model that reads a `RowRequest`'s rows: for row i,
    unit ``unit[i]``'s code z (``entry.encode`` of the activations at ``entry.hook``) on the tokens ``position[i] -
    before`` to ``position[i] + after`` of context ``context[i]``, clipped at the context's edges (int64 ``[R]``
    each, in any order)."""

    entry: Entry
    unit: torch.Tensor
    context: torch.Tensor
    position: torch.Tensor
    before: int
    after: int


@dataclass(frozen=True)
class ContextInputs:
    """The model inputs of some scored contexts: ``inputs[i]``, a row of `saebench_poly.models.base.Batch.inputs`,
    is context ``context[i]``'s (increasing); ``kind`` says what they are (``text``, ``ids`` or ``features``,
    `saebench_poly.stored_examples`)."""

    context: torch.Tensor
    inputs: torch.Tensor
    kind: str


@dataclass(frozen=True)
class Windows:
    """The pass's answer to a `WindowRequest`, row i for the request's row i: the window's first position
    ``start[i]`` and its number of tokens ``length[i]``, the code on it ``values[i]`` (float32 ``[R, before + after
    + 1]``, padded past ``length[i]``), and the inputs of the rows' ``context`` (shared by the round's requests)."""

    context: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    values: torch.Tensor
    inputs: ContextInputs

    def select(self, rows: torch.Tensor) -> Windows:
        """The windows of ``rows`` alone, with the inputs of their contexts alone (what is kept holds nothing else)."""
        context = self.context[rows]
        kept = torch.unique(context)
        at = torch.searchsorted(self.inputs.context, kept)
        return Windows(context=context, start=self.start[rows], length=self.length[rows], values=self.values[rows],
                       inputs=ContextInputs(context=kept, inputs=self.inputs.inputs[at], kind=self.inputs.kind))

    def tokens(self) -> torch.Tensor:
        """Each window's model inputs at its positions ``[R, before + after + 1]`` (padded as ``values``), for
        inputs of one id per position (kinds ``text`` and ``ids``)."""
        rows = self.inputs.inputs[torch.searchsorted(self.inputs.context, self.context)]
        where = (self.start[:, None] + torch.arange(self.values.shape[1])).clamp_max(rows.shape[1] - 1)
        return rows.gather(1, where)

    def context_inputs(self) -> torch.Tensor:
        """Each row's whole context input (kind ``features``: a sample's feature vector)."""
        return self.inputs.inputs[torch.searchsorted(self.inputs.context, self.context)]


@dataclass(frozen=True)
class RowRequest:
    """Rows of scored contexts that an accumulator asks the pass for after the scoring pass: h =
    ``inputs.capture(batch, activations)`` (`saebench_poly.models.base.UnitInputs`) at each (``context[i]``,
    ``position[i]``), int64 ``[R]`` each, ordered by context; with ``windows``, code windows of examples in the same
    run of the model. The pass answers with `Rows` (`saebench_poly.revisit.read_rows`)."""

    inputs: UnitInputs
    context: torch.Tensor
    position: torch.Tensor
    windows: WindowRequest | None = None


@dataclass(frozen=True)
class Rows:
    """The pass's answer to a `RowRequest`. The rows live in ``store`` ``[P, ...]``, which the requests of a round
    that read one hook share (one row per distinct (context, position) among them: the hook's activations, which
    ``transform`` (`UnitInputs.transform`) maps to h; a request that reads no hook has a store of its own, of h
    itself, and no ``transform``): the request's row i is ``transform(store[index[i]])``. ``windows``: the
    answer to the request's windows."""

    store: torch.Tensor
    index: torch.Tensor
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    windows: Windows | None = None

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """h at the request's rows ``rows`` (indices of any shape): ``[*rows.shape, d_h]``."""
        values = self.store[self.index[rows]]
        return values if self.transform is None else self.transform(values)


@dataclass(frozen=True)
class PostPass:
    """What the stage after the pass offers every accumulator (`Accumulator.after_pass`). ``peers``: how many
    accumulators of the asking one's class the run holds (those that ask answer in the same rounds and share a
    memory bound; counting every one keeps the bound safe). ``windows``: for a family that finds examples'
    behaviours, the windows to keep of each behaviour's examples (`ExampleWindows`); None for none."""

    peers: int = 1
    windows: ExampleWindows | None = None


@dataclass(frozen=True)
class ExampleWindows:
    """Keep each behaviour's central example and ``members`` more of its members, each with its code on the tokens
    ``before`` to ``after`` around its peak (`saebench_poly.stored_examples`)."""

    members: int
    before: int
    after: int


# What `Accumulator.after_pass` returns: a generator that yields one `RowRequest` per round and is sent its `Rows`.
AfterPass = Generator["RowRequest", "Rows", None]


@dataclass(frozen=True)
class MetricSpec:
    """One leaderboard metric. ``direction``: which way is better (``neutral``: no better way, e.g. a ratio whose
    ideal is 1). ``definition``: the formula, shown by ``saebench-poly list``. ``bounds``: the closed interval every
    value lies in by definition (``submit`` refuses a value outside it)."""

    name: str
    version: int
    direction: Direction
    family: str
    definition: str
    bounds: tuple[float, float] = (-math.inf, math.inf)


@dataclass
class DownstreamBatch:
    """Per-position next-token statistics for one entry on one batch, over positions that are scored and have a
    next token (float64): clean cross-entropy, cross-entropy with the reconstruction spliced in, with the hook
    zero-ablated, and KL(clean || spliced)."""

    ce_clean: torch.Tensor
    ce_spliced: torch.Tensor
    ce_zero_ablated: torch.Tensor
    kl: torch.Tensor


# Rows summed at once into int16 by `active_counts` (the most that cannot overflow it).
_INT16_ROWS = 2**15 - 1


def active_counts(z: torch.Tensor) -> torch.Tensor:
    """``[width]`` int64: per column of ``z`` ``[N, width]``, the rows where it is non-zero (NaN counts, as for
    ``z != 0``). ``z.bool()`` summed into int16 over chunks of at most 32,767 rows: on CPU a 2,048 x 4,096 batch
    takes 3.7 ms, against 24 ms for ``(z != 0).sum(dim=0, dtype=torch.int32)``."""
    counts = torch.zeros(z.shape[1], dtype=torch.int64, device=z.device)
    for chunk in z.bool().split(_INT16_ROWS):
        counts += chunk.sum(dim=0, dtype=torch.int16)
    return counts


# A code whose batch has at most this fraction of its entries non-zero is sparse: its statistics are gathered from
# the active entries (`EntryBatch.active_entries`) rather than dense products.
SPARSE_FRACTION = 1 / 32


@dataclass
class EntryBatch:
    """What an entry produced on one batch, at its scored positions: the activations ``x`` ``[N, d_out]`` that it
    reconstructs (those of its output hook: its input, except for a transcoder), code ``z`` ``[N, width]``,
    reconstruction ``x_hat`` ``[N, d_out]``, where each row came from (``context`` ``[N]``: the
    context's index in the scored data, counted from 0 across batches; ``position`` ``[N]``: the token's position in
    it), the index of its first row among all scored tokens (``first_token``; the rows are consecutive tokens), and
    downstream statistics when requested. ``shared``: a dict the pass hands every entry at the same hook in the same
    batch (see `per_hook`)."""

    x: torch.Tensor
    z: torch.Tensor
    x_hat: torch.Tensor
    context: torch.Tensor | None = None
    position: torch.Tensor | None = None
    first_token: int | None = None
    downstream: DownstreamBatch | None = None
    shared: dict[str, Any] = field(default_factory=dict, repr=False)
    _firing_counts: torch.Tensor | None = field(default=None, init=False, repr=False)
    _active_entries: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def per_hook(self, key: str, compute: Callable[[torch.Tensor], Any]) -> Any:
        """``compute(x)``, computed once per batch for all the entries at this hook (``x`` is the same for all of
        them): ``compute`` must be a pure function of ``x``, and ``key`` name it. The result is shared: read it,
        never change it in place."""
        if key not in self.shared:
            self.shared[key] = compute(self.x)
        return self.shared[key]

    def firing_counts(self) -> torch.Tensor:
        """``[width]`` int64: on how many of the batch's rows each unit is active (z != 0); computed once per batch
        and shared by the families that count firing."""
        if self._firing_counts is None:
            self._firing_counts = active_counts(self.z.detach())
        return self._firing_counts

    def is_sparse(self) -> bool:
        """Whether at most `SPARSE_FRACTION` of ``z``'s entries are non-zero (from `firing_counts`)."""
        return int(self.firing_counts().sum()) <= self.z.numel() * SPARSE_FRACTION

    def active_entries(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows, units)``: the indices of ``z``'s non-zero entries, row by row and in increasing unit order
        within a row (``z.nonzero``); computed once per batch and shared by the families that read sparse codes."""
        if self._active_entries is None:
            self._active_entries = self.z.detach().nonzero(as_tuple=True)  # ~30% faster than z.bool().nonzero()
        return self._active_entries


class NoOptions(BaseModel):
    """The options of a metric family that takes none: any key is an error."""

    model_config = ConfigDict(extra="forbid")


class Accumulator(ABC):
    """Streams over an entry's batches and reports the metrics in ``metrics``.

    A family with parameters declares them as a pydantic model in ``Options`` (unknown keys forbidden) and takes
    ``options`` as a third constructor argument; a spec sets them under ``[metric_options.<family>]``, and the run
    passes them only to families that were given some."""

    metrics: ClassVar[tuple[MetricSpec, ...]]
    # Attributes that are not accumulated state (the model, the entry, what is derived from them): left out when an
    # accumulator travels between the processes of one run (`saebench_poly.executors`), since `merge` never reads them.
    transient: ClassVar[tuple[str, ...]] = ("entry", "adapter")
    # Per-unit columns that this family adds to the per-unit table beyond the built-in ones
    # (`saebench_poly.leaderboard.UNITS_SCHEMA`): float64 values, one per unit, that `unit_values` returns.
    unit_columns: ClassVar[tuple[str, ...]] = ()
    needs_downstream: ClassVar[bool] = False
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, entry: Entry, adapter: ModelAdapter) -> None:
        self.entry = entry
        self.adapter = adapter

    @classmethod
    def applies(cls, entry: Entry, adapter: ModelAdapter) -> bool:
        """Whether these metrics are defined for this entry on this model."""
        return True

    @abstractmethod
    def update(self, batch: EntryBatch) -> None:
        """Fold one batch in."""

    @abstractmethod
    def compute(self) -> dict[str, float]:
        """Metric name -> value."""

    def merge(self, other: Accumulator) -> None:
        """Fold in the state of ``other``, an accumulator of the same class, entry and options fed other scored
        tokens (disjoint from these, their contexts numbered in the same global order): afterwards `compute` gives
        what one accumulator fed both would give, to float tolerance. Needed to shard a run over processes
        (``--executor ray``); a family that does not define it can only run in one process."""
        raise NotImplementedError(f"metric family {type(self).__name__} does not define merge, so it cannot be "
                                  "sharded: run it with --executor local")

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in self.transient}

    def after_pass(self, plan: PostPass) -> AfterPass | None:
        """For a family that needs rows of chosen scored contexts again after the pass (the characteristic examples
        of `saebench_poly.metrics.polysemanticity`): a generator that yields a `RowRequest` per round and is sent
        the `Rows` it asked for, called once after the pass and before `compute`; None (the default) when it needs
        none. ``plan``: what the stage offers (`PostPass`).
        The pass runs the model; the accumulator only asks and computes."""
        return None

    def unit_values(self) -> dict[str, torch.Tensor | Sequence[Any]]:
        """Per-unit columns ``[width]`` for the per-unit table (none by default): tensors, or sequences (numpy or
        pandas arrays, lists) for the columns that are strings, lists or nullable integers. Each is a built-in
        per-unit column or one of ``unit_columns``."""
        return {}
