"""Checking SAE training code for regressions: ``saebench-poly check CANDIDATE --baseline BASELINE``.

CANDIDATE is a sae-lens checkpoint folder (scored here on the spec, entries = that checkpoint alone) or a results
file; BASELINE a results file or one entry of a results file or leaderboard, ``FILE::ENTRY`` (so is CANDIDATE
when it names an entry). Both are validated as ``submit`` validates (unknown metric versions aside, see
below). Without ``::ENTRY`` a file contributes its SAE entries (not the raw-neuron, PCA and random
baselines, which measure the model, not the trainer). When each side holds one entry they are compared whatever
their names; otherwise entries are paired by name, and a baseline entry the candidate lacks fails as missing.

Each metric of each baseline entry is compared with the candidate's (`compare`). The allowed change is
``max(absolute, relative * |baseline|)`` from `TOLERANCES` (`DEFAULT_TOLERANCE` for a metric not listed). A
metric fails when it is missing from the candidate, becomes or stops being undefined (NaN), or gets worse than
the baseline by more than the allowed change in its direction (`MetricSpec.direction`). With ``two_sided`` it
also fails when it gets better by more than that (an unexplained improvement: update the baseline on purpose), and
a ``neutral`` metric (no better direction, e.g. L0) fails when it moves either way; one-sided, a neutral metric's
move is reported, not failed.

Two results are not comparable (exit 3) when their spec hashes differ (the report names the settings that differ),
when paired entries sit at different hooks, or when a metric has another version on each side or a version this
package does not define. Exit codes: `EXIT_PASS` 0, `EXIT_REGRESSED` 1, 2 for a usage or validation error (a
`UserError`), `EXIT_NOT_COMPARABLE` 3.

``update_baseline`` writes the candidate over the baseline file, whatever the comparison found (the report still
shows it), and is the only way this module writes the baseline; a missing baseline file is an error without it.
The report folder also receives the candidate's results (``candidate.parquet``), so that numbers computed in CI
can be inspected, and made the baseline on purpose (copy it, or ``check`` it with ``--update-baseline``).

The default tolerances assume a trainer that is reproducible for a seed: retraining and rescoring the toy
benchmark's SAEs, cold, with 1 or 2 threads, gave bitwise-equal metrics on one machine, while another seed moves
them well past the tolerances (TopK, k = 4: FVU 0.053-0.066, dead fraction 0.34-0.41 over 4 seeds). Create the
baseline on the kind of machine that runs the check, and give a nondeterministic trainer (e.g. on GPU) wider
tolerances.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from saebench_poly import leaderboard
from saebench_poly.errors import UserError
from saebench_poly.integrity import FileProvenance
from saebench_poly.leaderboard import Contents, entry_keys
from saebench_poly.metrics import all_metrics
from saebench_poly.results import Results, read_results, settings_differences, split_reference, validate
from saebench_poly.usertext import markdown_code, markdown_text

EXIT_PASS, EXIT_REGRESSED, EXIT_NOT_COMPARABLE = 0, 1, 3
REPORT_NAME = "check-report"
CANDIDATE_NAME = "candidate.parquet"
Status = Literal["ok", "regressed", "improved", "changed", "missing", "new"]


@dataclass(frozen=True)
class Tolerance:
    """A metric may move by ``max(absolute, relative * |baseline|)`` before its move counts."""

    absolute: float
    relative: float

    def allowed(self, baseline: float) -> float:
        return max(self.absolute, self.relative * abs(baseline)) if math.isfinite(baseline) else self.absolute


# Defaults per metric, chosen to sit above the run-to-run noise of seeded training and scoring on another machine
# (float rounding, another BLAS) and below a change a user would call a regression. Fractions of units move in
# steps of 1/width, so their absolute tolerance lets about 2% of the units flip in a small SAE; 5% relative on
# the distortions; 0.01 on cosines; one true feature of 20 on the toy model's recovery fraction.
TOLERANCES: dict[str, Tolerance] = {
    "l0": Tolerance(0.05, 0.05),
    "dead_fraction": Tolerance(0.02, 0.0),
    "dense_fraction": Tolerance(0.02, 0.0),
    "mse": Tolerance(1e-6, 0.05),
    "fvu": Tolerance(0.002, 0.05),
    "cosine_similarity": Tolerance(0.01, 0.0),
    "relative_l2_error": Tolerance(0.002, 0.05),
    "l2_norm_ratio": Tolerance(0.01, 0.0),
    "ce_increase": Tolerance(0.005, 0.05),
    "kl_divergence": Tolerance(0.002, 0.05),
    "ce_loss_recovered": Tolerance(0.01, 0.0),
    "mean_max_cosine": Tolerance(0.01, 0.0),
    "fraction_recovered": Tolerance(0.05, 0.0),
}
DEFAULT_TOLERANCE = Tolerance(1e-3, 0.05)


def tolerance_for(metric: str, overrides: dict[str, Tolerance] | None = None) -> Tolerance:
    return (overrides or {}).get(metric) or TOLERANCES.get(metric, DEFAULT_TOLERANCE)


def parse_tolerances(texts: list[str]) -> dict[str, Tolerance]:
    """``["fvu=0.01,0.1"]`` -> ``{"fvu": Tolerance(0.01, 0.1)}`` (absolute, relative)."""
    parsed = {}
    for text in texts:
        metric, _, numbers = text.partition("=")
        try:
            absolute, relative = (float(n) for n in numbers.split(","))
        except ValueError:
            raise UserError(f"tolerance {text!r}: write METRIC=ABSOLUTE,RELATIVE, e.g. fvu=0.002,0.05") from None
        if not metric or absolute < 0 or relative < 0:
            raise UserError(f"tolerance {text!r}: name a metric and give non-negative numbers")
        known = list(all_metrics())
        if metric not in known:
            close = difflib.get_close_matches(metric, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else " (`saebench-poly list` names them)"
            raise UserError(f"tolerance {text!r}: there is no metric {metric!r}{hint}")
        parsed[metric] = Tolerance(absolute, relative)
    return parsed


@dataclass
class MetricCheck:
    """One metric of one entry: the two values, the change allowed, and what the comparison found."""

    entry: str
    baseline_entry: str
    metric: str
    direction: str
    baseline: float | None
    candidate: float | None
    allowed: float | None
    status: Status

    @property
    def change(self) -> float | None:
        if self.baseline is None or self.candidate is None:
            return None
        return self.candidate - self.baseline


@dataclass
class CheckReport:
    """What ``check`` found: every metric compared, why the two are not comparable (if they are not), notes."""

    candidate: str
    baseline: str
    two_sided: bool
    checks: list[MetricCheck] = field(default_factory=list)
    not_comparable: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    baseline_written: bool = False

    def failing(self, item: MetricCheck) -> bool:
        if item.status in ("regressed", "missing"):
            return True
        if item.status == "changed":
            return self.two_sided or item.direction != "neutral"
        return item.status == "improved" and self.two_sided

    @property
    def failures(self) -> list[MetricCheck]:
        return [item for item in self.checks if self.failing(item)]

    @property
    def verdict(self) -> str:
        if self.baseline_written:
            return "baseline written"
        if self.not_comparable:
            return "not comparable"
        return "regressed" if self.failures else "pass"

    @property
    def exit_code(self) -> int:
        return {"not comparable": EXIT_NOT_COMPARABLE, "regressed": EXIT_REGRESSED}.get(self.verdict, EXIT_PASS)

    def summary(self) -> str:
        """One line: the verdict and the counts behind it."""
        if self.verdict == "not comparable":
            return f"not comparable: {'; '.join(self.not_comparable)}"
        failed = f"{len(self.failures)} of {len(self.checks)} metrics failed" if self.checks else "no metrics compared"
        return f"{self.verdict} ({failed})"

    def rows(self) -> list[tuple[list[str], bool, str]]:
        """Each metric compared as table cells (entry, metric, better, baseline, candidate, change, allowed,
        status), whether it fails, and its status."""
        return [([item.entry, item.metric, _better(item.direction), _number(item.baseline), _number(item.candidate),
                  _change(item), _number(item.allowed), item.status], self.failing(item), item.status) for item in self.checks]

    def diff(self) -> str:
        """The failures (or the reasons the two are not comparable) as aligned lines, for an assertion message."""
        lines = [f"saebench-poly check: {self.summary()}", f"  candidate: {self.candidate}", f"  baseline:  {self.baseline}"]
        for item in self.failures:
            lines.append("  " + "  ".join([
                f"{item.entry:<16}", f"{item.metric:<20}", f"{_better(item.direction):<16}",
                f"{_number(item.baseline):>10} -> {_number(item.candidate):<10}", f"{_change(item):<22}",
                f"allowed {_number(item.allowed)}", item.status,
            ]))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        def clean(value: Any) -> Any:
            return None if isinstance(value, float) and not math.isfinite(value) else value

        metrics = [{**{k: clean(v) for k, v in asdict(item).items()}, "change": clean(item.change),
                    "fails": self.failing(item)} for item in self.checks]
        return {"verdict": self.verdict, "exit_code": self.exit_code, "candidate": self.candidate,
                "baseline": self.baseline, "two_sided": self.two_sided, "not_comparable": self.not_comparable,
                "notes": self.notes, "metrics": metrics}

    def to_markdown(self) -> str:
        mode = ("two-sided: a metric fails when it moves either way by more than its tolerance" if self.two_sided
                else "one-sided: a metric fails when it gets worse by more than its tolerance")
        lines = [f"# saebench-poly check: {self.verdict}", "", f"- candidate: {markdown_code(self.candidate)}",
                 f"- baseline: {markdown_code(self.baseline)}", f"- mode: {mode}", f"- result: {markdown_text(self.summary())}", ""]
        for title, items in (("Not comparable", self.not_comparable), ("Notes", self.notes)):
            if items:
                lines += [f"## {title}", "", *[f"- {markdown_text(item)}" for item in items], ""]
        if self.checks:
            lines += ["## Metrics", "", "| entry | metric | better | baseline | candidate | change | allowed | status |",
                      "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
            for cells, fails, status in self.rows():
                cells = [markdown_text(cell) for cell in cells[:-1]] + [f"**{status}**" if fails else status]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"


def compare(candidate: Results, baseline: Results, two_sided: bool = False,
            tolerances: dict[str, Tolerance] | None = None) -> CheckReport:
    """Compare the candidate's entries with the baseline's, metric by metric (see the module docstring)."""
    report = CheckReport(candidate=candidate.source, baseline=baseline.source, two_sided=two_sided)
    ours = candidate if candidate.selected else candidate.scored()
    theirs = baseline if baseline.selected else baseline.scored()
    for side, results in (("candidate", ours), ("baseline", theirs)):
        if not results.keys:
            raise UserError(f"the {side} {results.source} holds no SAE entries: name the entry to compare with FILE::ENTRY")
    for ours_key, theirs_key in _pairs(ours, theirs, report):
        _compare_entries(ours, ours_key, theirs, theirs_key, report, tolerances)
    report.not_comparable = list(dict.fromkeys(report.not_comparable))
    report.notes = list(dict.fromkeys(report.notes))
    return report


def _pairs(ours: Results, theirs: Results, report: CheckReport) -> list[tuple[str | None, str]]:
    """(candidate key or None when missing, baseline key) for each baseline entry."""
    if len(ours.keys) == 1 and len(theirs.keys) == 1:
        return [(ours.keys[0], theirs.keys[0])]
    by_name = {key.partition("/")[2]: key for key in ours.keys}
    if len(ours.keys) == 1 and _name(ours.keys[0]) not in {_name(k) for k in theirs.keys}:
        names = ", ".join(_name(k) for k in theirs.keys)
        raise UserError(f"the baseline {theirs.source} holds several SAE entries ({names}) and none is named "
                        f"{_name(ours.keys[0])!r}: name the one to compare with {theirs.source}::ENTRY")
    pairs = [(by_name.get(_name(key)), key) for key in theirs.keys]
    baseline_names = {_name(k) for k in theirs.keys}
    report.notes += [f"entry {name!r} is new: the baseline has no entry of that name" for name in by_name if name not in baseline_names]
    return pairs


def _compare_entries(ours: Results, ours_key: str | None, theirs: Results, theirs_key: str,
                     report: CheckReport, tolerances: dict[str, Tolerance] | None) -> None:
    base = theirs.rows[entry_keys(theirs.rows) == theirs_key]
    base_name = _name(theirs_key)
    if ours_key is None:
        report.checks += [MetricCheck(base_name, base_name, row.metric, row.direction, row.value, None, None, "missing")
                          for row in base.itertuples()]
        return
    cand = ours.rows[entry_keys(ours.rows) == ours_key]
    name = _name(ours_key)
    first_ours, first_theirs = cand.iloc[0], base.iloc[0]
    if first_ours["spec_hash"] != first_theirs["spec_hash"]:
        differences = settings_differences(ours.provenance.specs.get(first_ours["spec_hash"]),
                                           theirs.provenance.specs.get(first_theirs["spec_hash"]), "candidate", "baseline")
        report.not_comparable.append(f"the spec hashes differ ({first_ours['spec_hash'][:12]} vs {first_theirs['spec_hash'][:12]}): "
                                     + ("; ".join(differences) or "the recorded settings are equal"))
    if first_ours["hook"] != first_theirs["hook"]:
        report.not_comparable.append(f"entry {name!r} is at hook {first_ours['hook']!r}, baseline entry {base_name!r} at {first_theirs['hook']!r}")
    for column in ("model_revision", "dataset_revision"):
        if first_ours[column] != first_theirs[column]:
            report.notes.append(f"{column} differs: {first_ours[column]!r} (candidate) vs {first_theirs[column]!r} (baseline)")
    known = {metric: spec.version for metric, (spec, _) in all_metrics().items()}
    candidate_rows = {row.metric: row for row in cand.itertuples()}
    for row in base.itertuples():
        other = candidate_rows.get(row.metric)
        if row.metric not in known or row.metric_version != known[row.metric]:
            report.not_comparable.append(f"metric {row.metric} has version {row.metric_version} in the baseline, which "
                                         f"this saebench-poly does not define (it defines {known.get(row.metric, 'no version')})")
            continue
        if other is None:
            report.checks.append(MetricCheck(name, base_name, row.metric, row.direction, row.value, None, None, "missing"))
            continue
        if other.metric_version != row.metric_version:
            report.not_comparable.append(f"metric {row.metric} has version {other.metric_version} in the candidate "
                                         f"and {row.metric_version} in the baseline")
            continue
        allowed = tolerance_for(row.metric, tolerances).allowed(row.value)
        report.checks.append(MetricCheck(name, base_name, row.metric, row.direction, row.value, other.value, allowed,
                                         _status(row.direction, row.value, other.value, allowed)))
    report.notes += [f"metric {m} of entry {name!r} is new: the baseline does not have it"
                     for m in candidate_rows if m not in set(base["metric"])]


def _status(direction: str, baseline: float, candidate: float, allowed: float) -> Status:
    if math.isnan(baseline) or math.isnan(candidate):
        return "ok" if math.isnan(baseline) and math.isnan(candidate) else "changed"
    change = candidate - baseline
    if direction == "neutral":
        return "changed" if abs(change) > allowed else "ok"
    worse = -change if direction == "higher" else change
    if worse > allowed:
        return "regressed"
    return "improved" if -worse > allowed else "ok"


def score_checkpoint(folder: Path, spec_path: Path, reporter: Any = None) -> Results:
    """Score the sae-lens checkpoint in ``folder`` on the spec at ``spec_path`` (its settings; as entries, the
    checkpoint alone: no trained SAEs, no baselines), in memory."""
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec, with_overrides

    loaded = load_spec(spec_path)
    alone = with_overrides(loaded, {"entries": [{"uri": f"disk:{folder.resolve()}", "name": folder.resolve().name}],
                                    "train": [], "baselines": []})
    result = run_benchmark(alone, reporter, write=False)
    spec = alone.spec
    provenance = FileProvenance(digests=leaderboard.entry_digests(result.rows), specs={spec.settings_hash(): spec.settings()})
    return Results(rows=result.rows, units=result.units, provenance=provenance, source=str(folder))


def load_candidate(candidate: str | Path, spec_path: Path | None, reporter: Any = None) -> Results:
    """A checkpoint folder scored on ``spec_path``, or a results file (or ``FILE::ENTRY``) read back."""
    path, entry = split_reference(str(candidate))
    if path.is_dir():
        if entry is not None:
            raise UserError(f"{path} is a checkpoint folder: it holds one SAE, so name no entry after ::")
        if spec_path is None:
            raise UserError(f"the candidate {path} is a checkpoint folder: give the spec to score it with (--spec)")
        return score_checkpoint(path, spec_path, reporter)
    return read_results(candidate)


def check(candidate: str | Path | Results, baseline: str | Path, spec_path: Path | None = None, two_sided: bool = False,
          update_baseline: bool = False, report_dir: Path | None = None, tolerances: dict[str, Tolerance] | None = None,
          reporter: Any = None) -> CheckReport:
    """Validate both sides, compare them, write the reports into ``report_dir`` (when given), and with
    ``update_baseline`` write the candidate as the new baseline file (see the module docstring)."""
    baseline_path, baseline_entry = split_reference(str(baseline))
    if update_baseline and baseline_entry is not None:
        raise UserError(f"--update-baseline rewrites a whole results file, not the entry {baseline}: point --baseline "
                        "at a file of its own (a leaderboard entry changes only through submit --replace)")
    if not baseline_path.exists() and not update_baseline:
        raise UserError(f"the baseline {baseline_path} does not exist: create it on purpose with --update-baseline")
    # what will be written is checked before a checkpoint is scored
    if update_baseline:
        leaderboard.check_writable(baseline_path)
    if report_dir is not None:
        leaderboard.check_writable(report_dir / CANDIDATE_NAME)
    theirs = None
    if baseline_path.exists():
        theirs = read_results(baseline)
        validate(theirs, known_metrics_only=False)
    ours = candidate if isinstance(candidate, Results) else load_candidate(candidate, spec_path, reporter)
    validate(ours, known_metrics_only=False)
    if theirs is not None:
        report = compare(ours, theirs, two_sided, tolerances)
    else:
        report = CheckReport(candidate=ours.source, baseline=str(baseline_path), two_sided=two_sided,
                             notes=[f"there was no baseline at {baseline_path}"])
    if update_baseline:
        leaderboard.update(baseline_path, lambda _old: Contents(ours.rows, ours.units, ours.provenance))
        report.baseline_written = True
        report.notes.append(f"the candidate was written to {baseline_path} as the new baseline")
    if report_dir is not None:
        write_reports(report, ours, report_dir)
    return report


def write_reports(report: CheckReport, candidate: Results, folder: Path) -> tuple[Path, Path, Path]:
    """Write ``check-report.md``, ``check-report.json`` and the candidate's results (``candidate.parquet``, with
    its per-unit table: a results file that can be made the baseline) into ``folder``, created when missing."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the report folder {folder}: {err.strerror}") from None
    markdown, data, results = folder / f"{REPORT_NAME}.md", folder / f"{REPORT_NAME}.json", folder / CANDIDATE_NAME
    leaderboard.write_atomic(report.to_markdown().encode(), markdown)
    leaderboard.write_atomic((json.dumps(report.to_json(), indent=1) + "\n").encode(), data)
    leaderboard.update(results, lambda _old: Contents(candidate.rows, candidate.units, candidate.provenance))
    return markdown, data, results


def _name(key: str) -> str:
    return key.partition("/")[2]


def _better(direction: str) -> str:
    return {"higher": "higher is better", "lower": "lower is better"}.get(direction, "no better way")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _change(item: MetricCheck) -> str:
    change = item.change
    if change is None or not math.isfinite(change):
        return "-"
    relative = f" ({change / abs(item.baseline):+.1%})" if item.baseline else ""
    return f"{change:+.4g}{relative}"
