"""Recovery of known true features, for models that know them (the toy models of superposition).

With t_f the unit-norm direction of true feature f in the hook's space (features the model dropped, with no
direction, are left out) and d_j the unit-normalised decoder direction of unit j:

- mean_max_cosine = mean_f max_j cos(t_f, d_j)
- fraction_recovered = #{f : max_j cos(t_f, d_j) > 0.9} / #features
"""

from __future__ import annotations

import torch

from saebench_poly.metrics.base import Accumulator, EntryBatch, MetricSpec

RECOVERY_THRESHOLD = 0.9


class FeatureRecovery(Accumulator):
    """A function of the weights alone: `update` has nothing to fold in."""

    metrics = (
        MetricSpec("mean_max_cosine", 1, "higher", "feature_recovery", "mean over true features of the best cosine with any decoder direction", bounds=(-1, 1)),
        MetricSpec("fraction_recovered", 1, "higher", "feature_recovery", f"fraction of true features whose best cosine exceeds {RECOVERY_THRESHOLD}", bounds=(0, 1)),
    )

    @classmethod
    def applies(cls, entry, adapter) -> bool:
        return adapter.true_feature_directions(entry.hook) is not None

    def update(self, batch: EntryBatch) -> None:
        pass

    def best_cosines(self) -> torch.Tensor:
        truth = self.adapter.true_feature_directions(self.entry.hook).to(torch.float64)
        truth = truth[truth.norm(dim=1) > 0]
        truth = truth / truth.norm(dim=1, keepdim=True)
        decoder = self.entry.decoder_directions().detach().to(truth.device, torch.float64)
        decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return (truth @ decoder.T).amax(dim=1)

    def compute(self) -> dict[str, float]:
        best = self.best_cosines()
        return {
            "mean_max_cosine": float(best.mean()),
            "fraction_recovered": float((best > RECOVERY_THRESHOLD).to(torch.float64).mean()),
        }
