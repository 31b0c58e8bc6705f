"""The learning loop: predict, ask the reference when unsure, store, update.

:class:`Learner` owns the model, the reference, the store and the policy;
:class:`otfml.calculator.OTFCalculator` is the thin ASE face of it.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from .errors import (
    ConfigError,
    FingerprintMismatch,
    IsolatedAtoms,
    ReferenceFailed,
    UnphysicalGeometry,
)
from .gp import Prediction, SparseGP, available_cpus
from .gp._threads import _Task
from .policy import Decision, LearningPolicy
from .reference import Reference
from .store import Store
from .structure import (
    charge_and_multiplicity,
    check_elements,
    check_fragments,
    check_geometry,
    fragments,
)
from .training import (
    check_model_settings,
    model_from_settings,
    one_fingerprint,
    train_from_frames,
)

__all__ = ["Learner", "StepResult"]


log = logging.getLogger(__name__)

@dataclass
class StepResult:
    """What one step returned.

    Attributes
    ----------
    energy : float
        eV.
    forces : ndarray (n_atoms, 3)
        eV/Å.
    source : str
        Where energy and forces come from (never mixed): ``"model"``,
        ``"reference"``, or ``"updated_model"`` (the reference was called, and
        the model's prediction after learning its label is returned; see
        ``LearningPolicy.call_step_result``).
    forces_std : ndarray (n_atoms,)
        Calibrated force-error estimate per atom, eV/Å (zero for reference values).
    max_force_std : float
        Largest calibrated force-error estimate of the model at this geometry,
        before any update, eV/Å (NaN where there was no model yet).
    reason : str
        Why the reference was or was not asked.
    prediction : Prediction or None
        The model's prediction the values come from (None for reference values).
    energy_std, local_std
        Predictive std of the returned energy (eV) and of each local energy
        (eV per atom); zero for reference values.  Computed on first access.
    """

    energy: float
    forces: np.ndarray
    source: str
    forces_std: np.ndarray
    max_force_std: float
    reason: str
    prediction: Prediction | None = None

    @property
    def called(self) -> bool:
        """True if this step's geometry was labelled by the reference (and learned)."""
        return self.source != "model"

    @property
    def energy_std(self) -> float:
        return 0.0 if self.prediction is None else self.prediction.energy_std

    @property
    def local_std(self) -> np.ndarray:
        if self.prediction is None:
            return np.zeros(len(self.forces))
        return self.prediction.local_std


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


@dataclass
class _PendingFit:
    """A hyperparameter fit on another thread: the reference call it started at, the
    hyperparameters then, its future ((Hyperparameters or None, seconds)) and the seconds
    taking its snapshot cost the update."""

    call: int
    before: np.ndarray
    future: Future
    started_s: float


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


class Learner:
    """On-the-fly learner.

    Parameters
    ----------
    reference : Reference
        Labels uncertain geometries.
    store : str or Store, optional
        HDF5 store; frames already in it warm-start the model.
    policy : LearningPolicy, optional
        When to call the reference.
    model : SparseGP, optional
        A model to start from (default: built from ``model_settings``).
    model_settings : dict, optional
        Overrides of :data:`MODEL_DEFAULTS`.
    species : list of int, optional
        Atomic numbers the model must cover (default: those of the first
        structure and of the store).
    charge, multiplicity : int, optional
        Defaults when ``atoms.info`` does not say.
    walker : int
        Walker id recorded with stored frames.
    """

    def __init__(
        self,
        reference: Reference,
        store: str | Store | None = None,
        policy: LearningPolicy | None = None,
        model: SparseGP | None = None,
        model_settings: dict | None = None,
        species: list[int] | None = None,
        charge: int | None = None,
        multiplicity: int | None = None,
        walker: int = 0,
    ) -> None:
        self.reference = reference
        self.policy = policy or LearningPolicy()
        self.settings = check_model_settings(model_settings)
        self.charge = charge
        self.multiplicity = multiplicity
        self.walker = walker
        self.model = model
        if model is not None and self.settings["predict_threads"] is not None:
            model.threads = self.settings["predict_threads"]
        self._species = sorted(set(species or []))
        self.store: Store | None = None
        if store is not None:
            self.store = store if isinstance(store, Store) else Store(store, mode="a")
        self.fingerprint: dict | None = None
        self.n_steps = 0
        self.n_calls = 0
        self.steps_since_call = 0
        #: seconds per model prediction, reference call and update (from the labels on);
        #: "hyperparameters": what each hyperparameter fit cost the updates (part of their
        #: time; for a fit on another thread, model.hyperparameter_lag, taking its snapshot
        #: and waiting for it); "fits_apart": how long each such fit ran on its thread;
        #: "prepared": the updates' parts prepared while the reference ran
        #: (model.overlap_update; not part of "update")
        self.timings = {"model": [], "reference": [], "update": [], "hyperparameters": [],
                        "fits_apart": [], "prepared": []}
        #: one dict per step: step, source, called (the reference labelled the step),
        #: reason, max_force_std (eV/Å), energy (eV),
        #: model_energy (the model's prediction, eV; on reference steps the one before
        #: the update; None without a model), frames and sparse (the model's frames and
        #: sparse environments before the step), labelled (frames the model was given,
        #: including those it let go of under ``max_frames``), model_s and update_s
        #: (seconds, None where not done)
        self.history: list[dict] = []
        self._budget_warned = False
        self.n_warm = 0
        #: reference failures in all, and in a row
        self.n_failures = 0
        self.failures_in_a_row = 0
        self._n_fragments: int | None = None
        #: set True to have the next step labelled by the reference whatever the model says;
        #: that step returns the reference's energy and forces (whatever call_step_result says)
        self.request_reference = False
        self._blas = _BlasLimit(self.settings["blas_threads"])
        self._overlap = self._overlap_possible()
        self._pool: ThreadPoolExecutor | None = None
        #: a hyperparameter fit running on another thread (see _refit), or None
        self._fit: _PendingFit | None = None
        self._fit_pool: ThreadPoolExecutor | None = None
        self.hyperparameter_schedule = HyperparameterSchedule(
            self.settings["hyperparameter_first"], self.settings["hyperparameter_every"])
        if self.store is not None and len(self.store):
            with self._blas:
                self._warm_start()

    # ------------------------------------------------------------------
    def _warm_start(self) -> None:
        """Rebuild the model from the frames in the store (:func:`one_fingerprint`)."""
        frames = one_fingerprint(list(self.store), f"store {self.store.path!r}")
        self.fingerprint = frames[-1].fingerprint
        # fragments are counted against the structure the store's run started from
        self._n_fragments = fragments(frames[0].atoms)[0]
        t0 = time.perf_counter()
        if self.model is None:
            self.model = train_from_frames(frames, self.settings, self._species)
        else:
            for fr in frames:
                self.model.add_frame(fr.atoms, fr.energy, fr.forces, solve=False)
            self.model.fit_hyperparameters()
        self._species = list(self.model.descriptor.species)
        log.info("warm start: %d frames from %s, %d sparse environments, %.1f s",
                 len(frames), self.store.path, self.model.n_sparse, time.perf_counter() - t0)
        self.n_warm = len(frames)

    def _ensure_model(self, atoms: Atoms) -> None:
        if self.model is None:
            species = sorted(set(self._species) | {int(z) for z in atoms.numbers})
            self.model = model_from_settings(species, self.settings)
            self._species = list(self.model.descriptor.species)

    def charge_and_multiplicity(self, atoms: Atoms) -> tuple[int, int]:
        """Charge and multiplicity for ``atoms`` (atoms.info, else the learner's defaults)."""
        return charge_and_multiplicity(atoms, self.charge, self.multiplicity)

    def _check_fingerprint(self, fp: dict) -> None:
        if self.fingerprint is None:
            self.fingerprint = fp
            return
        old = {k: v for k, v in self.fingerprint.items() if v is not None}
        new = {k: v for k, v in fp.items() if v is not None}
        common = set(old) & set(new)
        diff = {k: (old[k], new[k]) for k in common if old[k] != new[k]}
        if diff:
            where = f"store {self.store.path!r}" if self.store else "this model"
            raise FingerprintMismatch(
                f"the reference now labels with a different fingerprint than {where}: "
                + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(diff.items()))
                + ". Labels of different references, methods, charges or multiplicities are "
                "never mixed: use a new store for this setting"
            )
        self.fingerprint = {**self.fingerprint, **new}

    # ------------------------------------------------------------------
    def predict(self, atoms: Atoms, env=None) -> Prediction:
        """The model's prediction for ``atoms``, under otfml's BLAS thread limit.

        Use this rather than ``self.model.predict`` outside :meth:`step` (e.g. in
        a dynamics observer): without the limit, on a busy machine BLAS's threads
        wait for a core and a prediction takes several times as long.  ``env``:
        the descriptors of ``atoms`` if already computed (see ``SparseGP.predict``).

        Raises
        ------
        UnphysicalGeometry
            An atom has no neighbour within the descriptor cutoff.
        """
        with self._blas:
            try:
                return self.model.predict(atoms, env)
            except IsolatedAtoms:
                raise self._isolated(atoms, self.n_steps) from None

    def step(self, atoms: Atoms) -> StepResult:
        """Energy and forces for one geometry, from the model or the reference."""
        self.n_steps += 1
        step = self.n_steps
        if len(atoms) < 2:
            raise ConfigError(f"a structure of {len(atoms)} atom(s) has no local environments "
                              "to learn; otfml needs at least 2 atoms")
        if not np.all(np.isfinite(atoms.positions)):
            raise ConfigError(f"step {step}: positions contain NaN/inf")
        check_elements(atoms, f"the structure at step {step}")
        self._ensure_model(atoms)
        pred = None
        n_frames, n_sparse = self.model.n_frames, self.model.n_sparse
        n_dropped = self.model.n_dropped
        t_model = t_update = None
        if self.model.is_fitted:
            t0 = time.perf_counter()
            pred = self.predict(atoms)
            t_model = time.perf_counter() - t0
            self.timings["model"].append(t_model)
        dec = self.policy.decide(step, self.n_calls, self.steps_since_call,
                                 None if pred is None else pred.novelty,
                                 n_frames=self.model.n_frames, numbers=atoms.numbers)
        if self.request_reference:
            dec = Decision(True, "requested", dec.max_force_std, dec.force_std)
            self.request_reference = False
        if dec.reason == "budget exhausted" and not self._budget_warned:
            log.warning("reference budget of %s calls used up at step %d; the model is "
                        "trusted from now on", self.policy.max_calls, step)
            self._budget_warned = True
        if not dec.call:
            if pred is None:
                raise ConfigError("no model and no reference budget left: raise max_calls")
            self.steps_since_call += 1
            res = StepResult(pred.energy, pred.forces, "model", dec.force_std, dec.max_force_std,
                             dec.reason, pred)
        else:
            charge, mult = self.charge_and_multiplicity(atoms)  # checked where it is needed
            try:
                res = self._learn(atoms, step, charge, mult, pred, dec)
                self.failures_in_a_row = 0
                t_update = self.timings["update"][-1]  # _learn returns only after its update
            except ReferenceFailed as err:
                res = self._after_failure(err, pred, step, dec)
        self.history.append({"step": step, "source": res.source, "called": res.called,
                             "reason": res.reason, "max_force_std": res.max_force_std,
                             "energy": res.energy,
                             "model_energy": None if pred is None else pred.energy,
                             "frames": n_frames, "sparse": n_sparse,
                             "labelled": n_frames + n_dropped, "model_s": t_model,
                             "update_s": t_update})
        return res

    def _isolated(self, atoms: Atoms, step: int) -> UnphysicalGeometry:
        """The error for atoms with no neighbour within the descriptor cutoff."""
        cutoff = self.model.descriptor.cutoff
        d = atoms.get_all_distances()
        np.fill_diagonal(d, np.inf)
        lonely = np.flatnonzero(d.min(axis=1) >= cutoff)
        names = ", ".join(f"{i} ({atoms[i].symbol}, {d[i].min():.2f} Å)" for i in lonely[:10])
        return UnphysicalGeometry(
            f"step {step}: atoms {names} have no neighbour within the model's cutoff of "
            f"{cutoff:g} Å: the structure has flown apart. It was not sent to the "
            "reference; nothing was stored. Lower the time step, the temperature or "
            "learning.force_tolerance")

    def _after_failure(self, err: ReferenceFailed, pred, step: int, dec) -> StepResult:
        """Stop, or (``on_reference_failure: use_model``) go on with the model's prediction."""
        self.n_failures += 1
        self.failures_in_a_row += 1
        p = self.policy
        if (p.on_reference_failure != "use_model" or pred is None
                or isinstance(err, UnphysicalGeometry)):
            raise err
        if self.failures_in_a_row > p.max_consecutive_failures:
            log.error("%d reference failures in a row (learning.max_consecutive_failures = %d):"
                      " stopping", self.failures_in_a_row, p.max_consecutive_failures)
            raise err
        log.warning("%s\n-> step %d uses the model's prediction (learning.on_reference_failure"
                    " = use_model; %d failure(s) in a row); nothing was stored", err, step,
                    self.failures_in_a_row)
        return StepResult(pred.energy, pred.forces, "model", dec.force_std, dec.max_force_std,
                          "reference failed", pred)

    def _check_label(self, label, pred, atoms, step: int) -> None:
        """Refuse a label implausibly far from a trained model (e.g. a false SCF)."""
        limit = self.policy.label_check
        if limit is None or pred is None or self.model.n_frames < max(self.policy.initial_calls,
                                                                       2):
            return
        per_atom = abs(label.energy - pred.energy) / len(atoms)
        if per_atom > limit:
            raise ReferenceFailed(
                f"step {step}: implausible reference label: energy {label.energy:.4f} eV "
                f"against the model's {pred.energy:.4f} eV, {per_atom:.3f} eV/atom apart "
                f"(learning.label_check = {limit} eV/atom). A reference that reports success "
                "with a wrong energy (e.g. MOPAC with too few SCF iterations) would poison the "
                "model, so the frame was not stored. If the change is real (a reaction), raise "
                "learning.label_check or set it to null")

    def _learn(self, atoms, step, charge, mult, pred, dec) -> StepResult:
        check_geometry(atoms, step)
        n_fragments = fragments(atoms)[0]
        if self._n_fragments is None:
            self._n_fragments = n_fragments
        dissociated = n_fragments > self._n_fragments
        if dissociated and not self.policy.allow_fragmentation:
            check_fragments(atoms, step, self._n_fragments)  # raises, naming the atoms
        work = atoms.copy()
        work.info["otfml_step"] = step
        env = pred.env if pred is not None else None  # the descriptors, computed once
        admission = self._admission(atoms)
        # with overlap_update, the update's geometry-only part runs on another core while the
        # (out-of-process) reference runs, under otfml's BLAS limit; otherwise the reference
        # (perhaps in this process) keeps the BLAS threads it had and only the update is limited
        overlap = contextlib.ExitStack()
        if self._overlap:
            overlap.enter_context(self._blas)
            overlap.enter_context(_switch_interval(_OVERLAP_SWITCH_S))
        with overlap:
            helper = _Helper() if self._overlap else None
            prepared = (self._executor().submit(self._prepare, atoms, env, admission, helper)
                        if self._overlap else None)
            try:
                t0 = time.perf_counter()
                label = self.reference.compute(work, charge, mult)
                self.timings["reference"].append(time.perf_counter() - t0)
                self._check_fingerprint(label.fingerprint)
                if not dissociated:  # a dissociation (allowed) is new to the model
                    self._check_label(label, pred, atoms, step)
                if self.store is not None:
                    self.store.append(atoms, label.energy, label.forces, label.fingerprint,
                                      step=step, walker=self.walker,
                                      max_std=float(np.max(pred.novelty)) if pred is not None
                                      else float("nan"))
            except BaseException:
                if prepared is not None:  # the frame gets no labels: take its columns out again
                    self._discard(prepared)
                raise
            t1 = time.perf_counter()
            if pred is not None:
                self.policy.observe(pred.novelty, np.linalg.norm(pred.forces - label.forces,
                                                                 axis=1), atoms.numbers)
            self.n_calls += 1
            self.steps_since_call = 0
            with self._blas:  # nested in the overlap's limit, a no-op there
                if prepared is not None:
                    helper.serve()  # this thread takes on parts of the update still to do
                    prep = prepared.result()
                else:
                    prep = self.model.prepare_frame(atoms, env, sparse_tolerance=admission)
                self.model.add_prepared(prep, label.energy, label.forces, solve=False)
                self._refit()
        self.timings["update"].append(time.perf_counter() - t1)
        # a requested call (e.g. confirming an optimized geometry) returns the reference's values
        if self.policy.call_step_result == "updated_model" and dec.reason != "requested":
            new = self.predict(atoms, env)
            return StepResult(new.energy, new.forces, "updated_model",
                              self.policy.force_std(new.novelty, atoms.numbers),
                              dec.max_force_std, dec.reason, new)
        n = len(atoms)
        return StepResult(label.energy, label.forces, "reference", np.zeros(n),
                          dec.max_force_std, dec.reason)

    def _refit(self) -> None:
        """Solve for the weights after a frame was added, with new hyperparameters where a
        fit is due (``HyperparameterSchedule``) or a fit that ran apart takes effect.

        The first ``hyperparameter_first`` calls fit at once. Later fits, with
        ``hyperparameter_lag`` > 0, run on another thread on a copy of the model's
        accumulators while the run goes on, and take effect at the update
        ``hyperparameter_lag`` calls later, waiting for the fit there if need be: a fit
        costs several O(M^3) factorizations, the run's
        updates leave the second CPU idle for most of their time, and which call a fit
        takes effect at does not depend on how fast it ran. While it runs, BLAS keeps
        otfml's limit (``blas_threads``).
        """
        n = self.n_calls
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
        self._blas.__enter__()  # left at _apply_fit
        self._fit = _PendingFit(self.n_calls, self.model.hyp.as_array(),
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
            log.warning("the hyperparameter fit started at reference call %d failed; the "
                        "hyperparameters stay %s", fit.call, self.model.hyp, exc_info=True)
            new = None
        finally:
            self._blas.__exit__(None, None, None)
        self.timings["hyperparameters"].append(fit.started_s + time.perf_counter() - t0)
        if new is not None:
            self.model.hyp = new
        log.debug("hyperparameter fit of call %d applied at call %d: %s", fit.call,
                  self.n_calls, self.model.hyp)
        self.hyperparameter_schedule.fitted(fit.call, fit.before, self.model.hyp.as_array())

    def finish_hyperparameter_fit(self) -> None:
        """Apply a hyperparameter fit still running on another thread (waiting for it) and
        solve, so that the model a run leaves has it (``model.hyperparameter_lag``)."""
        if self._fit is None:
            return
        with self._blas:
            self._apply_fit()
            self.model.solve()

    def _admission(self, atoms: Atoms) -> float | None:
        """Sparse tolerance (normalized) for a labelled frame (``LearningPolicy.sparse_admission``).

        None: the model's own ``sparse_tolerance``.
        """
        frac = self.policy.sparse_admission
        u = self.policy.novelty_at_tolerance(atoms.numbers) if frac else None
        if u is None or not self.model.is_fitted:
            return None
        tol = self.model.sparse_tolerance
        return float(np.clip(frac * u / self.model.hyp.sigma, tol / 4, tol))

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

    def close(self) -> None:
        """Close the store and the threads that prepare updates and fit hyperparameters
        (a fit still running is applied first, :meth:`finish_hyperparameter_fit`)."""
        self.finish_hyperparameter_fit()
        for name in ("_pool", "_fit_pool"):
            pool = getattr(self, name)
            if pool is not None:
                pool.shutdown(wait=True)
                setattr(self, name, None)
        if self.store is not None:
            self.store.close()
