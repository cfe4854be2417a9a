"""What the report shows, read from a leaderboard's Parquet files into plain data (lists, dicts, numbers, strings),
ready to be written into the page as JSON.

- ``entries``: one per scored entry (``<run_id>/<entry>``), with its description, its frontier flags and every
  metric's value, for the sortable table and the figures;
- ``specs``: the provenance of each spec hash (model, data, token counts, seed, versions, and the settings the hash
  covers, from the file's metadata);
- ``units``: per entry, the per-unit values and stored examples of at most ``max_units`` units (every unit of a
  narrower entry; of a wider one the most polysemantic fifth by effective behaviours and a seeded uniform sample of
  the rest, so that a 65,536-latent entry does not put megabytes into the page), and the distribution of effective
  behaviours over all of its units.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from saebench_poly.errors import UserError
from saebench_poly.frontier import FRONTIERS
from saebench_poly.leaderboard import (
    EXAMPLES_SCHEMA,
    PROVENANCE_FIELDS,
    UNITS_SCHEMA,
    check_schema,
    entry_keys,
    examples_path,
    read_provenance,
    read_table,
    units_path,
)

REFERENCE_KINDS = ("neurons", "pca", "random")
# The table's first metric columns, in this order; every other metric of the file follows, by family.
LEADING_METRICS = ("l0", "dead_fraction", "rate_bits_per_token", "fvu", "cosine_similarity", "ce_increase",
                   "kl_divergence", "ce_loss_recovered", "mean_max_cosine", "fraction_recovered",
                   "mean_effective_behaviours", "monosemantic_fraction", "too_few_examples_fraction")
SPEC_COLUMNS = ("spec_name", "spec_hash", "model_id", "model_revision", "model_family", "dataset_id", "dataset_revision",
                "tokenizer", "tokens_scored", "context_size", "prepend_bos", "seed", "device", "dtype", "git_commit")
# Per-unit columns that identify rather than describe a unit, or that the explorer shows in its own way.
_UNIT_SKIP = {f.name for f in PROVENANCE_FIELDS} | {"unit", "cut_sweep", "central_examples", "example_contexts",
                                                    "example_positions", "example_behaviours"}
_HISTOGRAM_BINS = 24
# Behaviours per unit whose examples go into the page (the largest; the table keeps them all)
MAX_BEHAVIOURS = 12
_SIGNIFICANT = 5


@dataclass
class ReportContent:
    source: str
    entries: list[dict[str, Any]]
    metrics: list[dict[str, Any]]
    specs: list[dict[str, Any]]
    units: dict[str, dict[str, Any]] = field(default_factory=dict)
    vocabulary: list[str] = field(default_factory=list)
    has_examples: bool = False


def read_content(path: Path, max_units: int) -> ReportContent:
    """The report's data from the leaderboard at ``path`` and the tables beside it."""
    if not path.is_file():
        raise UserError(f"there is no leaderboard at {path}: give the .parquet file that `saebench-poly run` wrote")
    rows = read_table(path)
    if rows.empty:
        raise UserError(f"{path} holds no rows: run a spec first (`saebench-poly run SPEC`)")
    rows = rows.assign(key=entry_keys(rows))
    units_file = units_path(path)
    units = read_table(units_file, UNITS_SCHEMA) if units_file.is_file() else None
    examples_file = examples_path(path)
    content = ReportContent(source=path.name, entries=_entries(rows), metrics=_metrics(rows),
                            specs=_specs(rows, read_provenance(path).specs))
    if units is not None and len(units):
        units = units.assign(key=entry_keys(units))
        vocabulary: dict[str, int] = {}
        examples = _ExampleReader(examples_file) if examples_file.is_file() else None
        content.has_examples = examples is not None
        by_key = dict(tuple(units.groupby("key", sort=False)))
        effective = {}
        for entry in content.entries:
            frame = by_key.get(entry["key"])
            if frame is not None:
                frame = frame.sort_values("unit")
                content.units[entry["key"]] = _entry_units(frame, max_units, examples, vocabulary)
                effective[entry["key"]] = _effective(frame)
                entry["has_units"] = True
        for entry in content.entries:
            entry["neurons"] = _comparison_neurons(entry, content.entries)
        _histograms(content, effective)
        content.vocabulary = list(vocabulary)
    return content


def _number(value: Any) -> float | None:
    """A finite float rounded for display and JSON; None for NaN, null and infinities."""
    if value is None or value is pd.NA:
        return None
    value = float(value)
    if not math.isfinite(value):
        return None
    return float(f"{value:.{_SIGNIFICANT}g}")


def _entries(rows: pd.DataFrame) -> list[dict[str, Any]]:
    described = rows.drop_duplicates("key").set_index("key")
    values = rows.pivot_table(index="key", columns="metric", values="value", aggfunc="first", dropna=False, sort=False)
    names = described["entry"]
    entries = []
    for key, info in described.iterrows():
        duplicated = int((names == info["entry"]).sum()) > 1
        entries.append({
            "key": key, "entry": info["entry"], "label": f"{info['entry']} ({info['spec_name']})" if duplicated else info["entry"],
            "kind": info["entry_kind"], "architecture": info["architecture"], "source_uri": info["source_uri"],
            "hook": info["hook"], "d_in": int(info["d_in"]), "width": int(info["width"]), "model_id": info["model_id"],
            "spec_name": info["spec_name"], "spec_hash": info["spec_hash"], "run_id": info["run_id"],
            "reference": info["entry_kind"] in REFERENCE_KINDS,
            "pareto": {column: None if pd.isna(info[column]) else bool(info[column]) for column in FRONTIERS},
            "values": {metric: _number(value) for metric, value in values.loc[key].items()},
            "has_units": False,
        })
    return entries


def _metrics(rows: pd.DataFrame) -> list[dict[str, Any]]:
    described = rows.drop_duplicates("metric").set_index("metric")
    present = list(described.index)
    leading = [m for m in LEADING_METRICS if m in present]
    rest = sorted((m for m in present if m not in leading), key=lambda m: (described.at[m, "metric_family"], m))
    return [{"name": m, "family": described.at[m, "metric_family"], "direction": described.at[m, "direction"],
             "version": int(described.at[m, "metric_version"])} for m in [*leading, *rest]]


def _specs(rows: pd.DataFrame, settings: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    specs = []
    for spec_hash, group in rows.groupby("spec_hash", sort=False):
        first = group.iloc[0]
        record = {column: _plain(first[column]) for column in SPEC_COLUMNS}
        record["entries"] = int(group["key"].nunique())
        record["runs"] = sorted(set(group["run_id"]))
        record["created_at"] = str(group["created_at"].max())
        versions = {}
        for text in dict.fromkeys(group["package_versions"]):
            try:
                versions.update(json.loads(text))
            except (ValueError, TypeError):
                versions["(unreadable)"] = str(text)
        record["package_versions"] = versions
        record["settings"] = settings.get(spec_hash)
        specs.append(record)
    return specs


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value if isinstance(value, (int, float, bool, str)) else str(value)


def _layer(hook: str) -> str | None:
    found = re.search(r"(?:^|\.)(\d+)(?:\.|$)", hook)
    return found.group(1) if found else None


def _comparison_neurons(entry: dict[str, Any], entries: list[dict[str, Any]]) -> str | None:
    """The raw-neuron entry of the same layer and spec hash (the same hook first; the only one when the hooks name
    no layer, as a toy model's do), whose distribution the entry's is drawn against."""
    if entry["kind"] == "neurons":
        return None
    candidates = [e for e in entries if e["kind"] == "neurons" and e["spec_hash"] == entry["spec_hash"]
                  and e["model_id"] == entry["model_id"] and e["has_units"]]
    for rule in (lambda e: e["hook"] == entry["hook"],
                 lambda e: _layer(e["hook"]) is not None and _layer(e["hook"]) == _layer(entry["hook"])):
        matching = [e for e in candidates if rule(e)]
        if matching:
            return matching[0]["key"]
    return candidates[0]["key"] if len(candidates) == 1 else None


def _chosen_units(frame: pd.DataFrame, max_units: int) -> np.ndarray:
    """All units of a narrow entry; of a wide one the most polysemantic fifth and a seeded uniform sample."""
    units = frame["unit"].to_numpy()
    if len(units) <= max_units:
        return units
    effective = frame["effective_behaviours"].to_numpy(dtype=np.float64, na_value=np.nan)
    order = np.lexsort((units, -np.nan_to_num(effective, nan=-np.inf)))
    top = order[: max_units // 5]
    rest = np.setdiff1d(np.arange(len(units)), top)
    with_examples = rest[frame["n_examples"].fillna(0).to_numpy()[rest] > 0]
    pool = with_examples if len(with_examples) >= max_units - len(top) else rest
    sample = np.random.default_rng(0).choice(pool, size=max_units - len(top), replace=False)
    return np.sort(units[np.concatenate([top, sample])])


def _entry_units(frame: pd.DataFrame, max_units: int, examples: _ExampleReader | None,
                 vocabulary: dict[str, int]) -> dict[str, Any]:
    chosen = _chosen_units(frame, max_units)
    picked = frame.set_index("unit").loc[chosen]
    columns = {}
    for column in picked.columns:
        if column in _UNIT_SKIP or column == "key":
            continue
        values = picked[column]
        if values.isna().all():
            continue
        if column == "n_behaviours_sweep":
            cuts = frame["cut_sweep"].dropna()
            cut_text = ", ".join(f"{t:g}" for t in cuts.iloc[0]) if len(cuts) else ""
            columns[f"K at cut_sweep ({cut_text})"] = [None if v is None else ", ".join(str(int(k)) for k in v) for v in values]
        elif pd.api.types.is_numeric_dtype(values.dtype) and not pd.api.types.is_bool_dtype(values.dtype):
            columns[column] = [_number(v) for v in values]
        else:
            columns[column] = [None if _missing(v) else (", ".join(str(x) for x in v) if _listlike(v) else str(v)) for v in values]
    effective = frame["effective_behaviours"].to_numpy(dtype=np.float64, na_value=np.nan)
    ranked = np.lexsort((frame["unit"].to_numpy(), -np.nan_to_num(effective, nan=-np.inf)))
    shown = set(chosen.tolist())
    most = [int(frame["unit"].iloc[i]) for i in ranked[:len(shown)] if np.isfinite(effective[i])]
    most = [u for u in most if u in shown][:20]
    status = frame["poly_status"].fillna("").astype(str)
    result: dict[str, Any] = {
        "width": len(frame), "units": [int(u) for u in chosen], "columns": columns, "most_polysemantic": most,
        "histogram": None,
        "status_counts": {str(k): int(v) for k, v in status[status != ""].value_counts().items()},
        "central": {}, "examples": {}, "text_kind": None,
    }
    if "central_examples" in picked:
        for unit, central in zip(chosen, picked["central_examples"], strict=True):
            if not _missing(central) and len(central):
                result["central"][int(unit)] = [[int(c["context"]), int(c["position"])] for c in central]
    if examples is not None:
        result["examples"], result["text_kind"] = examples.units(frame["run_id"].iloc[0], frame["entry"].iloc[0], chosen,
                                                                 vocabulary)
    return result


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _listlike(value: Any) -> bool:
    return isinstance(value, (list, tuple, np.ndarray))


def _effective(frame: pd.DataFrame) -> np.ndarray:
    """Effective behaviours of the entry's units with enough examples (``poly_status`` ok)."""
    ok = (frame["poly_status"] == "ok").to_numpy()
    values = frame["effective_behaviours"].to_numpy(dtype=np.float64, na_value=np.nan)[ok]
    return values[np.isfinite(values)]


def _histograms(content: ReportContent, effective: dict[str, np.ndarray]) -> None:
    """Each entry's effective behaviours binned with its comparison neurons' on shared edges (1 to the larger
    maximum), as shares of the units with enough examples."""
    for entry in content.entries:
        pair = [entry["key"]] + ([entry["neurons"]] if entry.get("neurons") else [])
        present = [key for key in pair if effective.get(key) is not None and effective[key].size]
        if entry["key"] not in present:
            continue
        top = max(float(effective[key].max()) for key in present)
        edges = np.linspace(1.0, max(top, 1.0) * (1 + 1e-9) + 1e-9, _HISTOGRAM_BINS + 1)
        series = []
        for key in present:
            counts, _ = np.histogram(np.clip(effective[key], 1.0, None), bins=edges)
            series.append({"key": key, "share": [_number(c / effective[key].size) for c in counts],
                           "units": int(effective[key].size)})
        content.units[entry["key"]]["histogram"] = {"edges": [_number(e) for e in edges], "series": series}


class _ExampleReader:
    """The stored examples of chosen units: the table is read once (its identifying and example columns), and each
    entry takes the rows of its chosen units and of their `MAX_BEHAVIOURS` largest behaviours."""

    def __init__(self, path: Path) -> None:
        check_schema(path, EXAMPLES_SCHEMA)
        columns = ["run_id", "entry", "unit", "behaviour", "behaviour_size", "rank", "central", "context", "position",
                   "window_start", "token_kind", "tokens", "activations"]
        self.table = pq.read_table(path, columns=columns).filter(pc.field("behaviour") < MAX_BEHAVIOURS)

    def units(self, run_id: str, entry: str, units: np.ndarray, vocabulary: dict[str, int]) -> tuple[dict[int, Any], str | None]:
        condition = (pc.field("run_id") == run_id) & (pc.field("entry") == entry) & pc.field("unit").isin(pa.array(units, pa.int64()))
        table = self.table.filter(condition)
        if table.num_rows == 0:
            return {}, None
        table = table.sort_by([("unit", "ascending"), ("behaviour", "ascending"), ("rank", "ascending")])
        column = {name: table.column(name).to_pylist() for name in table.column_names if name not in ("tokens", "activations")}
        # token strings become indices into the page's one vocabulary; activations are rounded for display
        flat = pc.list_flatten(table.column("tokens")).to_numpy(zero_copy_only=False)
        distinct, inverse = np.unique(flat.astype(str), return_inverse=True)
        index = np.array([vocabulary.setdefault(t, len(vocabulary)) for t in distinct.tolist()], dtype=np.int64)[inverse]
        offsets = pc.list_value_length(table.column("tokens")).to_numpy().cumsum()
        tokens = np.split(index, offsets[:-1])
        values = np.split(pc.list_flatten(table.column("activations")).to_numpy(zero_copy_only=False).astype(np.float64),
                          offsets[:-1])
        out: dict[int, list[dict[str, Any]]] = {}
        for i, unit in enumerate(column["unit"]):
            behaviours = out.setdefault(int(unit), [])
            if not behaviours or behaviours[-1]["behaviour"] != column["behaviour"][i]:
                behaviours.append({"behaviour": column["behaviour"][i], "size": column["behaviour_size"][i], "examples": []})
            start = column["window_start"][i]
            behaviours[-1]["examples"].append({
                "c": column["context"][i], "p": column["position"][i], "s": start, "k": column["position"][i] - start,
                "m": column["central"][i], "t": tokens[i].tolist(),
                "a": [float(f"{a:.3g}") if np.isfinite(a) else None for a in values[i]],
            })
        return out, str(column["token_kind"][0])
