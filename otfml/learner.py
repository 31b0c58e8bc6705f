"""The learning loop: predict, ask the reference when unsure, store, update.

:class:`Learner` owns the model, the reference, the store and the policy;
:class:`otfml.calculator.OTFCalculator` is the thin ASE face of it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ase import Atoms

from .concurrency import _OVERLAP_SWITCH_S, _BlasLimit, _Helper, _Overlap, _switch_interval
from .errors import (
    ConfigError,
    FingerprintMismatch,
    IsolatedAtoms,
    ReferenceFailed,
)
from .gp import Prediction, SparseGP
from .hyperfit import HyperparameterSchedule, _HyperparameterFits, _PendingFit
from .model_setup import _ModelSetup
from .outcome import StepResult, _Failures
from .policy import Decision, LearningPolicy
from .reference import Label, Reference
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
)

__all__ = ["Learner", "StepResult"]


log = logging.getLogger(__name__)

class Learner(_ModelSetup, _HyperparameterFits, _Overlap, _Failures):
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
        #: the model version the label being learned was asked with (stored with it; a
        #: parallel run's coordinator sets it, -1 elsewhere)
        self.asked_version = -1
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
        #: count the bonded fragments of each structure before its reference call (False
        #: where they were counted before the structure came: a parallel run's coordinator)
        self.check_dissociation = True
        #: set True to have the next step labelled by the reference whatever the model says;
        #: that step returns the reference's energy and forces (whatever call_step_result says)
        self.request_reference = False
        #: set True to have every step labelled by the reference (and learned) until set
        #: False again, e.g. where an optimizer needs forces more accurate than the model's
        self.reference_only = False
        #: energy per atom (eV) of the last reference label (the label check compares with it)
        self.last_label_per_atom: float | None = None
        #: context that limits BLAS threads to ``model.blas_threads`` (the learner's own
        #: linear algebra runs in it; so may a caller's that works on the model's surface)
        self.blas_limit = _BlasLimit(self.settings["blas_threads"])
        self._overlap = self._overlap_possible()
        self._pool: ThreadPoolExecutor | None = None
        #: a hyperparameter fit running on another thread (see _refit), or None
        self._fit: _PendingFit | None = None
        self._fit_pool: ThreadPoolExecutor | None = None
        self.hyperparameter_schedule = HyperparameterSchedule(
            self.settings["hyperparameter_first"], self.settings["hyperparameter_every"])
        if self.store is not None and len(self.store):
            with self.blas_limit:
                self._warm_start()

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
        with self.blas_limit:
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
        if self.request_reference or self.reference_only:
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

    def _dissociated(self, atoms: Atoms, step: int) -> bool:
        """Whether ``atoms`` has more bonded fragments than the run's first structure; an
        UnphysicalGeometry unless ``learning.allow_fragmentation``. False without a check
        (``check_dissociation``)."""
        if not self.check_dissociation:
            return False
        n_fragments = fragments(atoms)[0]
        if self._n_fragments is None:
            self._n_fragments = n_fragments
        dissociated = n_fragments > self._n_fragments
        if dissociated and not self.policy.allow_fragmentation:
            check_fragments(atoms, step, self._n_fragments)  # raises, naming the atoms
        return dissociated

    def _learn(self, atoms, step, charge, mult, pred, dec) -> StepResult:
        check_geometry(atoms, step)
        dissociated = self._dissociated(atoms, step)
        env = pred.env if pred is not None else None  # the descriptors, computed once
        admission = self._admission(atoms)
        # with overlap_update, the update's geometry-only part runs on another core while the
        # (out-of-process) reference runs, under otfml's BLAS limit; otherwise the reference
        # (perhaps in this process) keeps the BLAS threads it had and only the update is limited
        overlap = contextlib.ExitStack()
        if self._overlap:
            overlap.enter_context(self.blas_limit)
            overlap.enter_context(_switch_interval(_OVERLAP_SWITCH_S))
        with overlap:
            helper = _Helper() if self._overlap else None
            prepared = (self._executor().submit(self._prepare, atoms, env, admission, helper)
                        if self._overlap else None)
            try:
                # a dissociation (allowed) is new to the model: its label is not compared
                label = self._reference_label(atoms, step, charge, mult, pred,
                                              compare=not dissociated)
                if self.store is not None:
                    self.store.append(atoms, label.energy, label.forces, label.fingerprint,
                                      step=step, walker=self.walker,
                                      max_std=float(dec.max_force_std),
                                      model_version=self.asked_version)
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
            with self.blas_limit:  # nested in the overlap's limit, a no-op there
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

    def _reference_label(self, atoms: Atoms, step: int, charge: int, mult: int, pred,
                         compare: bool = True) -> Label:
        """The reference's label of ``atoms`` at ``step``, timed, its fingerprint checked and
        (with ``compare``) its values against the model's prediction ``pred``
        (:meth:`_check_label`)."""
        work = atoms.copy()
        work.info["otfml_step"] = step
        t0 = time.perf_counter()
        label = self.reference.compute(work, charge, mult)
        self.timings["reference"].append(time.perf_counter() - t0)
        self._check_fingerprint(label.fingerprint)
        if compare:
            self._check_label(label, pred, atoms, step)
        self.last_label_per_atom = label.energy / len(atoms)
        return label

    def _admission(self, atoms: Atoms) -> float | None:
        """Sparse tolerance (normalized) for a labelled frame (``LearningPolicy.sparse_admission``).

        None: the model's own ``sparse_tolerance``.
        """
        frac = self.policy.sparse_admission
        u = self.policy.novelty_at_tolerance(atoms.numbers) if frac else None
        if u is None or not self.model.is_fitted:
            return None
        tol = self.model.sparse_tolerance
        scale = float(np.linalg.norm(self.model.hyp.term_sigmas()))  # novelty's largest value
        return float(np.clip(frac * u / scale, tol / 4, tol))

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
