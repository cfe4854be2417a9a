"""`saebench-poly submit` and `show`: validation, duplicates, concurrent submits, damaged leaderboards."""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from saebench_poly import leaderboard
from saebench_poly.leaderboard import SCHEMA_METADATA_KEY, read_table
from saebench_poly.results import read_results, validate
from saebench_poly.submit import submit
from tests.sharing.conftest import as_new_entry, copy_table, rewrite, schema_metadata
from tests.test_cli_errors import error_line


def entries(board: Path) -> set[str]:
    return set(read_table(board)["entry"])


def test_submit_adds_the_sae_keeps_its_provenance_and_ranks_it_beside_the_neurons(board: Path, results: Path, run_cli) -> None:
    code, out, err = run_cli("submit", str(results), "--leaderboard", str(board))
    assert code == 0, err
    assert "added sae-b" in out and "left out neurons:hidden, pca:hidden, random:hidden" in out
    assert "neurons:hidden" in out and " of 5 " in out  # ranks among sae-a, sae-b and the three baselines
    rows = read_table(board)
    assert entries(board) == {"sae-a", "sae-b", "neurons:hidden", "pca:hidden", "random:hidden"}
    submitted, original = rows[rows["entry"] == "sae-b"], read_table(results).query("entry == 'sae-b'")
    provenance = ["run_id", "spec_name", "created_at", "weights_sha256", "git_commit", "metric", "value"]
    pd.testing.assert_frame_equal(submitted[provenance].reset_index(drop=True), original[provenance].reset_index(drop=True))
    units = read_table(leaderboard.units_path(board), leaderboard.UNITS_SCHEMA)
    assert (units["entry"] == "sae-b").sum() == 16
    validate(read_results(board))  # every entry's digest still matches on the merged leaderboard


def test_a_duplicate_is_refused_unless_replaced(board: Path, results: Path, run_cli) -> None:
    assert run_cli("submit", str(results), "--leaderboard", str(board))[0] == 0
    before = board.read_bytes()
    code, _, err = run_cli("submit", str(results), "--leaderboard", str(board))
    assert code == 2 and "already holds 'sae-b' (the same weights" in error_line(err) and "--replace" in err
    assert board.read_bytes() == before
    code, out, err = run_cli("submit", str(results), "--leaderboard", str(board), "--replace")
    assert code == 0 and "replacing sae-b" in out, err
    assert (read_table(board)["entry"] == "sae-b").sum() == (read_table(results)["entry"] == "sae-b").sum()


def test_running_the_leaderboard_spec_again_keeps_submitted_entries(board: Path, results: Path, toy) -> None:
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec

    rewrite(results, lambda rows: rows.assign(spec_name="board"), reseal=True)  # scored with a spec of the same name
    submit(results, board)
    loaded = load_spec(toy["board_spec"])
    loaded.spec.output = str(board)
    run_benchmark(loaded)
    assert entries(board) == {"sae-a", "sae-b", "neurons:hidden", "pca:hidden", "random:hidden"}
    assert read_table(board).groupby(["entry", "metric"]).size().max() == 1


def _submit_when_all_are_ready(barrier, results: Path, board: Path) -> None:
    barrier.wait()
    submit(results, board)


def test_eight_concurrent_submits_leave_all_eight_entries(board: Path, results: Path, tmp_path: Path) -> None:
    files = [as_new_entry(results, f"sub-{i}", tmp_path / f"sub-{i}" / "results.parquet") for i in range(8)]
    context = multiprocessing.get_context("fork")  # children inherit the imports: no 8 cold starts on 2 cores
    barrier = context.Barrier(len(files))
    processes = [context.Process(target=_submit_when_all_are_ready, args=(barrier, f, board)) for f in files]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * len(files)
    assert {f"sub-{i}" for i in range(8)} <= entries(board)
    rows = read_table(board)
    expected = (read_table(results)["entry"] == "sae-b").sum()
    assert all((rows["entry"] == f"sub-{i}").sum() == expected for i in range(8))  # every entry has all its rows
    units = read_table(leaderboard.units_path(board), leaderboard.UNITS_SCHEMA)
    assert set(units["entry"]) == entries(board)
    validate(read_results(board))
    assert sorted(p.name for p in board.parent.iterdir()) == ["board.examples.parquet", "board.parquet", "board.parquet.lock",
                                                             "board.units.parquet"]


@pytest.mark.parametrize("damage", ["truncated", "not parquet", "plain parquet"])
def test_a_damaged_leaderboard_is_reported_and_left_untouched(damage: str, board: Path, results: Path, run_cli) -> None:
    data = board.read_bytes()
    if damage == "truncated":
        board.write_bytes(data[: len(data) // 2])
        message = "is not a readable Parquet file"
    elif damage == "not parquet":
        board.write_bytes(b"PAR1" + bytes(range(256)) * 4)
        message = "is not a readable Parquet file"
    else:
        pd.DataFrame({"entry": ["x"], "value": [1.0]}).to_parquet(board)
        message = "has no saebench_poly schema version"
    damaged = board.read_bytes()
    for args in (["submit", str(results), "--leaderboard", str(board)], ["show", str(board)]):
        code, _, err = run_cli(*args)
        assert code == 2 and message in error_line(err)
    assert board.read_bytes() == damaged
    assert sorted(p.name for p in board.parent.iterdir()) == ["board.parquet", "board.parquet.lock", "board.units.parquet"]


def _set(metric: str, column: str, value):
    def edit(rows: pd.DataFrame) -> pd.DataFrame:
        rows.loc[(rows["entry"] == "sae-b") & (rows["metric"] == metric), column] = value
        return rows

    return edit


REFUSED = {
    # (edit of the rows, reseal the digests, expected message)
    "a metric value edited after scoring": (_set("fvu", "value", 0.001), False, "entry 'sae-b' were changed after scoring"),
    "a value outside its bounds": (_set("dead_fraction", "value", 1.5), True, "dead_fraction = 1.5 lies outside its bounds [0, 1]"),
    "an infinite value": (_set("mse", "value", np.inf), True, "mse is inf, not a finite number"),
    "an unknown metric version": (_set("fvu", "metric_version", 99), True, "metric 'fvu' has version 99; this saebench-poly defines version 1"),
    "an unknown metric": (_set("fvu", "metric", "fvu_v2"), True, "metric 'fvu_v2' has version 1; this saebench-poly does not define it"),
    "a metric twice": (lambda rows: pd.concat([rows, rows[rows["metric"] == "l0"].iloc[:1]]), True, "has the metrics ['l0'] more than once"),
    "no weights sha256": (lambda rows: rows.assign(weights_sha256=""), True, "has no weights sha256"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_invalid_results_are_refused_with_the_problem_named(case: str, board: Path, results: Path, run_cli) -> None:
    edit, reseal, message = REFUSED[case]
    rewrite(results, edit, reseal)
    before = board.read_bytes()
    code, _, err = run_cli("submit", str(results), "--leaderboard", str(board))
    assert code == 2 and message in error_line(err) and "is refused" in err
    assert board.read_bytes() == before


def _rewrite_table(path: Path, change) -> None:
    """Change the Parquet table itself (columns, metadata), as a tool that knows nothing of saebench-poly would."""
    table = pq.read_table(path)
    pq.write_table(change(table), path)


def _settings_edited(table: pa.Table) -> pa.Table:
    metadata = dict(table.schema.metadata)
    record = json.loads(metadata[leaderboard.PROVENANCE_METADATA_KEY])
    for settings in record["specs"].values():
        settings["tokens"] = 1_000_000
    metadata[leaderboard.PROVENANCE_METADATA_KEY] = json.dumps(record).encode()
    return table.replace_schema_metadata(metadata)


BROKEN_FILES = {
    "spec hash does not match its spec": (_settings_edited, "is not the hash of the spec settings recorded with it"),
    "a missing column": (lambda t: t.drop_columns(["weights_sha256"]), "lacks the columns ['weights_sha256']"),
    "a mistyped column": (lambda t: t.set_column(t.schema.get_field_index("value"), "value", pa.array(["x"] * len(t))),
                          "has columns of the wrong type: value is string, not double"),
    "another schema version": (lambda t: t.replace_schema_metadata({**t.schema.metadata, SCHEMA_METADATA_KEY: b"99"}),
                               "has schema version 99"),
}


@pytest.mark.parametrize("case", list(BROKEN_FILES))
def test_broken_results_files_are_refused(case: str, board: Path, results: Path, run_cli) -> None:
    change, message = BROKEN_FILES[case]
    _rewrite_table(results, change)
    before = board.read_bytes()
    code, _, err = run_cli("submit", str(results), "--leaderboard", str(board))
    assert code == 2 and message in error_line(err)
    assert board.read_bytes() == before


def test_an_entry_scored_with_other_settings_is_refused_naming_them(board: Path, toy, tmp_path: Path, run_cli) -> None:
    other = tmp_path / "fewer.parquet"
    code, _, err = run_cli("run", str(toy["fewer_tokens_spec"]), "--output", str(other))
    assert code == 0, err
    before = board.read_bytes()
    code, _, err = run_cli("submit", str(other), "--leaderboard", str(board))
    assert code == 2 and "was scored with other settings" in err and "tokens: 4000 (leaderboard) vs 3000 (entry)" in error_line(err)
    assert board.read_bytes() == before


def test_show_ranks_and_filters(board: Path, results: Path, run_cli) -> None:
    submit(results, board)
    code, out, err = run_cli("show", str(board), "--metric", "fvu", "--metric", "l0", "--rank-by", "fvu", "--hook", "hidden")
    assert code == 0, err
    order = [line.split()[1] for line in out.splitlines() if line.split() and line.split()[0].isdigit()]  # rank, entry, ...
    fvu = read_table(board).query("metric == 'fvu'").set_index("entry")["value"]
    assert order == list(fvu.sort_values(kind="stable").index)
    assert "L0" in out and "dead" not in out
    code, _, err = run_cli("show", str(board), "--metric", "fvv")
    assert code == 2 and "no metric 'fvv'; did you mean 'fvu'" in error_line(err)
    code, _, err = run_cli("show", str(board), "--model", "gpt2")
    assert code == 2 and "has no entries with model_id 'gpt2'" in error_line(err)


def test_a_missing_leaderboard_is_a_usage_error(results: Path, tmp_path: Path, run_cli) -> None:
    code, _, err = run_cli("submit", str(results), "--leaderboard", str(tmp_path / "none.parquet"))
    assert code == 2 and "there is no leaderboard at" in error_line(err)
    assert not (tmp_path / "none.parquet").exists()


def test_copy_table_keeps_the_metadata(scored, tmp_path: Path) -> None:
    copy = copy_table(scored["results"], tmp_path / "copy.parquet")
    assert schema_metadata(copy) == schema_metadata(scored["results"])


def test_a_crash_between_the_two_renames_leaves_the_leaderboard_as_before(board: Path, results: Path, monkeypatch) -> None:
    """The per-unit table is renamed first and the leaderboard last: a crash in between leaves the leaderboard as
    it was, and the next write drops the orphaned per-unit rows instead of duplicating them."""
    before = board.read_bytes()
    rename = os.replace

    def crash_on_the_leaderboard(source, target) -> None:
        if Path(target) == board:
            raise KeyboardInterrupt("killed between the renames")
        rename(source, target)

    monkeypatch.setattr(os, "replace", crash_on_the_leaderboard)
    with pytest.raises(KeyboardInterrupt):
        submit(results, board)
    assert board.read_bytes() == before
    assert "sae-b" in set(read_table(leaderboard.units_path(board), leaderboard.UNITS_SCHEMA)["entry"])  # orphaned
    monkeypatch.setattr(os, "replace", rename)
    submit(results, board)
    assert not list(board.parent.glob(".*.tmp"))  # the temporary the crash left was removed under the lock
    units = read_table(leaderboard.units_path(board), leaderboard.UNITS_SCHEMA)
    assert (units["entry"] == "sae-b").sum() == 16 and set(units["entry"]) == entries(board)
