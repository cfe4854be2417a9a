"""Running torch on one CPU thread for tiny workloads.

Toy models and toy SAEs move a few thousand numbers per step. A second thread cannot speed that up, and on a machine
whose cores are busy, threads that spin waiting for each other made such training 5 to 10 times slower.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one CPU thread inside the block, then restore the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
