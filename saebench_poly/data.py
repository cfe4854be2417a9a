"""Token data for language models: documents from the hub or a local file, cut into fixed-length contexts.

The rule, the same for every source:

1. Documents are read in source order (hub: the split's stream; ``text``: one document per non-blank line of a UTF-8
   file; ``jsonl``/``parquet``: one per row of ``column``; ``tokens``: one token row per row) and then pass through a
   seeded shuffle buffer of ``shuffle_buffer`` documents (0 keeps the source order): `datasets.IterableDataset.shuffle`
   for hub streams (which also shuffles their shards), a plain buffer shuffle for local files. Either way the order is
   a pure function of the data, ``shuffle_buffer`` and ``seed``. Null documents are skipped.
2. Text is tokenized without special tokens; documents are concatenated with the tokenizer's EOS id between them
   (its SEP id for tokenizers without EOS, such as BERT's; nothing when it has neither); a document with no tokens
   adds nothing. Token rows (kind ``tokens``, or a hub column whose first row holds token ids) are concatenated
   without a separator.
3. The stream is cut into consecutive windows of ``context_size - 1`` tokens with ``bos_token_id`` prepended when
   ``prepend_bos``, else of ``context_size`` tokens; the incomplete tail is dropped.
4. A position is scored unless it holds the prepended BOS or one of the ignored token ids (`token_batches`), wherever
   it stands: by default the model's special tokens (BOS, EOS, pad, SEP, CLS, ...; the spec's ``ignore_tokens``),
   so the separators of rule 2 and any special token inside pre-tokenized rows are never scored.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Iterator
from functools import cached_property
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from saebench_poly.errors import UserError
from saebench_poly.models.base import Batch

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Documents tokenized per call: batching lets fast tokenizers work in parallel; the result does not depend on it.
_TOKENIZE_CHUNK = 256
_TOKEN_FILE_SUFFIXES = (".parquet", ".jsonl", ".npy")


class DatasetConfig(BaseModel):
    """Where the token data of a benchmark comes from.

    ``kind``: ``hub`` (anything `datasets.load_dataset` streams: a hub id or a dataset folder), ``text`` (a UTF-8 file,
    one document per non-empty line), ``jsonl``/``parquet`` (a text column), ``tokens`` (token ids: a ``.parquet`` or
    ``.jsonl`` column of int lists, or a ``.npy`` int array ``[rows, length]``). ``path``: the hub id or the file
    (already absolute). ``split``, ``name`` (config name) and ``revision`` are for the hub only. ``column`` defaults to
    ``text``, or ``input_ids`` for kind ``tokens``. ``shuffle_buffer``: documents in the seeded shuffle buffer.
    """

    model_config = ConfigDict(extra="forbid")

    kind: Literal["hub", "text", "jsonl", "parquet", "tokens"]
    path: str
    split: str = "train"
    name: str | None = None
    revision: str | None = None
    column: str | None = None
    shuffle_buffer: int = Field(10_000, ge=0)

    @model_validator(mode="after")
    def _fields_fit_kind(self) -> DatasetConfig:
        hub_only = sorted({"split", "name", "revision"} & self.model_fields_set)
        if self.kind != "hub" and hub_only:
            raise ValueError(f"{', '.join(hub_only)} apply only to kind 'hub', not to a local {self.kind!r} file")
        if self.column is not None and (self.kind == "text" or self.path.endswith(".npy")):
            raise ValueError(f"{self.path} has no columns; remove 'column'")
        if self.kind == "tokens" and not self.path.endswith(_TOKEN_FILE_SUFFIXES):
            raise ValueError(f"kind 'tokens' reads {', '.join(_TOKEN_FILE_SUFFIXES)} files, not {self.path}")
        return self

    @property
    def column_name(self) -> str:
        """The column that holds the documents."""
        if self.column is not None:
            return self.column
        return "input_ids" if self.kind == "tokens" else "text"


class TokenDataset:
    """A deterministic stream of token contexts (see the module docstring for the rule).

    Opening checks what can be checked before the run: the file or hub dataset is there and readable, its column
    exists, its first document has the right type, text data has a tokenizer, and ``prepend_bos`` has a BOS id.
    """

    def __init__(
        self,
        cfg: DatasetConfig,
        tokenizer: PreTrainedTokenizerBase | None,
        context_size: int,
        prepend_bos: bool,
        bos_token_id: int | None,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.context_size = context_size
        self.prepend_bos = prepend_bos
        self.bos_token_id = bos_token_id
        self.seed = seed
        self._vocab_size = None if tokenizer is None else len(tokenizer)
        if context_size < 1 + prepend_bos:
            raise UserError(f"context_size {context_size} is too small; use at least {1 + prepend_bos} tokens")
        if prepend_bos and bos_token_id is None:
            raise UserError("prepend_bos is set but the model has no BOS token; set prepend_bos to false")
        self._hub_dataset: Any = None
        self._hub_revision = ""
        if cfg.kind == "hub":
            self._open_hub()
        else:
            self._check_file()
        first = next(self._source(), None)
        if first is None:
            raise UserError(f"dataset {self.dataset_id} holds no documents; check the path, split and column")
        self.pretokenized = cfg.kind == "tokens" or (cfg.kind == "hub" and not isinstance(first, str))
        if not self.pretokenized and tokenizer is None:
            raise UserError(
                f"dataset {self.dataset_id} holds text but the model has no tokenizer; use pre-tokenized data "
                "(kind 'tokens') or a model with a tokenizer"
            )
        list(self._token_rows([first]))  # checks the first document's type now rather than mid-run

    @property
    def dataset_id(self) -> str:
        """The hub id with config name and split (``id[:name]:split``), or the file path."""
        if self.cfg.kind != "hub":
            return self.cfg.path
        name = f":{self.cfg.name}" if self.cfg.name else ""
        return f"{self.cfg.path}{name}:{self.cfg.split}"

    def describe(self) -> dict[str, str]:
        """Provenance for leaderboard rows: the dataset, its revision (the hub commit, or the sha256 of a local
        file's bytes) and the tokenizer (``""`` for pre-tokenized data)."""
        revision = self._hub_revision if self.cfg.kind == "hub" else self._file_sha256
        tokenizer = "" if self.pretokenized or self.tokenizer is None else self.tokenizer.name_or_path
        return {"dataset_id": self.dataset_id, "dataset_revision": revision, "tokenizer": tokenizer}

    def contexts(self) -> Iterator[torch.Tensor]:
        """Every context of the dataset, in order: LongTensors of shape ``[context_size]``."""
        width = self.context_size - self.prepend_bos
        prefix = np.array([self.bos_token_id] if self.prepend_bos else [], dtype=np.int64)
        for window in _windows(self._token_rows(self._documents()), width):
            yield torch.from_numpy(np.concatenate([prefix, window]))

    # --- reading documents -------------------------------------------------------------------------------------

    def _open_hub(self) -> None:
        import datasets  # deferred: importing datasets takes a second

        cfg = self.cfg
        try:
            builder = datasets.load_dataset_builder(cfg.path, cfg.name, revision=cfg.revision)
            self._hub_dataset = builder.as_streaming_dataset(split=cfg.split)
        except ConnectionError as e:
            raise UserError(
                f"dataset {cfg.path!r} cannot be loaded: the Hugging Face hub is unreachable ({type(e).__name__}); "
                "connect to the internet or use a local file"
            ) from e
        except datasets.exceptions.DatasetNotFoundError as e:
            raise UserError(
                f"dataset {cfg.path!r} is not on the Hugging Face hub (or is private or gated); check the id"
            ) from e
        except ValueError as e:  # an unknown split or config name; the message lists the available ones
            raise UserError(f"dataset {cfg.path!r}: {_first_line(e)}") from e
        except RuntimeError as e:
            if "scripts are no longer supported" not in str(e):
                raise
            raise UserError(f"dataset {cfg.path!r} is a loading script ({_first_line(e)}), which saebench-poly never runs: "
                            "point the spec at data files (kind 'jsonl', 'parquet', 'text' or 'tokens')") from e
        # For hub datasets the builder's hash is the commit that was resolved; it pins the data for provenance.
        self._hub_revision = builder.hash or ""
        columns = self._hub_dataset.column_names
        if columns is not None and cfg.column_name not in columns:
            raise UserError(f"dataset {self.dataset_id} has no column {cfg.column_name!r} ({_listing(columns)})")

    def _check_file(self) -> None:
        path = Path(self.cfg.path)
        if not path.is_file():
            raise UserError(f"dataset file {path} does not exist (or is not a file); check the path")
        try:
            with path.open("rb") as f:
                f.read(1)
        except OSError as e:
            raise UserError(f"cannot read dataset file {path}: {e.strerror or e}") from e

    def _source(self) -> Iterator[Any]:
        """The documents (text, or token rows) in source order; a null document is skipped."""
        cfg = self.cfg
        if cfg.kind == "hub":
            return self._hub_rows(self._hub_dataset)
        path = Path(cfg.path)
        file_format = path.suffix.lstrip(".") if cfg.kind == "tokens" else cfg.kind
        if file_format == "text":
            return (line for _, line in _lines(path))
        if file_format == "npy":
            return _npy_rows(path)
        rows = _parquet_rows(path, cfg.column_name) if file_format == "parquet" else _jsonl_rows(path, cfg.column_name)
        return (row for row in rows if row is not None)

    def _hub_rows(self, dataset: Any) -> Iterator[Any]:
        column = self.cfg.column_name
        for row in dataset:
            if column not in row:
                raise UserError(f"dataset {self.dataset_id} has a row without column {column!r} ({_listing(row)})")
            if row[column] is not None:
                yield row[column]

    def _documents(self) -> Iterator[Any]:
        """The documents in the seeded shuffled order."""
        if self.cfg.kind != "hub":
            return _buffer_shuffle(self._source(), self.cfg.shuffle_buffer, self.seed)
        dataset = self._hub_dataset
        if self.cfg.shuffle_buffer:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.cfg.shuffle_buffer)
        return self._hub_rows(dataset)

    # --- documents to tokens -----------------------------------------------------------------------------------

    def _token_rows(self, documents: Iterable[Any]) -> Iterator[np.ndarray]:
        """Token ids per document, separators included."""
        if self.pretokenized:
            for row in documents:
                yield self._checked_ids(row)
            return
        assert self.tokenizer is not None  # checked when opening
        separator = self.tokenizer.eos_token_id
        if separator is None:
            separator = self.tokenizer.sep_token_id
        first = True
        documents = iter(documents)
        while chunk := list(islice(documents, _TOKENIZE_CHUNK)):
            for doc in chunk:
                if not isinstance(doc, str):
                    raise UserError(
                        f"column {self.cfg.column_name!r} of dataset {self.dataset_id} holds "
                        f"{type(doc).__name__} values, not text; use kind 'tokens' for token ids"
                    )
            encoded = self.tokenizer(chunk, add_special_tokens=False, verbose=False)["input_ids"]
            for ids in encoded:
                if not ids:
                    continue
                if not first and separator is not None:
                    ids = [separator, *ids]
                first = False
                yield np.asarray(ids, dtype=np.int64)

    def _checked_ids(self, row: Any) -> np.ndarray:
        what = f"dataset {self.dataset_id}"
        if isinstance(row, str):
            raise UserError(f"{what} mixes text and token ids in column {self.cfg.column_name!r}; use one of them")
        ids = np.asarray(row)
        if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
            raise UserError(f"{what} holds rows that are not lists of integer token ids ({ids.dtype}, {ids.ndim}-d)")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and ids.min() < 0:
            raise UserError(f"{what} holds a negative token id ({ids.min()}); check the data")
        if self._vocab_size is not None and ids.size and ids.max() >= self._vocab_size:
            raise UserError(
                f"{what} holds token id {ids.max()}, outside the tokenizer's {self._vocab_size} ids; "
                "was it tokenized for another model?"
            )
        return ids

    @cached_property
    def _file_sha256(self) -> str:
        digest = hashlib.sha256()
        with open(self.cfg.path, "rb") as f:
            while block := f.read(1 << 20):
                digest.update(block)
        return digest.hexdigest()


def token_batches(
    dataset: TokenDataset, n_contexts: int | None, batch_size: int, skip_contexts: int = 0,
    ignored_ids: Iterable[int] = (),
) -> Iterator[Batch]:
    """Contexts ``skip_contexts .. skip_contexts + n_contexts`` of ``dataset`` in batches of ``batch_size`` (the
    last one may be smaller); ``n_contexts = None``: every context from ``skip_contexts`` to the end of the data.
    The concatenated batches do not depend on ``batch_size``. ``score_mask`` is False at position 0 when the dataset
    prepends BOS and wherever a token id is in ``ignored_ids``, True elsewhere."""
    if (n_contexts is not None and n_contexts < 1) or batch_size < 1 or skip_contexts < 0:
        raise UserError(
            f"need n_contexts >= 1, batch_size >= 1 and skip_contexts >= 0; got {n_contexts}, {batch_size}, "
            f"{skip_contexts}"
        )
    ignored = torch.tensor(sorted(set(ignored_ids)), dtype=torch.int64)
    contexts = islice(dataset.contexts(), skip_contexts, None)
    taken = 0
    while n_contexts is None or taken < n_contexts:
        wanted = batch_size if n_contexts is None else min(batch_size, n_contexts - taken)
        rows = list(islice(contexts, wanted))
        if n_contexts is None and not rows:
            return
        if len(rows) < wanted and n_contexts is not None:
            raise UserError(
                f"dataset {dataset.dataset_id} holds only {skip_contexts + taken + len(rows)} contexts of "
                f"{dataset.context_size} tokens ({skip_contexts} skipped + {n_contexts} asked for); "
                "ask for fewer tokens"
            )
        inputs = torch.stack(rows)
        score_mask = ~torch.isin(inputs, ignored)
        if dataset.prepend_bos:
            score_mask[:, 0] = False
        yield Batch(inputs=inputs, score_mask=score_mask)
        taken += wanted


def _windows(rows: Iterator[np.ndarray], width: int) -> Iterator[np.ndarray]:
    """Consecutive ``width``-token windows of the concatenated rows; the incomplete tail is dropped."""
    pending: list[np.ndarray] = []
    n_pending = 0
    for row in rows:
        pending.append(row)
        n_pending += len(row)
        if n_pending < width:
            continue
        stream = np.concatenate(pending)
        n_full = len(stream) // width
        yield from stream[: n_full * width].reshape(n_full, width)
        pending = [stream[n_full * width :]]
        n_pending = len(pending[0])


def _buffer_shuffle(items: Iterator[Any], buffer_size: int, seed: int) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``buffer_size`` items: each incoming item takes the place of a random
    buffered one, which is emitted; the buffer is emitted shuffled at the end."""
    if buffer_size == 0:
        yield from items
        return
    rng = random.Random(seed)
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        i = rng.randrange(buffer_size)
        yield buffer[i]
        buffer[i] = item
    rng.shuffle(buffer)
    yield from buffer


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    """The non-blank lines of a UTF-8 file with their 1-based numbers, newline removed."""
    try:
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    yield number, line.rstrip("\n")
    except UnicodeDecodeError as e:
        raise UserError(f"dataset file {path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from e


def _jsonl_rows(path: Path, column: str) -> Iterator[Any]:
    for number, line in _lines(path):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"line {number} of {path} is not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(row, dict) or column not in row:
            fields = _listing(row) if isinstance(row, dict) else "not a JSON object"
            raise UserError(f"line {number} of {path} has no field {column!r} ({fields}); set 'column'")
        yield row[column]


def _parquet_rows(path: Path, column: str) -> Iterator[Any]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"cannot read dataset file {path} as Parquet ({_first_line(e)})") from e
    if column not in file.schema_arrow.names:
        raise UserError(f"dataset file {path} has no column {column!r} ({_listing(file.schema_arrow.names)})")
    for batch in file.iter_batches(batch_size=1024, columns=[column]):
        yield from batch.column(0).to_pylist()


def _npy_rows(path: Path) -> Iterator[np.ndarray]:
    try:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:  # EOFError: an empty file
        raise UserError(f"cannot read dataset file {path} as a .npy int array ({_first_line(e) or 'it is empty'})") from e
    if array.ndim not in (1, 2) or not np.issubdtype(array.dtype, np.integer):
        raise UserError(f"{path} holds a {array.ndim}-d {array.dtype} array; token ids are an int array [rows, length]")
    yield from np.atleast_2d(array)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    return f"columns: {', '.join(names)}" if names else "no columns"
