"""`saebench-poly check` and `saebench_poly.testing`: run -> submit -> check end to end, every exit code,
direction-aware tolerances, reports, and the helpers a training repository uses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from saebench_poly.errors import UserError
from saebench_poly.leaderboard import read_table
from saebench_poly.regression import (
    EXIT_NOT_COMPARABLE,
    EXIT_PASS,
    EXIT_REGRESSED,
    TOLERANCES,
    Tolerance,
    check,
    compare,
)
from saebench_poly.results import read_results, validate
from saebench_poly.testing import assert_no_regression, score
from tests.sharing.conftest import rewrite
from tests.test_cli_errors import error_line


def report(folder: Path) -> dict:
    return json.loads((folder / "check-report.json").read_text())


def test_run_submit_check_end_to_end_with_every_exit_code(toy, run_cli, tmp_path: Path) -> None:
    board, results, reports = tmp_path / "board.parquet", tmp_path / "results.parquet", tmp_path / "reports"
    for spec, output in ((toy["board_spec"], board), (toy["submission_spec"], results)):
        code, _, err = run_cli("run", str(spec), "--output", str(output))
        assert code == 0, err
    code, out, err = run_cli("submit", str(results), "--leaderboard", str(board))
    assert code == 0 and "added sae-b" in out, err
    spec = ["--spec", str(toy["submission_spec"]), "--report-dir", str(reports)]
    baseline = f"{board}::sae-b"

    # 0: the same checkpoint, scored again, matches its leaderboard entry
    code, out, err = run_cli("check", str(toy["sae-b"]), "--baseline", baseline, *spec)
    assert code == EXIT_PASS, out + err
    assert report(reports)["verdict"] == "pass" and "check: pass" in out
    assert (reports / "check-report.md").read_text().startswith("# saebench-poly check: pass")
    candidate = read_results(reports / "candidate.parquet")  # the numbers CI computed, a valid results file
    validate(candidate)
    assert set(candidate.rows["entry"]) == {"sae-b"}

    # 1: a decoder zeroed by a "training bug" makes the reconstruction worse
    code, out, err = run_cli("check", str(toy["sae-broken"]), "--baseline", baseline, *spec)
    assert code == EXIT_REGRESSED, out + err
    failed = {m["metric"]: m for m in report(reports)["metrics"] if m["fails"]}
    assert {"fvu", "mse", "cosine_similarity"} <= set(failed) and failed["fvu"]["status"] == "regressed"
    assert "| sae-broken | fvu | lower is better |" in (reports / "check-report.md").read_text()

    # 3: the same checkpoint scored on fewer tokens is not comparable, and the report says why
    code, out, err = run_cli("check", str(toy["sae-b"]), "--baseline", baseline, "--spec", str(toy["fewer_tokens_spec"]),
                             "--report-dir", str(reports))
    assert code == EXIT_NOT_COMPARABLE, out + err
    assert "tokens: 3000 (candidate) vs 4000 (baseline)" in out
    assert "tokens: 3000 (candidate) vs 4000 (baseline)" in report(reports)["not_comparable"][0]

    # 2: a baseline that does not exist is a usage error and is not created by accident
    new_baseline = tmp_path / "ci" / "baseline.parquet"
    code, _, err = run_cli("check", str(results), "--baseline", str(new_baseline), "--report-dir", str(reports))
    assert code == 2 and "create it on purpose with --update-baseline" in error_line(err)
    assert not new_baseline.exists()

    # --update-baseline writes it on purpose, after which the candidate passes against it
    code, out, err = run_cli("check", str(results), "--baseline", str(new_baseline), "--update-baseline", "--report-dir", str(reports))
    assert code == EXIT_PASS and report(reports)["verdict"] == "baseline written", out + err
    assert set(read_table(new_baseline)["entry"]) == set(read_table(results)["entry"])
    code, out, err = run_cli("check", str(results), "--baseline", str(new_baseline), "--report-dir", str(reports))
    assert code == EXIT_PASS, out + err
    code, _, err = run_cli("check", str(results), "--baseline", baseline, "--update-baseline", "--report-dir", str(reports))
    assert code == 2 and "not the entry" in error_line(err)


def _with(results: Path, changes: dict[str, float], target: Path) -> Path:
    """A results file whose sae-b metrics are multiplied by ``changes`` (resealed: a result scored that way)."""
    def edit(rows: pd.DataFrame) -> pd.DataFrame:
        for metric, factor in changes.items():
            rows.loc[(rows["entry"] == "sae-b") & (rows["metric"] == metric), "value"] *= factor
        return rows

    target.parent.mkdir(parents=True, exist_ok=True)
    return rewrite(results, edit, reseal=True, target=target)


def _value(results: Path, metric: str) -> float:
    rows = read_table(results)
    return float(rows[(rows["entry"] == "sae-b") & (rows["metric"] == metric)]["value"].iloc[0])


@pytest.mark.parametrize(
    ("metric", "factor", "two_sided", "status", "fails"),
    [
        ("fvu", 1.5, False, "regressed", True),         # lower is better, and it rose by 50%
        ("fvu", 1.01, False, "ok", False),              # within 5%
        ("fvu", 0.5, False, "improved", False),         # better: fails only two-sided
        ("fvu", 0.5, True, "improved", True),
        ("cosine_similarity", 0.9, False, "regressed", True),  # higher is better, and it fell
        ("cosine_similarity", 1.01, True, "ok", False),  # +0.008 < 0.01 absolute
        ("l0", 2.0, False, "changed", False),           # neutral: reported one-sided ...
        ("l0", 2.0, True, "changed", True),             # ... failed two-sided
    ],
)
def test_tolerances_are_direction_aware(results: Path, tmp_path: Path, metric, factor, two_sided, status, fails) -> None:
    candidate = _with(results, {metric: factor}, tmp_path / "candidate" / "results.parquet")
    found = check(candidate, results, two_sided=two_sided)
    item = next(c for c in found.checks if c.metric == metric)
    assert (item.status, found.failing(item)) == (status, fails)
    assert found.exit_code == (EXIT_REGRESSED if fails else EXIT_PASS)
    assert all(c.status == "ok" for c in found.checks if c.metric != metric)
    assert item.allowed == pytest.approx(TOLERANCES[metric].allowed(_value(results, metric)))


def test_a_missing_metric_fails_and_a_new_one_is_noted(results: Path, tmp_path: Path) -> None:
    fewer = rewrite(results, lambda rows: rows[rows["metric"] != "fvu"], reseal=True, target=tmp_path / "a" / "fewer.parquet")
    found = check(fewer, results)
    assert found.exit_code == EXIT_REGRESSED and [(c.metric, c.status) for c in found.failures] == [("fvu", "missing")]
    found = check(results, fewer)
    assert found.exit_code == EXIT_PASS and "metric fvu of entry 'sae-b' is new: the baseline does not have it" in found.notes


def test_another_metric_version_is_not_comparable(results: Path, tmp_path: Path) -> None:
    def older(rows: pd.DataFrame) -> pd.DataFrame:
        rows.loc[rows["metric"] == "fvu", "metric_version"] = 0
        return rows

    baseline = rewrite(results, older, reseal=True, target=tmp_path / "old" / "baseline.parquet")
    found = check(results, baseline)
    assert found.exit_code == EXIT_NOT_COMPARABLE
    assert found.not_comparable == ["metric fvu has version 0 in the baseline, which this saebench-poly does not define (it defines 1)"]


def test_an_edited_baseline_is_refused(results: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "b" / "baseline.parquet"
    rewrite(results, lambda rows: rows.assign(value=rows["value"].where(rows["metric"] != "fvu", 0.01)), reseal=False, target=baseline)
    with pytest.raises(UserError, match="were changed after scoring"):
        check(results, baseline)


def test_entries_pair_by_name_when_a_file_holds_several(results: Path, tmp_path: Path) -> None:
    both = rewrite(results, lambda rows: pd.concat([rows, rows[rows["entry"] == "sae-b"].assign(entry="sae-c")]),
                   reseal=True, target=tmp_path / "both" / "results.parquet")
    found = check(results, both)
    assert found.exit_code == EXIT_REGRESSED and {c.status for c in found.failures} == {"missing"}
    assert {c.entry for c in found.failures} == {"sae-c"}
    assert check(f"{results}::sae-b", f"{both}::sae-c").exit_code == EXIT_PASS
    with pytest.raises(UserError, match="has no entry named 'sae-d'; did you mean"):
        check(results, f"{both}::sae-d")


def test_assert_no_regression_reports_a_readable_diff(results: Path, tmp_path: Path) -> None:
    worse = _with(results, {"fvu": 2.0}, tmp_path / "worse" / "results.parquet")
    assert_no_regression(results, results)
    with pytest.raises(AssertionError) as failure:
        assert_no_regression(worse, results)
    message = str(failure.value)
    fvu = _value(results, "fvu")
    assert message.splitlines()[0] == "saebench-poly check: regressed (1 of {} metrics failed)".format(len(compare(
        read_results(worse), read_results(results)).checks))
    line = next(line for line in message.splitlines() if " fvu " in line)
    assert "lower is better" in line and f"{fvu:.4g} -> {2 * fvu:.4g}" in line and "+100.0%" in line and "regressed" in line
    assert_no_regression(worse, results, tolerances={"fvu": (0.0, 1.5)})
    assert_no_regression(worse, results, tolerances={"fvu": Tolerance(1.0, 0.0)})


def test_tolerances_can_be_set_on_the_command_line(results: Path, tmp_path: Path, run_cli) -> None:
    worse = _with(results, {"fvu": 2.0}, tmp_path / "worse" / "results.parquet")
    reports = ["--report-dir", str(tmp_path / "reports")]
    assert run_cli("check", str(worse), "--baseline", str(results), *reports)[0] == EXIT_REGRESSED
    assert run_cli("check", str(worse), "--baseline", str(results), "--tolerance", "fvu=0,1.5", *reports)[0] == EXIT_PASS
    code, _, err = run_cli("check", str(worse), "--baseline", str(results), "--tolerance", "fvu=0.1", *reports)
    assert code == 2 and "write METRIC=ABSOLUTE,RELATIVE" in error_line(err)


def test_a_training_repository_checks_its_trainer_with_the_fixtures(saebench_toy_sae: Path, saebench_toy_spec: Path, tmp_path: Path) -> None:
    baseline = tmp_path / "baseline.parquet"
    check(saebench_toy_sae, baseline, spec_path=saebench_toy_spec, update_baseline=True)
    assert_no_regression(saebench_toy_sae, baseline, spec=saebench_toy_spec, two_sided=True)
    scored = score(saebench_toy_sae, saebench_toy_spec)
    assert set(scored.rows["entry"]) == {saebench_toy_sae.name}
    assert math.isclose(scored.rows.query("metric == 'l0'")["value"].iloc[0], 2.0, rel_tol=1e-6)  # TopK, k = 2
