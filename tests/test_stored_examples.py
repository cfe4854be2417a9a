"""The stored-examples table (`leaderboards/<spec>.examples.parquet`): which examples are kept, their windows, and
their activations against a direct computation with sae-lens and transformer-lens."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import torch

from saebench_poly.example_windows import members_from_behaviours
from saebench_poly.leaderboard import (
    EXAMPLES_SCHEMA,
    SCHEMA_METADATA_KEY,
    SCHEMA_VERSION,
    UNITS_SCHEMA,
    read_table,
    units_path,
)
from saebench_poly.metrics.behaviours import unit_behaviours
from saebench_poly.metrics.examples import Examples
from saebench_poly.run import run_benchmark
from saebench_poly.spec import load_spec
from saebench_poly.stored_examples import WINDOW_AFTER, WINDOW_BEFORE, examples_path
from tests.conftest import CONTEXT, D_MODEL, hostile_tokenizer, write_sae

RESID = "blocks.0.hook_resid_post"
NEURONS = "blocks.0.mlp.hook_post"
def tiny_run(tl_spec, tmp_path: Path, model_dir: Path | None = None, **top) -> tuple[Path, Path]:
    """A run of the tiny model with a TopK SAE on the residual stream: (spec, leaderboard)."""
    write_sae(tmp_path / "resid-topk", "topk", D_MODEL, 64, RESID, k=4)
    spec = tl_spec(entries=["disk:resid-topk"], **top)
    if model_dir is not None:
        text = spec.read_text().splitlines()
        spec.write_text("\n".join(f'name = "{model_dir}"' if line.startswith("name = ") and "/" in line else line
                                  for line in text) + "\n")
    run_benchmark(load_spec(spec))
    return spec, tmp_path / "out" / "board.parquet"


def test_members_one_central_example_per_behaviour_and_at_most_n_more() -> None:
    # unit 0: examples 0, 1, 2 alike and 3, 4 alike (two behaviours); unit 1: three examples, one behaviour
    a, b = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    embeddings = torch.stack([torch.stack([a, a * 2, a + 0.01 * b, b, b * 3]),
                              torch.stack([a, a, a, a, a])])
    valid = torch.tensor([[True] * 5, [True, True, True, False, False]])
    behaviours = unit_behaviours(embeddings, valid, "components", [0.9])
    context = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, -1, -1]])
    examples = Examples(context=context, position=context % 7, activation=torch.ones(2, 5, dtype=torch.float64),
                        count=valid.sum(dim=1), maximum=torch.ones(2, dtype=torch.float64))
    members = members_from_behaviours(examples, behaviours, more=1)
    rows = pd.DataFrame({name: getattr(members, name).numpy() for name in
                         ("unit", "behaviour", "behaviour_size", "rank", "context", "position")})
    assert rows.groupby(["unit", "behaviour"])["rank"].apply(list).to_dict() == {(0, 0): [0, 1], (0, 1): [0, 1], (1, 0): [0, 1]}
    central = rows[rows["rank"] == 0].set_index(["unit", "behaviour"])["context"]
    expected = context.gather(1, behaviours.central.clamp_min(0))
    assert central.to_dict() == {(0, 0): int(expected[0, 0]), (0, 1): int(expected[0, 1]), (1, 0): int(expected[1, 0])}
    assert rows.set_index(["unit", "behaviour"])["behaviour_size"].groupby(level=[0, 1]).first().to_dict() == {
        (0, 0): 3, (0, 1): 2, (1, 0): 3}
    assert (rows["position"] == rows["context"] % 7).all()
    everything = members_from_behaviours(examples, behaviours, more=10)
    assert len(everything) == 8  # every valid example, each once
    assert sorted(zip(everything.unit.tolist(), everything.context.tolist(), strict=True)) == sorted(
        (u, int(c)) for u in range(2) for c in context[u][valid[u]])


def test_the_run_stores_windows_whose_activations_match_sae_lens_and_transformer_lens(tl_spec, tmp_path: Path) -> None:
    from sae_lens import SAE

    from saebench_poly.inputs import Inputs
    from saebench_poly.models import MODEL_LOADERS

    spec, board = tiny_run(tl_spec, tmp_path)
    path = examples_path(board)
    assert pq.read_schema(path).metadata[SCHEMA_METADATA_KEY] == str(SCHEMA_VERSION).encode()
    assert pq.read_schema(path).remove_metadata().equals(EXAMPLES_SCHEMA)
    examples = read_table(path, EXAMPLES_SCHEMA)
    units = read_table(units_path(board), UNITS_SCHEMA)
    assert {"resid-topk", f"neurons:{NEURONS}", f"pca:{RESID}", f"random:{RESID}"} <= set(examples["entry"])
    assert set(examples["token_kind"]) == {"ids"}  # this model has no tokenizer
    # one central example per behaviour, the unit table's own; at most 5 more members; sizes as in the unit table
    for (entry, unit), rows in examples.groupby(["entry", "unit"]):
        row = units[(units["entry"] == entry) & (units["unit"] == unit)].iloc[0]
        sizes = list(row["behaviour_sizes"])
        assert sorted(set(rows["behaviour"])) == list(range(len(sizes)))
        central = rows[rows["central"]].sort_values("behaviour")
        assert list(central["behaviour"]) == list(range(len(sizes))) and (central["rank"] == 0).all()
        assert [(c, p) for c, p in zip(central["context"], central["position"], strict=True)] == [
            (c["context"], c["position"]) for c in row["central_examples"]]
        counts = rows.groupby("behaviour").size()
        assert all(counts[k] == min(size, 6) for k, size in enumerate(sizes))
        assert list(rows.groupby("behaviour")["behaviour_size"].first()) == sizes
    # windows: 24 before and 8 after the peak, clipped at the context's edges (contexts of 12 tokens clip both)
    start = (examples["position"] - WINDOW_BEFORE).clip(lower=0)
    end = (examples["position"] + WINDOW_AFTER).clip(upper=CONTEXT - 1)
    assert (examples["window_start"] == start).all()
    assert (examples["tokens"].map(len) == end - start + 1).all() and (examples["activations"].map(len) == end - start + 1).all()
    assert (examples["tokens"].map(list) == examples["token_ids"].map(lambda ids: [str(i) for i in ids])).all()

    loaded = load_spec(spec)
    adapter = MODEL_LOADERS.get("transformer_lens")(loaded.spec.model, torch.device("cpu"), torch.float32)
    inputs = Inputs(loaded.spec, adapter)
    sae = SAE.load_from_disk(str(tmp_path / "resid-topk"))
    checked = 0
    for entry, hook, encode in (("resid-topk", RESID, sae.encode), (f"neurons:{NEURONS}", NEURONS, lambda x: x)):
        rows = examples[examples["entry"] == entry]
        for row in rows.drop_duplicates("unit").head(4).itertuples():
            [(_, batch)] = list(inputs.scored_contexts(torch.tensor([row.context])))
            _, cache = adapter.model.run_with_cache(batch.inputs, names_filter=[hook])
            with torch.no_grad():
                z = encode(cache[hook][0])[:, row.unit]
            window = slice(row.window_start, row.window_start + len(row.activations))
            assert torch.allclose(torch.tensor(list(row.activations)), z[window].float(), rtol=1e-5, atol=1e-6)
            assert list(row.token_ids) == batch.inputs[0, window].tolist()
            # the peak is the context's most active scored token: what the pass selected
            scored = torch.where(batch.score_mask[0], z, -torch.inf)
            assert int(torch.argmax(scored)) == row.position
            checked += 1
    assert checked == 8


def test_a_tokenizer_gives_token_strings_and_running_again_replaces_the_rows(tl_spec, text_tl_model_dir, tmp_path: Path) -> None:
    spec, board = tiny_run(tl_spec, tmp_path, model_dir=text_tl_model_dir)
    first = read_table(examples_path(board), EXAMPLES_SCHEMA)
    assert set(first["token_kind"]) == {"text"}
    vocabulary = hostile_tokenizer()
    for row in first.head(20).itertuples():
        assert list(row.tokens) == [vocabulary.decode([i]) for i in row.token_ids]
    run_benchmark(load_spec(spec))
    again = read_table(examples_path(board), EXAMPLES_SCHEMA)
    assert len(again) == len(first) and again["run_id"].nunique() == 1 and set(again["run_id"]) != set(first["run_id"])


def test_submitted_entries_bring_their_stored_examples(tl_spec, tmp_path: Path) -> None:
    from saebench_poly.spec import with_overrides
    from saebench_poly.submit import submit

    spec, board = tiny_run(tl_spec, tmp_path)
    write_sae(tmp_path / "other-topk", "topk", D_MODEL, 32, RESID, seed=3, k=2)
    other = tl_spec(entries=["disk:other-topk"])
    results = tmp_path / "results" / "results.parquet"
    run_benchmark(with_overrides(load_spec(other), {"output": str(results)}))
    submit(results, board)
    stored = read_table(examples_path(board), EXAMPLES_SCHEMA)
    submitted = stored[stored["entry"] == "other-topk"]
    scored = read_table(examples_path(results), EXAMPLES_SCHEMA)
    assert len(submitted) == (scored["entry"] == "other-topk").sum() > 0 and set(submitted["unit"]) <= set(range(32))
    assert "resid-topk" in set(stored["entry"])


def test_after_the_pass_the_model_runs_once_over_each_context_for_the_rows_and_the_windows(tl_spec, tmp_path: Path,
                                                                                          monkeypatch) -> None:
    """The stage after the pass reads the examples' rows and the stored examples' windows in one run of the model:
    every context it reads again is read once, and each of its batches is one forward of the model."""
    from transformer_lens import HookedTransformer

    from saebench_poly.inputs import Inputs

    visited: list[int] = []
    counts = {"batches": 0, "forwards": 0}
    contexts, forward = Inputs.scored_contexts, HookedTransformer.run_with_cache

    def counted_contexts(self, indices, batch_size=None):
        for index, batch in contexts(self, indices, batch_size):
            counts["batches"] += 1
            visited.extend(index.tolist())
            yield index, batch

    def counted_forward(self, *args, **kwargs):
        counts["forwards"] += bool(visited)  # only after the pass, once the stage has read a context
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(Inputs, "scored_contexts", counted_contexts)
    monkeypatch.setattr(HookedTransformer, "run_with_cache", counted_forward)
    _, board = tiny_run(tl_spec, tmp_path)
    examples = read_table(examples_path(board), EXAMPLES_SCHEMA)
    assert {"resid-topk", f"neurons:{NEURONS}", f"pca:{RESID}", f"random:{RESID}"} <= set(examples["entry"])
    assert len(visited) == len(set(visited)) and set(examples["context"]) <= set(visited)
    assert counts["batches"] > 0 and counts["forwards"] == counts["batches"]


def test_the_windows_do_not_depend_on_how_many_rounds_the_re_run_takes(tl_spec, tmp_path: Path, monkeypatch) -> None:
    """With the units re-run one at a time (a round each), each round reads the windows of its examples: every
    example stored by both runs has the same window. (Which members are stored may differ where a behaviour's central
    example is a near tie, since the embeddings are compared in other chunks.)"""
    keys, window = ["entry", "unit", "context", "position"], ["window_start", "token_ids", "activations"]
    _, board = tiny_run(tl_spec, tmp_path)
    one = read_table(examples_path(board), EXAMPLES_SCHEMA)[keys + window]
    monkeypatch.setattr("saebench_poly.metrics.polysemanticity.CACHE_BYTES", 1)
    _, board = tiny_run(tl_spec, tmp_path)
    many = read_table(examples_path(board), EXAMPLES_SCHEMA)[keys + window]
    both = one.merge(many, on=keys, suffixes=("_one", "_many"))
    assert len(both) >= 0.9 * len(one) > 0
    for column in window:
        assert [list(v) if column != "window_start" else v for v in both[f"{column}_one"]] == [
            list(v) if column != "window_start" else v for v in both[f"{column}_many"]], column
