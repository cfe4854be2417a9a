"""Mergeable accumulators: the pass split into two shards of contexts, each with its own accumulators, merged,
gives the values of one unsplit pass, family by family (the basis of ``--executor ray``)."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from saebench_poly.activations import score
from saebench_poly.metrics import ACCUMULATORS
from saebench_poly.revisit import revisit
from saebench_poly.run import prepare_run
from saebench_poly.spec import load_spec
from saebench_poly.testing import saebench_toy_sae, saebench_toy_spec  # noqa: F401 - fixtures, registered by being imported here
from tests.conftest import CONTEXT, D_MODEL, write_sae

HOOK = "blocks.0.hook_resid_post"


def _tl_spec(folder: Path, model_dir: Path, token_file: Path) -> Path:
    write_sae(folder / "relu-sae", "standard", D_MODEL, 48, HOOK, seed=1)
    write_sae(folder / "topk-sae", "topk", D_MODEL, 64, HOOK, seed=2, k=2)
    path = folder / "spec.toml"
    # the geometry of codes wider than 40 is a sample of 50 tokens: the sampled path merges too
    path.write_text(
        f'name = "merge"\ntokens = 300\nfit_tokens = 100\ncontext_size = {CONTEXT}\nbatch_size = 5\nbos_token_id = 0\n'
        f'hooks = ["{HOOK}"]\ndevice = "cpu"\nentries = ["disk:relu-sae", "disk:topk-sae"]\n'
        f'output = "{folder / "board.parquet"}"\n'
        f'[model]\nloader = "transformer_lens"\nname = "{model_dir}"\n'
        f'[dataset]\nkind = "tokens"\npath = "{token_file}"\n'
        '[metric_options.geometry]\nmax_exact_width = 40\nsample_size = 50\n'
        '[metric_options.polysemanticity]\nmax_examples = 8\nmin_examples = 2\n')
    return path


def _split_and_merge(spec: Path) -> tuple[list, list]:
    """(accumulators fed the whole pass, accumulators merged from two shards), entry by entry, after `revisit`."""
    loaded = load_spec(spec)
    whole = prepare_run(loaded)
    score(whole.adapter, whole.scored, whole.inputs.batches("score"))
    contexts = whole.inputs.contexts_in("score")
    cut = contexts // 2 - 1  # not on a batch boundary
    merged = prepare_run(loaded)
    for start, stop in ((0, cut), (cut, contexts)):
        shard = prepare_run(loaded)
        batches, first_token = shard.inputs.score_slice(start, stop)
        score(shard.adapter, shard.scored, batches, first_context=start, first_token=first_token)
        for target, item in zip(merged.scored, shard.scored, strict=True):
            for mine, theirs in zip(target.accumulators, item.accumulators, strict=True):
                mine.merge(pickle.loads(pickle.dumps(theirs)))  # as it travels between processes
    for run in (whole, merged):
        revisit(run.adapter, run.scored, run.inputs.scored_contexts)
    return whole.scored, merged.scored


@pytest.fixture(scope="module")
def tl_pair(tmp_path_factory, tiny_tl_model_dir, token_file):
    return _split_and_merge(_tl_spec(tmp_path_factory.mktemp("merge-tl"), tiny_tl_model_dir, token_file))


@pytest.fixture(scope="module")
def toy_pair(saebench_toy_spec, saebench_toy_sae):  # noqa: F811 - fixtures
    spec = saebench_toy_spec.parent / "merge-toy.toml"
    spec.write_text(saebench_toy_spec.read_text().replace('name = "tiny-toy"', 'name = "merge-toy"')
                    .replace("entries = []", f'entries = ["disk:{saebench_toy_sae}"]').replace("batch_size = 1000", "batch_size = 700"))
    return _split_and_merge(spec)


def _same(expected, actual, where: str) -> None:
    """Equal, floats to float32 tolerance: the shards cut batches elsewhere, and the codes are float32 products."""
    if isinstance(expected, torch.Tensor):
        expected, actual = expected.cpu().numpy(), actual.cpu().numpy()
    if isinstance(expected, float) or (isinstance(expected, np.ndarray) and expected.dtype.kind == "f"):
        np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-8, equal_nan=True, err_msg=where)
    else:
        assert list(np.asarray(actual, dtype=object).tolist()) == list(np.asarray(expected, dtype=object).tolist()), where


def _compare(pair, family: str) -> int:
    cls = ACCUMULATORS.get(family)
    checked = 0
    for whole, merged in zip(*pair, strict=True):
        for a, b in zip(whole.accumulators, merged.accumulators, strict=True):
            if type(a) is not cls:
                continue
            values = a.compute()
            assert values.keys() == b.compute().keys()
            for name, value in values.items():
                _same(float(value), float(b.compute()[name]), f"{whole.entry.name} {name}")
            units = a.unit_values()
            assert units.keys() == b.unit_values().keys()
            for name, value in units.items():
                _same(value, b.unit_values()[name], f"{whole.entry.name} {name}")
            checked += 1
    return checked


@pytest.mark.parametrize("family", ["sparsity", "reconstruction", "downstream", "capacity", "geometry", "rate",
                                    "polysemanticity"])
def test_two_shards_merged_equal_one_pass_on_a_transformer_lens_model(tl_pair, family) -> None:
    assert _compare(tl_pair, family) >= 3  # two SAEs and the baselines


@pytest.mark.parametrize("family", ["sparsity", "reconstruction", "capacity", "geometry", "rate", "polysemanticity",
                                    "feature_recovery", "neuron_truth"])
def test_two_shards_merged_equal_one_pass_on_the_toy_model(toy_pair, family) -> None:
    assert _compare(toy_pair, family) >= 1


def test_the_sampled_geometry_and_the_examples_were_exercised(tl_pair) -> None:
    """The shards really covered the paths that merge by keys: a wide code's token sample and the examples."""
    whole, _ = tl_pair
    geometry = [a for item in whole for a in item.accumulators if type(a).__name__ == "CodeGeometry"]
    assert any(not g.exact and g.sample.keys.numel() == 50 for g in geometry)
    poly = [a for item in whole for a in item.accumulators if type(a).__name__ == "Polysemanticity" and a.selector]
    assert any(int(p.examples.count.max()) == 8 for p in poly)
    assert not math.isnan(float(sum(p.compute()["too_few_examples_fraction"] for p in poly)))
