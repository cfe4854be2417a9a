"""The data of a run, cut into three disjoint parts: ``fit`` (held out, fits the PCA baselines), ``score`` (what
every metric is computed on) and ``train`` (activations for the SAEs a spec trains).

Language models: the token stream's contexts are taken in order, ``fit`` first, then ``score``, then ``train``.
Toy models: each part is sampled with its own seed (``seed + 1`` fit, ``seed`` score, ``seed + 2`` train).

Tokens that are not text are never scored, in any part (`ignored_token_ids`): by default the model's special tokens
(BOS, EOS, pad, SEP, CLS, mask, decoder start: `ModelAdapter.special_token_ids`) and the spec's ``bos_token_id``,
wherever they stand in a context, as sae-lens's and SAEBench's evals exclude them (``ignore_tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Literal

import torch

from saebench_poly.data import TokenDataset, token_batches
from saebench_poly.errors import UserError
from saebench_poly.models.base import Batch, ModelAdapter
from saebench_poly.spec import BenchmarkSpec

Part = Literal["fit", "score"]
SYNTHETIC_SEED_OFFSETS = {"score": 0, "fit": 1, "train": 2}


class Inputs:
    """Batches of one part of the spec's data, for one model."""

    def __init__(self, spec: BenchmarkSpec, adapter: ModelAdapter) -> None:
        self.spec = spec
        self.adapter = adapter
        self.synthetic = spec.dataset.kind == "synthetic"
        if self.synthetic:
            self.dataset = None
            self.ignored_token_ids: list[int] = []
            return
        bos = spec.bos_token_id if spec.bos_token_id is not None else adapter.bos_token_id
        self.dataset = TokenDataset(
            spec.dataset, getattr(adapter, "tokenizer", None), context_size=spec.context_size, prepend_bos=spec.prepend_bos,
            bos_token_id=bos, seed=spec.seed,
        )
        self.scored_per_context = spec.context_size - (1 if spec.prepend_bos else 0)
        if self.scored_per_context <= 0:
            raise UserError("context_size must be at least 2 when prepend_bos is true")
        self.ignored_token_ids = ignored_token_ids(spec, adapter)

    def _contexts(self, tokens: int) -> int:
        return math.ceil(tokens / self.scored_per_context)

    def batches(self, part: Part, batch_size: int | None = None) -> Iterator[Batch]:
        """The batches of ``part`` (``fit`` or ``score``)."""
        batch_size = batch_size or self.spec.batch_size
        tokens = self.spec.fit_tokens if part == "fit" else self.spec.tokens
        if self.synthetic:
            return self.adapter.synthetic_batches(tokens, batch_size, self.spec.seed + SYNTHETIC_SEED_OFFSETS[part])
        skip = 0 if part == "fit" else self._contexts(self.spec.fit_tokens)
        return token_batches(self.dataset, self._contexts(tokens), batch_size, skip_contexts=skip,
                             ignored_ids=self.ignored_token_ids)

    def score_slice(self, start: int, stop: int) -> tuple[Iterator[Batch], int]:
        """The ``score`` contexts ``start .. stop - 1`` (a shard of a run) in batches of the spec's size, and the
        number of scored tokens before ``start``, so that the shard numbers its tokens as the whole run does. The
        contexts before ``start`` are read for their score masks, without running the model."""
        batch_size = self.spec.batch_size
        if self.synthetic:
            # toy models sample their inputs in one seeded stream: take the shard's rows out of it
            def rows() -> Iterator[Batch]:
                seen = 0
                for batch in self.batches("score"):
                    size = batch.score_mask.shape[0]
                    lo, hi = max(start - seen, 0), min(stop - seen, size)
                    if lo < hi:
                        yield Batch(batch.inputs[lo:hi], batch.score_mask[lo:hi])
                    seen += size
                    if seen >= stop:
                        return
            return rows(), start
        skip = self._contexts(self.spec.fit_tokens)
        before = 0
        if start:
            before = sum(int(batch.score_mask.sum()) for batch in token_batches(
                self.dataset, start, batch_size, skip_contexts=skip, ignored_ids=self.ignored_token_ids))
        return token_batches(self.dataset, stop - start, batch_size, skip_contexts=skip + start,
                             ignored_ids=self.ignored_token_ids), before

    def scored_contexts(self, contexts: torch.Tensor, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, Batch]]:
        """The ``score`` contexts with indices ``contexts`` (as `EntryBatch.context` counts them: from 0, across the
        batches of ``score``), in increasing order, in batches of at most ``batch_size``: (their indices, their batch).
        The data are read again from the start (no model runs), so the contexts are exactly those that were scored."""
        wanted = torch.unique(contexts.detach().cpu().to(torch.int64))
        batch_size = batch_size or self.spec.batch_size
        if wanted.numel() and (int(wanted[0]) < 0 or int(wanted[-1]) >= self.contexts_in("score")):
            raise ValueError(f"context indices must lie in [0, {self.contexts_in('score')}), got {wanted[0]}..{wanted[-1]}")
        pending: list[tuple[torch.Tensor, Batch]] = []
        held = start = taken = 0
        for batch in self.batches("score"):
            if taken == wanted.numel():
                break
            end = start + batch.score_mask.shape[0]
            upto = int(torch.searchsorted(wanted, end))
            if upto > taken:
                rows = wanted[taken:upto] - start
                pending.append((wanted[taken:upto], Batch(batch.inputs[rows], batch.score_mask[rows])))
                held, taken = held + upto - taken, upto
            while held >= batch_size or (held and taken == wanted.numel()):
                indices = torch.cat([i for i, _ in pending])
                inputs = torch.cat([b.inputs for _, b in pending])
                mask = torch.cat([b.score_mask for _, b in pending])
                yield indices[:batch_size], Batch(inputs[:batch_size], mask[:batch_size])
                rest = indices.shape[0] - batch_size
                pending = [(indices[batch_size:], Batch(inputs[batch_size:], mask[batch_size:]))] if rest > 0 else []
                held = max(rest, 0)
            start = end

    def contexts_in(self, part: Part) -> int:
        """How many contexts (samples for toy models) ``part`` holds."""
        tokens = self.spec.fit_tokens if part == "fit" else self.spec.tokens
        return tokens if self.synthetic else self._contexts(tokens)

    def tokens_in(self, part: Part) -> int:
        """How many tokens ``part`` scores (an upper bound for language models, whose last context may overshoot)."""
        tokens = self.spec.fit_tokens if part == "fit" else self.spec.tokens
        return tokens if self.synthetic else self._contexts(tokens) * self.scored_per_context

    def training_activations(self, hook: str, samples: int, batch_size: int) -> Iterator[torch.Tensor]:
        """``[batch_size, width]`` activations at ``hook`` from the ``train`` part, enough for ``samples``."""
        if self.synthetic:
            batches = self.adapter.synthetic_batches(samples + batch_size, batch_size, self.spec.seed + SYNTHETIC_SEED_OFFSETS["train"])
        else:
            # read on to the end of the data: the ignored tokens (document separators) in the contexts are not
            # samples, so how many contexts hold ``samples`` is known only once they are read
            skip = self._contexts(self.spec.fit_tokens) + self._contexts(self.spec.tokens)
            batches = token_batches(self.dataset, None, self.spec.batch_size, skip_contexts=skip,
                                    ignored_ids=self.ignored_token_ids)
        return _rebatched(self.adapter, batches, hook, batch_size)

    def describe(self) -> dict[str, str]:
        if self.synthetic:
            return {"dataset_id": f"synthetic:{self.adapter.model_id}", "dataset_revision": "", "tokenizer": ""}
        return self.dataset.describe()


def ignored_token_ids(spec: BenchmarkSpec, adapter: ModelAdapter) -> list[int]:
    """The token ids that are never scored: the spec's ``ignore_tokens`` list, or for ``"special"`` (the default) the
    model's special tokens and the spec's ``bos_token_id``."""
    if spec.ignore_tokens != "special":
        return sorted(set(spec.ignore_tokens))
    return sorted(adapter.special_token_ids() | ({spec.bos_token_id} - {None}))


def _rebatched(adapter: ModelAdapter, batches: Iterator[Batch], hook: str, batch_size: int) -> Iterator[torch.Tensor]:
    """Activations at ``hook`` in batches of exactly ``batch_size`` rows. Gradients are off only around the model's
    forward: a ``no_grad`` block around a ``yield`` would switch them off in the consumer (the trainer) too."""
    pending: list[torch.Tensor] = []
    held = 0
    for batch in batches:
        batch = batch.to(adapter.device)
        with torch.no_grad():
            acts = adapter.forward(batch, [hook], logits=False).activations[hook][batch.score_mask]
        pending.append(acts)
        held += acts.shape[0]
        while held >= batch_size:
            joined = torch.cat(pending)
            yield joined[:batch_size]
            pending, held = [joined[batch_size:]], held - batch_size
