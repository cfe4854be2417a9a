"""The stored examples' rows (`saebench_poly.stored_examples` has the table and its definition).

Two steps, with a narrow interface between them so that the behaviours can be found however the polysemanticity
family likes:

1. `members_from_behaviours`: from one entry's characteristic examples and behaviours, which examples to store:
   `StoredMembers`, per unit and behaviour the central example and up to ``more`` other members (in sample order),
   each a (context, position).
2. `stored_examples`: the rows of the members the polysemanticity family kept, with the code windows that the pass
   after the scoring pass read for them (`saebench_poly.metrics.base.Windows`, in the same run of the model as
   the examples' rows: `saebench_poly.revisit`). Nothing was kept per token of the data but the token ids of the
   contexts read again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from saebench_poly.metrics.base import Windows
from saebench_poly.metrics.behaviours import Behaviours
from saebench_poly.metrics.examples import Examples

if TYPE_CHECKING:
    from saebench_poly.activations import ScoredEntry
    from saebench_poly.models.base import ModelAdapter


@dataclass
class StoredMembers:
    """The examples to store for one entry, one per row (int64 ``[R]`` each, rows by unit, behaviour, rank):
    ``unit``; ``behaviour`` (its index in the unit's behaviour sizes, 0 = the largest) and ``behaviour_size``;
    ``rank`` (0 = the behaviour's central example, then its other members in the order of the unit's sample);
    ``sample``: the example's index in the unit's sample (`Examples`); ``context`` and ``position`` of its peak
    token."""

    unit: torch.Tensor
    behaviour: torch.Tensor
    behaviour_size: torch.Tensor
    rank: torch.Tensor
    sample: torch.Tensor
    context: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return int(self.unit.numel())


def members_from_behaviours(examples: Examples, behaviours: Behaviours, more: int, start: int = 0,
                            end: int | None = None) -> StoredMembers:
    """Each behaviour's central example and its first ``more`` other members (sample order), of the units [start,
    end) (all by default), from the results of `saebench_poly.metrics.behaviours.unit_behaviours` (``members``: each
    example's behaviour; ``central``: each behaviour's central example)."""
    end = behaviours.members.shape[0] if end is None else end
    labels = behaviours.members[start:end].cpu()
    width, sample = labels.shape
    valid = labels >= 0
    units, index = valid.nonzero(as_tuple=True)  # by unit, then by sample order
    behaviour = labels[units, index]
    central = behaviours.central[start:end].cpu()[units, behaviour] == index
    # rank: 0 for the central example, then 1, 2, ... over the behaviour's other members in sample order
    group = units * sample + behaviour
    others = ~central
    order = torch.sort(torch.where(others, group, -1), stable=True).indices
    order = order[others[order]]
    first = torch.ones(order.numel(), dtype=torch.bool)
    first[1:] = group[order][1:] != group[order][:-1]
    starts = torch.cummax(torch.where(first, torch.arange(order.numel()), 0), dim=0).values
    rank = torch.zeros_like(units)
    rank[order] = torch.arange(order.numel()) - starts + 1
    keep = rank <= more
    units, index, behaviour, rank = units[keep], index[keep], behaviour[keep], rank[keep]
    order = torch.argsort((units * sample + behaviour) * (sample + 1) + rank)
    units, index, behaviour, rank = units[order] + start, index[order], behaviour[order], rank[order]
    return StoredMembers(unit=units, behaviour=behaviour, behaviour_size=behaviours.sizes.cpu()[units, behaviour],
                         rank=rank, sample=index, context=examples.context.cpu()[units, index],
                         position=examples.position.cpu()[units, index])


def _features_text(values: torch.Tensor) -> str:
    nonzero = values.nonzero(as_tuple=True)[0].tolist()
    return " ".join(f"f{i}={float(values[i]):.3g}" for i in nonzero) or "(no feature active)"


def _frame(parts: Sequence[tuple[StoredMembers, Windows]], tokenizer: Any) -> pd.DataFrame:
    """One entry's rows, group by group, each in the order of its members."""
    chosen = StoredMembers(*(torch.cat([getattr(members, name) for members, _ in parts] + [torch.zeros(0, dtype=torch.int64)])
                             for name in StoredMembers.__dataclass_fields__))
    kind = next((windows.inputs.kind for _, windows in parts), "")
    frame = pd.DataFrame({
        "unit": chosen.unit.numpy(), "behaviour": chosen.behaviour.numpy(), "behaviour_size": chosen.behaviour_size.numpy(),
        "rank": chosen.rank.numpy(), "central": (chosen.rank == 0).numpy(), "context": chosen.context.numpy(),
        "position": chosen.position.numpy(), "token_kind": np.full(len(chosen), kind, dtype=object),
    })
    if not len(chosen):
        return frame.assign(window_start=np.zeros(0, np.int64), token_ids=[], tokens=[], activations=[])
    start, length, values = (torch.cat([getattr(windows, name) for _, windows in parts]) for name in ("start", "length", "values"))
    start, length = start.numpy(), length.numpy()
    keep = (torch.arange(values.shape[1])[None, :] < torch.as_tensor(length)[:, None]).numpy()
    cut = np.cumsum(length)[:-1]
    frame["window_start"] = start
    frame["activations"] = np.split(values.numpy()[keep], cut)
    if kind == "features":
        frame["token_ids"] = None
        frame["tokens"] = [[_features_text(sample)] for _, windows in parts for sample in windows.context_inputs()]
        return frame
    ids = torch.cat([windows.tokens() for _, windows in parts]).numpy()[keep]
    distinct, inverse = np.unique(ids, return_inverse=True)
    decoded = (tokenizer.batch_decode([[int(i)] for i in distinct]) if tokenizer is not None
               else [str(int(i)) for i in distinct])
    frame["token_ids"] = np.split(ids, cut)
    frame["tokens"] = np.split(np.asarray(decoded, dtype=object)[inverse], cut)
    return frame


def stored_examples(scored: Sequence[ScoredEntry], adapter: ModelAdapter) -> dict[str, pd.DataFrame]:
    """Entry name -> its stored examples' rows (without the provenance columns), for the entries whose behaviours
    the polysemanticity family found with windows (`saebench_poly.revisit.revisit` offered them)."""
    from saebench_poly.metrics.polysemanticity import Polysemanticity

    frames = {}
    for item in scored:
        for accumulator in item.accumulators:
            if isinstance(accumulator, Polysemanticity) and accumulator.stored is not None:
                frames[item.entry.name] = _frame(accumulator.stored, getattr(adapter, "tokenizer", None))
    return frames
