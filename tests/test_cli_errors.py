"""Bad input: one line on stderr naming the problem, exit status 2, no traceback, and no file written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import D_MLP, D_MODEL, write_sae

RESID = "blocks.0.hook_resid_post"


def error_line(stderr: str) -> str:
    """The error: the last line of stderr, the only one that starts with the error prefix (progress messages
    before it are not errors), with no traceback anywhere."""
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert [line for line in lines if line.startswith("saebench-poly: error: ")] == lines[-1:], stderr
    return lines[-1]


def nan_sae(folder: Path) -> Path:
    from sae_lens import SAE

    sae = SAE.load_from_disk(write_sae(folder, "standard", D_MODEL, 8, RESID))
    with torch.no_grad():
        sae.b_enc[3] = float("nan")
    sae.save_model(folder)
    return folder


CASES = {
    "missing checkpoint": (lambda tmp: ["disk:no/such/sae"], "", "does not exist"),
    "d_in differs from the hook": (lambda tmp: [f"disk:{write_sae(tmp / 'wide', 'standard', D_MLP, 8, RESID)}"], "", "has d_in=32 but hook"),
    "hook the model lacks": (lambda tmp: ["neurons:blocks.7.mlp.hook_post"], "", "has no hook 'blocks.7.mlp.hook_post'"),
    "NaN weights": (lambda tmp: [f"disk:{nan_sae(tmp / 'nan')}"], "", "non-finite values (NaN or inf) in b_enc"),
    "unknown key in the spec": (lambda tmp: [], "colum = 'ids'", "unknown key 'dataset.colum'"),
    "unknown source scheme": (lambda tmp: ["diks:somewhere"], "", "unknown source scheme 'diks'; did you mean 'disk'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(case: str, tl_spec, run_cli, tmp_path: Path) -> None:
    entries, extra, message = CASES[case]
    spec = tl_spec(entries=entries(tmp_path), extra=extra)
    code, out, err = run_cli("run", str(spec))
    assert code == 2
    assert message in error_line(err)
    assert not (tmp_path / "out").exists()


def test_a_failed_run_leaves_the_existing_leaderboard_untouched(tl_spec, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("run", str(tl_spec(tokens=50)))
    assert code == 0, err
    board = tmp_path / "out" / "board.parquet"
    before = board.read_bytes()
    code, _, err = run_cli("run", str(tl_spec(tokens=50, entries=["disk:missing"])))
    assert code == 2 and board.read_bytes() == before
    assert sorted(p.name for p in board.parent.iterdir()) == ["board.examples.parquet", "board.parquet", "board.parquet.lock",
                                                             "board.units.parquet"]


def test_a_corrupt_leaderboard_is_reported_and_left_as_it_was(tl_spec, run_cli, tmp_path: Path) -> None:
    board = tmp_path / "out" / "board.parquet"
    board.parent.mkdir()
    board.write_bytes(b"PAR1 this is not parquet")
    code, _, err = run_cli("run", str(tl_spec(tokens=50)))
    assert code == 2 and "is not a readable Parquet file" in error_line(err)
    assert board.read_bytes() == b"PAR1 this is not parquet"
    # refused before the model is loaded and the pass run, and no lock file left beside it
    assert "loading the" not in err and [p.name for p in board.parent.iterdir()] == ["board.parquet"]


def test_an_output_under_a_file_is_refused_before_the_pass(tl_spec, run_cli, tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("")
    code, _, err = run_cli("run", str(tl_spec(tokens=50)), "--output", str(tmp_path / "afile" / "board.parquet"))
    assert code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in error_line(err) and "loading the" not in err


def test_an_output_that_is_not_a_parquet_file_name_is_refused(tl_spec, run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("run", str(tl_spec(tokens=50)), "--output", str(tmp_path / "res.csv"))
    assert code == 2 and "is not a .parquet file name" in error_line(err) and "name it res.parquet" in err
    assert not list(tmp_path.glob("res*"))


def test_check_refuses_a_baseline_it_could_not_write_before_scoring(run_cli, tmp_path: Path) -> None:
    code, _, err = run_cli("check", str(tmp_path / "no-checkpoint-yet"), "--baseline", str(tmp_path / "base.pq"),
                           "--update-baseline")
    assert code == 2 and "base.pq is not a .parquet file name" in error_line(err)


def test_data_that_leave_no_token_to_score_are_one_line_and_leave_nothing(tl_spec, run_cli, tmp_path: Path) -> None:
    import pandas as pd

    pd.DataFrame({"input_ids": [[0] * 24 for _ in range(40)]}).to_parquet(tmp_path / "bos.parquet")  # BOS only
    spec = tl_spec(tokens=50, baselines=["neurons"])
    spec.write_text(re.sub(r'(?m)^path = ".*"$', f'path = "{tmp_path / "bos.parquet"}"', spec.read_text()))
    code, _, err = run_cli("run", str(spec), "--checkpoint-every", "1")
    assert code == 2 and "no token was scored" in error_line(err)
    assert not (tmp_path / "out").exists() and not list(tmp_path.rglob("*checkpoint*"))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "no-such-benchmark"], "no spec file or benchmark named 'no-such-benchmark'"),
        (["run", "--device", "cuda:0"], "no CUDA GPU"),
        (["run", "--examples", "-1"], "Invalid value for '--examples'"),
        (["run", "--tokenz", "5"], "No such option: --tokenz"),
        (["check", "x"], "Missing option '--baseline'"),
        (["nosuch"], "No such command 'nosuch'"),
    ],
)
def test_bad_arguments_are_one_line(args: list[str], message: str, run_cli, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run_cli(*args)
    assert code == 2 and message in error_line(err)


def test_the_installed_console_script_reports_user_errors_without_a_traceback(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "saebench-poly"
    result = subprocess.run([str(script), "run", str(tmp_path / "absent.toml")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == f"saebench-poly: error: no spec file or benchmark named '{tmp_path / 'absent.toml'}' (looked in ./benchmarks, {Path(__file__).resolve().parent.parent / 'benchmarks'} and the installed default specs)"
    assert result.stdout == ""


def test_list_shows_sources_models_and_metrics(run_cli) -> None:
    code, out, _ = run_cli("list")
    assert code == 0
    for name in ("sae_lens", "disk", "neurons", "pca", "random", "transformer_lens", "hf", "toy", "fvu", "ce_loss_recovered"):
        assert name in out
