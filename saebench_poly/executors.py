"""The pass sharded over Ray workers (``saebench-poly run SPEC --executor ray``).

The scored contexts are cut into contiguous slices, one per worker. Each worker prepares the run as the driver does
(`saebench_poly.run.prepare_run`: the model, the entries, the baselines fitted on the same held-out data, fresh
accumulators), runs the one pass over its slice with its contexts and tokens numbered as in the whole run, and
returns its accumulators' state (`Accumulator.merge`; the model and entries stay behind, `Accumulator.transient`).
The driver merges the states in slice order into its own accumulators, then runs the post-pass stage (examples'
re-run, stored examples) and writes, as a single-process run does. The results equal those of one process to float
tolerance (the slices cut batches elsewhere); the spec and its hash do not name the executor.

Every process reads the spec's files (model, SAEs, data, artifacts) at the same paths: on a cluster they must be on
a shared file system. SAEs the spec trains are trained by the driver before any worker starts.
"""

from __future__ import annotations

import importlib
from typing import Any

from saebench_poly.activations import score
from saebench_poly.errors import UserError
from saebench_poly.metrics.base import Accumulator
from saebench_poly.run import PreparedRun, Reporter, prepare_run
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


def score_shard(loaded: LoadedSpec, start: int, stop: int) -> tuple[int, list[list[Accumulator]]]:
    """In a worker: the pass over scored contexts ``start .. stop - 1``; (tokens scored, each entry's accumulators)."""
    prepared = prepare_run(loaded)
    batches, first_token = prepared.inputs.score_slice(start, stop)
    tokens = score(prepared.adapter, prepared.scored, batches, first_context=start, first_token=first_token)
    return tokens, [item.accumulators for item in prepared.scored]


class RayExecutor:
    """Shards the pass over ``workers`` Ray tasks (default: one per GPU of the cluster, else one per CPU) on the
    cluster at ``address`` (default: a Ray instance already started in this process, else a new local one).
    Each task asks for one GPU when the cluster has GPUs and the spec's device is not ``cpu``, else one CPU."""

    def __init__(self, address: str | None = None, workers: int | None = None) -> None:
        if workers is not None and workers < 1:
            raise UserError(f"--workers must be at least 1, got {workers}")
        self.address, self.workers = address, workers
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
        task = ray.remote(num_gpus=1, num_cpus=0)(score_shard) if gpus else ray.remote(num_cpus=1)(score_shard)
        loaded = LoadedSpec(spec=prepared.loaded.spec, path=prepared.loaded.path.resolve())
        pending = {task.remote(loaded, start, stop): index for index, (start, stop) in enumerate(bounds)}
        results: dict[int, tuple[int, list[list[Accumulator]]]] = {}
        reporter.message(f"scoring on {len(bounds)} Ray worker(s), {bounds[0][1] - bounds[0][0]} context(s) each")
        with reporter.task(f"scoring {len(prepared.scored)} entries", prepared.inputs.tokens_in("score")) as advance:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                index = pending.pop(done[0])
                results[index] = _get(ray, done[0])
                advance(results[index][0])
        for index in range(len(bounds)):  # in slice order, so that the merged floats do not depend on timing
            _, shard = results[index]
            for item, accumulators in zip(prepared.scored, shard, strict=True):
                for mine, theirs in zip(item.accumulators, accumulators, strict=True):
                    mine.merge(theirs)
        return sum(tokens for tokens, _ in results.values())


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
