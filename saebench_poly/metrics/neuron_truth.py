"""How many true features load on each raw neuron, for models that know their features (the toy models): the
neuron-level ground truth that the dictionary-based neuron metrics are checked against.

For the raw-neuron entry at a hook where the model knows its true features (`ModelAdapter.true_feature_directions`,
rows t_i unit-normalised; features the model dropped have no direction and are left out):

- the effective number of true features on neuron k is the per-neuron participation ratio of
  `saebench_poly.metrics.capacity.neuron_participation_ratio` with the true features as the dictionary:
  PR_k = (sum_i f_i t_ik^2)^2 / sum_i (f_i t_ik^2)^2. The true features of both toy models are equally frequent,
  so f_i is uniform and cancels. Neurons below 10% of the mean load carry no feature and are *unloaded*.
  neuron_truth_pr_mean = mean PR_k over loaded neurons; neuron_truth_polysemantic_fraction = #{loaded k : PR_k >=
  1.5} / width (option ``polysemantic_pr``, as in the capacity family).
- When the model also gives the raw feature-to-neuron weights W_ik (`ModelAdapter.true_feature_weights`; the
  incidental-polysemanticity model of Lecomte et al. 2023), Lecomte et al.'s count: feature i is on neuron k when
  0.8 <= |W_ik| <= 1.2 (option ``weight_window``), a neuron with two or more is polysemantic.
  neuron_truth_weights_polysemantic_fraction = that count / width; neuron_truth_agreement = the fraction of neurons
  that both rules call polysemantic or both call not; and, when width m >= n features,
  neuron_truth_predicted_polysemantic_fraction = (n^2 / (4m)) / m, their birthday-argument prediction.

Per neuron (the raw-neuron entry's rows of the per-unit table): neuron_truth_pr (NaN for neurons no feature loads)
and neuron_truth_features_by_weights (NaN without weights).
"""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saebench_poly.metrics.base import Accumulator, EntryBatch, MetricSpec
from saebench_poly.metrics.capacity import loaded_neurons, neuron_participation_ratio


class NeuronTruthOptions(BaseModel):
    """``[metric_options.neuron_truth]`` in a spec."""

    model_config = ConfigDict(extra="forbid")
    polysemantic_pr: float = Field(1.5, ge=1, description="PR_k at or above which a neuron counts as polysemantic")
    weight_window: tuple[float, float] = Field((0.8, 1.2), description="|W_ik| range that puts feature i on neuron k")

    @model_validator(mode="after")
    def _ordered(self) -> NeuronTruthOptions:
        low, high = self.weight_window
        if not 0 <= low <= high:
            raise ValueError("weight_window must be [low, high] with 0 <= low <= high")
        return self


class NeuronTruth(Accumulator):
    """True features per raw neuron, by participation ratio and by Lecomte et al.'s weight rule (module docstring).
    A function of the model's weights: `update` has nothing to fold in."""

    Options = NeuronTruthOptions
    metrics = (
        MetricSpec("neuron_truth_pr_mean", 1, "neutral", "neuron_truth", "mean over loaded neurons of PR_k with the true features as dictionary", bounds=(1, math.inf)),
        MetricSpec("neuron_truth_polysemantic_fraction", 1, "neutral", "neuron_truth", "#{loaded neurons with true-feature PR_k >= 1.5} / width", bounds=(0, 1)),
        MetricSpec("neuron_truth_weights_polysemantic_fraction", 1, "neutral", "neuron_truth", "#{neurons holding >= 2 features with 0.8 <= |W_ik| <= 1.2} / width (Lecomte et al. 2023)", bounds=(0, 1)),
        MetricSpec("neuron_truth_predicted_polysemantic_fraction", 1, "neutral", "neuron_truth", "n^2 / (4 m) / m, Lecomte et al.'s prediction (m >= n)", bounds=(0, math.inf)),
        MetricSpec("neuron_truth_agreement", 1, "higher", "neuron_truth", "fraction of neurons that the PR rule and the weight rule classify alike", bounds=(0, 1)),
    )

    def __init__(self, entry, adapter, options: NeuronTruthOptions | None = None) -> None:
        super().__init__(entry, adapter)
        self.options = options or NeuronTruthOptions()

    @classmethod
    def applies(cls, entry, adapter) -> bool:
        return entry.kind == "neurons" and adapter.true_feature_directions(entry.hook) is not None

    def update(self, batch: EntryBatch) -> None:
        pass

    def merge(self, other: NeuronTruth) -> None:
        pass

    def per_neuron(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(PR_k, loaded_k, features on k by the weight rule or None)."""
        truth = self.adapter.true_feature_directions(self.entry.hook).detach()
        truth = truth[truth.norm(dim=1) > 0]
        ratio, load = neuron_participation_ratio(truth, torch.ones(truth.shape[0]))
        loaded = loaded_neurons(load) & ratio.isfinite()
        weights = self.adapter.true_feature_weights(self.entry.hook)
        counts = None
        if weights is not None:
            low, high = self.options.weight_window
            magnitude = weights.detach().abs()
            counts = ((magnitude >= low) & (magnitude <= high)).sum(dim=0).to(torch.float64)
        return ratio, loaded, counts

    def compute(self) -> dict[str, float]:
        ratio, loaded, counts = self.per_neuron()
        width = ratio.numel()
        by_pr = loaded & (ratio >= self.options.polysemantic_pr)
        values = {
            "neuron_truth_pr_mean": float(ratio[loaded].mean()) if loaded.any() else float("nan"),
            "neuron_truth_polysemantic_fraction": float(by_pr.sum()) / width,
        }
        if counts is not None:
            by_weights = counts.to(by_pr.device) >= 2
            n_features = self.adapter.true_feature_weights(self.entry.hook).shape[0]
            values["neuron_truth_weights_polysemantic_fraction"] = float(by_weights.sum()) / width
            values["neuron_truth_agreement"] = float((by_pr == by_weights).sum()) / width
            if width >= n_features:
                values["neuron_truth_predicted_polysemantic_fraction"] = n_features**2 / (4 * width) / width
        return values

    def unit_values(self) -> dict[str, torch.Tensor]:
        ratio, loaded, counts = self.per_neuron()
        values = {"neuron_truth_pr": torch.where(loaded, ratio, torch.nan)}
        if counts is not None:
            values["neuron_truth_features_by_weights"] = counts
        return values
