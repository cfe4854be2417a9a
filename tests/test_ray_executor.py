"""``--executor ray``: the pass sharded over a local Ray instance with 2 CPU workers gives the leaderboard of a
run in one process, value by value, with the same spec hash."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest

from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec
from saebench_poly.testing import saebench_toy_sae, saebench_toy_spec, write_toy_spec  # noqa: F401 - fixtures
from tests.test_cli_errors import error_line

try:
    import ray
except ImportError:  # the optional extra: pip install 'saebench-poly[ray]'
    ray = None

needs_ray = pytest.mark.skipif(ray is None, reason="ray is not installed (pip install 'saebench-poly[ray]')")


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def sharded_spec(saebench_toy_spec, saebench_toy_sae):  # noqa: F811 - fixtures
    # 3,333 samples: the two shards (1,667 and 1,666) cut the 1,000-sample batches elsewhere than one process does
    return write_toy_spec(saebench_toy_spec.parent, name="sharded", entries=[f"disk:{saebench_toy_sae}"], tokens=3333)


def _by_key(rows: pd.DataFrame) -> pd.Series:
    return rows.set_index(["entry", "metric"])["value"].sort_index()


@pytest.mark.ray
@needs_ray
def test_a_run_sharded_over_two_ray_workers_equals_one_in_this_process(local_ray, sharded_spec) -> None:
    from saebench_poly.executors import RayExecutor

    loaded = load_spec(sharded_spec)
    local = run_benchmark(loaded, write=False)
    sharded = run_benchmark(loaded, write=False, executor=RayExecutor(workers=2))
    assert sharded.tokens_scored == local.tokens_scored == 3333
    expected, actual = _by_key(local.rows), _by_key(sharded.rows)
    assert list(actual.index) == list(expected.index)
    np.testing.assert_allclose(actual.to_numpy(), expected.to_numpy(), rtol=1e-6, atol=1e-8, equal_nan=True)
    assert set(sharded.rows["spec_hash"]) == set(local.rows["spec_hash"])
    for column in ("firing_frequency", "max_activation", "n_examples", "effective_behaviours", "capacity"):
        np.testing.assert_allclose(sharded.units[column].to_numpy(float), local.units[column].to_numpy(float),
                                   rtol=1e-6, atol=1e-8, equal_nan=True, err_msg=column)
    assert sharded.units["central_examples"].tolist() == local.units["central_examples"].tolist()
    pd.testing.assert_frame_equal(sharded.examples.drop(columns=["run_id", "created_at"], errors="ignore"),
                                  local.examples.drop(columns=["run_id", "created_at"], errors="ignore"))


@pytest.mark.ray
@needs_ray
def test_entries_spread_over_groups_of_workers_equal_one_process(local_ray, sharded_spec) -> None:
    from saebench_poly.executors import RayExecutor

    loaded = load_spec(sharded_spec)
    local = run_benchmark(loaded, write=False)
    grouped = run_benchmark(loaded, write=False, executor=RayExecutor(workers=2, groups=2))
    assert grouped.tokens_scored == local.tokens_scored == 3333
    expected, actual = _by_key(local.rows), _by_key(grouped.rows)
    assert list(actual.index) == list(expected.index)
    np.testing.assert_allclose(actual.to_numpy(), expected.to_numpy(), rtol=1e-6, atol=1e-8, equal_nan=True)
    assert grouped.units["central_examples"].tolist() == local.units["central_examples"].tolist()


def test_a_worker_of_an_entry_group_holds_only_its_entries(sharded_spec) -> None:
    from saebench_poly.executors import entry_groups, score_shard
    from saebench_poly.metrics.polysemanticity import Polysemanticity
    from saebench_poly.run import prepare_run

    loaded = load_spec(sharded_spec)
    everything = prepare_run(loaded)
    names = [item.entry.name for item in everything.scored]
    kept = [names[-1], names[0]]  # asked out of order: kept in the run's order
    prepared = prepare_run(loaded, entry_names=kept)
    assert [item.entry.name for item in prepared.scored] == [names[0], names[-1]]
    tokens, states = score_shard(loaded, 0, 2, entry_names=kept)
    whole_tokens, whole_states = score_shard(loaded, 0, 2)
    assert tokens == whole_tokens
    for state, position in zip(states, (0, len(names) - 1), strict=True):  # the selection's results wait for revisit
        np.testing.assert_equal([a.compute() for a in state if not isinstance(a, Polysemanticity)],
                                [a.compute() for a in whole_states[position] if not isinstance(a, Polysemanticity)])
    assert entry_groups([5, 1, 4, 2, 3], 2) == [[0, 1, 3], [2, 4]]  # totals 8 and 7
    assert entry_groups([1, 1], 5) == [[0], [1]]
    assert sorted(p for group in entry_groups(list(range(9)), 4) for p in group) == list(range(9))


@pytest.mark.ray
@needs_ray
def test_the_cli_writes_the_sharded_run(local_ray, sharded_spec, run_cli) -> None:
    code, out, err = run_cli("run", str(sharded_spec), "--executor", "ray", "--workers", "2", "--entry-groups", "2")
    assert code == 0, err
    assert "scoring on 4 Ray task(s): 2 slice(s) of about 1667 context(s) x 2 groups of entries" in " ".join(err.split())
    board = pd.read_parquet(sharded_spec.parent / "sharded.parquet")
    assert board["spec_hash"].nunique() == 1 and (board["tokens_scored"] == 3333).all()


def test_executor_ray_without_ray_is_one_line(monkeypatch, run_cli, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    code, _, err = run_cli("run", str(write_toy_spec(tmp_path)), "--executor", "ray")
    assert code == 2
    assert error_line(err) == ("saebench-poly: error: --executor ray needs Ray, which is not installed: "
                               "pip install 'saebench-poly[ray]'")
    assert not (tmp_path / "tiny-toy.parquet").exists()


def test_no_entry_groups_is_one_line(run_cli, tmp_path) -> None:
    pytest.importorskip("ray")
    code, _, err = run_cli("run", str(write_toy_spec(tmp_path)), "--executor", "ray", "--entry-groups", "0")
    assert code == 2 and error_line(err) == "saebench-poly: error: --entry-groups must be at least 1, got 0"


@pytest.mark.parametrize(("args", "message"), [
    (["--executor", "dask"], "unknown executor 'dask': use local or ray"),
    (["--workers", "2"], "--address, --workers and --entry-groups apply to --executor ray only"),
    (["--entry-groups", "2"], "--address, --workers and --entry-groups apply to --executor ray only"),
])
def test_bad_executor_options_are_one_line(run_cli, tmp_path, args, message) -> None:
    code, _, err = run_cli("run", str(write_toy_spec(tmp_path)), *args)
    assert code == 2 and error_line(err) == f"saebench-poly: error: {message}"
