"""Thread pools the engine shares between merges in one process, made on first use.

Reading inputs in parallel, the fused loops' parts and the shard checksum each run on a
pool of their own, so that one kind of work never waits behind another's queue.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

_POOLS: dict[str, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()


def shared_pool(name: str, workers: int) -> ThreadPoolExecutor:
    """The process's pool called ``name`` (threads ``tureen-<name>_N``), with ``workers``
    threads when it is first asked for."""
    with _LOCK:
        pool = _POOLS.get(name)
        if pool is None:
            pool = ThreadPoolExecutor(workers, thread_name_prefix=f"tureen-{name}")
            _POOLS[name] = pool
        return pool
