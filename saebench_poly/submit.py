"""Submitting entries to a shared leaderboard: ``saebench-poly submit RESULTS --leaderboard BOARD [--replace]``.

RESULTS is a results file written by ``saebench-poly run SPEC --output RESULTS``. It is validated first
(`saebench_poly.results.validate`: schema, types, finite values within bounds, known metric versions, spec hash,
digests), then merged into BOARD under BOARD's file lock (`leaderboard.update`: read, check, write a temporary file,
rename), so concurrent submits lose no row and a crash leaves BOARD as it was before or after.

- Every entry's spec hash must be one of BOARD's: an entry scored with other settings is refused, naming the
  settings that differ from those of BOARD's spec (the one of the same name, else the one with most rows).
- Its SAE entries are added. An SAE already on BOARD under the same spec hash, with the same weights sha256 or the
  same entry name, is refused unless ``replace``, which replaces that entry's rows.
- Its reference entries (raw neurons, PCA, random rotations) are added only where BOARD has no entry of that name
  under the same spec hash: BOARD's own baselines stand.
- Added entries keep their own run's provenance on every row, and are marked submitted, so that running BOARD's
  spec again keeps them. Their per-unit rows and stored examples (the tables beside RESULTS) come with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from saebench_poly import leaderboard
from saebench_poly.errors import UserError
from saebench_poly.integrity import FileProvenance
from saebench_poly.leaderboard import EXAMPLES_SCHEMA, Contents, entry_keys, read_table
from saebench_poly.ranking import standing
from saebench_poly.results import REFERENCE_KINDS, Results, read_results, settings_differences, validate
from saebench_poly.stored_examples import examples_path


@dataclass
class Submission:
    """What a submit did: the entries added (``added``, of which ``replaced`` took the place of earlier rows),
    the reference entries left out because the leaderboard has its own (``skipped``), and, for each added SAE
    entry, its standing among the leaderboard's entries (`ranking.standing`)."""

    leaderboard: Path
    added: list[str]
    replaced: list[str]
    skipped: list[str]
    standings: dict[str, pd.DataFrame]


def submit(results_path: str | Path, leaderboard_path: str | Path, replace: bool = False) -> Submission:
    """Validate the results file and merge its entries into the leaderboard (see the module docstring)."""
    results = read_results(results_path)
    if results.selected:
        raise UserError("submit takes a whole results file, not FILE::ENTRY: score the entry you want alone to submit it")
    validate(results)
    board = Path(leaderboard_path)
    if not board.is_file():
        raise UserError(f"there is no leaderboard at {board}: create it by running its spec (saebench-poly run SPEC --output {board})")
    outcome: dict[str, list[str]] = {}
    examples_file = examples_path(Path(results_path))
    examples = read_table(examples_file, EXAMPLES_SCHEMA) if examples_file.is_file() else None

    def change(old: Contents) -> Contents:
        added, dropped, outcome["replaced"], outcome["skipped"] = _plan(results, old, board, replace)
        keep = ~entry_keys(old.rows).isin(dropped)
        keep_units = ~entry_keys(old.units).isin(dropped)
        new = results.only(added)
        provenance = old.provenance.merged(FileProvenance(
            digests={k: results.provenance.digests[k] for k in added},
            specs={h: results.provenance.specs[h] for h in set(new.rows["spec_hash"])},
            submitted=added,
        ))
        outcome["added"] = [k for k in results.keys if k in added]
        stored = old.examples
        if examples is not None and len(examples):
            stored = leaderboard.concat(old.examples, examples[entry_keys(examples).isin(added)])
        return Contents(leaderboard.concat(old.rows[keep], new.rows), leaderboard.concat(old.units[keep_units], new.units),
                        provenance, stored)

    written = leaderboard.update(board, change)
    kinds = dict(zip(entry_keys(written.rows), written.rows["entry_kind"], strict=True))
    standings = {_name(k): standing(written.rows, k) for k in outcome["added"] if kinds[k] not in REFERENCE_KINDS}
    return Submission(leaderboard=board, added=[_name(k) for k in outcome["added"]], replaced=outcome["replaced"],
                      skipped=outcome["skipped"], standings=standings)


def _plan(results: Results, old: Contents, board: Path, replace: bool) -> tuple[set[str], set[str], list[str], list[str]]:
    """Which result entries to add and which leaderboard entries they replace; a `UserError` for a spec mismatch
    or a duplicate. Returns (keys added, leaderboard keys dropped, names replaced, reference names skipped)."""
    rows = old.rows
    if rows.empty:
        raise UserError(f"{board} holds no rows, so it has no spec to compare entries with: run its spec first")
    board_keys = entry_keys(rows)
    _check_spec(results, old, board)
    added: set[str] = set()
    dropped: set[str] = set()
    replaced, skipped, duplicates = [], [], []
    for key, entry in results.rows.groupby(entry_keys(results.rows), sort=False):
        first = entry.iloc[0]
        same_spec = rows["spec_hash"] == first["spec_hash"]
        same_name = same_spec & (rows["entry"] == first["entry"])
        if first["entry_kind"] in REFERENCE_KINDS:
            if same_name.any():
                skipped.append(first["entry"])
            else:
                added.add(key)
            continue
        clashing = same_spec & ((rows["weights_sha256"] == first["weights_sha256"]) | (rows["entry"] == first["entry"]))
        if clashing.any():
            if not replace:
                other = rows[clashing].iloc[0]
                why = "the same weights" if other["weights_sha256"] == first["weights_sha256"] else "the same name"
                duplicates.append(f"{first['entry']!r} ({why} as {other['entry']!r}, weights sha256 {other['weights_sha256'][:12]})")
                continue
            dropped |= set(board_keys[clashing])
            replaced.append(first["entry"])
        added.add(key)
    if duplicates:
        raise UserError(f"{board} already holds {', '.join(duplicates)} for this spec: pass --replace to replace it")
    if not added:
        raise UserError(f"{results.source} holds nothing to submit: its entries are baselines that {board} already has")
    return added, dropped, replaced, skipped


def _check_spec(results: Results, old: Contents, board: Path) -> None:
    """Every entry's spec hash must be one of the leaderboard's; otherwise name the settings that differ."""
    board_hashes = set(old.rows["spec_hash"])
    for spec_hash, group in results.rows.groupby("spec_hash", sort=False):
        if spec_hash in board_hashes:
            continue
        same_name = old.rows[old.rows["spec_name"] == group["spec_name"].iloc[0]]
        target = (same_name if len(same_name) else old.rows)["spec_hash"].value_counts().index[0]
        differences = settings_differences(old.provenance.specs.get(target), results.provenance.specs.get(spec_hash),
                                           "leaderboard", "entry")
        raise UserError(
            f"{results.source} was scored with other settings than {board} (spec hash {spec_hash[:12]} vs "
            f"{target[:12]}): {'; '.join(differences) or 'the settings recorded are equal but the hashes differ'}"
        )


def _name(key: str) -> str:
    return key.partition("/")[2]
