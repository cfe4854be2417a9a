"""Checkpoints of a run's pass, so that a killed run continues where it stopped (``saebench-poly run SPEC --resume``).

Every ``every`` batches (and once at the end of the pass) the accumulators of every entry are written, with the
position reached (batches, contexts and tokens scored), to ``<artifacts>/pass-checkpoint.safetensors`` (the spec's
``artifacts`` folder). The file is one safetensors file: the accumulators' tensors as its tensors, everything else
(numbers, flags, the nesting of their state, the spec's settings hash, the entries and their metric families) as
JSON in its metadata. Nothing is pickled, so reading a checkpoint runs no code from it. It is written to a temporary
file and renamed into place (`saebench_poly.leaderboard.stage`), so a kill leaves the previous checkpoint or the new
one, and it is removed when the run has written its results.

A resumed run restores the accumulators into the freshly prepared ones and scores the remaining contexts: every
accumulator has then folded in the same batches, in the same order, as in an uninterrupted run, so on CPU with the
same batch size and number of threads the results are bit-identical (floats travel as their exact hex form, tensors bit for bit). A
checkpoint of another spec (settings hash), other entries or other metric families is refused.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from saebench_poly import leaderboard
from saebench_poly.errors import UserError
from saebench_poly.metrics.base import Accumulator
from saebench_poly.models.base import Batch

CHECKPOINT_FILE = "pass-checkpoint.safetensors"
DEFAULT_EVERY = 100  # batches: the default of saebench-poly run --checkpoint-every
FORMAT_NAME = "saebench-poly pass checkpoint"
FORMAT = f"{FORMAT_NAME} 2"  # 2: the example selector's store records its used columns and holds no keys
_PACKAGE = "saebench_poly."


@dataclass(frozen=True)
class Position:
    """How far the pass has gone: batches, contexts (samples for toy models) and tokens scored."""

    batches: int = 0
    contexts: int = 0
    tokens: int = 0

    def after(self, batch: Batch) -> Position:
        return Position(self.batches + 1, self.contexts + batch.score_mask.shape[0],
                        self.tokens + int(batch.score_mask.sum()))


def checkpoint_path(artifacts_dir: Path) -> Path:
    return artifacts_dir / CHECKPOINT_FILE


def identity(spec_hash: str, entries: list[tuple[str, str, list[Accumulator]]]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: the spec's settings hash, and each entry's name, URI and metric
    families, in order."""
    return {"spec_hash": spec_hash,
            "entries": [[name, uri, [type(a).__name__ for a in accumulators]] for name, uri, accumulators in entries]}


def save(path: Path, ident: dict[str, Any], position: Position, accumulators: list[list[Accumulator]]) -> None:
    """Write the state of every entry's ``accumulators`` and ``position`` to ``path``, atomically."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    state = [[_encode(a.__getstate__(), f"{i}.{j}", tensors, seen) for j, a in enumerate(row)]
             for i, row in enumerate(accumulators)]
    metadata = {"format": FORMAT, "identity": json.dumps(ident), "position": json.dumps(asdict(position)),
                "state": json.dumps(state)}
    temporary = leaderboard.stage(path, lambda name: save_file(tensors, name, metadata=metadata))
    os.replace(temporary, path)


def restore(path: Path, ident: dict[str, Any], accumulators: list[list[Accumulator]], device: torch.device) -> Position:
    """Load the checkpoint at ``path`` into the fresh ``accumulators`` (tensors that were not on the CPU go to
    ``device``); returns its position. A `UserError` when it is not a checkpoint or was written for another run."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                if str(metadata.get("format", "")).startswith(FORMAT_NAME):
                    raise UserError(f"the checkpoint {path} was written by another version of saebench-poly: run "
                                    "without --resume to start over")
                raise UserError(f"{path} is not a saebench-poly pass checkpoint: delete it, or run without --resume")
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - safe_open has no __iter__
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"cannot read the checkpoint {path} ({err}): delete it, or run without --resume") from None
    written = json.loads(metadata["identity"])
    if written != ident:
        what = "spec settings" if written["spec_hash"] != ident["spec_hash"] else "entries or metrics"
        raise UserError(f"the checkpoint {path} was written by a run with other {what} (spec hash "
                        f"{written['spec_hash'][:12]}, this run {ident['spec_hash'][:12]}): run without --resume to "
                        "start over")
    for row, states in zip(accumulators, json.loads(metadata["state"]), strict=True):
        for accumulator, state in zip(row, states, strict=True):
            fresh = accumulator.__getstate__()
            accumulator.__dict__.update({key: _decode(value, fresh.get(key), tensors, device)
                                         for key, value in state["dict"].items()})
    return Position(**json.loads(metadata["position"]))


def checkpointed(batches: Iterator[Batch], every: int, start: Position,
                 write: Callable[[Position], None]) -> Iterator[Batch]:
    """``batches``, calling ``write(position)`` every ``every`` batches and after the last one. The pass
    (`saebench_poly.activations.score`) asks for the next batch only when every accumulator has folded in the
    previous one, so a checkpoint written before a batch is handed out holds exactly the batches handed out before."""
    position, since = start, 0
    for batch in batches:
        if since == every:
            write(position)
            since = 0
        yield batch
        position, since = position.after(batch), since + 1
    if since:
        write(position)


def _encode(value: Any, key: str, tensors: dict[str, torch.Tensor], seen: set[int]) -> Any:
    """``value`` as JSON, its tensors moved into ``tensors`` under keys derived from ``key``."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return {"int": str(value)}
    if isinstance(value, float):
        return {"float": value.hex()}
    if isinstance(value, torch.Tensor):
        if value.is_sparse:
            value = value.coalesce()
            return {"sparse": [_encode(value.indices(), f"{key}.i", tensors, seen),
                               _encode(value.values(), f"{key}.v", tensors, seen)], "size": list(value.shape)}
        tensor = value.detach().to("cpu").contiguous()
        if id(tensor.untyped_storage()) in seen or tensor.untyped_storage().nbytes() != tensor.nbytes:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        seen.add(id(tensor.untyped_storage()))
        tensors[key] = tensor
        return {"tensor": key, "cpu": value.device.type == "cpu"}
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list":
                [_encode(item, f"{key}.{i}", tensors, seen) for i, item in enumerate(value)]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, f"{key}.{k}", tensors, seen) for k, v in value.items()}}
    if isinstance(value, BaseModel):
        return {"options": _name(type(value)), "values": value.model_dump(mode="json")}
    if type(value).__module__.startswith(_PACKAGE) and hasattr(value, "__dict__"):
        return {"object": _name(type(value)), "dict": _encode(dict(vars(value)), key, tensors, seen)["dict"]}
    raise TypeError(f"an accumulator holds a {type(value).__name__} at {key}, which a checkpoint cannot write")


def _decode(value: Any, fresh: Any, tensors: dict[str, torch.Tensor], device: torch.device) -> Any:
    """The value that `_encode` wrote; ``fresh`` is what a new accumulator holds there (options are kept from it,
    objects are restored into it)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if "int" in value:
        return int(value["int"])
    if "float" in value:
        return float.fromhex(value["float"])
    if "tensor" in value:
        tensor = tensors[value["tensor"]]
        return tensor if value["cpu"] else tensor.to(device)
    if "sparse" in value:
        indices, values = (_decode(part, None, tensors, device) for part in value["sparse"])
        return torch.sparse_coo_tensor(indices, values, value["size"], is_coalesced=True)
    if "list" in value or "tuple" in value:
        items = value.get("list", value.get("tuple"))
        fresh_items = fresh if isinstance(fresh, (list, tuple)) and len(fresh) == len(items) else [None] * len(items)
        decoded = [_decode(item, old, tensors, device) for item, old in zip(items, fresh_items, strict=True)]
        return decoded if "list" in value else tuple(decoded)
    if "options" in value:
        if not isinstance(fresh, BaseModel) or fresh.model_dump(mode="json") != value["values"]:
            raise UserError("the checkpoint was written with other metric options: run without --resume to start over")
        return fresh
    if "object" in value:
        kind = _class(value["object"])
        target = fresh if type(fresh) is kind else kind.__new__(kind)
        old = vars(fresh) if type(fresh) is kind else {}
        target.__dict__.update({k: _decode(v, old.get(k), tensors, device) for k, v in value["dict"].items()})
        return target
    old = fresh if isinstance(fresh, dict) else {}
    return {k: _decode(v, old.get(k), tensors, device) for k, v in value["dict"].items()}


def _name(kind: type) -> str:
    return f"{kind.__module__}:{kind.__qualname__}"


def _class(name: str) -> type:
    """A class of this package named by `_name`; any other name is refused (a checkpoint names no outside code)."""
    module, _, qualname = name.partition(":")
    if not module.startswith(_PACKAGE):
        raise UserError(f"the checkpoint names the class {name}, which is not saebench-poly's: delete it")
    target: Any = importlib.import_module(module)
    for part in qualname.split("."):
        target = getattr(target, part)
    if not isinstance(target, type):
        raise UserError(f"the checkpoint names {name}, which is not a class: delete it")
    return target
