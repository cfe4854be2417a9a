"""What a leaderboard file records about its rows beyond their columns, in its Parquet metadata.

The key ``saebench_poly.provenance`` holds one JSON object:

- ``digests``: for each scored entry, keyed ``<run_id>/<entry>``, the sha256 of that entry's rows in canonical form
  (`DIGESTED_COLUMNS` in that order, values as the leaderboard schema types them, rows sorted by metric, written as
  JSON with each float's exact repr). ``run`` computes it when it writes its rows; ``submit`` and ``check``
  recompute it and refuse rows that no longer match. It is a checksum, not a signature: it catches rows edited
  after scoring (by hand, in a notebook, by a script that does not know about it), not a determined forger, who
  can recompute it with this module.
- ``specs``: for each spec hash, the settings that it hashes (`BenchmarkSpec.settings`), so that a refusal can
  name the settings that differ.
- ``submitted``: the entries that ``submit`` added; running a spec again replaces that spec's rows but keeps them.

The per-unit table is not digested: nothing that ``submit`` or ``check`` decides depends on it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

DIGEST_SCHEME = "sha256-canonical-rows-v1"
# The columns of leaderboard schema 1 that a digest covers: every column a run writes. Columns derived from the
# whole leaderboard (e.g. frontier flags, recomputed at each write) are not part of an entry's own content.
DIGESTED_COLUMNS = (
    "schema_version", "run_id", "spec_name", "spec_hash", "entry", "source_uri", "entry_kind", "architecture",
    "model_id", "model_revision", "model_family", "hook", "d_in", "width", "metric", "metric_version",
    "metric_family", "direction", "value", "dataset_id", "dataset_revision", "tokenizer", "tokens_scored",
    "context_size", "prepend_bos", "seed", "device", "dtype", "weights_sha256", "git_commit", "package_versions",
    "created_at",
)


def settings_hash(settings: dict[str, Any]) -> str:
    """sha256 of spec settings (`BenchmarkSpec.settings`) as canonical JSON (sorted keys): the ``spec_hash`` of
    every leaderboard row."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def content_sha256(path: Path) -> str:
    """sha256 of a file's bytes; of a folder, sha256 over the (name, sha256) of each file directly in it, in name
    order (hidden files aside): what a model folder holds, wherever it lies."""
    if path.is_file():
        with path.open("rb") as handle:
            return hashlib.file_digest(handle, "sha256").hexdigest()
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    listing = [[p.name, content_sha256(p)] for p in files]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode()).hexdigest()


def entry_key(run_id: str, entry: str) -> str:
    """How a scored entry is named in the provenance metadata: ``<run_id>/<entry>``."""
    return f"{run_id}/{entry}"


@dataclass
class FileProvenance:
    """The provenance metadata of one leaderboard file (see the module docstring)."""

    digests: dict[str, str] = field(default_factory=dict)
    specs: dict[str, dict[str, Any]] = field(default_factory=dict)
    submitted: set[str] = field(default_factory=set)

    def to_json(self) -> bytes:
        return json.dumps(
            {"scheme": DIGEST_SCHEME, "digests": self.digests, "specs": self.specs, "submitted": sorted(self.submitted)},
            sort_keys=True,
        ).encode()

    @classmethod
    def from_json(cls, raw: bytes | None) -> FileProvenance:
        """Parse the metadata value; absent metadata gives an empty record. A digest of another scheme is dropped,
        so rows digested by an unknown scheme count as undigested."""
        if raw is None:
            return cls()
        loaded = json.loads(raw)
        digests = loaded.get("digests", {}) if loaded.get("scheme") == DIGEST_SCHEME else {}
        return cls(digests=dict(digests), specs=dict(loaded.get("specs", {})), submitted=set(loaded.get("submitted", [])))

    def merged(self, other: FileProvenance) -> FileProvenance:
        """This record with ``other``'s entries added (``other`` wins where both name the same key)."""
        return FileProvenance(digests={**self.digests, **other.digests}, specs={**self.specs, **other.specs},
                              submitted=self.submitted | other.submitted)

    def restricted_to(self, keys: Iterable[str], spec_hashes: Iterable[str]) -> FileProvenance:
        """Only what concerns the entries ``keys`` and the spec hashes ``spec_hashes`` (what a file still holds)."""
        keys, spec_hashes = set(keys), set(spec_hashes)
        return FileProvenance(digests={k: v for k, v in self.digests.items() if k in keys},
                              specs={k: v for k, v in self.specs.items() if k in spec_hashes},
                              submitted=self.submitted & keys)


def digest_table(table: pa.Table) -> dict[str, str]:
    """``<run_id>/<entry>`` -> sha256 of that entry's rows in canonical form; ``table`` has `DIGESTED_COLUMNS`
    typed as in the leaderboard schema."""
    grouped: dict[str, list[list[Any]]] = {}
    for row in table.select(list(DIGESTED_COLUMNS)).to_pylist():
        values = [_canonical(row[name]) for name in DIGESTED_COLUMNS]
        grouped.setdefault(entry_key(row["run_id"], row["entry"]), []).append(values)
    metric_at = DIGESTED_COLUMNS.index("metric")
    digests = {}
    for key, rows in grouped.items():
        rows.sort(key=lambda values: (values[metric_at], json.dumps(values)))
        digests[key] = hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
    return digests


def _canonical(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
