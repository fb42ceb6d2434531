"""CPU linear algebra on one thread, so that a merge's bytes do not depend on the machine.

LAPACK's SVD (and the products around it) gives other low bits on another number of
threads, so without this a spectral merge (TSV-M, ISO-C, ISO-CTS) would differ between
machines, between the local and the Ray executor (whose tasks get one CPU each) and between
runs with another ``OMP_NUM_THREADS``. torch's thread count is process-wide: one lock for
every caller keeps two merges in one process from restoring each other's count too early.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.Lock()


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run the block's CPU linear algebra on one thread, then restore the thread count
    (CUDA work is left as it is)."""
    if device.type != "cpu":
        yield
        return
    with _LOCK:
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(previous)
