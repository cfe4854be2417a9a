"""The stage after the scoring pass: the model run again over the few scored contexts that the accumulators ask
rows of (`Accumulator.after_pass`: the characteristic examples of the polysemanticity family, and the code windows
of the examples it keeps for the stored-examples table), in rounds, each one run of the model over the union of the
round's contexts; the accumulators never run the model themselves.

In a round, each batch is one forward for every hook that the requests read, and the rows of a hook are stored once
for every request that reads it (`Rows`: entries at one hook, such as an SAE and the neurons, PCA and random
rotation beside it, select largely the same tokens), so that the memory of a round does not grow with the number of
entries at a hook. The windows are the code of the examples' units on the tokens around their peaks, read from the
same forwards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from saebench_poly.activations import Progress, ScoredEntry
from saebench_poly.metrics.base import (
    Accumulator,
    AfterPass,
    ContextInputs,
    ExampleWindows,
    PostPass,
    RowRequest,
    Rows,
    ScoredContexts,
    WindowRequest,
    Windows,
)
from saebench_poly.models.base import Batch, ModelAdapter
from saebench_poly.row_spill import SpilledRows, row_store


def revisit(adapter: ModelAdapter, scored: list[ScoredEntry], contexts: ScoredContexts,
            progress: Progress | None = None, windows: ExampleWindows | None = None) -> None:
    """`revisit_accumulators` for every accumulator of the run; ``progress`` advances by one per accumulator."""
    revisit_accumulators(adapter, [a for item in scored for a in item.accumulators], contexts, progress, windows)


def revisit_accumulators(adapter: ModelAdapter, accumulators: Sequence[Accumulator], contexts: ScoredContexts,
                         progress: Progress | None = None, windows: ExampleWindows | None = None) -> None:
    """After the pass, the rows the accumulators ask for (`Accumulator.after_pass`, offered ``windows``), in rounds:
    each round takes one request of every accumulator still asking and runs the model once over the union of their
    contexts (`read_rows`); the accumulators' generators compute between rounds. One round when every request fits
    at once (the polysemanticity family's `CACHE_BYTES`). ``progress`` advances by one per accumulator."""
    peers: dict[type, int] = {}
    for accumulator in accumulators:
        peers[type(accumulator)] = peers.get(type(accumulator), 0) + 1
    asking: list[tuple[AfterPass, RowRequest]] = []
    with torch.no_grad():
        for accumulator in accumulators:
            rounds = accumulator.after_pass(PostPass(peers=peers[type(accumulator)], windows=windows))
            request = next(rounds, None) if rounds is not None else None
            if request is None and progress:
                progress(1)
            if request is not None:
                asking.append((rounds, request))
        while asking:
            answers = read_rows(adapter, [request for _, request in asking], contexts)
            still = []
            for (rounds, _), rows in zip(asking, answers, strict=True):
                try:
                    still.append((rounds, rounds.send(rows)))
                except StopIteration:
                    if progress:
                        progress(1)
            # this round's stores go before the next round reads its own: two rounds never hold rows at once
            answers = rows = None
            asking = still


def read_rows(adapter: ModelAdapter, requests: Sequence[RowRequest], contexts: ScoredContexts) -> list[Rows]:
    """Each request's `Rows` (and windows), from one run of the model over the union of their contexts: each batch
    is one forward for every hook that the requests read (their inputs' `UnitInputs.hook`, their windows' entry
    hooks), whose rows every request at that hook shares."""
    asked = [request.context.cpu() for request in requests]
    asked += [request.windows.context.cpu() for request in requests if request.windows is not None]
    union = torch.unique(torch.cat(asked))
    stores = _RowStores(requests)
    readers = [_WindowReader(request.windows) if request.windows is not None else None for request in requests]
    hooks = sorted(stores.hooks | {reader.request.entry.hook for reader in readers if reader is not None})
    inputs = _InputsReader(adapter) if any(readers) else None
    for indices, batch in contexts(union):
        indices = indices.cpu()
        if inputs is not None:
            inputs.read(indices, batch)
        batch = batch.to(adapter.device)
        activations = adapter.forward(batch, hooks, logits=False).activations if hooks else {}
        stores.read(indices, batch, activations)
        for reader in readers:
            if reader is not None:
                reader.read(indices, batch, activations)
    context_inputs = inputs.result() if inputs is not None else None
    return [rows if reader is None else replace(rows, windows=reader.result(context_inputs))
            for rows, reader in zip(stores.result(), readers, strict=True)]


def _slice(wanted: torch.Tensor, indices: torch.Tensor) -> tuple[int, int]:
    """The run [lo, hi) of ``wanted`` (increasing) that lies within a batch's contexts ``indices`` (increasing)."""
    return int(torch.searchsorted(wanted, indices[0])), int(torch.searchsorted(wanted, indices[-1], right=True))


class _RowStores:
    """The stores of a round: per hook read by some request, the hook's activations at every distinct (context,
    position) that the requests at the hook ask for; per request that reads no hook, h at its own rows."""

    def __init__(self, requests: Sequence[RowRequest]) -> None:
        self.requests = requests
        self.asked = [(request.context.cpu(), request.position.cpu()) for request in requests]
        by_hook: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            if request.inputs.hook is not None:
                by_hook.setdefault(request.inputs.hook, []).append(i)
        self.hooks = set(by_hook)
        self.index: list[torch.Tensor | None] = [None] * len(requests)
        # hook -> (context, position) of its store's rows, by context
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for hook, members in by_hook.items():
            context = torch.cat([self.asked[i][0] for i in members])
            position = torch.cat([self.asked[i][1] for i in members])
            span = int(position.max()) + 1 if position.numel() else 1
            keys, inverse = torch.unique(context * span + position, return_inverse=True)
            self.pairs[hook] = (keys // span, keys % span)
            offsets = [0]
            for i in members:
                offsets.append(offsets[-1] + requests[i].context.numel())
            for i, lo, hi in zip(members, offsets, offsets[1:], strict=False):
                self.index[i] = inverse[lo:hi]
        self.devices = {request.inputs.hook: request.inputs.weight.device for request in reversed(requests)}
        # the stores: by hook, or by request for requests that read no hook
        self.stores: dict[str | int, torch.Tensor | SpilledRows] = {}
        self.filled: dict[str | int, int] = {}

    def read(self, indices: torch.Tensor, batch: Batch, activations: dict[str, torch.Tensor]) -> None:
        for hook, (context, position) in self.pairs.items():
            self._fill(hook, context, position, indices, lambda hook=hook: activations[hook])
        for i, request in enumerate(self.requests):
            if request.inputs.hook is None:
                self._fill(i, *self.asked[i], indices, lambda request=request: request.inputs.capture(batch, activations))

    def _fill(self, key: str | int, context: torch.Tensor, position: torch.Tensor, indices: torch.Tensor,
              values: Callable[[], torch.Tensor]) -> None:
        lo, hi = _slice(context, indices)
        if hi == lo:
            return
        h = values()
        local = torch.searchsorted(indices, context[lo:hi]).to(h.device)
        if key not in self.stores:
            device = self.devices[key] if isinstance(key, str) else self.requests[key].inputs.weight.device
            self.stores[key] = row_store(context.numel(), tuple(h.shape[2:]), h.dtype, device)
            self.filled[key] = 0
        store = self.stores[key]
        store[lo:hi] = h[local, position[lo:hi].to(h.device)].to(store.device)
        self.filled[key] += hi - lo

    def result(self) -> list[Rows]:
        out = []
        for i, request in enumerate(self.requests):
            hook = request.inputs.hook
            key, asked = (hook, self.pairs[hook][0].numel()) if hook is not None else (i, request.context.numel())
            if self.filled.get(key, 0) != asked:
                raise RuntimeError(f"the scored contexts gave {self.filled.get(key, 0)} of the {asked} rows asked for")
            if hook is None:
                out.append(Rows(store=self.stores[i], index=torch.arange(asked, device=self.stores[i].device)))
            else:
                store = self.stores[hook]
                out.append(Rows(store=store, index=self.index[i].to(store.device), transform=request.inputs.transform))
        return out


class _WindowReader:
    """One `WindowRequest`'s windows, batch by batch: the batch's contexts that hold its examples are encoded once,
    and each example takes its unit's code on its window."""

    def __init__(self, request: WindowRequest) -> None:
        self.request = request
        self.order = torch.argsort(request.context.cpu(), stable=True)
        self.contexts = request.context.cpu()[self.order]
        self.span = torch.arange(request.before + request.after + 1)
        # each row's window, written in place as its batch comes (no list of parts to concatenate and reorder)
        rows = request.context.numel()
        self.start = torch.zeros(rows, dtype=torch.int64)
        self.length = torch.zeros(rows, dtype=torch.int64)
        self.values = torch.zeros((rows, self.span.numel()), dtype=torch.float32)
        self.filled = 0

    def read(self, indices: torch.Tensor, batch: Batch, activations: dict[str, torch.Tensor]) -> None:
        lo, hi = _slice(self.contexts, indices)
        if hi == lo:
            return
        request, rows = self.request, self.order[lo:hi]
        positions = batch.score_mask.shape[1]
        # only the batch's contexts that hold this request's examples are encoded
        needed, local = torch.unique(torch.searchsorted(indices, request.context.cpu()[rows]), return_inverse=True)
        x = activations[request.entry.hook][needed.to(batch.inputs.device)]
        z = request.entry.encode(x.reshape(-1, x.shape[-1])).reshape(x.shape[0], positions, -1)
        peak = request.position.cpu()[rows]
        start = (peak - request.before).clamp_min(0)
        length = (peak + request.after).clamp_max(positions - 1) - start + 1
        where = (start[:, None] + self.span).clamp_max(positions - 1)
        values = z[local[:, None].to(z.device), where.to(z.device), request.unit.cpu()[rows, None].to(z.device)]
        self.start[rows], self.length[rows] = start, length
        self.values[rows] = values.to(torch.float32).cpu()
        self.filled += rows.numel()

    def result(self, inputs: ContextInputs) -> Windows:
        if self.filled != self.request.context.numel():
            raise RuntimeError(f"the scored contexts gave {self.filled} of the {self.request.context.numel()} windows asked for")
        return Windows(context=self.request.context.cpu(), start=self.start, length=self.length, values=self.values,
                       inputs=inputs)


class _InputsReader:
    """The model inputs of the round's contexts (on the CPU), which the windows' tokens come from."""

    def __init__(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        self.kind: str | None = None
        self.contexts: list[torch.Tensor] = []
        self.inputs: list[torch.Tensor] = []

    def read(self, indices: torch.Tensor, batch: Batch) -> None:
        self.kind = self.kind or token_kind(self.adapter, batch)
        self.contexts.append(indices)
        self.inputs.append(batch.inputs.cpu())

    def result(self) -> ContextInputs:
        if not self.contexts:
            return ContextInputs(context=torch.zeros(0, dtype=torch.int64), inputs=torch.zeros((0, 1)), kind="")
        return ContextInputs(context=torch.cat(self.contexts), inputs=torch.cat(self.inputs), kind=self.kind or "")


def token_kind(adapter: ModelAdapter, batch: Batch) -> str:
    """What a window's tokens are (`saebench_poly.stored_examples`): text with a tokenizer, ids for integer inputs
    with one id per position, features for a toy model's sample of feature values."""
    if getattr(adapter, "tokenizer", None) is not None:
        return "text"
    inputs = batch.inputs
    if not inputs.is_floating_point() and inputs.dim() == 2 and inputs.shape[1] == batch.score_mask.shape[1]:
        return "ids"
    return "features"
