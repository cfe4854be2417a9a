"""The downstream cost of a reconstruction: the model's next-token loss with the reconstruction spliced in at the
entry's hook (at scored positions; BOS keeps its clean activations), against the clean model and against
zero-ablating the hook. Positions counted: scored positions that have a next token.

- ce_increase = mean_t CE_spliced(t) - mean_t CE_clean(t)   (nats per token)
- kl_divergence = mean_t KL(p_clean(t) || p_spliced(t))      (nats per token)
- ce_loss_recovered = (CE_zero - CE_spliced) / (CE_zero - CE_clean), the means over the same positions
  (1: as good as the clean model; 0: as bad as zero-ablation). Defined as in SAEBench's core eval.

With no counted position (no scored position has a next token) all three are NaN.
"""

from __future__ import annotations

import math

import torch

from saebench_poly.metrics.base import Accumulator, DownstreamBatch, EntryBatch, MetricSpec


class Downstream(Accumulator):
    """Sums of per-position CE (clean, spliced, zero-ablated) and KL, in float64."""

    metrics = (
        MetricSpec("ce_increase", 1, "lower", "downstream", "mean CE with reconstruction spliced in minus clean CE (nats)"),
        MetricSpec("kl_divergence", 1, "lower", "downstream", "mean KL(clean || spliced) next-token distributions (nats)", bounds=(0, math.inf)),
        MetricSpec("ce_loss_recovered", 1, "higher", "downstream", "(CE_zero - CE_spliced) / (CE_zero - CE_clean)"),
    )
    needs_downstream = True

    @classmethod
    def applies(cls, entry, adapter) -> bool:
        return adapter.supports_downstream

    def __init__(self, entry, adapter) -> None:
        super().__init__(entry, adapter)
        self.positions = 0
        self.sums = {"ce_clean": 0.0, "ce_spliced": 0.0, "ce_zero_ablated": 0.0, "kl": 0.0}

    def update(self, batch: EntryBatch) -> None:
        downstream = batch.downstream
        assert downstream is not None, "the activation pass must supply downstream statistics"
        for key in self.sums:
            self.sums[key] += float(getattr(downstream, key).sum())
        self.positions += int(downstream.ce_clean.numel())

    def merge(self, other: Downstream) -> None:
        for key in self.sums:
            self.sums[key] += other.sums[key]
        self.positions += other.positions

    def compute(self) -> dict[str, float]:
        """The means over the counted positions; NaN when there are none (no scored position has a next token)."""
        mean = {key: value / (self.positions or math.nan) for key, value in self.sums.items()}
        gap = mean["ce_zero_ablated"] - mean["ce_clean"]
        return {
            "ce_increase": mean["ce_spliced"] - mean["ce_clean"],
            "kl_divergence": mean["kl"],
            "ce_loss_recovered": (mean["ce_zero_ablated"] - mean["ce_spliced"]) / gap if gap != 0 else float("nan"),
        }


def next_token_log_probs(logits: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[n_positions, vocab]`` (float32) of the next token at ``positions`` (a bool mask
    ``[batch, context - 1]``)."""
    return torch.log_softmax(logits[:, :-1][positions].float(), dim=-1)


def cross_entropy(log_probs: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (float64) of ``log_probs`` (from `next_token_log_probs`) against the next token."""
    targets = tokens[:, 1:][positions].unsqueeze(-1)
    return -log_probs.gather(-1, targets).squeeze(-1).to(torch.float64)


def kl_divergence(clean: torch.Tensor, spliced: torch.Tensor, clean_probs: torch.Tensor | None = None) -> torch.Tensor:
    """KL(p_clean || p_spliced) per position (float64) from two `next_token_log_probs`; ``clean_probs``, when given,
    is ``clean.exp()`` computed once for several spliced forwards."""
    probs = clean.exp() if clean_probs is None else clean_probs
    return torch.linalg.vecdot(probs, clean - spliced).to(torch.float64)


__all__ = ["Downstream", "DownstreamBatch", "cross_entropy", "kl_divergence", "next_token_log_probs"]
