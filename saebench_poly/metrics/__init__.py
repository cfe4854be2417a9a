"""Metric registry: every metric name maps to its `MetricSpec` and the `Accumulator` that computes it.

Accumulators register with `register_accumulator` (built-ins lazily below; other packages through the entry-point
group ``saebench_poly.metrics``, whose objects are `Accumulator` subclasses).
"""

from __future__ import annotations

import difflib

from saebench_poly.errors import UserError
from saebench_poly.metrics.base import Accumulator, DownstreamBatch, EntryBatch, MetricSpec
from saebench_poly.registry import Registry

ACCUMULATORS: Registry[type[Accumulator]] = Registry("metric family", entry_point_group="saebench_poly.metrics")
ACCUMULATORS.register("sparsity", "saebench_poly.metrics.core:Sparsity")
ACCUMULATORS.register("reconstruction", "saebench_poly.metrics.core:Reconstruction")
ACCUMULATORS.register("downstream", "saebench_poly.metrics.downstream:Downstream")
ACCUMULATORS.register("feature_recovery", "saebench_poly.metrics.feature_recovery:FeatureRecovery")


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


__all__ = ["ACCUMULATORS", "Accumulator", "DownstreamBatch", "EntryBatch", "MetricSpec", "all_metrics", "resolve_metrics"]
