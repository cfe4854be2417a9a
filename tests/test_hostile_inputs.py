"""Hostile and broken inputs through the command line (issue 9), one case per test, grouped as the issue is:

1. no code runs from a model folder (a tokenizer or config with ``auto_map`` custom code, ``trust_remote_code``);
2. names that rich markup, a terminal or a Markdown table would interpret are refused on the way in, and print as
   themselves on every way out (terminal, Markdown, JSON) when a board already holds them;
3. output files get the mode of the file they replace (0644 for new ones under umask 022).

Each case asserts what the user sees: the exit status, one ``saebench-poly: error:`` line and no traceback, and
that nothing ran or was left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from saebench_poly import leaderboard
from saebench_poly.integrity import FileProvenance
from saebench_poly.leaderboard import Contents
from saebench_poly.regression import CheckReport, MetricCheck
from saebench_poly.testing import (  # noqa: F401 - fixtures, registered by being imported here
    saebench_toy_sae,
    saebench_toy_spec,
    write_toy_spec,
)
from tests.conftest import char_tokenizer, write_sae
from tests.test_cli_errors import error_line

HOSTILE_NAMES = {
    "markup close": "[/]x",
    "markup style": "[bold]x",
    "ESC colour": "a\x1b[31mred",
    "OSC title and BEL": "a\x1b]0;owned\x07b",
    "newline": "a\nb",
    "table pipe": "a|b",
}
# What must never reach a terminal or a report raw: ESC starts every escape sequence, BEL ends an OSC one.
RAW_CONTROLS = ("\x1b", "\x07")


def assert_inert(text: str) -> None:
    """No raw control character, and no traceback (a MarkupError would be one)."""
    assert not any(c in text for c in RAW_CONTROLS), repr(text)
    assert "Traceback" not in text and "MarkupError" not in text


# --- 1. no code runs from a model folder -------------------------------------------------------------------------


def custom_code_tokenizer(folder: Path, marker: Path) -> Path:
    """A working tokenizer whose ``tokenizer_config.json`` asks, through ``auto_map``, for a class in a Python file
    of the folder; importing that file creates ``marker``."""
    folder.mkdir(parents=True, exist_ok=True)
    char_tokenizer().save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", "tokenization_evil.EvilTokenizer"]}
    config["tokenizer_class"] = "EvilTokenizer"
    config_path.write_text(json.dumps(config))
    (folder / "tokenization_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PreTrainedTokenizerFast as EvilTokenizer\n"
    )
    return folder


def tl_folder(source: Path, target: Path, **config: object) -> Path:
    """A copy of a transformer-lens model folder with ``config`` merged into its ``config.json``."""
    shutil.copytree(source, target)
    path = target / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return target


def hf_folder(target: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(target)
    return target


def hf_spec(tmp_path: Path, folder: Path) -> Path:
    path = tmp_path / "hf.toml"
    path.write_text(f'name = "hf"\ntokens = 10\ndevice = "cpu"\n[model]\nloader = "hf"\nname = "{folder}"\n'
                    f'[dataset]\nkind = "tokens"\npath = "{tmp_path / "tokens.npy"}"\n')
    return path


def _tl_trusting(tmp: Path, model: Path, marker: Path) -> Path:
    evil = custom_code_tokenizer(tmp / "evil-tokenizer", marker)
    return tl_folder(model, tmp / "model", tokenizer_name=str(evil), trust_remote_code=True)


def _tl_named(tmp: Path, model: Path, marker: Path) -> Path:
    evil = custom_code_tokenizer(tmp / "evil-tokenizer", marker)
    return tl_folder(model, tmp / "model", tokenizer_name=str(evil), trust_remote_code=False)


def _tl_files(tmp: Path, model: Path, marker: Path) -> Path:
    return custom_code_tokenizer(tl_folder(model, tmp / "model"), marker)


def _hf_tokenizer(tmp: Path, model: Path, marker: Path) -> Path:  # noqa: ARG001 - one signature for every case
    return custom_code_tokenizer(hf_folder(tmp / "model"), marker)


def _hf_model_code(tmp: Path, model: Path, marker: Path) -> Path:  # noqa: ARG001
    folder = hf_folder(tmp / "model")
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="evil", architectures=["EvilModel"],
                  auto_map={"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil", "modeling_evil"):
        (folder / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return folder


# case -> (how to build the model folder, its loader, the exit status, a piece of the error line or None)
CODE_CASES = {
    "tl config sets trust_remote_code": (_tl_trusting, "transformer_lens", 2, "sets trust_remote_code"),
    "tl config names a custom-code tokenizer": (_tl_named, "transformer_lens", 0, None),
    "tl folder holds a custom-code tokenizer": (_tl_files, "transformer_lens", 2, "never runs a tokenizer's own code"),
    "hf folder holds a custom-code tokenizer": (_hf_tokenizer, "hf", 0, None),
    "hf config maps to custom model code": (_hf_model_code, "hf", 2, "cannot load model"),
}


@pytest.mark.parametrize("case", list(CODE_CASES))
def test_no_code_from_a_model_folder_runs(case: str, tiny_tl_model_dir: Path, tl_spec, run_cli, tmp_path: Path) -> None:
    build, loader, status, message = CODE_CASES[case]
    marker = tmp_path / "code-ran"
    folder = build(tmp_path, tiny_tl_model_dir, marker)
    if loader == "hf":
        spec = hf_spec(tmp_path, folder)
    else:
        spec = tl_spec()
        spec.write_text(spec.read_text().replace(str(tiny_tl_model_dir), str(folder)))
    code, out, err = run_cli("hooks", str(spec))
    assert not marker.exists(), f"{case}: the folder's Python ran"
    assert code == status, err
    if message is not None:
        assert message in error_line(err)
    assert "Traceback" not in err


# --- 2. names ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_a_hostile_entry_name_in_a_spec_is_refused_before_anything_runs(name: str, tl_spec, run_cli, tmp_path: Path) -> None:
    spec = tl_spec()
    uri = "neurons:blocks.0.hook_resid_post"
    spec.write_text(spec.read_text().replace("entries = []", f"entries = [{{uri = {json.dumps(uri)}, name = {json.dumps(name)}}}]"))
    code, out, err = run_cli("run", str(spec))
    assert code == 2 and "may use only letters, digits" in error_line(err)
    assert_inert(out + err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["[bold]x", "a|b", "a\x1b[31mred", "a\nb"], ids=["markup", "pipe", "ESC", "newline"])
def test_a_hostile_checkpoint_folder_name_is_refused(name: str, tl_spec, run_cli, tmp_path: Path) -> None:
    folder = write_sae(tmp_path / name, "standard", 16, 8, "blocks.0.hook_resid_post")
    spec = tl_spec()
    spec.write_text(spec.read_text().replace("entries = []", f"entries = [{json.dumps(f'disk:{folder}')}]"))
    code, out, err = run_cli("run", str(spec))
    assert code == 2 and "give the entry another name in the spec" in error_line(err)
    assert_inert(out + err)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../escape", "a/b", "[bold]x"])
def test_a_trained_sae_name_that_is_not_a_plain_folder_name_is_refused(name: str, run_cli, tmp_path: Path) -> None:
    spec = write_toy_spec(tmp_path, name="train")
    spec.write_text(spec.read_text() + f'\n[[train]]\nname = {json.dumps(name)}\narchitecture = "topk"\nd_sae = 8\nk = 2\n'
                    'training_samples = 1000\nbatch_size = 100\n')
    code, out, err = run_cli("run", str(spec))
    assert code == 2 and "trained SAE name" in error_line(err)
    assert not (tmp_path / ".artifacts").exists()


@pytest.fixture(scope="module")
def poisoned(saebench_toy_spec: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811 - fixture
    """A toy leaderboard whose SAE entries carry every hostile name, resealed (digests recomputed): what a board
    written before names were checked, or by another tool, may hold."""
    from saebench_poly.run import run_benchmark
    from saebench_poly.spec import load_spec

    folder = tmp_path_factory.mktemp("poisoned")
    sae = write_sae(folder / "sae", "topk", 5, 8, "hidden", seed=1, k=2)
    loaded = load_spec(write_toy_spec(saebench_toy_spec.parent, name="poisoned", entries=[f"disk:{sae}"]))
    loaded.spec.output = str(folder / "clean.parquet")
    result = run_benchmark(loaded)
    rows, units = leaderboard.read_table(result.output), leaderboard.read_table(leaderboard.units_path(result.output), leaderboard.UNITS_SCHEMA)
    sae_rows, sae_units = rows[rows["entry_kind"] == "sae"], units[units["entry_kind"] == "sae"]
    copies, unit_copies = [rows], [units]
    for number, name in enumerate(HOSTILE_NAMES.values()):
        run_id = f"{number:032x}"
        copies.append(sae_rows.assign(entry=name, run_id=run_id, weights_sha256=f"{number:064x}"))
        unit_copies.append(sae_units.assign(entry=name, run_id=run_id))
    rows, units = leaderboard.concat(*copies), leaderboard.concat(*unit_copies)
    provenance = leaderboard.read_provenance(result.output).merged(FileProvenance(digests=leaderboard.entry_digests(rows)))
    board = folder / "poisoned.parquet"
    leaderboard.update(board, lambda _old: Contents(rows, units, provenance))
    return board


def test_show_prints_a_poisoned_board_with_every_name_inert(poisoned: Path, run_cli) -> None:
    code, out, err = run_cli("show", str(poisoned))
    assert code == 0, err
    assert_inert(out + err)
    for shown in ("[/]x", "[bold]x", "a\\x1b[31mred", "a\\x1b]0;owned\\x07b", "a\\nb", "a|b"):
        assert shown in out, shown


@pytest.mark.parametrize("name", list(HOSTILE_NAMES.values()), ids=list(HOSTILE_NAMES))
def test_submit_and_check_refuse_a_hostile_name_in_one_inert_line(name: str, poisoned: Path, run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("check", f"{poisoned}::{name}", "--baseline", f"{poisoned}::{name}",
                             "--report-dir", str(tmp_path / "report"))
    assert code == 2 and "uses characters outside letters, digits" in error_line(err)
    assert_inert(out + err)
    code, out, err = run_cli("submit", str(poisoned), "--leaderboard", str(poisoned))
    assert code == 2 and "uses characters outside letters, digits" in error_line(err)
    assert_inert(out + err)


def test_the_check_reports_keep_a_hostile_path_inert(saebench_toy_sae: Path, saebench_toy_spec: Path,  # noqa: F811
                                                      run_cli, tmp_path: Path) -> None:
    """The candidate's path reaches the terminal, check-report.md and check-report.json as written."""
    hostile = tmp_path / "a|b [bold]x `code` \x1b]0;owned\x07" / "sae"
    shutil.copytree(saebench_toy_sae, hostile)
    baseline = tmp_path / "baseline.parquet"
    code, out, err = run_cli("check", str(hostile), "--baseline", str(baseline), "--spec", str(saebench_toy_spec),
                             "--update-baseline", "--report-dir", str(tmp_path / "report"))
    assert code == 0, err
    assert_inert(out + err)
    markdown = (tmp_path / "report" / "check-report.md").read_text()
    assert_inert(markdown)
    candidate_line = next(line for line in markdown.splitlines() if line.startswith("- candidate:"))
    assert candidate_line.startswith("- candidate: ``/") and candidate_line.endswith("/sae``")  # a longer fence
    assert "\\x1b]0;owned\\x07" in candidate_line
    assert json.loads((tmp_path / "report" / "check-report.json").read_text())["candidate"] == str(hostile)


def test_the_markdown_table_escapes_every_hostile_name() -> None:
    report = CheckReport(candidate="c", baseline="b", two_sided=False)
    report.checks = [MetricCheck(name, name, "fvu", "lower", 0.1, 0.2, 0.01, "regressed") for name in HOSTILE_NAMES.values()]
    table = [line for line in report.to_markdown().splitlines() if line.startswith("| ") and "fvu" in line]
    assert len(table) == len(HOSTILE_NAMES)  # a newline in a name would have split a row
    for line in table:
        assert_inert(line)
        assert line.replace("\\|", "").count("|") == 9  # eight cells: the pipe in "a|b" is escaped
        assert "[bold]" not in line and "[/]" not in line


# --- 3. file modes -----------------------------------------------------------------------------------------------


def test_outputs_are_0644_when_new_and_keep_the_mode_they_replace(saebench_toy_sae: Path, saebench_toy_spec: Path,  # noqa: F811
                                                                   run_cli, tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        board = tmp_path / "board.parquet"
        args = ("check", str(saebench_toy_sae), "--baseline", str(board), "--spec", str(saebench_toy_spec),
                "--update-baseline", "--report-dir", str(tmp_path / "report"))
        assert run_cli(*args)[0] == 0
        written = [board, leaderboard.units_path(board), *(tmp_path / "report").iterdir()]
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written if p.suffix != ".lock"} == {
            p.name: 0o644 for p in written if p.suffix != ".lock"}
        board.chmod(0o664)
        assert run_cli(*args)[0] == 0
        assert stat.S_IMODE(board.stat().st_mode) == 0o664
    finally:
        os.umask(previous)
