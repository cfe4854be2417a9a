"""The pass sharded over Ray workers (``saebench-poly run SPEC --executor ray``).

The scored contexts are cut into contiguous slices, one per worker. Each worker prepares the run as the driver does
(`saebench_poly.run.prepare_run`: the model, the entries, the baselines fitted on the same held-out data, fresh
accumulators), runs the one pass over its slice with its contexts and tokens numbered as in the whole run, and
returns its accumulators' state (`Accumulator.merge`; the model and entries stay behind, `Accumulator.transient`).
With entry groups (``--entry-groups G``), each of the slices x groups tasks loads every entry on the CPU (the
baselines follow from the entries' hooks) and keeps only its group's, fitted and moved to its device: a GPU holds
one group's entries and accumulators. The driver merges the states in slice order into its own accumulators, then
runs the post-pass stage (examples' re-run, stored examples) and writes, as a single-process run does. The results
equal those of one process to float tolerance (the slices cut batches elsewhere); the spec and its hash do not name
the executor.

Every process reads the spec's files (model, SAEs, data, artifacts) at the same paths: on a cluster they must be on
a shared file system. SAEs the spec trains are trained by the driver before any worker starts.
"""

from __future__ import annotations

import importlib
from typing import Any

from saebench_poly.activations import score
from saebench_poly.errors import UserError
from saebench_poly.metrics.base import Accumulator
from saebench_poly.run import PreparedRun, Reporter, prepare_run, scoring_task
from saebench_poly.spec import LoadedSpec

RAY_MISSING = "--executor ray needs Ray, which is not installed: pip install 'saebench-poly[ray]'"


def import_ray() -> Any:
    """The ``ray`` module, or a `UserError` saying how to install it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise UserError(RAY_MISSING) from None


def shard_bounds(contexts: int, shards: int) -> list[tuple[int, int]]:
    """``shards`` contiguous slices [start, stop) covering contexts 0 .. contexts - 1, sizes differing by at most
    one; never an empty slice."""
    shards = max(1, min(shards, contexts))
    size, extra = divmod(contexts, shards)
    bounds, start = [], 0
    for index in range(shards):
        stop = start + size + (1 if index < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def entry_groups(costs: list[int], groups: int) -> list[list[int]]:
    """The positions 0 .. len(costs) - 1 cut into at most ``groups`` non-empty groups of about equal total cost:
    largest cost first, each to the group with the least cost so far (ties: the lower group); each group in
    increasing position."""
    groups = max(1, min(groups, len(costs)))
    members: list[list[int]] = [[] for _ in range(groups)]
    totals = [0] * groups
    for position in sorted(range(len(costs)), key=lambda p: (-costs[p], p)):
        lightest = min(range(groups), key=lambda g: (totals[g], g))
        members[lightest].append(position)
        totals[lightest] += costs[position]
    return [sorted(group) for group in members if group]


def score_shard(loaded: LoadedSpec, start: int, stop: int,
                entry_names: list[str] | None = None) -> tuple[int, list[list[Accumulator]]]:
    """In a worker: the pass over scored contexts ``start .. stop - 1`` for the entries named (default: every
    entry); (tokens scored, each entry's accumulators, in the run's entry order)."""
    prepared = prepare_run(loaded, entry_names=entry_names)
    batches, first_token = prepared.inputs.score_slice(start, stop)
    tokens = score(prepared.adapter, prepared.scored, batches, first_context=start, first_token=first_token)
    return tokens, [item.accumulators for item in prepared.scored]


class RayExecutor:
    """Shards the pass over Ray tasks on the cluster at ``address`` (default: a Ray instance already started in this
    process, else a new local one): ``workers`` contiguous slices of the scored contexts (default: one per GPU of
    the cluster, else one per CPU) times ``groups`` groups of entries (`entry_groups`, cost: width x input width;
    default 1, every task holds every entry). Each task asks for one GPU when the cluster has GPUs and the spec's
    device is not ``cpu``, else one CPU."""

    def __init__(self, address: str | None = None, workers: int | None = None, groups: int = 1) -> None:
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        if groups < 1:
            raise UserError(f"--entry-groups must be at least 1, got {groups}")
        self.address, self.workers, self.groups = address, workers, groups
        self.ray = import_ray()

    def score(self, prepared: PreparedRun, reporter: Reporter) -> int:
        ray = self.ray
        _check_mergeable(prepared)
        started = not ray.is_initialized()
        if started:
            try:
                if self.address is None:
                    ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
            except ConnectionError as err:
                raise UserError(f"cannot reach the Ray cluster at {self.address}: {err}") from None
        try:
            return self._score(prepared, reporter)
        finally:
            if started:
                ray.shutdown()

    def _score(self, prepared: PreparedRun, reporter: Reporter) -> int:
        ray = self.ray
        resources = ray.cluster_resources()
        gpus = int(resources.get("GPU", 0)) if prepared.loaded.spec.device != "cpu" else 0
        workers = self.workers or gpus or int(resources.get("CPU", 1))
        bounds = shard_bounds(prepared.inputs.contexts_in("score"), workers)
        entries = [item.entry for item in prepared.scored]
        groups = entry_groups([entry.width * entry.d_in for entry in entries], self.groups)
        task = ray.remote(num_gpus=1, num_cpus=0)(score_shard) if gpus else ray.remote(num_cpus=1)(score_shard)
        loaded = LoadedSpec(spec=prepared.loaded.spec, path=prepared.loaded.path.resolve())
        whole = len(groups) == 1
        pending = {task.remote(loaded, start, stop, None if whole else [entries[p].name for p in group]): (g, s)
                   for g, group in enumerate(groups) for s, (start, stop) in enumerate(bounds)}
        results: dict[tuple[int, int], tuple[int, list[list[Accumulator]]]] = {}
        split = "" if whole else f" x {len(groups)} groups of entries"
        reporter.message(f"scoring on {len(pending)} Ray task(s): {len(bounds)} slice(s) of about "
                         f"{bounds[0][1] - bounds[0][0]} context(s){split}")
        with reporter.task(scoring_task(len(prepared.scored)), prepared.inputs.tokens_in("score")) as advance:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                key = pending.pop(done[0])
                results[key] = _get(ray, done[0])
                if key[0] == 0:  # one group's tasks count the tokens
                    advance(results[key][0])
        for g, group in enumerate(groups):
            for s in range(len(bounds)):  # in slice order, so that the merged floats do not depend on timing
                _, shard = results[g, s]
                for position, accumulators in zip(group, shard, strict=True):
                    for mine, theirs in zip(prepared.scored[position].accumulators, accumulators, strict=True):
                        mine.merge(theirs)
        return sum(results[0, s][0] for s in range(len(bounds)))


def _get(ray: Any, ref: Any) -> Any:
    """A task's result; a user mistake met in a worker stays a one-line `UserError`."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, UserError):
            raise UserError(str(err.cause)) from None
        raise


def _check_mergeable(prepared: PreparedRun) -> None:
    families = sorted({type(a).__name__ for item in prepared.scored for a in item.accumulators
                       if type(a).merge is Accumulator.merge})
    if families:
        raise UserError(f"metric families {', '.join(families)} cannot be sharded (they define no merge): leave them "
                        "out of `metrics` or run with --executor local")
