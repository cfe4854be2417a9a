"""Benchmark specs: a TOML file, validated by pydantic models that reject unknown keys.

Relative paths in a spec (model folder, data files, ``disk:`` entries, ``output``, ``artifacts``) resolve against
the folder of the spec file. ``{name}`` in ``output`` and ``artifacts`` is replaced by the spec's name.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from saebench_poly.data import DatasetConfig
from saebench_poly.errors import UserError
from saebench_poly.integrity import content_sha256, settings_hash
from saebench_poly.models.base import ModelConfig
from saebench_poly.training import SAETrainingConfig
from saebench_poly.usertext import NAME_CHARACTERS, is_valid_name, printable

# The default specs (benchmarks/*.toml) as a wheel ships them (setup.py); absent in a checkout.
PACKAGED_SPECS = Path(__file__).resolve().parent / "specs"
BASELINE_SCHEMES = ("neurons", "pca", "random")
# Contexts scored when a language model's spec gives no ``tokens``: at 4,000 contexts of 127 tokens the median
# live latent of the real-model study's SAEs has at least 30 characteristic examples (README, "How many tokens").
DEFAULT_CONTEXTS = 4_000
DATASET_KINDS = ("hub", "text", "jsonl", "parquet", "tokens", "synthetic")
# Model loaders whose models sample their own inputs (dataset kind "synthetic"); their `name` is always a folder.
SYNTHETIC_LOADERS = ("toy", "incidental")


class SyntheticDataConfig(BaseModel):
    """Inputs sampled by the model itself (toy models, which define their own feature distribution)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["synthetic"]


class EntrySpec(BaseModel):
    """One entry: a source URI, with an optional display name and a hook that overrides the checkpoint's."""

    model_config = ConfigDict(extra="forbid")
    uri: str
    name: str | None = None
    hook: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str | None) -> str | None:
        if name is not None and not is_valid_name(name):
            raise ValueError(f"entry name {printable(repr(name))} may use only {NAME_CHARACTERS}")
        return name


class TrainedSAESpec(SAETrainingConfig):
    """An SAE the spec trains (sae-lens training classes) on the activations at ``hook`` (default: the spec's
    first hook), stored under ``artifacts/saes/<name>`` and reused while its settings are unchanged."""

    hook: str | None = None

    @field_validator("name")
    @classmethod
    def _check_name(cls, name: str) -> str:
        # the name is also a folder under artifacts/saes/, so it may not hold a path separator
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name):
            raise ValueError(f"trained SAE name {printable(repr(name))} may use only ASCII letters, digits, '.', '_' and '-' "
                             "(at most 100, starting with a letter or digit)")
        return name

    def training_config(self) -> SAETrainingConfig:
        return SAETrainingConfig(**self.model_dump(exclude={"hook"}, exclude_unset=True))


class BenchmarkSpec(BaseModel):
    """A benchmark: which model, data and entries to score, with which metrics, written where.

    ``tokens``: scored tokens (samples for toy models); a language model's spec without it scores
    `DEFAULT_CONTEXTS` contexts, enough for the median live latent of a typical SAE to have 30 characteristic
    examples (README, "How many tokens"); ``fit_tokens``: a held-out slice, before the scored one,
    on which PCA baselines are fitted; ``hooks``: hooks whose baselines (``baselines``) are always added, besides
    the MLP neurons that each SAE's hook is compared with; ``train``: SAEs trained with sae-lens on the model's
    activations when their folder under ``artifacts`` is missing, then scored as ``disk:`` entries.
    """

    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")]
    description: str = ""
    model: ModelConfig
    dataset: Annotated[DatasetConfig | SyntheticDataConfig, Field(discriminator="kind")]
    hooks: list[str] = Field(default_factory=list)
    baselines: list[Literal["neurons", "pca", "random"]] = Field(default_factory=lambda: list(BASELINE_SCHEMES))
    entries: list[EntrySpec] = Field(default_factory=list)
    train: list[TrainedSAESpec] = Field(default_factory=list)
    metrics: list[str] | None = None
    # [metric_options.<family>]: parameters of a metric family (its `Options`), validated when the spec is run.
    metric_options: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tokens: Annotated[int, Field(gt=0)] | None = None
    fit_tokens: Annotated[int, Field(ge=0)] = 8192
    context_size: Annotated[int, Field(gt=0)] = 128
    batch_size: Annotated[int, Field(gt=0)] = 16
    prepend_bos: bool = True
    bos_token_id: int | None = None
    # Token ids never scored, wherever they stand: "special" = the model's special tokens (`saebench_poly.inputs`).
    ignore_tokens: Literal["special"] | list[Annotated[int, Field(ge=0)]] = "special"
    seed: int = 0
    device: str = "auto"
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    output: str = "../leaderboards/{name}.parquet"
    artifacts: str = ".artifacts/{name}"
    # (section, key) -> a local path as the spec file wrote it, before `load_spec` made it absolute.
    _written_paths: dict[tuple[str, str], str] = PrivateAttr(default_factory=dict)
    # (section, key) -> the sha256 of what that local path holds (`integrity.content_sha256`), computed once.
    _content: dict[tuple[str, str], str] = PrivateAttr(default_factory=dict)

    @field_validator("entries", mode="before")
    @classmethod
    def _uris_as_entries(cls, entries: Any) -> Any:
        """An entry may be written as its bare URI."""
        return [{"uri": e} if isinstance(e, str) else e for e in entries] if isinstance(entries, list) else entries

    @model_validator(mode="after")
    def _check_data(self) -> BenchmarkSpec:
        synthetic = self.dataset.kind == "synthetic"
        if synthetic != (self.model.loader in SYNTHETIC_LOADERS):
            raise ValueError(f"dataset kind 'synthetic' goes with the model loaders {', '.join(SYNTHETIC_LOADERS)}, and only with them")
        if self.tokens is None:
            if synthetic:
                raise ValueError("tokens is missing: a toy model's spec says how many samples to score (tokens = N)")
            self.tokens = DEFAULT_CONTEXTS * (self.context_size - self.prepend_bos)
            self.__pydantic_fields_set__.discard("tokens")  # a filled default, so overrides of context_size refill it
        return self

    def settings(self) -> dict[str, Any]:
        """The evaluation settings: what the numbers depend on (model, data, token counts, context, BOS handling,
        the ignored tokens, seed, dtype, metrics and their options), not which entries are scored, where results go, the device or the
        batch size.
        A local model folder or data file is identified by what it holds, not where it lies: its path is replaced by
        ``sha256`` (`integrity.content_sha256`), so the same files give the same settings at any path, relative or
        absolute, and other files at the same path give other settings. The folder of a synthetic model (toy,
        incidental) is a cache of what its options train, so it is left out. Paths stay in the leaderboard as
        provenance (``model_id``, ``dataset_id``)."""
        settings = self.model_dump(
            mode="json",
            include={"model", "dataset", "tokens", "fit_tokens", "context_size", "prepend_bos", "bos_token_id",
                     "seed", "dtype", "metrics"},
        )
        if self.metric_options:  # only when set, so that specs without options keep their hash
            settings["metric_options"] = self.metric_options
        if self.dataset.kind != "synthetic":  # toy models have no tokens, and their specs keep their hash
            settings["ignore_tokens"] = self.ignore_tokens
        for section, key in self._written_paths:
            del settings[section][key]
            if section != "model" or self.model.loader not in SYNTHETIC_LOADERS:
                settings[section]["sha256"] = self._content_sha256(section, key)
        return settings

    def _content_sha256(self, section: str, key: str) -> str:
        if (section, key) not in self._content:
            path = Path(getattr(getattr(self, section), key))
            if not path.exists():
                raise UserError(f"{section} {key} {path} does not exist: check the path in the spec")
            self._content[section, key] = content_sha256(path)
        return self._content[section, key]

    def settings_hash(self) -> str:
        """sha256 of `settings` (canonical JSON). Two results are comparable when their hashes are equal."""
        return settings_hash(self.settings())

    def data_settings_hash(self) -> str:
        """sha256 of `settings` without the metrics and their options: what the activations depend on, so what an
        SAE trained on them depends on."""
        settings = self.settings()
        return settings_hash({key: value for key, value in settings.items() if key not in ("metrics", "metric_options")})


class LoadedSpec(BaseModel):
    """A validated spec and the file it came from."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: BenchmarkSpec
    path: Path

    @property
    def base_dir(self) -> Path:
        """The spec's folder; for a default spec shipped inside the installed package (`PACKAGED_SPECS`),
        ``./benchmarks``, so that it writes into the current folder as it would from a checkout."""
        return Path.cwd() / "benchmarks" if self.path.parent == PACKAGED_SPECS else self.path.parent

    def resolve(self, value: str) -> Path:
        """``value`` as an absolute path (``{name}`` filled in), relative ones against the spec's folder."""
        path = Path(value.replace("{name}", self.spec.name)).expanduser()
        return path if path.is_absolute() else (self.base_dir / path).resolve()

    @property
    def output_path(self) -> Path:
        return self.resolve(self.spec.output)

    @property
    def artifacts_dir(self) -> Path:
        return self.resolve(self.spec.artifacts)


def load_spec(path: str | Path) -> LoadedSpec:
    """Read and validate a spec file; every problem is a one-line `UserError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"spec file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"spec {path} is not valid TOML: {err}") from None
    try:
        spec = BenchmarkSpec.model_validate(raw)
    except ValidationError as err:
        raise UserError(f"spec {path}: {_first_problem(err)}") from None
    loaded = LoadedSpec(spec=spec, path=path.resolve())
    _resolve_paths(loaded)
    return loaded


def _resolve_paths(loaded: LoadedSpec) -> None:
    """Local model folders and data files become absolute, so that loaders never see spec-relative paths."""
    spec = loaded.spec
    if spec.model.loader in SYNTHETIC_LOADERS or _looks_local(spec.model.name, loaded.base_dir):
        spec._written_paths["model", "name"] = spec.model.name
        spec.model.name = str(loaded.resolve(spec.model.name))
    if spec.dataset.kind not in ("hub", "synthetic"):
        spec._written_paths["dataset", "path"] = spec.dataset.path
        spec.dataset.path = str(loaded.resolve(spec.dataset.path))


def _looks_local(name: str, base_dir: Path) -> bool:
    return name.startswith((".", "/", "~")) or (base_dir / name).exists()


def _first_problem(err: ValidationError) -> str:
    """The problem to report: an unknown key before anything else (a misspelt required key is also missing),
    with the key it was probably meant to be."""
    problems = err.errors()
    unknown = [p for p in problems if p["type"] == "extra_forbidden"]
    problem = (unknown or problems)[0]
    loc = _user_location(problem)
    where = ".".join(loc)
    if problem["type"] == "extra_forbidden":
        siblings = [_user_location(p)[-1] for p in problems if p["type"] == "missing" and _user_location(p)[:-1] == loc[:-1]]
        known = siblings or (list(BenchmarkSpec.model_fields) if len(loc) == 1 else [])
        close = difflib.get_close_matches(loc[-1], known, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else " (check its spelling; the README lists the keys a spec takes)"
        return f"unknown key {where!r}{hint}"
    if problem["type"] == "missing":
        return f"missing key {where!r}"
    message = problem["msg"].removeprefix("Value error, ")
    return f"{where}: {message}" if where else message


def _user_location(problem: Any) -> list[str]:
    loc = [str(part) for part in problem["loc"] if not re.fullmatch(r"[a-z_]+\[.*\]|function-after.*", str(part))]
    if loc[:1] == ["dataset"] and len(loc) > 1 and loc[1] in DATASET_KINDS:
        del loc[1]  # pydantic names the discriminated union's branch; the user wrote no such key
    return loc


def with_overrides(loaded: LoadedSpec, overrides: dict[str, Any]) -> LoadedSpec:
    """``loaded`` with top-level settings replaced (from command-line options), validated again."""
    if not overrides:
        return loaded
    try:
        spec = BenchmarkSpec.model_validate({**loaded.spec.model_dump(exclude_unset=True), **overrides})
    except ValidationError as err:
        raise UserError(f"option {_first_problem(err)}") from None
    spec._written_paths = {where: path for where, path in loaded.spec._written_paths.items() if where[0] not in overrides}
    spec._content = {where: sha for where, sha in loaded.spec._content.items() if where in spec._written_paths}
    return LoadedSpec(spec=spec, path=loaded.path)
