"""Metric registry: every metric name maps to its `MetricSpec` and the `Accumulator` that computes it.

Accumulators register with `register_accumulator` (built-ins lazily below; other packages through the entry-point
group ``saebench_poly.metrics``, whose objects are `Accumulator` subclasses).
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from saebench_poly.errors import UserError
from saebench_poly.metrics.base import Accumulator, DownstreamBatch, EntryBatch, MetricSpec
from saebench_poly.registry import Registry

ACCUMULATORS: Registry[type[Accumulator]] = Registry("metric family", entry_point_group="saebench_poly.metrics")
ACCUMULATORS.register("sparsity", "saebench_poly.metrics.core:Sparsity")
ACCUMULATORS.register("reconstruction", "saebench_poly.metrics.core:Reconstruction")
ACCUMULATORS.register("downstream", "saebench_poly.metrics.downstream:Downstream")
ACCUMULATORS.register("feature_recovery", "saebench_poly.metrics.feature_recovery:FeatureRecovery")
ACCUMULATORS.register("capacity", "saebench_poly.metrics.capacity:Capacity")
ACCUMULATORS.register("geometry", "saebench_poly.metrics.geometry:CodeGeometry")
ACCUMULATORS.register("rate", "saebench_poly.metrics.rate:Rate")
ACCUMULATORS.register("neuron_truth", "saebench_poly.metrics.neuron_truth:NeuronTruth")
ACCUMULATORS.register("polysemanticity", "saebench_poly.metrics.polysemanticity:Polysemanticity")


def all_metrics() -> dict[str, tuple[MetricSpec, type[Accumulator]]]:
    """Every registered metric name -> (spec, accumulator class)."""
    found: dict[str, tuple[MetricSpec, type[Accumulator]]] = {}
    for family in ACCUMULATORS.names():
        accumulator = ACCUMULATORS.get(family)
        for spec in accumulator.metrics:
            if spec.name in found:
                raise ValueError(f"metric {spec.name!r} is defined by {found[spec.name][1]} and by {accumulator}")
            found[spec.name] = (spec, accumulator)
    return found


def resolve_metrics(names: list[str] | None) -> dict[str, tuple[MetricSpec, type[Accumulator]]]:
    """The metrics a spec asks for (all when ``names`` is None); an unknown name is a `UserError`."""
    available = all_metrics()
    if names is None:
        return available
    chosen = {}
    for name in names:
        if name not in available:
            close = difflib.get_close_matches(name, list(available), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise UserError(f"unknown metric {name!r}{hint} (`saebench-poly list` shows them)")
        chosen[name] = available[name]
    return chosen


def resolve_metric_options(options: dict[str, dict[str, Any]]) -> dict[type[Accumulator], BaseModel]:
    """The validated ``[metric_options.<family>]`` tables of a spec, keyed by accumulator class; an unknown family
    or option, or a bad value, is a `UserError`."""
    resolved = {}
    for family, values in options.items():
        accumulator = ACCUMULATORS.get(family)
        try:
            resolved[accumulator] = accumulator.Options.model_validate(values)
        except ValidationError as err:
            problem = err.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            if problem["type"] == "extra_forbidden":
                known = ", ".join(accumulator.Options.model_fields) or "none"
                raise UserError(f"unknown option {where!r} in metric_options.{family} (it takes: {known})") from None
            raise UserError(f"metric_options.{family}.{where}: {problem['msg']}") from None
    return resolved


def build_accumulator(family: type[Accumulator], entry: Any, adapter: Any, options: dict[type[Accumulator], BaseModel]) -> Accumulator:
    """``family``'s accumulator for ``entry``, with its options when the spec set some."""
    chosen = options.get(family)
    return family(entry, adapter) if chosen is None else family(entry, adapter, chosen)


__all__ = ["ACCUMULATORS", "Accumulator", "DownstreamBatch", "EntryBatch", "MetricSpec", "all_metrics", "build_accumulator",
           "resolve_metric_options", "resolve_metrics"]
