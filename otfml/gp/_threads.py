"""Work shared between two threads: tasks another thread may claim, halves of a product."""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ._kernels import _FIXED_ATOMS, _MIN_SPLIT_WORK


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@functools.cache
def _default_threads() -> int:
    """Threads for a prediction when ``SparseGP.threads`` is None: 2 given 2 CPUs, else 1."""
    return min(2, available_cpus())


class _Task:
    """A piece of work that the first thread to claim it runs (see ``SparseGP.prepare_frame``).

    ``join`` runs it if no other thread has, else waits for it; it returns the result
    or raises the error.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._result = self._error = None

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def run(self) -> None:
        try:
            self._result = self.fn()
        except BaseException as err:  # handed to join
            self._error = err
        finally:
            self._done.set()

    def join(self):
        if self.claim():
            self.run()
        else:
            self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


#: fewest rows (or columns) of an update's memory-bound product worth sharing between two
#: threads (:func:`_in_two`); below it the hand-over costs more than it saves
_MIN_SHARED = 256


def _in_two(spawn: Callable[[Callable], _Task] | None, fn: Callable[[int, int], object],
            n: int) -> list:
    """``fn(0, n)`` done as ``fn(0, h)``, offered to another thread through ``spawn``, and
    ``fn(h, n)`` on this one; returns the results in order (one, without ``spawn`` or below
    :data:`_MIN_SHARED`). The parts must not depend on each other (e.g. rows of a product);
    how the range is cut may change rounding (BLAS takes ``W @ W.T`` as one symmetric
    product), never more, and the cut does not depend on which thread ran what."""
    if spawn is None or n < _MIN_SHARED:
        return [fn(0, n)]
    h = n // 2
    first = spawn(functools.partial(fn, 0, h))
    second = fn(h, n)
    return [first.join(), second]


class Lanes:
    """The threads that share a model's predictions and the work of its updates.

    Parameters
    ----------
    threads : int, optional
        Threads per prediction. None: two where this process may use two CPUs, else one.
    """

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    @property
    def n(self) -> int:
        """Threads in use (``threads``, or the automatic choice)."""
        return self.threads if self.threads is not None else _default_threads()

    def for_work(self, work: list[tuple[int, int, float]]) -> int:
        """Threads for one prediction's work (``n``; one where the work is small)."""
        n = self.n
        if n > 1 and sum(u * (_FIXED_ATOMS + k) for _, k, u in work) >= _MIN_SPLIT_WORK:
            return n
        return 1

    def pool(self) -> ThreadPoolExecutor:
        """The other threads (``n - 1``)."""
        n = self.n
        if self._pool is None or self._pool_size != n - 1:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="otfml-predict")
            self._pool_size = n - 1
        return self._pool

    def spawn_here(self) -> Callable[[Callable], _Task] | None:
        """``spawn`` for work of an update on the calling thread while nothing else runs:
        the prediction's other threads take it; None on one thread."""
        if self.n < 2:
            return None
        pool = self.pool()

        def spawn(fn: Callable) -> _Task:
            task = _Task(fn)
            pool.submit(lambda: task.claim() and task.run())
            return task

        return spawn
