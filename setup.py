"""The default specs (benchmarks/*.toml) ship inside the wheel as package data, saebench_poly/specs/*.toml, so that
``saebench-poly run`` finds them in an install without a checkout. Everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SPECS = Path(__file__).resolve().parent / "benchmarks"


class BuildWithSpecs(build_py):
    def run(self) -> None:
        super().run()
        target = Path(self.build_lib) / "saebench_poly" / "specs"
        self.mkpath(str(target))
        for spec in sorted(SPECS.glob("*.toml")):
            self.copy_file(str(spec), str(target / spec.name))


setup(cmdclass={"build_py": BuildWithSpecs})
