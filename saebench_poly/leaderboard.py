"""The Parquet leaderboards: schema, validation, atomic writes.

A leaderboard is long: one row per (entry, metric), with the run's provenance on every row. Beside it
(``<name>.units.parquet``) the per-unit table has one row per (entry, unit). Both schemas are written down here
once, with a version stored in each file's metadata and checked on every read and write. A write replaces the rows
of the spec being written (so re-running a spec never duplicates it), goes to a temporary file in the same folder
and is renamed over the old file, under a file lock: readers see the old file or the new one, never a mix.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock

from saebench_poly.errors import UserError, first_line

SCHEMA_VERSION = 1
SCHEMA_METADATA_KEY = b"saebench_poly.schema_version"
TABLE_METADATA_KEY = b"saebench_poly.table"

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
    ]
)


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
    return table.select(schema.names).cast(schema).to_pandas()


def to_arrow(frame: pd.DataFrame, schema: pa.Schema) -> pa.Table:
    """``frame`` as a table of exactly ``schema`` (a missing or extra column is a bug, and raises)."""
    if sorted(frame.columns) != sorted(schema.names):
        raise ValueError(f"columns {sorted(frame.columns)} do not match the schema {sorted(schema.names)}")
    table = pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False)
    table_name = b"leaderboard" if schema.equals(LEADERBOARD_SCHEMA) else b"units"
    return table.replace_schema_metadata({SCHEMA_METADATA_KEY: str(SCHEMA_VERSION).encode(), TABLE_METADATA_KEY: table_name})


def write_atomic(table: pa.Table, path: Path) -> None:
    """Write ``table`` to a temporary file beside ``path``, fsync it, and rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        pq.write_table(table, temporary)
        with open(temporary, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def replace_spec_rows(path: Path, spec_name: str, rows: pd.DataFrame, units: pd.DataFrame) -> None:
    """Put ``rows`` (and ``units``) in the leaderboard at ``path`` in place of the rows of ``spec_name``.

    Both files are validated before anything is written; the per-unit table is renamed into place first, so the
    leaderboard's rename is the commit point. The lock serialises concurrent writers."""
    with FileLock(str(path) + ".lock"):
        merged = {}
        for target, new, schema in ((units_path(path), units, UNITS_SCHEMA), (path, rows, LEADERBOARD_SCHEMA)):
            if target.exists():
                old = read_table(target, schema)
                new = pd.concat([old[old["spec_name"] != spec_name], new], ignore_index=True) if len(old) else new
            merged[target] = to_arrow(new, schema)
        for target, table in merged.items():
            write_atomic(table, target)
