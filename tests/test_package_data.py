"""Installed from a wheel, without a checkout, the default specs are still there: package data under
saebench_poly/specs/, run as if they lay in ./benchmarks."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from saebench_poly import cli, spec

REPOSITORY = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_the_wheel_ships_the_default_specs(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy(REPOSITORY / name, source / name)
    shutil.copytree(REPOSITORY / "saebench_poly", source / "saebench_poly", ignore=shutil.ignore_patterns("__pycache__"))
    (source / "benchmarks").mkdir()
    specs = sorted((REPOSITORY / "benchmarks").glob("*.toml"))
    for path in specs:
        shutil.copy(path, source / "benchmarks" / path.name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("saebench_poly-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        for path in specs:
            assert archive.read(f"saebench_poly/specs/{path.name}") == path.read_bytes()


def test_a_packaged_default_spec_runs_from_the_current_folder(tmp_path, monkeypatch, run_cli) -> None:
    packaged = tmp_path / "site-packages" / "saebench_poly" / "specs"
    packaged.mkdir(parents=True)
    shutil.copy(REPOSITORY / "benchmarks" / "toy-superposition.toml", packaged)
    monkeypatch.setattr(spec, "PACKAGED_SPECS", packaged)
    monkeypatch.setattr(cli, "REPOSITORY_BENCHMARKS", tmp_path / "no-checkout" / "benchmarks")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)

    loaded = spec.load_spec(cli.resolve_spec_path("toy-superposition"))
    assert loaded.output_path == work / "leaderboards" / "toy-superposition.parquet"
    assert loaded.spec.model.name == str(work / "benchmarks" / ".artifacts" / "toy-superposition" / "model")
    code, out, err = run_cli("hooks", "toy-superposition")
    assert code == 0, err
    assert out.split() == ["hidden", "8"] and (work / "benchmarks" / ".artifacts" / "toy-superposition" / "model").is_dir()
    assert not any(packaged.parent.rglob(".artifacts"))
