"""Helpers for testing SAE training code against saebench-poly in your own repository's test suite.

Plain functions, usable with or without pytest:

- `write_toy_spec`: a tiny toy-superposition benchmark spec (a toy model of superposition with known true
  features, trained in a second; scored in a second).
- `toy_activations`: batches of a spec's model activations from its ``train`` slice (disjoint from the data it
  scores), to train your SAE on.
- `train_toy_sae`: a reference SAE trained with sae-lens's own trainer and saved in sae-lens format (a stand-in
  for your trainer, or a fixture).
- `score`: a checkpoint folder or results file as `saebench_poly.results.Results`.
- `assert_no_regression`: compare a candidate with a baseline as ``saebench-poly check`` does; a regression
  raises `AssertionError` whose message lists each failing metric, baseline -> candidate, change and tolerance.

Fixtures, after ``pytest_plugins = ["saebench_poly.testing"]`` in your top-level ``conftest.py``:
``saebench_toy_spec`` (a tiny spec, per session) and ``saebench_toy_sae`` (a TopK SAE trained on it, per session).
They build under `single_thread`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from saebench_poly.files import with_new_file_permissions
from saebench_poly.regression import Tolerance, check, load_candidate
from saebench_poly.results import Results
from saebench_poly.threads import single_thread

TINY_TOY_MODEL = {"n_features": 12, "n_hidden": 5, "feature_probability": 0.1, "importance_decay": 0.85,
                  "train_steps": 400, "batch_size": 512, "seed": 0}


def write_toy_spec(folder: str | Path, name: str = "tiny-toy", entries: Sequence[str] = (), tokens: int = 4000,
                   fit_tokens: int = 1000, seed: int = 0, **model_options: Any) -> Path:
    """Write ``<folder>/<name>.toml``: a toy model of superposition (`TINY_TOY_MODEL`, updated by
    ``model_options``) scoring ``entries`` (source URIs; relative paths resolve against ``folder``) and the
    baselines on ``tokens`` samples; its results go to ``<folder>/<name>.parquet``. The model is trained on first
    use into ``<folder>/.artifacts/toy-model``, which every spec written into ``folder`` shares: specs that
    differ only in name and entries have the same settings, so their results are comparable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    options = "\n".join(f"{key} = {json.dumps(value)}" for key, value in {**TINY_TOY_MODEL, **model_options}.items())
    path = folder / f"{name}.toml"
    path.write_text(
        f'name = "{name}"\nentries = {json.dumps(list(entries))}\nhooks = ["hidden"]\ntokens = {tokens}\n'
        f'fit_tokens = {fit_tokens}\nbatch_size = 1000\n'
        f'seed = {seed}\ndevice = "cpu"\noutput = "{{name}}.parquet"\nartifacts = ".artifacts/{{name}}"\n\n'
        f'[model]\nloader = "toy"\nname = ".artifacts/toy-model"\n\n[model.options]\n{options}\n\n'
        '[dataset]\nkind = "synthetic"\n'
    )
    return path


def toy_activations(spec: str | Path, samples: int, batch_size: int, hook: str | None = None) -> Iterator[torch.Tensor]:
    """``[batch_size, width]`` float32 CPU activations at ``hook`` (default: the spec's first hook) of the spec's
    model, from the ``train`` slice of its data, enough batches for ``samples`` (and one more)."""
    from saebench_poly.inputs import Inputs
    from saebench_poly.models import MODEL_LOADERS
    from saebench_poly.spec import load_spec

    loaded = load_spec(spec).spec
    adapter = MODEL_LOADERS.get(loaded.model.loader)(loaded.model, torch.device("cpu"), torch.float32)
    hook = hook or (loaded.hooks[0] if loaded.hooks else adapter.hook_names()[0])
    return Inputs(loaded, adapter).training_activations(hook, samples, batch_size)


def train_toy_sae(spec: str | Path, folder: str | Path, architecture: str = "topk", d_sae: int = 16,
                  training_samples: int = 20_000, batch_size: int = 500, lr: float = 3e-3, seed: int = 0,
                  hook: str | None = None, **sparsity: Any) -> Path:
    """Train an SAE with sae-lens's trainer on the spec's activations and save it in sae-lens format in
    ``folder``. ``sparsity``: the setting the architecture needs (default ``k=2`` for topk and batchtopk,
    ``l1_coefficient=0.3`` for standard and gated, ``l0_coefficient=0.1`` for jumprelu)."""
    from saebench_poly.models import MODEL_LOADERS
    from saebench_poly.spec import load_spec
    from saebench_poly.training import SAETrainingConfig, train_sae

    defaults = {"topk": {"k": 2}, "batchtopk": {"k": 2}, "jumprelu": {"l0_coefficient": 0.1}}
    sparsity = sparsity or defaults.get(architecture, {"l1_coefficient": 0.3})
    cfg = SAETrainingConfig(name=Path(folder).name, architecture=architecture, d_sae=d_sae, training_samples=training_samples,
                            batch_size=batch_size, lr=lr, seed=seed, **sparsity)
    loaded = load_spec(spec).spec
    adapter = MODEL_LOADERS.get(loaded.model.loader)(loaded.model, torch.device("cpu"), torch.float32)
    hook = hook or (loaded.hooks[0] if loaded.hooks else adapter.hook_names()[0])
    data = toy_activations(spec, training_samples, batch_size, hook)
    sae = train_sae(cfg, adapter.hook_width(hook), data, hook_name=hook, model_name=adapter.model_id)
    with_new_file_permissions(*sae.save_model(Path(folder)))  # the weights and cfg.json it wrote
    return Path(folder)


def score(candidate: str | Path, spec: str | Path | None = None) -> Results:
    """A checkpoint folder scored on ``spec`` (a spec file, or a name in ./benchmarks or this checkout's
    benchmarks/; default ``toy-superposition``), or a results file (``FILE`` or ``FILE::ENTRY``) read back."""
    return load_candidate(candidate, _spec_path(spec) if Path(candidate).is_dir() else None)


def assert_no_regression(candidate: str | Path | Results, baseline: str | Path, spec: str | Path | None = None,
                         two_sided: bool = False, tolerances: dict[str, Tolerance | tuple[float, float]] | None = None) -> None:
    """Fail with a readable diff when ``candidate`` (a checkpoint folder scored on ``spec``, a results file or
    `Results`) regressed against ``baseline`` (a results file or ``FILE::ENTRY``), or the two are not comparable.
    ``tolerances``: metric -> `Tolerance` or (absolute, relative), replacing the defaults
    (`saebench_poly.regression.TOLERANCES`)."""
    chosen = {m: t if isinstance(t, Tolerance) else Tolerance(*t) for m, t in (tolerances or {}).items()}
    spec_path = _spec_path(spec) if not isinstance(candidate, Results) and Path(candidate).is_dir() else None
    report = check(candidate, baseline, spec_path=spec_path, two_sided=two_sided, tolerances=chosen)
    if report.exit_code != 0:
        raise AssertionError(report.diff())


def _spec_path(spec: str | Path | None) -> Path:
    from saebench_poly.cli import DEFAULT_SPEC, resolve_spec_path

    return resolve_spec_path(str(spec or DEFAULT_SPEC))


@pytest.fixture(scope="session")
def saebench_toy_spec(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny toy-superposition spec (`write_toy_spec`) in a session temporary folder, its model trained."""
    spec = write_toy_spec(tmp_path_factory.mktemp("saebench-toy"))
    with single_thread():
        toy_activations(spec, 1, 1)  # loading the model trains it
    return spec


@pytest.fixture(scope="session")
def saebench_toy_sae(saebench_toy_spec: Path) -> Path:
    """A TopK SAE (k = 2, 16 latents) trained with sae-lens on the tiny spec's activations, in sae-lens format."""
    with single_thread():
        return train_toy_sae(saebench_toy_spec, saebench_toy_spec.parent / "toy-sae")
