"""Work spread over a node's cores by threads, in order (``deepdark.io``).

numpy releases the interpreter lock inside its array operations (sorting, BLAS, ufunc loops),
as do the fit's compiled sums (:mod:`deepdark.physics.compiled`), so independent blocks of array
work run side by side on threads: no copies between processes, one address space, the same
memory budget. Results come back in the order of their inputs, so
what is built from them does not depend on the number of threads.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from threadpoolctl import threadpool_limits

T = TypeVar("T")
R = TypeVar("R")


def available_cores() -> int:
    """Cores this process may run on (its CPU affinity: what a batch system gave the job)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def resolve_threads(threads: int | None) -> int:
    """``threads`` (at least 1), or every available core when None."""
    if threads is None:
        return available_cores()
    if int(threads) < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return int(threads)


def in_flight(threads: int) -> int:
    """Items :func:`ordered_map` holds at once on ``threads`` threads: those running or done and
    waiting, and the one its caller is using."""
    return threads + 2 if threads > 1 else 1


def threads_within(threads: int, nbytes: Callable[[int], float], budget: float) -> int:
    """The most threads, up to ``threads`` (1 at the least), whose work held at once,
    ``nbytes(threads)``, stays within ``budget`` bytes: more threads hold more items in flight."""
    while threads > 1 and nbytes(threads) > budget:
        threads -= 1
    return threads


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[R]:
    """``map(fn, items)`` on ``threads`` threads: the results in the order of ``items``, with at
    most ``threads`` + 1 items submitted and not yet handed back, so that memory stays that of
    :func:`in_flight` items. ``items`` is drawn in the calling thread (a reader need not be
    thread-safe). One thread: a plain ``map``, no pool. An error in ``fn`` is raised here, in
    the order of the items, and what was not started yet is not started. While the threads run,
    numpy's matrix products run on one thread each (:func:`shared_cores`)."""
    if threads <= 1:
        yield from map(fn, items)
        return
    pending: deque[Future] = deque()
    with shared_cores(threads), ThreadPoolExecutor(max_workers=threads, thread_name_prefix="deepdark") as pool:
        try:
            for item in items:
                if len(pending) > threads:
                    yield pending.popleft().result()
                pending.append(pool.submit(fn, item))
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:  # an error or an abandoned loop: do not start what is queued
                f.cancel()


@contextlib.contextmanager
def shared_cores(threads: int) -> Iterator[None]:
    """While ``threads`` threads do array work side by side (``threads`` > 1): numpy's matrix
    products (BLAS) on one thread each, so that BLAS's own threads do not overbook the cores
    (measured: the per-pixel fit's matrix products took twice as long)."""
    if threads <= 1:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class PerThread:
    """One object for each thread that asks for one (``make()`` on its first :meth:`get`), and
    every object made (:attr:`made`): what threads add up without a lock, summed at the end."""

    def __init__(self, make: Callable[[], T]):
        self._make, self._local, self._lock = make, threading.local(), threading.Lock()
        self.made: list[T] = []

    def get(self) -> T:
        obj = getattr(self._local, "obj", None)
        if obj is None:
            obj = self._local.obj = self._make()
            with self._lock:
                self.made.append(obj)
        return obj
