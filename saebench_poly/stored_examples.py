"""The stored-examples table, ``<name>.examples.parquet`` beside a leaderboard: the text behind every behaviour.

One row per stored example: for each unit with characteristic examples (`saebench_poly.metrics.polysemanticity`)
and each of its behaviours, the behaviour's central example (``rank`` 0, ``central`` true) and up to N more of its
members (ranks 1..N, in the order of the unit's seeded sample; N is ``saebench-poly run --examples``, default 5).
Each row holds the token window around the example's peak token, ``WINDOW_BEFORE`` tokens before it and
``WINDOW_AFTER`` after, clipped at the context's edges (BOS included when it falls inside), and the unit's code z
on every token of the window (float32). What the tokens are, ``token_kind``:

- ``text``: ``tokens`` are the tokenizer's strings of ``token_ids`` (each id decoded on its own);
- ``ids``: the model has no tokenizer; ``tokens`` are the ids written in decimal;
- ``features``: a toy model's sample is a vector of feature values, not tokens: its one "token" lists the sample's
  nonzero features (``f3=0.71 f12=0.33``) and ``token_ids`` is null. An input that is one integer per sample (the
  incidental-polysemanticity model's feature index) is of kind ``ids``.

The schema is written down here once; its version is the leaderboard's (`saebench_poly.leaderboard.SCHEMA_VERSION`),
stored in the file's metadata and checked on every read and write. The table is written with the leaderboard,
atomically and under its lock, and a re-run of a spec replaces the spec's rows (`saebench_poly.leaderboard.update`).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from saebench_poly.errors import UserError, first_line

WINDOW_BEFORE = 24
WINDOW_AFTER = 8
DEFAULT_MEMBERS = 5
TOKEN_KINDS = ("text", "ids", "features")


def examples_fields(provenance: list[pa.Field]) -> list[pa.Field]:
    """The examples table's columns after the shared provenance columns."""
    return provenance + [
        pa.field("unit", pa.int64(), nullable=False),
        # the behaviour's index in the unit's behaviour_sizes (0 = the largest) and its size (examples in it)
        pa.field("behaviour", pa.int64(), nullable=False),
        pa.field("behaviour_size", pa.int64(), nullable=False),
        # 0 for the central example, then the other members stored, in the order of the unit's sample
        pa.field("rank", pa.int64(), nullable=False),
        pa.field("central", pa.bool_(), nullable=False),
        # the example: its context (index in the scored data, from 0) and peak position, as in central_examples
        pa.field("context", pa.int64(), nullable=False),
        pa.field("position", pa.int64(), nullable=False),
        # the window: its first position, the tokens, and the unit's code z at each of them
        pa.field("window_start", pa.int64(), nullable=False),
        pa.field("token_kind", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int64()), nullable=True),
        pa.field("tokens", pa.list_(pa.string()), nullable=False),
        pa.field("activations", pa.list_(pa.float32()), nullable=False),
    ]


def examples_path(leaderboard: Path) -> Path:
    """Where the stored-examples table of ``leaderboard`` lives."""
    return leaderboard.with_name(leaderboard.name.removesuffix(".parquet") + ".examples.parquet")


def check_file_schema(path: Path, schema: pa.Schema, version_key: bytes, version: int) -> None:
    """The checks of `saebench_poly.leaderboard.read_table` on the file's schema alone (nothing else is read): a
    readable Parquet file of schema version ``version`` with every column of ``schema``; a `UserError` otherwise."""
    try:
        found_schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as err:
        raise UserError(f"{path} is not a readable Parquet file ({first_line(err)})") from None
    found = (found_schema.metadata or {}).get(version_key)
    if found is None or int(found) != version:
        raise UserError(f"{path} has schema version {found.decode() if found else 'none'}, this saebench-poly reads {version}")
    missing = [name for name in schema.names if name not in found_schema.names]
    if missing:
        raise UserError(f"{path} lacks the columns {missing}: it is not a complete saebench-poly table")
