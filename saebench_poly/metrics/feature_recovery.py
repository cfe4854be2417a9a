"""Recovery of known true features, for models that know them (the toy models of superposition).

With t_f the unit-norm direction of true feature f in the output hook's space (features the model dropped, with
no direction, are left out), d_j the unit-normalised decoder direction of unit j, and s(t, d) = cos(t, d) for units
whose activity is z (SAE latents, neurons) or |cos(t, d)| for signed units (`Entry.signed_units`: PCA and random
directions, AbsTopK latents), whose +d and -d are the same direction, so that the arbitrary sign of such a vector
does not change the score:

- mean_max_cosine = mean_f max_j s(t_f, d_j)
- fraction_recovered = #{f : max_j s(t_f, d_j) > 0.9} / #features

Version 2: s = |cos| for signed units (version 1 used the signed cosine for every unit).
"""

from __future__ import annotations

import torch

from saebench_poly.metrics.base import Accumulator, EntryBatch, MetricSpec

RECOVERY_THRESHOLD = 0.9


class FeatureRecovery(Accumulator):
    """A function of the weights alone: `update` has nothing to fold in."""

    metrics = (
        MetricSpec("mean_max_cosine", 2, "higher", "feature_recovery", "mean over true features of the best cosine with any decoder direction (|cos| for signed units)", bounds=(-1, 1)),
        MetricSpec("fraction_recovered", 2, "higher", "feature_recovery", f"fraction of true features whose best cosine (|cos| for signed units) exceeds {RECOVERY_THRESHOLD}", bounds=(0, 1)),
    )

    @classmethod
    def applies(cls, entry, adapter) -> bool:
        return adapter.true_feature_directions(entry.output_hook) is not None

    def update(self, batch: EntryBatch) -> None:
        pass

    def merge(self, other: FeatureRecovery) -> None:
        pass

    def best_cosines(self) -> torch.Tensor:
        """``[features]``: max_j s(t_f, d_j) (the module docstring)."""
        truth = self.adapter.true_feature_directions(self.entry.output_hook).to(torch.float64)
        truth = truth[truth.norm(dim=1) > 0]
        truth = truth / truth.norm(dim=1, keepdim=True)
        decoder = self.entry.decoder_directions().detach().to(truth.device, torch.float64)
        decoder = decoder / decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cosines = truth @ decoder.T
        return (cosines.abs() if self.entry.signed_units else cosines).amax(dim=1)

    def compute(self) -> dict[str, float]:
        best = self.best_cosines()
        return {
            "mean_max_cosine": float(best.mean()),
            "fraction_recovered": float((best > RECOVERY_THRESHOLD).to(torch.float64).mean()),
        }
