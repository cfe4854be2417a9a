"""Token data: the context rule, determinism, batching, provenance and one-line errors, all offline."""

from __future__ import annotations

import hashlib
import json
import string

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedTokenizerFast

from saebench_poly.data import DatasetConfig, TokenDataset, token_batches
from saebench_poly.errors import UserError
from tests.conftest import BOS, CHARS, EOS, char_tokenizer


def char_ids(text: str) -> list[int]:
    """The ids the test tokenizer gives ``text``: one per character."""
    return [CHARS.index(c) + 3 for c in text]


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return char_tokenizer()


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("".join(f"doc {c}{c}{c} here\n\n" for c in string.ascii_lowercase * 4), encoding="utf-8")
    return path


def dataset(cfg: DatasetConfig, tokenizer=None, context_size=8, prepend_bos=True, seed=0) -> TokenDataset:
    return TokenDataset(cfg, tokenizer, context_size, prepend_bos, BOS if prepend_bos else None, seed)


def contexts(ds: TokenDataset) -> list[list[int]]:
    return [c.tolist() for c in ds.contexts()]


def test_text_documents_are_joined_by_eos_and_cut_into_windows(tmp_path, tokenizer):
    path = tmp_path / "two.txt"
    path.write_text("ab\n\n  \ncde\nfg", encoding="utf-8")
    cfg = DatasetConfig(kind="text", path=str(path), shuffle_buffer=0)

    stream = char_ids("ab") + [EOS] + char_ids("cde") + [EOS] + char_ids("fg")
    assert contexts(dataset(cfg, tokenizer, context_size=3, prepend_bos=True)) == [
        [BOS, *stream[i : i + 2]] for i in range(0, 8, 2)
    ]
    assert contexts(dataset(cfg, tokenizer, context_size=4, prepend_bos=False)) == [stream[0:4], stream[4:8]]


def test_contexts_are_deterministic_for_a_seed(text_file, tokenizer):
    cfg = DatasetConfig(kind="text", path=str(text_file))
    first = contexts(dataset(cfg, tokenizer, seed=1))
    assert first == contexts(dataset(cfg, tokenizer, seed=1))
    assert first != contexts(dataset(cfg, tokenizer, seed=2))
    in_file_order = contexts(dataset(cfg.model_copy(update={"shuffle_buffer": 0}), tokenizer, seed=1))
    assert in_file_order[0][1:] == char_ids("doc aaa")
    assert all(len(c) == 8 and c[0] == BOS for c in first)


@pytest.mark.parametrize("prepend_bos", [True, False])
def test_batches_do_not_depend_on_batch_size(text_file, tokenizer, prepend_bos):
    ds = dataset(DatasetConfig(kind="text", path=str(text_file)), tokenizer, prepend_bos=prepend_bos)
    runs = {size: list(token_batches(ds, n_contexts=40, batch_size=size, skip_contexts=3)) for size in (1, 7, 64)}
    inputs = {size: torch.cat([b.inputs for b in batches]) for size, batches in runs.items()}
    assert [len(b.inputs) for b in runs[7]] == [7] * 5 + [5]
    assert torch.equal(inputs[1], inputs[7]) and torch.equal(inputs[1], inputs[64])
    assert torch.equal(inputs[1], torch.stack(list(ds.contexts())[3:43]))
    masks = torch.cat([b.score_mask for b in runs[7]])
    assert masks.dtype == torch.bool and masks.shape == (40, 8)
    assert bool(masks[:, 1:].all()) and torch.equal(masks[:, 0], torch.full((40,), not prepend_bos))


def test_running_out_of_data_says_how_much_there_is(text_file, tokenizer):
    ds = dataset(DatasetConfig(kind="text", path=str(text_file)), tokenizer)
    available = len(contexts(ds))
    assert sum(len(b.inputs) for b in token_batches(ds, available - 2, 5, skip_contexts=2)) == available - 2
    with pytest.raises(UserError, match=f"holds only {available} contexts of 8 tokens.*ask for fewer tokens"):
        list(token_batches(ds, available, 5, skip_contexts=1))


def test_pretokenized_rows_are_concatenated_without_separator(tmp_path, tokenizer):
    rows = np.arange(3, 3 + 5 * 6, dtype=np.int32).reshape(5, 6) % 29 + 3
    flat = rows.reshape(-1).tolist()
    np.save(tmp_path / "ids.npy", rows)
    pq.write_table(pa.table({"input_ids": rows.tolist()}), tmp_path / "ids.parquet")
    (tmp_path / "ids.jsonl").write_text("".join(json.dumps({"ids": r}) + "\n" for r in rows.tolist()))
    configs = [
        DatasetConfig(kind="tokens", path=str(tmp_path / "ids.npy"), shuffle_buffer=0),
        DatasetConfig(kind="tokens", path=str(tmp_path / "ids.parquet"), shuffle_buffer=0),
        DatasetConfig(kind="tokens", path=str(tmp_path / "ids.jsonl"), column="ids", shuffle_buffer=0),
    ]
    for cfg in configs:
        ds = dataset(cfg, tokenizer=None, context_size=8, prepend_bos=True)
        assert contexts(ds) == [[BOS, *flat[i : i + 7]] for i in range(0, 28, 7)]
        assert ds.describe()["tokenizer"] == ""
    shuffled = dataset(configs[0].model_copy(update={"shuffle_buffer": 100}), prepend_bos=False, context_size=6)
    assert sorted(contexts(shuffled)) == sorted(rows.tolist()) != contexts(shuffled)


def test_text_columns_of_jsonl_and_parquet(tmp_path, tokenizer):
    docs = ["ab", "cd", "ef"]
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    rows = [{"text": docs[0]}, {"text": None}, {"text": docs[1]}, {"text": docs[2]}]  # a null document is skipped
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    expected = [[BOS, *char_ids("ab"), EOS], [BOS, *char_ids("cd"), EOS]]
    parquet = DatasetConfig(kind="parquet", path=str(tmp_path / "docs.parquet"), column="body", shuffle_buffer=0)
    jsonl = DatasetConfig(kind="jsonl", path=str(tmp_path / "docs.jsonl"), shuffle_buffer=0)
    assert contexts(dataset(parquet, tokenizer, context_size=4)) == expected
    assert contexts(dataset(jsonl, tokenizer, context_size=4)) == expected


def test_describe_pins_local_files_by_their_bytes(text_file, tokenizer):
    tokenizer.name_or_path = "char-tokenizer"
    info = dataset(DatasetConfig(kind="text", path=str(text_file)), tokenizer).describe()
    assert info == {
        "dataset_id": str(text_file),
        "dataset_revision": hashlib.sha256(text_file.read_bytes()).hexdigest(),
        "tokenizer": "char-tokenizer",
    }


def test_hub_datasets_stream_shuffled_by_seed(tmp_path, monkeypatch, tokenizer):
    """A dataset folder goes through the same `datasets` streaming path as a hub id, without a network."""
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0)  # a pause when a stream closes
    (tmp_path / "repo" / "data").mkdir(parents=True)
    docs = [f"doc {c}" for c in string.ascii_lowercase]
    pq.write_table(pa.table({"text": docs}), tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    cfg = DatasetConfig(kind="hub", path=str(tmp_path / "repo"), shuffle_buffer=8)

    ds = dataset(cfg, tokenizer, context_size=6, prepend_bos=False, seed=3)
    shuffled = contexts(ds)
    assert shuffled == contexts(dataset(cfg, tokenizer, context_size=6, prepend_bos=False, seed=3))
    in_order = contexts(dataset(cfg.model_copy(update={"shuffle_buffer": 0}), tokenizer, 6, False))
    assert in_order[0] == char_ids("doc a") + [EOS]
    assert shuffled != in_order and sorted(map(sorted, shuffled)) == sorted(map(sorted, in_order))
    info = ds.describe()
    assert info["dataset_id"] == f"{tmp_path / 'repo'}:train" and info["dataset_revision"]
    with pytest.raises(UserError, match="has no column 'body'"):
        dataset(cfg.model_copy(update={"column": "body"}), tokenizer)
    # a hub column of token-id lists is pre-tokenized data: no tokenizer, no separator
    (tmp_path / "ids" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"input_ids": [[3, 4, 5], [6, 7, 8]]}), tmp_path / "ids" / "data" / "train.parquet")
    ids = DatasetConfig(kind="hub", path=str(tmp_path / "ids"), column="input_ids", shuffle_buffer=0)
    pretokenized = dataset(ids, tokenizer=None, context_size=4)
    assert contexts(pretokenized) == [[BOS, 3, 4, 5], [BOS, 6, 7, 8]]
    assert pretokenized.describe()["tokenizer"] == ""
    with pytest.raises(UserError, match="Bad split: test"):
        dataset(cfg.model_copy(update={"split": "test"}), tokenizer)


def test_unreachable_hub_is_one_line():
    with pytest.raises(UserError) as error:
        dataset(DatasetConfig(kind="hub", path="no-such-org/no-such-dataset"), prepend_bos=False)
    message = str(error.value)
    assert "no-such-org/no-such-dataset" in message and "unreachable" in message and "\n" not in message


def test_user_mistakes_are_one_line_errors(tmp_path, text_file, tokenizer):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    (tmp_path / "other.jsonl").write_text('{"body": "ok"}\n')
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "not.parquet").write_text("plain text")
    np.save(tmp_path / "floats.npy", np.zeros((2, 3)))
    np.save(tmp_path / "objects.npy", np.array([[1], "x"], dtype=object), allow_pickle=True)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "text.parquet")
    text_parquet = DatasetConfig(kind="tokens", path=str(tmp_path / "text.parquet"))
    np.save(tmp_path / "big.npy", np.array([[5, 99]]))
    cases = {
        "does not exist": DatasetConfig(kind="text", path=str(tmp_path / "missing.txt")),
        "line 2 of .* is not valid JSON": DatasetConfig(kind="jsonl", path=str(tmp_path / "bad.jsonl")),
        "has no field 'text' \\(columns: body\\)": DatasetConfig(kind="jsonl", path=str(tmp_path / "other.jsonl")),
        "is not UTF-8 text": DatasetConfig(kind="text", path=str(tmp_path / "latin1.txt")),
        "as Parquet": DatasetConfig(kind="parquet", path=str(tmp_path / "not.parquet")),
        "has no column 'input_ids' \\(columns: text\\)": text_parquet,
        "float64 array": DatasetConfig(kind="tokens", path=str(tmp_path / "floats.npy")),
        "as a .npy int array": DatasetConfig(kind="tokens", path=str(tmp_path / "objects.npy")),
        "token id 99, outside the tokenizer's 32 ids": DatasetConfig(kind="tokens", path=str(tmp_path / "big.npy")),
    }
    for pattern, cfg in cases.items():
        with pytest.raises(UserError, match=pattern) as error:
            list(dataset(cfg, tokenizer).contexts())
        assert "\n" not in str(error.value)
    text = DatasetConfig(kind="text", path=str(text_file))
    with pytest.raises(UserError, match="holds text but the model has no tokenizer"):
        dataset(text, tokenizer=None)
    with pytest.raises(UserError, match="prepend_bos is set but the model has no BOS token"):
        TokenDataset(text, tokenizer, 8, True, None, 0)
    (tmp_path / "ids.jsonl").write_text('{"text": [3, 4]}\n')
    with pytest.raises(UserError, match="holds list values, not text; use kind 'tokens'"):
        dataset(DatasetConfig(kind="jsonl", path=str(tmp_path / "ids.jsonl")), tokenizer)


def test_config_rejects_fields_that_do_not_fit_the_kind():
    with pytest.raises(ValidationError, match="apply only to kind 'hub'"):
        DatasetConfig(kind="text", path="/data/a.txt", revision="main")
    with pytest.raises(ValidationError, match="has no columns"):
        DatasetConfig(kind="text", path="/data/a.txt", column="body")
    with pytest.raises(ValidationError, match="kind 'tokens' reads"):
        DatasetConfig(kind="tokens", path="/data/a.txt")
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        DatasetConfig(kind="hub", path="org/data", shuffle=True)
    assert DatasetConfig(kind="tokens", path="/data/a.npy").column_name == "input_ids"
