"""Hostile and broken inputs through the command line (issue 9), one case per test, grouped as the issue is:

1. no code runs from a model folder (a tokenizer or config with ``auto_map`` custom code, ``trust_remote_code``);
2. names that rich markup, a terminal or a Markdown table would interpret are refused on the way in, and print as
   themselves on every way out (terminal, Markdown, JSON) when a board already holds them;
3. output files get the mode of the file they replace (0644 for new ones under umask 022);
4. comparable means the same inputs: the spec hash covers what a model folder and a data file hold, not their paths;
5. a board holds one entry per (name, spec hash);
9. a fresh cold run of the default benchmark reproduces the committed leaderboard, whatever the thread count;
10. ``show`` fits 120 columns, and the help has no typer artefacts.

Each case asserts what the user sees: the exit status, one ``saebench-poly: error:`` line and no traceback, and
that nothing ran or was left behind.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
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
from tests.conftest import char_tokenizer, copy_of_toy_spec, write_sae
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
    assert code == 2 and "may use only ASCII letters, digits" in error_line(err)
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
    assert code == 2 and "uses characters outside ASCII letters, digits" in error_line(err)
    assert_inert(out + err)
    code, out, err = run_cli("submit", str(poisoned), "--leaderboard", str(poisoned))
    assert code == 2 and "uses characters outside ASCII letters, digits" in error_line(err)
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


def test_weights_are_written_as_readable_as_their_config(tmp_path: Path) -> None:
    """safetensors 0.8 creates its files 0600; the weights saebench-poly writes get what ``open`` gives cfg.json."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    previous = os.umask(0o022)
    try:
        cfg = HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4, n_heads=2, d_vocab=16, act_fn="relu")
        folder = save_hooked_transformer(HookedTransformer(cfg), tmp_path / "model")
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.iterdir()} == {
            p.name: 0o644 for p in folder.iterdir()}
    finally:
        os.umask(previous)


# --- 4. comparable means the same inputs -------------------------------------------------------------------------


def rows_of(board: Path):
    return leaderboard.read_table(board)


def test_another_model_at_the_same_path_is_not_comparable(tiny_tl_model_dir: Path, tl_spec, run_cli, tmp_path: Path) -> None:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from saebench_poly.models.hooked import save_hooked_transformer

    model = shutil.copytree(tiny_tl_model_dir, tmp_path / "model")
    spec = tl_spec(tokens=50)
    spec.write_text(spec.read_text().replace(str(tiny_tl_model_dir), str(model)))
    assert run_cli("run", str(spec), "--output", str(tmp_path / "board.parquet"))[0] == 0
    config = HookedTransformerConfig(**{k: v for k, v in json.loads((model / "config.json").read_text()).items()
                                        if k in ("n_layers", "d_model", "n_ctx", "d_head", "n_heads", "d_mlp", "d_vocab",
                                                 "act_fn", "normalization_type")}, seed=1)
    save_hooked_transformer(HookedTransformer(config), tmp_path / "other")
    shutil.copyfile(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    assert run_cli("run", str(spec), "--output", str(tmp_path / "other.parquet"))[0] == 0
    revisions = {rows_of(tmp_path / name)["model_revision"].iloc[0] for name in ("board.parquet", "other.parquet")}
    assert len(revisions) == 2 and all(len(r) == 64 for r in revisions)  # the folder's content hash
    code, out, err = run_cli("submit", str(tmp_path / "other.parquet"), "--leaderboard", str(tmp_path / "board.parquet"))
    assert code == 2 and "was scored with other settings" in error_line(err) and "model.sha256" in err


def test_relative_and_absolute_paths_to_the_same_files_are_comparable(tiny_tl_model_dir: Path, token_file: Path, tl_spec,
                                                                      run_cli, tmp_path: Path) -> None:
    absolute = tl_spec(tokens=50)
    relative = tmp_path / "relative.toml"
    text = absolute.read_text()
    for path in (tiny_tl_model_dir, token_file):
        text = text.replace(str(path), os.path.relpath(path, tmp_path))
    relative.write_text(text)
    for spec, output in ((absolute, "a.parquet"), (relative, "b.parquet")):
        assert run_cli("run", str(spec), "--output", str(tmp_path / output))[0] == 0
    assert set(rows_of(tmp_path / "a.parquet")["spec_hash"]) == set(rows_of(tmp_path / "b.parquet")["spec_hash"])
    code, out, err = run_cli("check", str(tmp_path / "b.parquet::pca:blocks.0.hook_resid_post"),
                             "--baseline", str(tmp_path / "a.parquet::pca:blocks.0.hook_resid_post"),
                             "--report-dir", str(tmp_path / "report"))
    assert code == 0, out + err


# --- 5. one entry per (name, spec hash) --------------------------------------------------------------------------


def test_running_a_spec_onto_a_board_that_holds_its_submitted_entry_keeps_one_entry(tl_spec, run_cli, tmp_path: Path) -> None:
    sae = write_sae(tmp_path / "sae-b", "standard", 16, 8, "blocks.0.hook_resid_post")
    board, results = tmp_path / "board.parquet", tmp_path / "results.parquet"
    assert run_cli("run", str(tl_spec(tokens=50)), "--output", str(board))[0] == 0
    spec = tl_spec(tokens=50, name="submission", entries=[f"disk:{sae}"])
    assert run_cli("run", str(spec), "--output", str(results))[0] == 0
    assert run_cli("submit", str(results), "--leaderboard", str(board))[0] == 0
    assert run_cli("run", str(spec), "--output", str(board))[0] == 0
    rows = rows_of(board)
    assert rows[rows["entry"] == "sae-b"]["run_id"].nunique() == 1
    assert (rows.groupby(["spec_hash", "entry"])["run_id"].nunique() == 1).all()
    code, out, err = run_cli("check", str(results), "--baseline", f"{board}::sae-b", "--report-dir", str(tmp_path / "report"))
    assert code == 0, out + err


# --- 6-7. a user mistake is one line that says what and where; a bug has its own exit status -----------------------


def _set(spec: Path, old: str, new: str) -> Path:
    text = spec.read_text()
    assert old in text, (old, text)
    spec.write_text(text.replace(old, new))
    return spec


def _tokens(tmp: Path, ids: list[list[int]] | None) -> Path:
    import numpy as np

    path = tmp / "ids.npy"
    if ids is None:
        path.write_bytes(b"")
    else:
        np.save(path, np.array(ids, dtype=np.int64))
    return path


def _with_tokens(spec: Path, token_file: Path, tokens: Path) -> Path:
    return _set(spec, str(token_file), str(tokens))


def _corrupt_weights(spec: Path, tiny_tl_model_dir: Path, tmp: Path) -> Path:
    model = shutil.copytree(tiny_tl_model_dir, tmp / "model")
    (model / "model.safetensors").write_bytes(b"\x00" * 64)
    return _set(spec, str(tiny_tl_model_dir), str(model))


def _script_dataset(spec: Path, token_file: Path, tmp: Path) -> Path:
    folder = tmp / "scripted"
    folder.mkdir()
    (folder / "scripted.py").write_text("import datasets\nraise SystemExit('the loading script ran')\n")
    return _set(spec, f'kind = "tokens"\npath = {json.dumps(str(token_file))}', f'kind = "hub"\npath = {json.dumps(str(folder))}')


def _text_without_tokenizer(spec: Path, token_file: Path, tmp: Path) -> Path:
    (tmp / "docs.txt").write_text("some text\nmore text\n")
    return _set(spec, f'kind = "tokens"\npath = {json.dumps(str(token_file))}', f'kind = "text"\npath = {json.dumps(str(tmp / "docs.txt"))}')


def _sae_with(tmp: Path, cfg_change) -> str:
    folder = write_sae(tmp / "sae", "standard", 16, 8, "blocks.0.hook_resid_post")
    path = folder / "cfg.json"
    path.write_text(cfg_change(path.read_text()))
    return f"disk:{folder}"


def _wider(cfg: str) -> str:
    return json.dumps({**json.loads(cfg), "d_sae": 9})


def _with_entry(spec: Path, uri: str) -> Path:
    return _set(spec, "entries = []", f"entries = [{json.dumps(uri)}]")


# case -> (spec changes: (spec, tmp, fixtures) -> spec, a piece of the one error line)
MISTAKES = {
    "context_size above the model's n_ctx": (lambda spec, tmp, f: _set(spec, "context_size = 12", "context_size = 64"),
                                             "context_size 64 is longer than"),
    "token id beyond the vocabulary": (lambda spec, tmp, f: _with_tokens(spec, f["token_file"], _tokens(tmp, [[5, 300, 7] * 20] * 40)),
                                       "token id 300"),
    "0-byte tokens file": (lambda spec, tmp, f: _with_tokens(spec, f["token_file"], _tokens(tmp, None)), "ids.npy"),
    "attention-pattern hook": (lambda spec, tmp, f: _set(spec, 'hooks = ["blocks.0.hook_resid_post"]', 'hooks = ["blocks.0.attn.hook_pattern"]'),
                               "blocks.0.attn.hook_pattern"),
    "corrupt model.safetensors": (lambda spec, tmp, f: _corrupt_weights(spec, f["tiny_tl_model_dir"], tmp), "model.safetensors"),
    "hub dataset folder with a loading script": (lambda spec, tmp, f: _script_dataset(spec, f["token_file"], tmp), "loading script"),
    "text data on a model without a tokenizer": (lambda spec, tmp, f: _text_without_tokenizer(spec, f["token_file"], tmp),
                                                 "has no tokenizer"),
    "typo of a key": (lambda spec, tmp, f: _set(spec, "tokens = 400", "tokns = 400"),
                               "unknown key 'tokns'; did you mean 'tokens'"),
    "cfg.json d_sae that the weights do not have": (lambda spec, tmp, f: _with_entry(spec, _sae_with(tmp, _wider)), "size mismatch for W_"),
    "cfg.json that is not JSON": (lambda spec, tmp, f: _with_entry(spec, _sae_with(tmp, lambda t: t[:-3])), "cfg.json"),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_mistake_is_one_line_exit_2_and_writes_nothing(case: str, tl_spec, tiny_tl_model_dir: Path, token_file: Path,
                                                          run_cli, tmp_path: Path) -> None:
    change, message = MISTAKES[case]
    spec = change(tl_spec(), tmp_path, {"tiny_tl_model_dir": tiny_tl_model_dir, "token_file": token_file})
    code, out, err = run_cli("run", str(spec))
    assert code == 2, out + err
    assert message in error_line(err)
    assert not (tmp_path / "out").exists()



@pytest.mark.parametrize("failure", ["full disk", "read-only folder"])
def test_a_file_system_that_refuses_the_write_is_one_line_and_leaves_no_file(failure: str, tl_spec, run_cli, monkeypatch,
                                                                              tmp_path: Path) -> None:
    """Simulated (the tests may run as root, whom a read-only folder does not stop): the disk fills up after a
    partial write, or the folder refuses new files."""
    import errno
    import tempfile

    import pyarrow.parquet as pq

    def full(writer, table, *args, **kwargs) -> None:  # after the file was opened and its header written
        raise OSError(errno.ENOSPC, "No space left on device")

    def read_only(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    if failure == "full disk":
        monkeypatch.setattr(pq.ParquetWriter, "write_table", full)
    else:
        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    code, out, err = run_cli("run", str(tl_spec(tokens=50)))
    assert code == 2 and ("No space left on device" if failure == "full disk" else "Permission denied") in error_line(err)
    assert [p.name for p in (tmp_path / "out").iterdir() if not p.name.endswith(".lock")] == []  # no orphan units table


@pytest.mark.parametrize("where", ["output", "lock"])
def test_an_output_or_lock_path_that_is_a_folder_is_one_line(where: str, tl_spec, run_cli, tmp_path: Path) -> None:
    board = tmp_path / "out" / "board.parquet"
    (board if where == "output" else Path(f"{board}.lock")).mkdir(parents=True)
    code, out, err = run_cli("run", str(tl_spec(tokens=50)), "--output", str(board))
    assert code == 2 and "is a folder" in error_line(err)
    assert not board.is_file()


def test_a_stale_temporary_is_removed_by_the_next_write(tl_spec, run_cli, tmp_path: Path) -> None:
    board = tmp_path / "out" / "board.parquet"
    board.parent.mkdir()
    stale = [board.parent / ".board.parquet.k1ll3d.tmp", board.parent / ".board.units.parquet.k1ll3d.tmp"]
    for path in stale:
        path.write_bytes(b"half a parquet file")
    assert run_cli("run", str(tl_spec(tokens=50)))[0] == 0
    assert not any(path.exists() for path in stale) and board.is_file()


def test_check_refuses_a_tolerance_for_an_unknown_metric(run_cli, tmp_path: Path) -> None:
    code, out, err = run_cli("check", str(tmp_path / "c.parquet"), "--baseline", str(tmp_path / "b.parquet"),
                             "--tolerance", "fvuu=0.1,0")
    assert code == 2 and "no metric 'fvuu'; did you mean 'fvu'?" in error_line(err)


def test_not_comparable_prints_no_table_of_regressions(tl_spec, run_cli, tmp_path: Path) -> None:
    for tokens, name in ((50, "a.parquet"), (60, "b.parquet")):
        assert run_cli("run", str(tl_spec(tokens=tokens)), "--output", str(tmp_path / name))[0] == 0
    entry = "::pca:blocks.0.hook_resid_post"
    code, out, err = run_cli("check", f"{tmp_path / 'b.parquet'}{entry}", "--baseline", f"{tmp_path / 'a.parquet'}{entry}",
                             "--report-dir", str(tmp_path / "report"))
    assert code == 3, out + err
    assert "not comparable" in out and "tokens: 60 (candidate) vs 50 (baseline)" in out
    assert "beyond their tolerance" not in out and "regressed" not in out


@pytest.mark.parametrize(("raised", "status", "last_line"), [
    (ZeroDivisionError("a bug"), 70, "saebench-poly: internal error: ZeroDivisionError"),
    (EOFError("a library read past the end"), 70, "saebench-poly: internal error: EOFError"),
    (KeyboardInterrupt(), 130, "saebench-poly: interrupted"),
], ids=["bug", "EOFError", "Ctrl-C"])
def test_a_bug_has_its_own_exit_status_and_keeps_its_traceback(raised: BaseException, status: int, last_line: str,
                                                               tl_spec, run_cli, monkeypatch) -> None:
    import saebench_poly.run

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(saebench_poly.run, "run_benchmark", broken)
    code, out, err = run_cli("run", str(tl_spec()))
    assert code == status
    assert err.strip().splitlines()[-1].startswith(last_line)
    assert ("Traceback" in err) == (status == 70)
    assert "Aborted" not in err


def test_a_killed_run_leaves_nothing_in_the_temp_directory(saebench_toy_spec: Path, tmp_path: Path) -> None:  # noqa: F811
    """sae-lens imports wandb, whose temporary folders a kill -9 would leave behind; the run keeps them in a
    folder of its own, which the next run removes."""
    import signal
    import subprocess
    import sys
    import time

    temp = tmp_path / "tmp"
    temp.mkdir()
    environment = {**os.environ, "TMPDIR": str(temp)}
    script = Path(sys.executable).parent / "saebench-poly"
    process = subprocess.Popen([str(script), "run", str(saebench_toy_spec), "--output", str(tmp_path / "b.parquet")],
                               env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list(temp.glob("saebench-poly-*/*wandb*")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    left = list(temp.iterdir())
    assert len(left) == 1 and left[0].name.startswith(f"saebench-poly-{process.pid}-"), left
    subprocess.run([str(script), "list"], env=environment, stdout=subprocess.DEVNULL, check=True, timeout=120)
    assert list(temp.iterdir()) == []


# --- 9. the README's first command -------------------------------------------------------------------------------

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_a_cold_run_of_the_default_benchmark_matches_the_committed_leaderboard(tmp_path: Path) -> None:
    """Trains the toy model and its SAEs from nothing (its own artifacts folder) with MKL in its compatible mode, as
    `make run` does (MKL then runs the same code on every x86 CPU: a TopK SAE's training flips with the last bit of
    a product), and two torch threads offered (toy runs take one), and compares every value with `leaderboards/toy-superposition.parquet`
    (regenerate it with `make leaderboards`) within the tolerances of `check`."""
    from saebench_poly.regression import tolerance_for

    spec = copy_of_toy_spec(tmp_path / "benchmarks")
    env = {**os.environ, "MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "saebench_poly.cli", "run", str(spec), "--output",
                           str(tmp_path / "fresh.parquet")], env=env, capture_output=True, text=True, check=False,
                          timeout=900)
    assert done.returncode == 0, done.stderr
    fresh, committed = rows_of(tmp_path / "fresh.parquet"), rows_of(REPOSITORY / "leaderboards" / "toy-superposition.parquet")
    assert set(fresh["spec_hash"]) == set(committed["spec_hash"]), "the settings changed: run `make leaderboards`"
    values = fresh.merge(committed, on=["entry", "metric"], how="outer", suffixes=("_fresh", "_committed"), indicator=True)
    assert (values["_merge"] == "both").all(), values[values["_merge"] != "both"][["entry", "metric", "_merge"]]

    def close(fresh: float, committed: float, metric: str) -> bool:
        if math.isnan(fresh) or math.isnan(committed):
            return math.isnan(fresh) and math.isnan(committed)
        return abs(fresh - committed) <= tolerance_for(metric).allowed(committed)

    off = [f"{row.entry} {row.metric}: {row.value_committed} (committed) vs {row.value_fresh} (fresh)"
           for row in values.itertuples() if not close(row.value_fresh, row.value_committed, row.metric)]
    assert not off, "\n".join(off)


# --- 10. show at 120 columns, help ---------------------------------------------------------------------------------


def test_show_fits_120_columns_without_cutting_a_value(run_cli, monkeypatch) -> None:
    from rich.console import Console

    from saebench_poly import cli

    monkeypatch.setattr(cli, "out_console", Console(width=120, markup=False, highlight=False, emoji=False))
    code, out, err = run_cli("show", str(REPOSITORY / "leaderboards" / "toy-superposition.parquet"))
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 120
    assert "…" not in out
    assert "topk-4" in out and "neurons:hidden" in out and "mean rank" in out and "RDP" in out


@pytest.mark.parametrize("command", ["run", "submit", "show", "check", "hooks"])
def test_the_help_has_no_typer_artefacts(command: str, run_cli) -> None:
    code, out, err = run_cli(command, "--help")
    usage = out.splitlines()[0]
    assert code == 0 and f" {command} [OPTIONS]" in usage
    assert "<bool>" not in out and "{" not in usage and "}" not in usage
