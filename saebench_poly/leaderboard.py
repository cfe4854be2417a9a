"""The Parquet leaderboards: schema, validation, atomic writes.

A leaderboard is long: one row per (entry, metric), with the run's provenance on every row. Beside it
(``<name>.units.parquet``) the per-unit table has one row per (entry, unit). Both schemas are written down here
once, with a version stored in each file's metadata and checked on every read and write. A write replaces the rows
of the spec being written (so re-running a spec never duplicates it), goes to a temporary file in the same folder
and is renamed over the old file, under a file lock: readers see the old file or the new one, never a mix.
Every read-modify-write goes through `update`, so concurrent writers (runs, submits) lose no rows. The file
metadata also carries each entry's digest and each spec's settings (`saebench_poly.integrity`).
"""

from __future__ import annotations

import glob
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from saebench_poly.errors import UserError, first_line
from saebench_poly.files import new_file_permissions
from saebench_poly.frontier import recompute_frontier
from saebench_poly.integrity import DIGESTED_COLUMNS, FileProvenance, digest_table, entry_key
from saebench_poly.stored_examples import check_file_schema, examples_fields, examples_path

# 2: leaderboard gains the frontier flags (pareto_*), the per-unit table the capacity, neuron_truth and
#    polysemanticity (neuron-embedding) columns.
# 3: the per-unit polysemanticity columns name the behaviour rule and its cut (behaviour_rule, behaviour_cut,
#    cut_sweep replace tau, tau_sweep) and list each unit's examples and their behaviours (example_*).
SCHEMA_VERSION = 3
SCHEMA_METADATA_KEY = b"saebench_poly.schema_version"
TABLE_METADATA_KEY = b"saebench_poly.table"
PROVENANCE_METADATA_KEY = b"saebench_poly.provenance"

PROVENANCE_FIELDS = [
    pa.field("schema_version", pa.int32(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("spec_name", pa.string(), nullable=False),
    pa.field("spec_hash", pa.string(), nullable=False),
    pa.field("entry", pa.string(), nullable=False),
    pa.field("source_uri", pa.string(), nullable=False),
    pa.field("entry_kind", pa.string(), nullable=False),
    pa.field("architecture", pa.string(), nullable=False),
    pa.field("model_id", pa.string(), nullable=False),
    pa.field("model_revision", pa.string(), nullable=False),
    pa.field("model_family", pa.string(), nullable=False),
    pa.field("hook", pa.string(), nullable=False),
    pa.field("d_in", pa.int64(), nullable=False),
    pa.field("width", pa.int64(), nullable=False),
]

LEADERBOARD_SCHEMA = pa.schema(
    PROVENANCE_FIELDS
    + [
        pa.field("metric", pa.string(), nullable=False),
        pa.field("metric_version", pa.int32(), nullable=False),
        pa.field("metric_family", pa.string(), nullable=False),
        pa.field("direction", pa.string(), nullable=False),
        pa.field("value", pa.float64(), nullable=True),
        # the entry's place on the rate-distortion(-polysemanticity) frontier of its group (saebench_poly.frontier)
        pa.field("pareto_rate_distortion", pa.bool_(), nullable=True),
        pa.field("pareto_rate_distortion_polysemanticity", pa.bool_(), nullable=True),
        pa.field("dataset_id", pa.string(), nullable=False),
        pa.field("dataset_revision", pa.string(), nullable=False),
        pa.field("tokenizer", pa.string(), nullable=False),
        pa.field("tokens_scored", pa.int64(), nullable=False),
        pa.field("context_size", pa.int64(), nullable=False),
        pa.field("prepend_bos", pa.bool_(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("weights_sha256", pa.string(), nullable=False),
        pa.field("git_commit", pa.string(), nullable=False),
        pa.field("package_versions", pa.string(), nullable=False),
        pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

UNITS_SCHEMA = pa.schema(
    PROVENANCE_FIELDS
    + [
        pa.field("unit", pa.int64(), nullable=False),
        pa.field("firing_frequency", pa.float64(), nullable=True),
        pa.field("max_activation", pa.float64(), nullable=True),
        # saebench_poly.metrics.capacity: C_i over all units, over live units, and the size of the unit's block
        pa.field("capacity", pa.float64(), nullable=True),
        pa.field("capacity_live", pa.float64(), nullable=True),
        pa.field("capacity_block_size", pa.float64(), nullable=True),
        # saebench_poly.metrics.neuron_truth (raw neurons of models that know their features): per neuron
        pa.field("neuron_truth_pr", pa.float64(), nullable=True),
        pa.field("neuron_truth_features_by_weights", pa.float64(), nullable=True),
        # saebench_poly.metrics.polysemanticity (neuron embeddings, Foote 2024): status (ok, too_few_examples,
        # too_weak, no_embedding), characteristic examples, behaviours K by the rule (behaviour_rule, with the unit's
        # similarity cut) and at each cut of cut_sweep, exp(H), the largest behaviour's share, the mean cosine of
        # the examples, each behaviour's size and central example, and each example with its behaviour
        pa.field("poly_status", pa.string(), nullable=True),
        pa.field("n_examples", pa.int64(), nullable=True),
        pa.field("n_behaviours", pa.int64(), nullable=True),
        pa.field("behaviour_rule", pa.string(), nullable=True),
        pa.field("behaviour_cut", pa.float64(), nullable=True),
        pa.field("cut_sweep", pa.list_(pa.float64()), nullable=True),
        pa.field("n_behaviours_sweep", pa.list_(pa.int64()), nullable=True),
        pa.field("effective_behaviours", pa.float64(), nullable=True),
        pa.field("largest_behaviour_share", pa.float64(), nullable=True),
        pa.field("mean_example_cosine", pa.float64(), nullable=True),
        pa.field("behaviour_sizes", pa.list_(pa.int64()), nullable=True),
        pa.field("central_examples", pa.list_(pa.struct([("context", pa.int64()), ("position", pa.int64())])), nullable=True),
        pa.field("example_contexts", pa.list_(pa.int64()), nullable=True),
        pa.field("example_positions", pa.list_(pa.int64()), nullable=True),
        pa.field("example_behaviours", pa.list_(pa.int64()), nullable=True),
    ]
)


# saebench_poly.stored_examples: the token windows of each behaviour's central example and a few more members
EXAMPLES_SCHEMA = pa.schema(examples_fields(PROVENANCE_FIELDS))


def units_schema(extra_columns: Iterable[str] = ()) -> pa.Schema:
    """`UNITS_SCHEMA` and, after it in name order, the float64 per-unit columns that metric families add
    (`Accumulator.unit_columns`)."""
    extra = sorted(set(extra_columns) - set(UNITS_SCHEMA.names))
    return pa.schema([*UNITS_SCHEMA, *(pa.field(name, pa.float64(), nullable=True) for name in extra)])


def units_path(leaderboard: Path) -> Path:
    """Where the per-unit table of ``leaderboard`` lives."""
    return leaderboard.with_name(leaderboard.name.removesuffix(".parquet") + ".units.parquet")


def read_table(path: Path, schema: pa.Schema = LEADERBOARD_SCHEMA) -> pd.DataFrame:
    """Read a leaderboard (or per-unit table) and check its schema version and columns."""
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"{path} is not a readable Parquet file ({first_line(err)}); it was left untouched") from None
    found = (table.schema.metadata or {}).get(SCHEMA_METADATA_KEY)
    if found is None:
        raise UserError(f"{path} has no saebench_poly schema version: it is not a saebench-poly leaderboard")
    if int(found) != SCHEMA_VERSION:
        raise UserError(f"{path} has schema version {int(found)}, this saebench-poly writes {SCHEMA_VERSION}: convert it first")
    missing = [name for name in schema.names if name not in table.column_names]
    if missing:
        raise UserError(f"{path} lacks the columns {missing}: it is not a complete saebench-poly table")
    if schema.equals(UNITS_SCHEMA):  # keeps the per-unit columns that metric families add (float64)
        schema = units_schema(table.column_names)
    table = table.select(schema.names)
    empty = [f"{f.name} ({table.column(f.name).null_count})" for f in schema if not f.nullable and table.column(f.name).null_count]
    if empty:
        raise UserError(f"{path} has empty values in columns that must be filled: {', '.join(empty)}")
    try:
        return table.cast(schema).to_pandas()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        wrong = [f"{f.name} is {table.schema.field(f.name).type}, not {f.type}" for f in schema
                 if not table.schema.field(f.name).type.equals(f.type)]
        raise UserError(f"{path} has columns of the wrong type: {'; '.join(wrong)}") from None


def check_schema(path: Path, schema: pa.Schema) -> None:
    """`read_table`'s version and column checks from the file's schema alone, for tables too large to read whole."""
    check_file_schema(path, schema, SCHEMA_METADATA_KEY, SCHEMA_VERSION)


def check_leaderboard_name(path: Path) -> None:
    """A leaderboard is a ``.parquet`` file: its per-unit and examples tables are named from it (`units_path`)."""
    if path.suffix != ".parquet":
        raise UserError(f"{path} is not a .parquet file name: a leaderboard is Parquet, with its tables beside it as "
                        f"<name>.units.parquet and <name>.examples.parquet; name it {path.with_suffix('.parquet').name}")


def check_writable(path: Path) -> None:
    """Before a run, so that a long pass is not lost to its last step: refuse in one line a leaderboard that could
    not be written, a folder, a name that is not ``.parquet``, a path under a file, a folder that cannot be entered
    or written (probed with a temporary file, removed at once), or existing tables that `update` would refuse to
    read (their schemas only). Nothing is left behind: a folder that does not exist yet is probed in its nearest
    existing parent and created by the write."""
    try:
        if path.is_dir():
            raise UserError(f"{path} is a folder, not a leaderboard file: name a .parquet file inside it")
        check_leaderboard_name(path)
        existing = next(folder for folder in path.parents if folder.exists())
        if not existing.is_dir():
            raise UserError(f"cannot write {path}: {existing} is a file, not a folder")
        tempfile.TemporaryFile(dir=existing, prefix=".saebench-tmp-").close()
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or first_line(err)}") from None
    for table, schema in ((path, LEADERBOARD_SCHEMA), (units_path(path), UNITS_SCHEMA), (examples_path(path), EXAMPLES_SCHEMA)):
        if table.exists():
            check_schema(table, schema)


def read_provenance(path: Path) -> FileProvenance:
    """The digests, spec settings and submitted entries recorded in a leaderboard file's metadata."""
    try:
        metadata = pq.read_schema(path).metadata or {}
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"{path} is not a readable Parquet file ({first_line(err)}); it was left untouched") from None
    try:
        return FileProvenance.from_json(metadata.get(PROVENANCE_METADATA_KEY))
    except (ValueError, TypeError, AttributeError):
        raise UserError(f"{path} has unreadable saebench_poly provenance metadata; it was left untouched") from None


def entry_keys(frame: pd.DataFrame) -> pd.Series:
    """Each row's ``<run_id>/<entry>``: which scored entry it belongs to."""
    return pd.Series([entry_key(r, e) for r, e in zip(frame["run_id"], frame["entry"], strict=True)], index=frame.index, dtype=object)


def entry_digests(rows: pd.DataFrame) -> dict[str, str]:
    """The digest of each entry in ``rows`` (`saebench_poly.integrity.digest_table`)."""
    schema = pa.schema([LEADERBOARD_SCHEMA.field(name) for name in DIGESTED_COLUMNS])
    return digest_table(pa.Table.from_pandas(rows[list(DIGESTED_COLUMNS)], schema=schema, preserve_index=False))


def to_arrow(frame: pd.DataFrame, schema: pa.Schema, provenance: FileProvenance | None = None) -> pa.Table:
    """``frame`` as a table of exactly ``schema`` (a missing or extra column is a bug, and raises), with the
    schema version and, when given, the provenance record in its metadata."""
    if sorted(frame.columns) != sorted(schema.names):
        raise ValueError(f"columns {sorted(frame.columns)} do not match the schema {sorted(schema.names)}")
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    table_name = {LEADERBOARD_SCHEMA: b"leaderboard", EXAMPLES_SCHEMA: b"examples"}.get(schema, b"units")
    metadata = {SCHEMA_METADATA_KEY: str(SCHEMA_VERSION).encode(), TABLE_METADATA_KEY: table_name}
    if provenance is not None:
        metadata[PROVENANCE_METADATA_KEY] = provenance.to_json()
    return table.replace_schema_metadata(metadata)


# Rows of a table converted to Arrow and written at a time (one Parquet row group each): the per-unit and examples
# tables are a run's largest objects, and a whole-table conversion would hold a second copy of them.
WRITE_ROWS = 4096


def write_frame(frame: pd.DataFrame, schema: pa.Schema, name: str, provenance: FileProvenance | None = None) -> None:
    """``frame`` to the Parquet file ``name`` as `to_arrow` converts it, `WRITE_ROWS` rows at a time."""
    first = to_arrow(frame.iloc[:WRITE_ROWS], schema, provenance)
    with pq.ParquetWriter(name, first.schema) as writer:
        writer.write_table(first)
        for start in range(WRITE_ROWS, len(frame), WRITE_ROWS):
            writer.write_table(to_arrow(frame.iloc[start : start + WRITE_ROWS], schema, provenance))


def new_file_mode(path: Path) -> int:
    """The permissions a rewrite of ``path`` gets: those of the file it replaces, else what ``open`` would give
    a new file (0666 less the umask: 0644 under the usual umask 022)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return new_file_permissions()


def stage(path: Path, write: Callable[[str], None]) -> str:
    """Call ``write`` on a new temporary file beside ``path`` (``.<name>.<random>.tmp``), fsync it and give it
    `new_file_mode`; returns its name, for the caller to rename over ``path``. Nothing is left behind when
    writing fails, and a failure of the file system (read-only folder, full disk) is a `UserError`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(f"cannot write {path}: {err.strerror or first_line(err)}") from None
    os.close(handle)
    try:
        write(temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, new_file_mode(path))
    except OSError as err:
        os.unlink(temporary)
        raise UserError(f"cannot write {path}: {err.strerror or first_line(err)}; it was left as it was") from None
    except BaseException:
        os.unlink(temporary)
        raise
    return temporary


def write_atomic(table: pa.Table | bytes, path: Path) -> None:
    """Write ``table`` (or bytes) to a temporary file beside ``path`` and rename it over ``path`` (`stage`)."""
    if isinstance(table, bytes):
        temporary = stage(path, lambda name: Path(name).write_bytes(table))
    else:
        temporary = stage(path, lambda name: pq.write_table(table, name))
    os.replace(temporary, path)


@dataclass
class Contents:
    """A leaderboard's rows, its per-unit rows, its provenance record and its stored examples (None in a change:
    keep the examples of the entries that the new rows hold)."""

    rows: pd.DataFrame
    units: pd.DataFrame
    provenance: FileProvenance
    examples: pd.DataFrame | None = None


def concat(*frames: pd.DataFrame) -> pd.DataFrame:
    """Row-wise concatenation that skips empty frames (whose column types pandas cannot reconcile)."""
    filled = [f for f in frames if len(f)]
    return pd.concat(filled, ignore_index=True) if filled else frames[0].iloc[0:0]


def update(path: Path, change: Callable[[Contents], Contents]) -> Contents:
    """Read the leaderboard at ``path`` (empty when there is none), apply ``change``, and write the result, all
    under the file lock, so concurrent updates are serialised and none is lost; returns what was written. The
    frontier flags of every row are recomputed from the new rows (`saebench_poly.frontier.recompute_frontier`).

    All three files are converted and staged before anything is renamed; the per-unit and stored-examples tables are renamed
    into place first, so the leaderboard's rename is the commit point (units and examples of entries the leaderboard
    does not hold, left by a write interrupted between the renames, are dropped). An unreadable file raises and is left untouched."""
    units_file, examples_file = units_path(path), examples_path(path)
    if path.is_dir():
        raise UserError(f"{path} is a folder, not a leaderboard file: name a .parquet file inside it")
    check_leaderboard_name(path)
    with _locked(path):
        _remove_stale_temporaries(path, units_file, examples_file)
        rows = read_table(path) if path.exists() else LEADERBOARD_SCHEMA.empty_table().to_pandas()
        units = read_table(units_file, UNITS_SCHEMA) if units_file.exists() else UNITS_SCHEMA.empty_table().to_pandas()
        examples = (read_table(examples_file, EXAMPLES_SCHEMA) if examples_file.exists()
                    else EXAMPLES_SCHEMA.empty_table().to_pandas())
        old = Contents(rows, _held(units, rows), read_provenance(path) if path.exists() else FileProvenance(),
                       _held(examples, rows))
        new = change(old)
        new.rows = recompute_frontier(new.rows)
        keys = set(entry_keys(new.rows))
        written = Contents(new.rows, _held(new.units, new.rows), new.provenance.restricted_to(keys, new.rows["spec_hash"]),
                           _held(old.examples if new.examples is None else new.examples, new.rows))
        tables = {units_file: (written.units, units_schema(written.units.columns), None),
                  examples_file: (written.examples, EXAMPLES_SCHEMA, None),
                  path: (written.rows, LEADERBOARD_SCHEMA, written.provenance)}
        # Every file is staged before any is renamed, so a full disk, a read-only folder or a table that does not
        # convert leaves neither a new per-unit table beside an old leaderboard nor an orphan per-unit table beside
        # none.
        staged: dict[Path, str] = {}
        try:
            for target, (frame, schema, provenance) in tables.items():
                staged[target] = stage(target, lambda name, f=frame, s=schema, p=provenance: write_frame(f, s, name, p))
        except BaseException:
            for temporary in staged.values():
                os.unlink(temporary)
            raise
        for target, temporary in staged.items():
            os.replace(temporary, target)
        return written


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the file lock ``<path>.lock``. The lock file stays after the write: removing it would let a writer
    still waiting on the removed file and a new writer locking a new file both hold "the" lock at once."""
    lock_path = Path(str(path) + ".lock")
    if lock_path.is_dir():
        raise UserError(f"the lock file {lock_path} is a folder: remove it (saebench-poly creates it as an empty file)")
    try:
        lock = FileLock(str(lock_path))
        lock.acquire()
    except OSError as err:
        raise UserError(f"cannot lock {path} through {lock_path}: {err.strerror or first_line(err)}") from None
    try:
        yield
    finally:
        lock.release()


def _remove_stale_temporaries(*paths: Path) -> None:
    """Remove the temporary files (``.<name>.<random>.tmp``) that writes of ``paths`` killed mid-way left behind.
    Called under the lock, which every writer of these files holds while its temporary exists."""
    for path in paths:
        for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            with suppress(FileNotFoundError):
                stale.unlink()


def _held(units: pd.DataFrame, rows: pd.DataFrame) -> pd.DataFrame:
    """The per-unit rows of entries that ``rows`` holds (matched on (run_id, entry) pairs, factorized: the per-unit
    and examples tables have a row per unit or example)."""
    if not len(units):
        return units
    held = pd.MultiIndex.from_arrays([rows["run_id"], rows["entry"]]).unique()
    mask = pd.MultiIndex.from_arrays([units["run_id"], units["entry"]]).isin(held)
    return units if mask.all() else units[mask]  # no copy of a table that is held whole


def replace_spec_rows(path: Path, spec_name: str, rows: pd.DataFrame, units: pd.DataFrame,
                      settings: dict[str, Any] | None = None, examples: pd.DataFrame | None = None) -> None:
    """Put ``rows`` (and ``units`` and ``examples``) in the leaderboard at ``path`` in place of the rows of
    ``spec_name``, except entries that ``submit`` added; record the new entries' digests and the spec's ``settings``.
    A board holds one entry per (name, spec hash), and one SAE entry per (weights, spec hash): a kept entry that the
    new rows score again, by name or by weights, is replaced by them."""
    examples = EXAMPLES_SCHEMA.empty_table().to_pandas() if examples is None else examples
    added = FileProvenance(digests=entry_digests(rows), specs={rows["spec_hash"].iloc[0]: settings} if settings else {})
    names, weights = _identities(rows)

    def change(old: Contents) -> Contents:
        old_names, old_weights = _identities(old.rows)
        again = old_names.isin(set(names)) | old_weights.isin(set(weights.dropna()))
        submitted = entry_keys(old.rows).isin(old.provenance.submitted)
        keep = ((old.rows["spec_name"] != spec_name) | submitted) & ~again
        # per-unit rows and stored examples of entries no longer held are dropped by `update`
        return Contents(concat(old.rows[keep], rows), concat(old.units, units), old.provenance.merged(added),
                        concat(old.examples, examples))

    update(path, change)


def _identities(rows: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Each row's (spec hash, entry name), and its (spec hash, weights sha256) for SAE rows (None otherwise)."""
    names = pd.Series(list(zip(rows["spec_hash"], rows["entry"], strict=True)), index=rows.index, dtype=object)
    weights = pd.Series([(h, w) if kind == "sae" else None for h, w, kind in
                         zip(rows["spec_hash"], rows["weights_sha256"], rows["entry_kind"], strict=True)], index=rows.index, dtype=object)
    return names, weights
