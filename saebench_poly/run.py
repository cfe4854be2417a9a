"""Running a spec end to end: spec -> model -> entries -> one activation pass -> records -> Parquet.

Nothing is written until every entry has been loaded and scored, so a bad input leaves no partial leaderboard.
The only files written earlier are caches under the spec's ``artifacts`` folder (a toy model, SAEs the spec
trains), each moved into place whole.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import tempfile
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

import numpy as np
import pandas as pd
import torch

from saebench_poly import checkpoint, leaderboard
from saebench_poly.activations import ScoredEntry, fit_baselines, score
from saebench_poly.errors import UserError
from saebench_poly.example_windows import stored_examples
from saebench_poly.files import current_umask, with_new_file_permissions
from saebench_poly.inputs import Inputs
from saebench_poly.metrics import build_accumulator, resolve_metric_options, resolve_metrics
from saebench_poly.metrics.base import ExampleWindows
from saebench_poly.models import MODEL_LOADERS, ModelAdapter
from saebench_poly.models.hooked import normalized_kwargs
from saebench_poly.provenance import git_commit, package_versions
from saebench_poly.revisit import revisit
from saebench_poly.sources import Entry, SAEEntry, SourceContext, load_entry
from saebench_poly.sources.sae_lens_sources import recorded_model_kwargs
from saebench_poly.spec import SYNTHETIC_LOADERS, BenchmarkSpec, LoadedSpec, TrainedSAESpec
from saebench_poly.stored_examples import DEFAULT_MEMBERS, WINDOW_AFTER, WINDOW_BEFORE
from saebench_poly.threads import single_thread
from saebench_poly.training import train_sae
from saebench_poly.usertext import check_entry_name

TRAINING_RECORD = "training.json"
# The reporter tasks of the stage after the pass: the one run of the model over the selected contexts (the examples'
# rows and the stored examples' windows), then the stored examples' rows (benchmarks/perf/ time them by these names).
CHARACTERISTIC_EXAMPLES_TASK = "characteristic examples"
STORED_EXAMPLES_TASK = "stored examples"


def scoring_task(entries: int) -> str:
    """The description of the pass's progress: "scoring 1 entry", "scoring 8 entries"."""
    return f"scoring {entries} {'entry' if entries == 1 else 'entries'}"


class Executor(Protocol):
    """Runs the pass of a prepared run elsewhere and merges the results into its accumulators; returns the number
    of tokens scored (`saebench_poly.executors.RayExecutor`)."""

    def score(self, prepared: PreparedRun, reporter: Reporter) -> int: ...


class Reporter:
    """Where a run reports progress; the default reports nothing. ``task`` returns a context manager that yields
    a callable advancing the task by a number of tokens (or samples, or steps)."""

    def task(self, description: str, total: int | None) -> AbstractContextManager[Callable[[int], None]]:
        return nullcontext(lambda _n: None)

    def message(self, text: str) -> None:
        pass


@dataclass
class RunResult:
    rows: pd.DataFrame
    units: pd.DataFrame
    output: Path
    tokens_scored: int
    examples: pd.DataFrame | None = None


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when there is a GPU, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} was asked for but this machine has no CUDA GPU: use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class PreparedRun:
    """A run up to its pass: the model, its data, and every entry with fresh accumulators (baselines fitted)."""

    loaded: LoadedSpec
    adapter: ModelAdapter
    inputs: Inputs
    scored: list[ScoredEntry]
    metrics: dict
    device: torch.device


def prepare_run(loaded: LoadedSpec, reporter: Reporter | None = None,
                entry_names: Collection[str] | None = None) -> PreparedRun:
    """Load the model and the entries, train and fit what the spec asks for, and build the accumulators: all that
    comes before the pass, the same in every process of a sharded run. With ``entry_names`` only those entries are
    kept, in the run's order: every entry is read on the CPU (the baselines follow from the entries' hooks), the
    others are dropped before anything is fitted or moved to the run's device (a worker of an entry group)."""
    reporter = reporter or Reporter()
    spec = loaded.spec
    seed_everything(spec.seed)
    device = resolve_device(spec.device)
    dtype = getattr(torch, spec.dtype)
    metrics = resolve_metrics(spec.metrics)
    _check_unit_columns({accumulator for _, accumulator in metrics.values()})
    metric_options = resolve_metric_options(spec.metric_options)
    kwargs_chosen = _resolve_model_kwargs(loaded, reporter)
    reporter.message(f"{spec.name}: loading the {spec.model.loader} model on {device}")
    adapter: ModelAdapter = MODEL_LOADERS.get(spec.model.loader)(spec.model, device, dtype)
    for hook in spec.hooks:
        adapter.hook_width(hook)
    inputs = Inputs(spec, adapter)
    if inputs.ignored_token_ids:
        reporter.message(f"not scoring the token ids {inputs.ignored_token_ids} (ignore_tokens = {spec.ignore_tokens!r})")
    for trained in spec.train:
        _ensure_trained(trained, loaded, adapter, inputs, reporter)
    entries = _load_entries(loaded, adapter, device if entry_names is None else torch.device("cpu"), dtype)
    if not kwargs_chosen:
        _check_model_kwargs(loaded, entries)
    _check_metrics_apply(spec, metrics, entries, adapter, reporter)
    for caveat in dict.fromkeys(filter(None, (adapter.units_caveat(entry.hook) for entry in entries))):
        reporter.message(f"note: {caveat}")
    if "neurons" in spec.baselines:
        for hook in dict.fromkeys(e.hook for e in entries if e.kind == "sae" and adapter.comparison_neuron_hook(e.hook) is None):
            reporter.message(f"note: no MLP neurons to compare with the SAEs at {hook}: the model has no hook of them "
                             "in that layer (one elementwise activation module); name their hook in `hooks` if it has one")
    if entry_names is not None:
        kept = set(entry_names)
        entries = [entry for entry in entries if entry.name in kept]

    to_fit = [entry.name for entry in entries if entry.needs_fit]
    if to_fit and inputs.contexts_in("fit") == 0:
        raise UserError(f"{', '.join(to_fit)} must be fitted on held-out data, and fit_tokens is 0: set fit_tokens "
                        "(default 8192), or leave pca out of `baselines` and `entries`")
    if to_fit:
        with reporter.task("fitting baselines", inputs.tokens_in("fit")) as advance:
            fit_baselines(adapter, entries, inputs.batches("fit"), advance)
    scored = []
    for entry in entries:
        entry.to(device, dtype)
        families = {accumulator for _, accumulator in metrics.values() if accumulator.applies(entry, adapter)}
        accumulators = [build_accumulator(family, entry, adapter, metric_options) for family in sorted(families, key=lambda f: f.__name__)]
        scored.append(ScoredEntry(entry, accumulators))
    return PreparedRun(loaded, adapter, inputs, scored, metrics, device)


def run_benchmark(loaded: LoadedSpec, reporter: Reporter | None = None, write: bool = True,
                  examples: int = DEFAULT_MEMBERS, executor: Executor | None = None,
                  checkpoint_every: int | None = None, resume: bool = False) -> RunResult:
    """Score every entry of ``loaded`` in one pass and (when ``write``) replace the spec's leaderboard rows. Each
    behaviour's central example and up to ``examples`` more of its members go to the stored-examples table. The
    pass runs in this process, or sharded by ``executor`` (`saebench_poly.executors`), whose accumulators this
    process merges before the post-pass stage.

    A pass in this process writes a checkpoint of its accumulators every ``checkpoint_every`` batches (none when
    None or 0) and ``resume`` continues from the checkpoint a killed run left (`saebench_poly.checkpoint`); the
    checkpoint is removed once the run has finished.

    A spec of a synthetic model (toy, incidental) runs on one CPU thread: its tensors are tiny, so a second thread
    only spins (a cold default benchmark took 250 s on two busy cores, 30 s on one), and what it trains (the model,
    the SAEs) then does not depend on the machine's thread count."""
    with single_thread() if loaded.spec.model.loader in SYNTHETIC_LOADERS else nullcontext():
        return _run_benchmark(loaded, reporter, write, examples, executor, checkpoint_every or 0, resume)


def _run_benchmark(loaded: LoadedSpec, reporter: Reporter | None, write: bool, examples: int,
                   executor: Executor | None, checkpoint_every: int, resume: bool) -> RunResult:
    reporter = reporter or Reporter()
    if executor is not None and resume:
        raise UserError("--resume applies to --executor local only (a sharded run writes no checkpoint)")
    if write:
        leaderboard.check_writable(loaded.output_path)
    prepared = prepare_run(loaded, reporter)
    adapter, inputs, scored = prepared.adapter, prepared.inputs, prepared.scored
    if executor is None:
        tokens = _score_here(prepared, reporter, checkpoint_every, resume)
    else:
        tokens = executor.score(prepared, reporter)
    if tokens == 0:
        checkpoint.checkpoint_path(loaded.artifacts_dir).unlink(missing_ok=True)
        raise UserError("no token was scored: every token of the scored contexts is a special token or in "
                        "ignore_tokens; check the dataset (and ignore_tokens)")
    windows = ExampleWindows(members=examples, before=WINDOW_BEFORE, after=WINDOW_AFTER)
    with reporter.task(CHARACTERISTIC_EXAMPLES_TASK, sum(len(item.accumulators) for item in scored)) as advance:
        revisit(adapter, scored, inputs.scored_contexts, advance, windows)
    with reporter.task(STORED_EXAMPLES_TASK, None):
        stored_windows = stored_examples(scored, adapter)

    rows, units, stored = _records(loaded, adapter, inputs, scored, prepared.metrics, tokens, prepared.device,
                                   stored_windows)
    output = loaded.output_path
    if write:
        leaderboard.replace_spec_rows(output, loaded.spec.name, rows, units, settings=loaded.spec.settings(), examples=stored)
    checkpoint.checkpoint_path(loaded.artifacts_dir).unlink(missing_ok=True)
    return RunResult(rows=rows, units=units, output=output, tokens_scored=tokens, examples=stored)


def _score_here(prepared: PreparedRun, reporter: Reporter, every: int, resume: bool) -> int:
    """The pass in this process, checkpointed every ``every`` batches, from the checkpoint when ``resume`` finds
    one; returns the number of tokens scored in the whole pass."""
    inputs, scored = prepared.inputs, prepared.scored
    path = checkpoint.checkpoint_path(prepared.loaded.artifacts_dir)
    ident = checkpoint.identity(prepared.loaded.spec.settings_hash(),
                                [(item.entry.name, item.entry.uri, item.accumulators) for item in scored])
    start = checkpoint.Position()
    if resume and path.is_file():
        start = checkpoint.restore(path, ident, [item.accumulators for item in scored], prepared.device)
        reporter.message(f"resuming from {path}: {start.tokens:,} tokens ({start.contexts:,} contexts) were scored")
    elif resume:
        reporter.message(f"no checkpoint at {path}: scoring from the start")
    total = inputs.contexts_in("score")
    if start.contexts == 0:
        batches, before = inputs.batches("score"), 0
    elif start.contexts < total:
        batches, before = inputs.score_slice(start.contexts, total)
    else:  # killed after the pass
        batches, before = iter(()), start.tokens
    if before != start.tokens:
        raise UserError(f"the checkpoint {path} counts {start.tokens:,} tokens in the first {start.contexts:,} "
                        f"contexts, the data now {before:,}: run without --resume to start over")
    if every:
        batches = checkpoint.checkpointed(batches, every, start, _checkpoint_writer(path, ident, scored, reporter))
    with reporter.task(scoring_task(len(scored)), inputs.tokens_in("score")) as advance:
        advance(start.tokens)
        return start.tokens + score(prepared.adapter, scored, batches, advance, first_context=start.contexts,
                                    first_token=start.tokens)


def _checkpoint_writer(path: Path, ident: dict, scored: list[ScoredEntry],
                       reporter: Reporter) -> Callable[[checkpoint.Position], None]:
    """Writes the checkpoint at a position; a file system that refuses it (a read-only artifacts folder, a full
    disk) is said once and the run goes on without checkpoints, since they only guard against a later failure."""
    refused: list[UserError] = []

    def write(position: checkpoint.Position) -> None:
        if not refused:
            try:
                checkpoint.save(path, ident, position, [item.accumulators for item in scored])
            except UserError as err:
                refused.append(err)
                reporter.message(f"{err}; the run goes on without checkpoints")

    return write


def _resolve_model_kwargs(loaded: LoadedSpec, reporter: Reporter) -> bool:
    """A transformer-lens model loads as the spec's SAEs were trained on it: ``[model.options]
    model_from_pretrained_kwargs`` when the spec sets it, else the kwargs its entries record (which must agree; a
    `UserError` naming two that differ), else none. The result is written into the spec's model options, so the
    spec hash records it. Returns whether the spec chose."""
    spec = loaded.spec
    if spec.model.loader != "transformer_lens":
        return True
    recorded = {item.name or item.uri: normalized_kwargs(kwargs) for item in spec.entries
                if (kwargs := recorded_model_kwargs(item.uri, loaded.base_dir)) is not None}
    given = spec.model.options.get("model_from_pretrained_kwargs")
    if given is None:
        distinct = {json.dumps(kwargs, sort_keys=True, default=str): name for name, kwargs in recorded.items()}
        if len(distinct) > 1:
            (first, a), (second, b) = list(distinct.items())[:2]
            raise UserError(f"the SAEs were trained on differently loaded models: {a} with model_from_pretrained_kwargs "
                            f"{first}, {b} with {second}; score them in separate specs, or choose in [model.options] "
                            "model_from_pretrained_kwargs")
        given = next(iter(recorded.values()), {})
    else:
        for name, kwargs in recorded.items():
            if kwargs != normalized_kwargs(given):
                reporter.message(f"{name} was trained with model_from_pretrained_kwargs {kwargs}; it is scored on the "
                                 f"model loaded with the spec's {normalized_kwargs(given)}")
    chosen = "model_from_pretrained_kwargs" in spec.model.options
    spec.model.options = {**spec.model.options, "model_from_pretrained_kwargs": normalized_kwargs(given)}
    return chosen


def _check_model_kwargs(loaded: LoadedSpec, entries: list[Entry]) -> None:
    """The loaded SAEs of the spec's entries record the kwargs their model was loaded with (a release's SAE may
    record them only in its downloaded config): a `UserError` when they differ from those the model was loaded
    with (called when the spec did not choose)."""
    spec = loaded.spec
    used = spec.model.options["model_from_pretrained_kwargs"]
    for entry in entries:
        if entry.uri in {item.uri for item in spec.entries} and isinstance(entry, SAEEntry):
            kwargs = normalized_kwargs(entry.sae.cfg.metadata.model_from_pretrained_kwargs)
            if kwargs != used:
                raise UserError(f"SAE {entry.name} was trained on the model loaded with model_from_pretrained_kwargs "
                                f"{kwargs}, the others with {used}; score them in separate specs, or choose in "
                                "[model.options] model_from_pretrained_kwargs")


def _check_metrics_apply(spec: BenchmarkSpec, metrics: dict, entries: list[Entry], adapter: ModelAdapter,
                         reporter: Reporter) -> None:
    """Before scoring: a `UserError` when none of the metrics the spec names applies to any entry, a message
    naming those that apply to none when only some do."""
    if spec.metrics is None:
        return
    idle = [f"{name} ({metric.family})" for name, (metric, family) in metrics.items()
            if not any(family.applies(entry, adapter) for entry in entries)]
    if len(idle) == len(metrics):
        raise UserError(f"none of the metrics the spec names applies to its entries on {adapter.family} model "
                        f"{adapter.model_id!r}: {', '.join(idle)}; name others in `metrics` (`saebench-poly list`)")
    if idle:
        reporter.message(f"{', '.join(idle)}: no entry on this model has these metrics; they are left out")


def _check_unit_columns(families: set[type]) -> None:
    """Each per-unit column a family declares (`Accumulator.unit_columns`) is new and declared once."""
    declared: dict[str, str] = {}
    for family in sorted(families, key=lambda f: f.__name__):
        for column in family.unit_columns:
            if column in leaderboard.UNITS_SCHEMA.names or column in declared:
                other = declared.get(column, "the built-in per-unit table")
                raise ValueError(f"per-unit column {column!r} of metric family {family.__name__} is already {other}'s")
            declared[column] = family.__name__


def _load_entries(loaded: LoadedSpec, adapter: ModelAdapter, device: torch.device, dtype: torch.dtype) -> list[Entry]:
    """The spec's entries, its trained SAEs, the baselines of its hooks, and the raw neurons of every SAE's hook."""
    spec = loaded.spec
    default_hook = spec.hooks[0] if len(spec.hooks) == 1 else None

    def context(hook: str | None = None) -> SourceContext:
        return SourceContext(adapter=adapter, device=device, dtype=dtype, seed=spec.seed, base_dir=loaded.base_dir,
                             hook=hook, default_hook=default_hook)

    entries: list[Entry] = []
    for trained in spec.train:
        folder = _trained_folder(loaded, trained)
        entry = load_entry(f"disk:{folder}", context(trained.hook or default_hook))
        entry.name, entry.uri = trained.name, f"disk:{folder.relative_to(loaded.base_dir) if folder.is_relative_to(loaded.base_dir) else folder}"
        entries.append(entry)
    for item in spec.entries:
        entry = load_entry(item.uri, context(item.hook))
        entry.name = item.name or entry.name
        entries.append(entry)
    uris = {e.uri for e in entries}
    baseline_hooks = list(spec.hooks)
    for entry in list(entries):
        neuron_hook = adapter.comparison_neuron_hook(entry.hook)
        if neuron_hook and all(adapter.units_of(neuron_hook) != adapter.units_of(h) for h in baseline_hooks):
            baseline_hooks.append(neuron_hook)
    for hook in baseline_hooks:
        for scheme in spec.baselines:
            uri = f"{scheme}:{hook}"
            if uri not in uris and (scheme == "neurons" or hook in spec.hooks):
                entries.append(load_entry(uri, context()))
                uris.add(uri)
    for entry in entries:
        check_entry_name(entry.name, entry.uri)
    names = [e.name for e in entries]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UserError(f"entry names must be unique; {duplicates} appear twice: give the entries a name in the spec")
    return entries


def _trained_folder(loaded: LoadedSpec, trained: TrainedSAESpec) -> Path:
    return loaded.artifacts_dir / "saes" / trained.name


def _ensure_trained(trained: TrainedSAESpec, loaded: LoadedSpec, adapter: ModelAdapter, inputs: Inputs, reporter: Reporter) -> None:
    """Train the SAE with sae-lens unless its folder already holds one trained with the same settings."""
    hook = trained.hook or (loaded.spec.hooks[0] if loaded.spec.hooks else None)
    if hook is None:
        raise UserError(f"trained SAE {trained.name!r} needs a hook: set its `hook` or the spec's `hooks`")
    d_in = adapter.hook_width(hook)
    record = {"training": trained.model_dump(mode="json"), "hook": hook, "d_in": d_in, "model_id": adapter.model_id,
              "data": loaded.spec.data_settings_hash()}
    folder = _trained_folder(loaded, trained)
    record_path = folder / TRAINING_RECORD
    if record_path.is_file() and json.loads(record_path.read_text()) == record:
        return
    data = inputs.training_activations(hook, trained.training_samples, trained.batch_size)
    samples = math.ceil(trained.training_samples / trained.batch_size) * trained.batch_size
    with reporter.task(f"training SAE {trained.name}", samples) as advance:
        sae = train_sae(trained.training_config(), d_in, _counted(data, advance), device=str(adapter.device),
                        hook_name=hook, model_name=adapter.model_id)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{trained.name}.", dir=folder.parent))
    staging.chmod(0o777 & ~current_umask())  # mkdtemp's 0700 would hide the SAE from other users
    sae.save_model(staging)
    (staging / TRAINING_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True))
    with_new_file_permissions(staging)
    if folder.exists():
        shutil.rmtree(folder)
    staging.rename(folder)


def _counted(data: Iterator[torch.Tensor], advance: Callable[[int], None]) -> Iterator[torch.Tensor]:
    for batch in data:
        advance(batch.shape[0])
        yield batch


def _records(loaded: LoadedSpec, adapter: ModelAdapter, inputs: Inputs, scored: list[ScoredEntry], metrics: dict,
             tokens: int, device: torch.device,
             windows: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    spec = loaded.spec
    run_id = uuid.uuid4().hex
    shared = {
        "schema_version": leaderboard.SCHEMA_VERSION, "run_id": run_id, "spec_name": spec.name,
        "spec_hash": spec.settings_hash(), **adapter.describe(),
    }
    run_provenance = {
        **inputs.describe(), "tokens_scored": tokens, "context_size": spec.context_size if not inputs.synthetic else 1,
        "prepend_bos": spec.prepend_bos and not inputs.synthetic, "seed": spec.seed, "device": str(device),
        "dtype": spec.dtype, "git_commit": git_commit(), "package_versions": package_versions(),
        "created_at": pd.Timestamp(datetime.now(UTC)),
    }
    rows, units, examples = [], [], [leaderboard.EXAMPLES_SCHEMA.empty_table().to_pandas()]
    for item in scored:
        described = {**shared, **item.entry.describe()}
        sha = item.entry.weights_sha256()
        unit_columns: dict[str, np.ndarray] = {}
        for accumulator in item.accumulators:
            values = accumulator.compute()
            for name, value in values.items():
                if name not in metrics:
                    continue
                metric = metrics[name][0]
                rows.append({**described, **run_provenance, "metric": name, "metric_version": metric.version,
                             "metric_family": metric.family, "direction": metric.direction, "value": float(value),
                             "weights_sha256": sha})
            values = accumulator.unit_values()
            undeclared = sorted(set(values) - set(leaderboard.UNITS_SCHEMA.names) - set(accumulator.unit_columns))
            if undeclared:
                raise ValueError(f"metric family {type(accumulator).__name__} reports the per-unit values {undeclared}, "
                                 "which are neither built-in per-unit columns nor in its unit_columns")
            unit_columns.update({k: v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v
                                 for k, v in values.items()})
        frame = pd.DataFrame({"unit": np.arange(item.entry.width), **unit_columns})
        for column in leaderboard.UNITS_SCHEMA.names:
            if column not in frame:
                # None, not NaN: the column may hold lists (a family left out by the spec's `metrics`)
                frame[column] = described.get(column)
        units.append(frame)
        if item.entry.name in windows:
            examples.append(windows[item.entry.name].assign(**{c: described[c] for c in (f.name for f in leaderboard.PROVENANCE_FIELDS)}))
    return pd.DataFrame(rows), pd.concat(units, ignore_index=True), leaderboard.concat(*examples)
