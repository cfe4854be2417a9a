"""The one activation pass: each batch runs through the model once, and the activations at every needed hook feed
every entry and every accumulator. Nothing larger than one batch's activations and codes is ever held.

An entry reads its hook and reconstructs its output hook (the same hook, except for transcoders, which are scored
against the output hook's activations). Downstream statistics need the model re-run with the output hook's
activations replaced: once per hook for the zero-ablation and once per entry for its reconstruction (from the hook's
block onwards where the adapter can).
After the pass, `saebench_poly.revisit` re-runs the model over the few scored contexts that the accumulators ask rows
of.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from saebench_poly.errors import UserError
from saebench_poly.metrics.base import Accumulator, DownstreamBatch, EntryBatch
from saebench_poly.metrics.downstream import cross_entropy, kl_divergence, next_token_log_probs
from saebench_poly.metrics.moments import Moments
from saebench_poly.models.base import Batch, ForwardOutput, ModelAdapter
from saebench_poly.sources.base import Entry

Progress = Callable[[int], None]


@dataclass
class ScoredEntry:
    """An entry and the accumulators that score it."""

    entry: Entry
    accumulators: list[Accumulator] = field(default_factory=list)

    @property
    def needs_downstream(self) -> bool:
        return any(a.needs_downstream for a in self.accumulators)


def fit_baselines(adapter: ModelAdapter, entries: list[Entry], batches: Iterable[Batch], progress: Progress | None = None) -> None:
    """Fit the entries that need it (PCA) on held-out batches: one model pass, one `Moments` per hook."""
    to_fit = [e for e in entries if e.needs_fit]
    if not to_fit:
        return
    moments = {e.hook: Moments() for e in to_fit}
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(adapter.device)
            output = adapter.forward(batch, sorted(moments), logits=False)
            for hook, accumulator in moments.items():
                accumulator.update(output.activations[hook][batch.score_mask])
            if progress:
                progress(int(batch.score_mask.sum()))
    for entry in to_fit:
        hook_moments = moments[entry.hook]
        if hook_moments.count < 2:
            raise UserError(f"{hook_moments.count} held-out token(s) to fit {entry.name}, and it needs at least 2: "
                            "raise fit_tokens")
        entry.fit(hook_moments.mean, hook_moments.covariance())


def score(adapter: ModelAdapter, scored: list[ScoredEntry], batches: Iterable[Batch], progress: Progress | None = None,
          first_context: int = 0, first_token: int = 0) -> int:
    """Feed every batch to every entry's accumulators; returns the number of tokens scored. The batches' contexts
    and tokens are numbered from ``first_context`` and ``first_token`` (a shard of the scored data numbers its
    contexts and tokens as the whole run does)."""
    hooks = sorted({hook for s in scored for hook in (s.entry.hook, s.entry.output_hook)})
    downstream_hooks = sorted({s.entry.output_hook for s in scored if s.needs_downstream})
    tokens, contexts = 0, first_context
    with torch.no_grad():
        for batch in batches:
            batch = batch.to(adapter.device)
            clean = adapter.forward(batch, hooks, logits=bool(downstream_hooks))
            activations = {hook: clean.activations[hook][batch.score_mask] for hook in hooks}
            context, position = batch.score_mask.nonzero(as_tuple=True)
            context = context + contexts
            contexts += batch.score_mask.shape[0]
            downstream = _DownstreamPass(adapter, batch, clean, downstream_hooks) if downstream_hooks else None
            shared: dict[str, dict] = {hook: {} for hook in hooks}
            for item in scored:
                x = activations[item.entry.hook]
                z = item.entry.encode(x)
                x_hat = item.entry.reconstruct(x, z)
                target = activations[item.entry.output_hook]  # x, except for a transcoder
                entry_batch = EntryBatch(x=target, z=z, x_hat=x_hat, context=context, position=position,
                                         first_token=first_token + tokens, shared=shared[item.entry.output_hook])
                if item.needs_downstream:
                    entry_batch.downstream = downstream.statistics(item.entry.output_hook, target, x_hat)
                for accumulator in item.accumulators:
                    accumulator.update(entry_batch)
            scored_here = int(batch.score_mask.sum())
            tokens += scored_here
            if progress:
                progress(scored_here)
    return tokens


class _DownstreamPass:
    """Next-token statistics of one batch: the clean log-probabilities and each hook's zero-ablation once, then a
    spliced forward per entry. A reconstruction within float rounding of its input (`reproduces`: the raw-neuron
    identity bitwise, a full-rank basis such as PCA or a random rotation to ~1e-6 in float32) would re-run the clean
    forward up to that rounding, so the clean log-probabilities stand in for it."""

    def __init__(self, adapter: ModelAdapter, batch: Batch, clean: ForwardOutput, hooks: list[str]) -> None:
        self.adapter, self.batch, self.clean = adapter, batch, clean
        self.positions = batch.score_mask[:, :-1]
        self.clean_log_probs = next_token_log_probs(clean.logits, self.positions)
        self.clean_probs = self.clean_log_probs.exp()
        self.ce_clean = cross_entropy(self.clean_log_probs, batch.inputs, self.positions)
        self.ce_zero = {hook: cross_entropy(self._spliced_log_probs(hook, None), batch.inputs, self.positions) for hook in hooks}
        self.kl_zero = torch.zeros_like(self.ce_clean)

    def _spliced_log_probs(self, hook: str, values: torch.Tensor | None) -> torch.Tensor:
        logits = self.adapter.forward_with_replacement(self.batch, self.clean, hook, _spliced(self.batch.score_mask, values))
        return next_token_log_probs(logits, self.positions)

    def statistics(self, hook: str, x: torch.Tensor, x_hat: torch.Tensor) -> DownstreamBatch:
        if reproduces(x, x_hat):
            return DownstreamBatch(ce_clean=self.ce_clean, ce_spliced=self.ce_clean, ce_zero_ablated=self.ce_zero[hook],
                                   kl=self.kl_zero)
        log_probs = self._spliced_log_probs(hook, x_hat)
        return DownstreamBatch(ce_clean=self.ce_clean, ce_spliced=cross_entropy(log_probs, self.batch.inputs, self.positions),
                               ce_zero_ablated=self.ce_zero[hook],
                               kl=kl_divergence(self.clean_log_probs, log_probs, self.clean_probs))


REPRODUCES_TOLERANCE = 1e-5


def reproduces(x: torch.Tensor, x_hat: torch.Tensor) -> bool:
    """Whether ``x_hat`` equals ``x`` up to float rounding: bitwise, or every row within a relative L2 distance of
    1e-5 (a float32 full-rank orthonormal basis reconstructs to ~1e-6; any SAE is far above)."""
    if torch.equal(x_hat, x):
        return True
    if x.dtype not in (torch.float32, torch.float64):
        return False
    error = (x_hat - x).norm(dim=1)
    return bool((error <= REPRODUCES_TOLERANCE * x.norm(dim=1)).all())


def _spliced(mask: torch.Tensor, values: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """A replacement that writes ``values`` (zeros when None) at the scored positions and keeps the rest."""

    def replace(activations: torch.Tensor) -> torch.Tensor:
        replaced = activations.clone()
        replaced[mask] = 0 if values is None else values.to(replaced.dtype)
        return replaced

    return replace
