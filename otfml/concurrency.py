"""Threads of the learning loop: BLAS limits, and update work done while the reference runs."""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from ase import Atoms

from .gp import available_cpus
from .gp._threads import _Task

log = logging.getLogger(__name__)


#: the interpreter's thread switch interval while an update is prepared during a reference
#: call: the thread running the reference gets the GIL back within this time to write the
#: input, start the program and read its output (Python's default, 5 ms, would delay each
#: MOPAC call by a good part of its own length)
_OVERLAP_SWITCH_S = 1e-4


@contextlib.contextmanager
def _switch_interval(seconds: float):
    """``sys.setswitchinterval`` inside the context, restored after."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


class _Helper:
    """Hands parts of a prepared update to the thread that waited for the reference.

    The update thread offers tasks (``spawn``); once the reference has returned, the
    learner's thread runs those it claims first (``serve``) until the update thread
    is done (``close``). Tasks nobody claimed are run by the update thread itself.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def spawn(self, fn) -> _Task:
        task = _Task(fn)
        self._queue.put(task)
        return task

    def close(self) -> None:
        self._queue.put(None)

    def serve(self) -> None:
        while (task := self._queue.get()) is not None:
            if task.claim():
                task.run()


class _BlasLimit:
    """Context that limits BLAS threads during otfml's own linear algebra.

    The M x M products and factorizations of an update run faster on one thread
    than on threads that compete with the reference for the cores.  Only this
    process's BLAS is limited, only inside the context: the reference code (a
    separate MOPAC process) and the user's own numpy keep their threads.
    ``None`` leaves BLAS alone.
    """

    def __init__(self, threads: int | None) -> None:
        self.threads = threads
        self._libs = None
        self._saved: list[int] = []
        self._depth = 0  # nested contexts leave the limit to the outermost one

    def __enter__(self):
        # the BLAS libraries' own setters: threadpoolctl's limit() context re-inspects
        # every library, a cost of the order of a model step
        self._depth += 1
        if self.threads is None or self._depth > 1:
            return self
        if self._libs is None:
            from threadpoolctl import ThreadpoolController

            self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self._saved = [lib.num_threads for lib in self._libs]
        for lib in self._libs:
            lib.set_num_threads(int(self.threads))
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth:
            return
        for lib, n in zip(self._libs or [], self._saved):
            lib.set_num_threads(n)
        self._saved = []



class _Overlap:
    """The part of :class:`otfml.learner.Learner` that prepares an update on another thread
    while the reference runs (``model.overlap_update``)."""

    def _overlap_possible(self) -> bool:
        """Whether updates are prepared while the reference runs (``model.overlap_update``).

        Only for a reference in its own process (MOPAC, ASE's file-based calculators)
        and with a second CPU for this process: an in-process reference would share
        the interpreter and otfml's BLAS limit.
        """
        if not self.settings["overlap_update"]:
            return False
        cpus = available_cpus()
        ok = cpus >= 2 and getattr(self.reference, "external_process", False)
        log.debug("overlap_update: %s (%d CPUs for this process, reference %s)", ok, cpus,
                  self.reference.code)
        return ok

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otfml-update")
        return self._pool

    def _prepare(self, atoms: Atoms, env, admission: float | None, helper: _Helper):
        """``SparseGP.prepare_frame`` on the update thread, timed."""
        t0 = time.perf_counter()
        try:
            prep = self.model.prepare_frame(atoms, env, sparse_tolerance=admission,
                                            spawn=helper.spawn)
        finally:
            helper.close()
        self.timings["prepared"].append(time.perf_counter() - t0)
        return prep

    def _discard(self, prepared) -> None:
        """Wait for a prepared update whose frame got no labels and undo it."""
        try:
            prep = prepared.result()
        except Exception:  # the reference's error is the one to report
            log.exception("preparing the update failed as well")
            return
        self.model.discard_prepared(prep)

