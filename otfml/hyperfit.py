"""When and how the learner refits the hyperparameters (on another thread, with a lag)."""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)


class HyperparameterSchedule:
    """At which reference calls the hyperparameters are refitted.

    At each of the first ``first`` calls and at calls that are powers of two;
    besides, ``every`` calls after the last fit, an interval that doubles (up
    to ``8 * every``) after each fit that moved no hyperparameter by more than
    ``settled`` (relative), and falls back to ``every`` after one that did.
    A fit costs several O(M^3) likelihood evaluations, and once a run has
    settled fits hardly move the hyperparameters.

    Parameters
    ----------
    first, every : int
        ``model.hyperparameter_first`` and ``model.hyperparameter_every``.
    settled : float, default 0.1
        Largest relative change of a hyperparameter at a fit that still counts
        as settled.
    """

    def __init__(self, first: int, every: int, settled: float = 0.1) -> None:
        self.first, self.every, self.settled = int(first), int(every), float(settled)
        self.gap = self.every
        self.next = self.every

    def start_at(self, n_frames: int) -> None:
        """Count from a model warm-started (and fitted) on ``n_frames`` stored frames: the
        next fit is due ``every`` labels later, or at a power of two."""
        self.next = int(n_frames) + self.every

    def due(self, n_calls: int) -> bool:
        """Refit at call ``n_calls`` (1-based)?"""
        n = int(n_calls)
        return n <= self.first or (n & (n - 1)) == 0 or n >= self.next

    def fitted(self, n_calls: int, before: np.ndarray, after: np.ndarray) -> None:
        """Record a fit at call ``n_calls`` that moved the hyperparameters from ``before``."""
        moved = float(np.max(np.abs(np.asarray(after) / np.asarray(before) - 1.0)))
        self.gap = (min(2 * self.gap, 8 * self.every) if moved <= self.settled
                    else self.every)
        self.next = int(n_calls) + self.gap


@dataclass
class _PendingFit:
    """A hyperparameter fit on another thread: the reference call it started at, the
    hyperparameters then, its future ((Hyperparameters or None, seconds)) and the seconds
    taking its snapshot cost the update."""

    call: int
    before: np.ndarray
    future: Future
    started_s: float



class _HyperparameterFits:
    """The part of :class:`otfml.learner.Learner` that solves after an update and applies
    hyperparameter fits (:class:`HyperparameterSchedule`)."""

    def _refit(self) -> None:
        """Solve for the weights after a frame was added, with new hyperparameters where a
        fit is due (``HyperparameterSchedule``, counting the warm start's frames too) or a
        fit that ran apart takes effect.

        The first ``hyperparameter_first`` labels fit at once. Later fits, with
        ``hyperparameter_lag`` > 0, run on another thread on a copy of the model's
        accumulators while the run goes on, and take effect at the update
        ``hyperparameter_lag`` calls later, waiting for the fit there if need be: a fit
        costs several O(M^3) factorizations, the run's
        updates leave the second CPU idle for most of their time, and which call a fit
        takes effect at does not depend on how fast it ran. While it runs, BLAS keeps
        otfml's limit (``blas_threads``).
        """
        n = self.n_warm + self.n_calls  # the labels the model holds
        lag = self.settings["hyperparameter_lag"]
        if self._fit is not None and n >= self._fit.call + lag:
            self._apply_fit()
        if self._fit is None and self.hyperparameter_schedule.due(n):
            if lag and n > self.settings["hyperparameter_first"]:
                self._start_fit()
            else:
                before = self.model.hyp.as_array()
                t0 = time.perf_counter()
                self.model.fit_hyperparameters()  # and solves
                self.timings["hyperparameters"].append(time.perf_counter() - t0)
                self.hyperparameter_schedule.fitted(n, before, self.model.hyp.as_array())
                return
        self.model.solve()

    def _start_fit(self) -> None:
        """Start a hyperparameter fit on another thread (see :meth:`_refit`)."""
        t0 = time.perf_counter()
        run = self.model.hyperparameter_fit()  # a snapshot of the data as they are now

        def timed():
            t = time.perf_counter()
            out = run()
            return out, time.perf_counter() - t

        if self._fit_pool is None:
            self._fit_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otfml-fit")
        self.blas_limit.__enter__()  # left at _apply_fit
        self._fit = _PendingFit(self.n_warm + self.n_calls, self.model.hyp.as_array(),
                                self._fit_pool.submit(timed), time.perf_counter() - t0)

    def _apply_fit(self) -> None:
        """Wait for the fit on the other thread and give its hyperparameters to the model
        (the next solve factors anew)."""
        fit, self._fit = self._fit, None
        t0 = time.perf_counter()
        try:
            new, seconds = fit.future.result()
            self.timings["fits_apart"].append(seconds)
        except Exception:  # a fit is never worth losing the run for
            log.warning("the hyperparameter fit started at label %d failed; the "
                        "hyperparameters stay %s", fit.call, self.model.hyp, exc_info=True)
            new = None
        finally:
            self.blas_limit.__exit__(None, None, None)
        self.timings["hyperparameters"].append(fit.started_s + time.perf_counter() - t0)
        if new is not None:
            self.model.hyp = new
        log.debug("hyperparameter fit of label %d applied at label %d: %s", fit.call,
                  self.n_warm + self.n_calls, self.model.hyp)
        self.hyperparameter_schedule.fitted(fit.call, fit.before, self.model.hyp.as_array())

    def finish_hyperparameter_fit(self) -> None:
        """Apply a hyperparameter fit still running on another thread (waiting for it) and
        solve, so that the model a run leaves has it (``model.hyperparameter_lag``)."""
        if self._fit is None:
            return
        with self.blas_limit:
            self._apply_fit()
            self.model.solve()

