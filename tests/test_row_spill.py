"""The re-run's row stores in a temporary file (`saebench_poly.row_spill`): the same values as a tensor store, and
one clear line when the temporary folder has no room."""

from __future__ import annotations

import errno

import pytest
import torch

from saebench_poly import row_spill
from saebench_poly.errors import UserError


def test_a_spilled_store_reads_back_exactly_what_a_tensor_store_holds(monkeypatch) -> None:
    values = torch.randn(1000, 7, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(row_spill, "SPILL_BYTES", 0)
    store = row_spill.row_store(1000, (7,), torch.float32, torch.device("cpu"))
    assert isinstance(store, row_spill.SpilledRows) and store.shape == (1000, 7)
    for start in range(0, 1000, 300):  # written slice by slice, as the re-run's batches come
        store[start : start + 300] = values[start : start + 300]
    index = torch.randint(1000, (5, 40), generator=torch.Generator().manual_seed(1))
    assert torch.equal(store[index], values[index])
    runs = torch.tensor([999, 3, 4, 5, 4, 0, 998, 500])  # runs of consecutive rows, repeats, both ends, any order
    assert torch.equal(store[runs], values[runs])
    assert store[torch.zeros(0, dtype=torch.int64)].shape == (0, 7)
    real = row_spill.os.preadv
    monkeypatch.setattr(row_spill.os, "preadv", lambda fd, buffers, offset: real(fd, [buffers[0][:5]], offset))
    assert torch.equal(store[torch.arange(10, 200)], values[10:200])  # reads that return fewer bytes than asked
    monkeypatch.setattr(row_spill, "SPILL_BYTES", 2**40)
    assert isinstance(row_spill.row_store(1000, (7,), torch.float32, torch.device("cpu")), torch.Tensor)


def test_no_room_for_the_rows_is_one_line_naming_tmpdir(monkeypatch) -> None:
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(row_spill.tempfile, "TemporaryFile", full)
    with pytest.raises(UserError, match="No space left on device.*set TMPDIR"):
        row_spill.SpilledRows(10, (3,), torch.float32)
