"""The port's CPU threads (NumPy backend): one pool per thread count, BLAS held at one thread.

NumPy's elementwise passes run on one thread, so the engine spreads independent
work (row slices, attention units, KV groups) over the cores itself. While it
does, BLAS is held at one thread: OpenBLAS's own threads keep spinning after a
call and would take the cores from the engine's threads.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

_pools: dict[int, ThreadPoolExecutor] = {}
_controller = None


def available_cores() -> int:
    """CPU cores this process may run on (its affinity, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def blas_threads(limit: int):
    """Context manager holding BLAS at `limit` threads (threadpoolctl)."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller.limit(limits=limit, user_api="blas")


def each(work, items, threads: int) -> None:
    """work(item) for every item, which must not depend on one another: on a pool of `threads` threads
    with BLAS held at one thread when there are several threads and items, else in order."""
    items = list(items)
    threads = min(threads, len(items))
    if threads <= 1:
        for item in items:
            work(item)
        return
    if threads not in _pools:  # long-lived: decoding hands work over once per layer and token
        _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="asl-port")
    with blas_threads(1):
        list(_pools[threads].map(work, items))  # list(): re-raises an item's exception here
