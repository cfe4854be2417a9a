"""Row stores of the re-run after the pass (`saebench_poly.revisit`) that live in a temporary file once they are
large, so that the process's memory does not grow with the number of distinct example tokens.

A store is ``[P, d]`` rows, written once in increasing row order, slice by slice, then read by any index. Below
`SPILL_BYTES` (or on an accelerator) it is a tensor; above it on the CPU, a `SpilledRows`: an anonymous temporary
file written with ``pwrite`` and read with ``preadv``, one call per run of consecutive rows asked for, straight
into the array returned, so that only the rows a read asks for are ever resident in the process (the operating
system's page cache, which it can drop, holds the rest). A memory map is not used: touching one row of a mapped
file that sits in the page cache maps the cached pages around it too (the kernel's fault-around), and those count
in the process's resident memory: reading 4,300 scattered rows of a 1,536-wide store raised the peak by 0.8 GiB.
The values are the same bytes either way. The file goes to the temporary folder (``TMPDIR``): mind that a tmpfs
there is memory.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from saebench_poly.errors import UserError

# Stores of more bytes than this go to a file when they are on the CPU.
SPILL_BYTES = 2**25


class SpilledRows:
    """``[rows, *shape]`` values of ``dtype`` in an anonymous temporary file (module docstring)."""

    device = torch.device("cpu")

    def __init__(self, rows: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape = (rows, *shape)
        self.dtype = dtype
        self._numpy = torch.empty(0, dtype=dtype).numpy().dtype
        self._row_bytes = int(np.prod(shape, dtype=np.int64)) * self._numpy.itemsize
        try:
            self._file = tempfile.TemporaryFile(prefix="saebench-poly-rows-")
            self._file.truncate(rows * self._row_bytes)
        except OSError as err:
            raise _no_room(err) from None

    def __setitem__(self, rows: slice, values: torch.Tensor) -> None:
        start = rows.start or 0
        data = values.detach().to("cpu", self.dtype).contiguous().numpy()
        try:
            os.pwrite(self._file.fileno(), data.tobytes(), start * self._row_bytes)
        except OSError as err:
            raise _no_room(err) from None

    def __getitem__(self, index: torch.Tensor) -> torch.Tensor:
        index = torch.as_tensor(index).cpu()
        wanted, inverse = np.unique(index.numpy().reshape(-1), return_inverse=True)
        rows = np.empty((len(wanted), *self.shape[1:]), dtype=self._numpy)
        raw = memoryview(rows.reshape(-1).view(np.uint8))
        # the runs of consecutive rows, one read each: run r holds wanted[starts[r] : stops[r]]
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        starts, stops = np.r_[0, breaks][: len(wanted)], np.r_[breaks, len(wanted)][: len(wanted)]
        size = self._row_bytes
        for first, stop, row in zip(starts.tolist(), stops.tolist(), wanted[starts].tolist(), strict=True):
            self._read_into(raw[first * size : stop * size], row * size)
        return torch.from_numpy(rows[inverse].reshape(*index.shape, *self.shape[1:]))

    def _read_into(self, buffer: memoryview, offset: int) -> None:
        """Fill ``buffer`` with the file's bytes from ``offset`` (a read may return fewer bytes than asked)."""
        while len(buffer):
            got = os.preadv(self._file.fileno(), [buffer], offset)
            if got == 0:
                raise EOFError(f"the temporary row store ended at byte {offset}")
            buffer, offset = buffer[got:], offset + got


def _no_room(err: OSError) -> UserError:
    return UserError(f"cannot write the examples' rows to a temporary file in {tempfile.gettempdir()} ({err.strerror}): "
                     "set TMPDIR to a folder with room")


def row_store(rows: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | SpilledRows:
    """An empty store of ``rows`` rows: a tensor on ``device``, or a `SpilledRows` when it is on the CPU and
    larger than `SPILL_BYTES`."""
    size = rows * int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
    if torch.device(device).type == "cpu" and size > SPILL_BYTES:
        return SpilledRows(rows, shape, dtype)
    return torch.empty((rows, *shape), dtype=dtype, device=device)
