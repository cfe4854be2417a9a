"""Results files, read back and validated before ``submit`` and ``check`` trust them.

A results file is what ``saebench-poly run SPEC --output FILE`` writes: a leaderboard file (same schema, same
per-unit table beside it) holding one run's entries, with their digests and their spec's settings in its metadata
(`saebench_poly.integrity`). One entry of a results file or of a leaderboard is named ``FILE::ENTRY``.

Validation (`validate`) refuses, with one line naming each problem: a wrong schema version, missing or mistyped
columns, empty required values (`leaderboard.read_table`); an entry or spec name outside the character set of
`usertext.NAME_PATTERN` (so that no name reaches a terminal or a report as markup or control codes); an entry with a metric twice or with more than one spec
hash or weights hash; a weights sha256 that is not 64 hex digits; a metric or metric version this package does
not define, or whose direction differs from its definition; an infinite value, or one outside its metric's bounds
(`MetricSpec.bounds`, with a ``ROUNDING_SLACK`` for float rounding); a spec hash that is not the hash of the
settings recorded for it; rows whose digest is missing or no longer matches (edited after scoring). A NaN value is
accepted: it is how a metric says that it is undefined for an entry (e.g. the polysemanticity summaries of an
entry with no unit that has enough examples); it ranks last, and ``check`` compares it as a value.
"""

from __future__ import annotations

import difflib
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from saebench_poly.errors import UserError
from saebench_poly.integrity import FileProvenance, settings_hash
from saebench_poly.leaderboard import (
    SCHEMA_VERSION,
    UNITS_SCHEMA,
    entry_digests,
    entry_keys,
    read_provenance,
    read_table,
    units_path,
)
from saebench_poly.metrics import all_metrics
from saebench_poly.usertext import NAME_CHARACTERS, is_valid_name, printable

# Entries that measure the model and data rather than an SAE: the baselines every run adds.
REFERENCE_KINDS = ("neurons", "pca", "random")
ENTRY_SEPARATOR = "::"
# Float rounding may put a value a hair outside its metric's bounds (e.g. a KL of -1e-12).
ROUNDING_SLACK = 1e-6
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHOWN_PROBLEMS = 3


@dataclass
class Results:
    """Rows (long format), per-unit rows and provenance of some scored entries; ``source`` names them in messages;
    ``selected``: one entry was picked by name (``FILE::ENTRY``)."""

    rows: pd.DataFrame
    units: pd.DataFrame
    provenance: FileProvenance
    source: str
    selected: bool = False

    @property
    def keys(self) -> list[str]:
        """The ``<run_id>/<entry>`` of each entry, in order of appearance."""
        return list(dict.fromkeys(entry_keys(self.rows)))

    def only(self, keys: set[str], source: str | None = None) -> Results:
        """The entries ``keys`` alone."""
        units = self.units[entry_keys(self.units).isin(keys)] if len(self.units) else self.units
        return replace(self, rows=self.rows[entry_keys(self.rows).isin(keys)].reset_index(drop=True),
                       units=units.reset_index(drop=True), source=source or self.source)

    def scored(self) -> Results:
        """Without the reference entries (raw neurons, PCA, random rotations)."""
        keys = set(entry_keys(self.rows[~self.rows["entry_kind"].isin(REFERENCE_KINDS)]))
        return self.only(keys)

    def entry(self, name: str) -> Results:
        """The one entry called ``name``; a `UserError` when there is none or more than one."""
        matching = self.rows[self.rows["entry"] == name]
        if matching.empty:
            names = list(dict.fromkeys(self.rows["entry"]))
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f" (it has {', '.join(names)})"
            raise UserError(f"{self.source} has no entry named {name!r}{hint}")
        keys = list(dict.fromkeys(entry_keys(matching)))
        if len(keys) > 1:
            specs = ", ".join(sorted(set(matching["spec_name"])))
            raise UserError(f"{self.source} has {len(keys)} entries named {name!r} (specs {specs}): it is ambiguous")
        return replace(self.only(set(keys), source=f"{self.source}{ENTRY_SEPARATOR}{name}"), selected=True)


def split_reference(reference: str) -> tuple[Path, str | None]:
    """``"board.parquet::l1-0.3"`` -> (path, entry name); a plain path -> (path, None)."""
    path, separator, entry = reference.rpartition(ENTRY_SEPARATOR)
    if not separator or Path(reference).exists():
        return Path(reference), None
    if not path or not entry:
        raise UserError(f"{reference!r}: write FILE or FILE{ENTRY_SEPARATOR}ENTRY")
    return Path(path), entry


def read_results(reference: str | Path) -> Results:
    """The rows of a results file or leaderboard (``FILE``), or of one of its entries (``FILE::ENTRY``), with the
    per-unit rows beside it (none when that file is absent) and the file's provenance record. Not validated."""
    path, entry = split_reference(str(reference))
    if not path.is_file():
        raise UserError(f"{path} does not exist (or is not a file)")
    rows = read_table(path)
    if rows.empty:
        raise UserError(f"{path} holds no rows")
    units_file = units_path(path)
    units = read_table(units_file, UNITS_SCHEMA) if units_file.is_file() else UNITS_SCHEMA.empty_table().to_pandas()
    results = Results(rows=rows, units=units, provenance=read_provenance(path), source=str(path))
    return results.entry(entry) if entry is not None else results


def validate(results: Results, known_metrics_only: bool = True) -> None:
    """Raise one `UserError` naming every problem of ``results`` (see the module docstring). ``check`` passes
    ``known_metrics_only=False``: a metric version this package does not define makes two results not comparable
    rather than invalid."""
    problems = _problems(results, known_metrics_only)
    if problems:
        more = f" (and {len(problems) - _SHOWN_PROBLEMS} more)" if len(problems) > _SHOWN_PROBLEMS else ""
        raise UserError(f"{results.source} is refused: {'; '.join(problems[:_SHOWN_PROBLEMS])}{more}")


def _problems(results: Results, known_metrics_only: bool) -> list[str]:
    rows = results.rows
    problems: list[str] = []
    versions = sorted(set(rows["schema_version"]) - {SCHEMA_VERSION})
    if versions:
        problems.append(f"rows of schema version {versions}, this saebench-poly reads {SCHEMA_VERSION}")
    for column, what in (("entry", "entry name"), ("spec_name", "spec name")):
        bad = [name for name in dict.fromkeys(rows[column]) if not is_valid_name(name)]
        if bad:
            problems.append(f"the {what} {printable(repr(bad[0]))} uses characters outside {NAME_CHARACTERS}")
    for _, group in rows.groupby(entry_keys(rows), sort=False):
        entry = f"entry {printable(repr(group['entry'].iloc[0]))}"
        repeated = sorted(set(group["metric"][group["metric"].duplicated()]))
        if repeated:
            problems.append(f"{entry} has the metrics {repeated} more than once")
        for column in ("spec_hash", "weights_sha256"):
            if group[column].nunique() > 1:
                problems.append(f"{entry} has {group[column].nunique()} different {column} values")
        bad_sha = sorted({sha for sha in group["weights_sha256"] if not _SHA256.match(sha)})
        if bad_sha:
            problems.append(f"{entry} has no weights sha256 (found {bad_sha[0]!r}, expected 64 hex digits)")
    problems += _metric_problems(rows, known_metrics_only)
    problems += _spec_problems(rows, results.provenance)
    problems += digest_problems(results)
    return problems


def _metric_problems(rows: pd.DataFrame, known_metrics_only: bool) -> list[str]:
    known = {name: spec for name, (spec, _) in all_metrics().items()}
    problems = []
    for row in rows.drop_duplicates(["metric", "metric_version", "direction"]).itertuples():
        metric = known.get(row.metric)
        if metric is None or row.metric_version != metric.version:
            if known_metrics_only:
                defined = f"defines version {metric.version}" if metric else "does not define it (`saebench-poly list`)"
                problems.append(f"metric {row.metric!r} has version {row.metric_version}; this saebench-poly {defined}")
            continue
        if row.direction != metric.direction:
            problems.append(f"metric {row.metric!r} is marked {row.direction!r}, its definition says {metric.direction!r}")
    for row in rows.itertuples():
        value = row.value
        if math.isnan(value):
            continue
        if not math.isfinite(value):
            problems.append(f"entry {row.entry!r}: {row.metric} is {value}, not a finite number")
            continue
        metric = known.get(row.metric)
        low, high = metric.bounds if metric and metric.version == row.metric_version else (-math.inf, math.inf)
        if not low - ROUNDING_SLACK <= value <= high + ROUNDING_SLACK:
            problems.append(f"entry {row.entry!r}: {row.metric} = {value:.6g} lies outside its bounds [{low:g}, {high:g}]")
    return problems


def _spec_problems(rows: pd.DataFrame, provenance: FileProvenance) -> list[str]:
    problems = []
    for spec_hash in dict.fromkeys(rows["spec_hash"]):
        settings = provenance.specs.get(spec_hash)
        if settings is None:
            problems.append(f"it records no settings for spec hash {spec_hash[:12]}, so the hash cannot be checked")
        elif settings_hash(settings) != spec_hash:
            problems.append(f"spec hash {spec_hash[:12]} is not the hash of the spec settings recorded with it "
                            f"({settings_hash(settings)[:12]}): the rows or the settings were edited")
    return problems


def digest_problems(results: Results) -> list[str]:
    """Entries whose digest is missing from the provenance record or does not match their rows."""
    problems = []
    for key, digest in entry_digests(results.rows).items():
        entry = key.partition("/")[2]
        recorded = results.provenance.digests.get(key)
        if recorded is None:
            problems.append(f"entry {entry!r} has no digest: results must be written by `saebench-poly run`")
        elif recorded != digest:
            problems.append(f"the rows of entry {entry!r} were changed after scoring (their digest does not match)")
    return problems


def settings_differences(ours: dict[str, Any] | None, theirs: dict[str, Any] | None,
                         our_name: str, their_name: str) -> list[str]:
    """The settings that differ, as ``key: ours (our_name) vs theirs (their_name)`` lines (dotted keys)."""
    if ours is None or theirs is None:
        missing = our_name if ours is None else their_name
        return [f"the {missing} records no spec settings to compare"]
    flat_ours, flat_theirs = _flatten(ours), _flatten(theirs)
    lines = []
    for key in sorted(set(flat_ours) | set(flat_theirs)):
        a, b = flat_ours.get(key, "(unset)"), flat_theirs.get(key, "(unset)")
        if a != b:
            lines.append(f"{key}: {_short(a)} ({our_name}) vs {_short(b)} ({their_name})")
    return lines


def _flatten(settings: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
