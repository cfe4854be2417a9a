"""The stored examples' token windows (`saebench_poly.stored_examples` has the table and its definition).

Two steps, with a narrow interface between them so that the behaviours can be found however the polysemanticity
family likes:

1. `members_from_behaviours`: from one entry's characteristic examples and behaviours, which examples to store:
   `StoredMembers`, per unit and behaviour the central example and up to ``more`` other members (in sample order),
   each a (context, position).
2. `read_windows`: after the pass and the behaviours, one more run of the model over the contexts of the stored
   examples of every entry (nothing else is read again, and nothing was kept per token of the data): each batch's
   activations at every entry's hook are encoded once per entry, and each stored example takes the unit's code z
   on its window of tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from saebench_poly.activations import ScoredEntry
from saebench_poly.metrics.base import ScoredContexts
from saebench_poly.metrics.behaviours import Behaviours
from saebench_poly.metrics.examples import Examples
from saebench_poly.models.base import Batch, ModelAdapter
from saebench_poly.sources.base import Entry
from saebench_poly.stored_examples import WINDOW_AFTER, WINDOW_BEFORE


@dataclass
class StoredMembers:
    """The examples to store for one entry, one per row (int64 ``[R]`` each, rows by unit, behaviour, rank):
    ``unit``; ``behaviour`` (its index in the unit's behaviour sizes, 0 = the largest) and ``behaviour_size``;
    ``rank`` (0 = the behaviour's central example, then its other members in the order of the unit's sample);
    ``context`` and ``position`` of the example's peak token."""

    unit: torch.Tensor
    behaviour: torch.Tensor
    behaviour_size: torch.Tensor
    rank: torch.Tensor
    context: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return int(self.unit.numel())


def members_from_behaviours(examples: Examples, behaviours: Behaviours, more: int) -> StoredMembers:
    """Each behaviour's central example and its first ``more`` other members (sample order), from the results of
    `saebench_poly.metrics.behaviours.unit_behaviours` (``members``: each example's behaviour; ``central``: each
    behaviour's central example)."""
    labels = behaviours.members.cpu()
    width, sample = labels.shape
    valid = labels >= 0
    units, index = valid.nonzero(as_tuple=True)  # by unit, then by sample order
    behaviour = labels[units, index]
    central = behaviours.central.cpu()[units, behaviour] == index
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
    units, index, behaviour, rank = units[order], index[order], behaviour[order], rank[order]
    return StoredMembers(unit=units, behaviour=behaviour, behaviour_size=behaviours.sizes.cpu()[units, behaviour],
                         rank=rank, context=examples.context.cpu()[units, index],
                         position=examples.position.cpu()[units, index])


def token_kind(adapter: ModelAdapter, batch: Batch) -> str:
    """What a window's tokens are (`saebench_poly.stored_examples`): text with a tokenizer, ids for integer inputs
    with one id per position, features for a toy model's sample of feature values."""
    if getattr(adapter, "tokenizer", None) is not None:
        return "text"
    inputs = batch.inputs
    if not inputs.is_floating_point() and inputs.dim() == 2 and inputs.shape[1] == batch.score_mask.shape[1]:
        return "ids"
    return "features"


def _features_text(values: torch.Tensor) -> str:
    nonzero = values.nonzero(as_tuple=True)[0].tolist()
    return " ".join(f"f{i}={float(values[i]):.3g}" for i in nonzero) or "(no feature active)"


def read_windows(entries: Sequence[Entry], members: Sequence[StoredMembers], contexts: ScoredContexts,
                 adapter: ModelAdapter, progress: Callable[[int], None] | None = None) -> list[pd.DataFrame]:
    """The stored examples' rows (`saebench_poly.stored_examples`, without the provenance columns) of each entry,
    from one run of the model over the union of their contexts: one forward per batch for every entry's hook, and
    one encoding per entry and batch."""
    union = torch.unique(torch.cat([m.context for m in members])) if members else torch.empty(0, dtype=torch.int64)
    hooks = sorted({entry.hook for entry, m in zip(entries, members, strict=True) if len(m)})
    # each entry's rows by context, so that a batch (a run of the union, in increasing order) takes a slice of them
    by_context = [torch.argsort(m.context, stable=True) for m in members]
    sorted_contexts = [m.context[order] for m, order in zip(members, by_context, strict=True)]
    # per entry, per batch: the rows filled, their window starts and lengths, codes and ids [rows, window]
    parts: list[list[tuple]] = [[] for _ in entries]
    kind, features = None, {}
    span = torch.arange(WINDOW_BEFORE + WINDOW_AFTER + 1)
    with torch.no_grad():
        for indices, batch in contexts(union):
            indices = indices.cpu()
            kind = kind or token_kind(adapter, batch)
            batch = batch.to(adapter.device)
            activations = adapter.forward(batch, hooks, logits=False).activations
            positions = batch.score_mask.shape[1]
            inputs = batch.inputs.cpu()
            for entry, chosen, order, ordered, out in zip(entries, members, by_context, sorted_contexts, parts, strict=True):
                lo = int(torch.searchsorted(ordered, indices[0]))
                hi = int(torch.searchsorted(ordered, indices[-1], right=True))
                if hi == lo:
                    continue
                rows = order[lo:hi]
                # only the batch's contexts that hold this entry's examples are encoded
                needed, local = torch.unique(torch.searchsorted(indices, chosen.context[rows]), return_inverse=True)
                x = activations[entry.hook][needed.to(batch.inputs.device)]
                z = entry.encode(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], positions, -1)
                peak = chosen.position[rows]
                start = (peak - WINDOW_BEFORE).clamp_min(0)
                length = (peak + WINDOW_AFTER).clamp_max(positions - 1) - start + 1
                where = (start[:, None] + span).clamp_max(positions - 1)
                values = z[local[:, None].to(z.device), where.to(z.device), chosen.unit[rows, None].to(z.device)]
                if kind == "features":
                    ids = None
                    for context, sample in zip(chosen.context[rows].tolist(), inputs[needed[local]], strict=True):
                        features.setdefault(context, _features_text(sample))
                else:
                    ids = inputs[needed[local][:, None], where]
                out.append((rows, start, length, values.to(torch.float32).cpu(), ids))
            if progress:
                progress(indices.numel())
    return [_frame(chosen, out, kind, features, getattr(adapter, "tokenizer", None)) for chosen, out in zip(members, parts, strict=True)]


def _frame(chosen: StoredMembers, parts: list[tuple], kind: str | None, features: dict[int, str], tokenizer: Any) -> pd.DataFrame:
    """One entry's rows, in the order of ``chosen``, from the pieces `read_windows` gathered batch by batch."""
    filled = sum(part[0].numel() for part in parts)
    if filled != len(chosen):
        raise RuntimeError(f"the scored contexts gave {filled} of the {len(chosen)} stored examples' windows")
    frame = pd.DataFrame({
        "unit": chosen.unit.numpy(), "behaviour": chosen.behaviour.numpy(), "behaviour_size": chosen.behaviour_size.numpy(),
        "rank": chosen.rank.numpy(), "central": (chosen.rank == 0).numpy(), "context": chosen.context.numpy(),
        "position": chosen.position.numpy(), "token_kind": np.full(len(chosen), kind or "", dtype=object),
    })
    if not parts:
        return frame.assign(window_start=np.zeros(0, np.int64), token_ids=[], tokens=[], activations=[])
    rows, start, length, values = (torch.cat([part[i] for part in parts]) for i in range(4))
    order = torch.argsort(rows)
    start, length, values = start[order].numpy(), length[order].numpy(), values[order]
    keep = (torch.arange(values.shape[1])[None, :] < torch.as_tensor(length)[:, None]).numpy()
    cut = np.cumsum(length)[:-1]
    frame["window_start"] = start
    frame["activations"] = np.split(values.numpy()[keep], cut)
    if kind == "features":
        frame["token_ids"] = None
        frame["tokens"] = [[features[c]] for c in frame["context"]]
        return frame
    ids = torch.cat([part[4] for part in parts])[order].numpy()[keep]
    distinct, inverse = np.unique(ids, return_inverse=True)
    decoded = (tokenizer.batch_decode([[int(i)] for i in distinct]) if tokenizer is not None
               else [str(int(i)) for i in distinct])
    frame["token_ids"] = np.split(ids, cut)
    frame["tokens"] = np.split(np.asarray(decoded, dtype=object)[inverse], cut)
    return frame


def stored_examples(scored: Sequence[ScoredEntry], contexts: ScoredContexts, adapter: ModelAdapter, more: int,
                    progress: Callable[[int], None] | None = None) -> dict[str, pd.DataFrame]:
    """Entry name -> its stored examples' rows, for the entries whose behaviours the polysemanticity family found
    (after `saebench_poly.activations.revisit`)."""
    from saebench_poly.metrics.polysemanticity import Polysemanticity

    entries, members = [], []
    for item in scored:
        for accumulator in item.accumulators:
            if isinstance(accumulator, Polysemanticity) and accumulator.behaviours is not None:
                entries.append(item.entry)
                members.append(members_from_behaviours(accumulator.examples, accumulator.behaviours, more))
    frames = read_windows(entries, members, contexts, adapter, progress)
    return {entry.name: frame for entry, frame in zip(entries, frames, strict=True)}
