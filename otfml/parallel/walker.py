"""Ranks 1..K: dynamics on the latest model version; labels go to the coordinator."""

from __future__ import annotations

import logging
import time

import numpy as np
from ase import Atoms

from ..learner import Learner
from ..outcome import StepResult
from ..structure import check_geometry, fragments
from .protocol import LABEL, LabelMessage, checksum, model_from_parts, receive_versions

log = logging.getLogger(__name__)

#: most of a walker's time spent taking model versions between its reference calls (a
#: version waits beyond it; before a call the newest is always taken)
INSTALL_SHARE = 0.05

#: most labels of one walker on their way to the coordinator; a walker with this many waits
#: for the oldest. One: a walker that needs labels faster than the coordinator learns them
#: waits rather than asks again where the model it will receive is already sure
IN_FLIGHT = 1

#: weight of the newest wait in a walker's running estimates of how long waiting for its
#: own label takes and how often the version it waited for was sure
WAIT_MEMORY = 0.25
#: what a walker expects of the share of its waits that drop the request before it waited
WAIT_PRIOR = 0.5
#: a walker that found waiting not worth it still waits at every this-many-th chance (its
#: estimates would otherwise never learn that waiting pays again)
WAIT_EXPLORE = 8
#: seconds between polls for a version while a walker waits for one
WAIT_POLL_S = 0.001
#: longest a calibrating walker waits for the version that learned its calibrating label, s
CALIBRATION_WAIT_S = 30.0


class WalkerLearner(Learner):
    """A :class:`otfml.learner.Learner` that predicts with the coordinator's model versions.

    Where its decision asks for the reference, it first takes a newer version if one has
    come, or waits for the one that learned its own previous label where that is expected
    to pay (:meth:`_wait_for_own_label`), and trusts it if that one is sure (the request
    is dropped); otherwise it calls its own reference, sends the label to the coordinator
    (rank 0), and returns the label's values. It never trains: every version comes from
    the coordinator, taken at a step boundary without waiting for it.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The session's communicator (this rank is walker ``rank - 1``).
    reference : otfml.reference.Reference
        This walker's reference (its own MOPAC process, working directory, ...).
    **kwargs
        :class:`otfml.learner.Learner` arguments (no store: rank 0 keeps it).
    """

    def __init__(self, comm, reference, **kwargs) -> None:
        super().__init__(reference, walker=comm.Get_rank() - 1, **kwargs)
        self.comm = comm
        #: the model version in use (0: none yet)
        self.version = 0
        #: checksum of each version this walker used
        self.checksums: dict[int, str] = {}
        #: seconds from a label's arrival at the coordinator to this walker's use of the
        #: version that learned it
        self.latency: list[float] = []
        #: requests dropped because a newer version was sure
        self.n_screened = 0
        #: seconds spent taking versions, and when this walker's first step began
        self.install_s = 0.0
        self._started: float | None = None
        self._sends: list = []  # labels on their way to the coordinator
        #: waits for the version that learned this walker's previous label, their seconds,
        #: and how many of them ended with the request dropped (the version was sure)
        self.n_waits, self.wait_s, self.n_waits_paid = 0, 0.0, 0
        self._taken_in = 0  # this walker's labels the coordinator had taken in, at version
        self._update_s = 0.0  # the coordinator's update time per label, s
        self._wait_est: float | None = None  # running estimate of a wait, s
        self._wait_pays = WAIT_PRIOR  # running share of waits that dropped the request
        self._passed = 0  # chances to wait passed up since the last wait

    def use_prior(self, kind: str = "mmff") -> bool:
        """A walker's model is the coordinator's: it has the prior only where the run's
        model settings name it (``model.prior``)."""
        return self.settings["prior"] == kind

    def take_newest(self, now: bool = True) -> bool:
        """Take the newest model version that has arrived, if any (True if one did).

        With ``now`` False (between calls) a version waits while taking versions has cost
        more than :data:`INSTALL_SHARE` of this walker's time so far: where labels come
        fast, the walker then takes every few versions rather than each one.
        """
        if not now and self._started is not None and self.install_s > INSTALL_SHARE * (
                time.perf_counter() - self._started):
            return False
        t0 = time.perf_counter()
        newest = receive_versions(self.comm)
        if newest is None or newest.version <= self.version:
            return False
        digest = checksum(newest.data)
        if digest != newest.checksum:
            raise RuntimeError(f"model version {newest.version} reached walker {self.walker} "
                               f"damaged (its checksum differs from the coordinator's); "
                               "the run's store is intact: run the same command again")
        self.model = model_from_parts(newest.data)
        if self.settings["predict_threads"] is not None:
            self.model.threads = self.settings["predict_threads"]
        # this walker's settings (its stage's), the coordinator's calibration
        self.policy = type(self.policy)(**self.policy.settings()).inherit(newest.policy)
        self.version = newest.version
        self._taken_in = newest.taken_in.get(self.walker, 0)
        self._update_s = newest.update_s
        self.checksums[newest.version] = digest
        self.latency.append(time.time() - newest.label_arrived)
        self.install_s += time.perf_counter() - t0
        return True

    def step(self, atoms: Atoms) -> StepResult:
        if self._started is None:
            self._started = time.perf_counter()
            self._n_fragments = fragments(atoms)[0]
        self.take_newest(now=False)
        if self._sends:
            self._sends = [r for r in self._sends if not r.Test()]
        return super().step(atoms)

    def flush(self) -> None:
        """Wait until every label this walker sent has reached the coordinator."""
        for req in self._sends:
            req.wait()
        self._sends = []

    def _wait_for_own_label(self, calibrating: bool = False) -> bool:
        """Before an uncertain or calibrating call: where this walker's previous label is
        not yet in the model it holds, wait for the version that learned it, taking the
        versions that come meanwhile. True if it chose to wait (a calibrating wait is not
        a choice).

        Right after a call the next geometries are close to the labelled one: the version
        that learned it is often sure of them, where the model at hand is not. Waiting is
        chosen where it is expected to cost less than it saves: the share of earlier waits
        that ended with the request dropped (:data:`WAIT_PRIOR` before any), times what a
        call costs (this walker's reference time and the coordinator's update), against
        the expected wait. No wait is longer than that cost. A ``calibrating`` request (a
        model whose errors were not measured yet) always waits for the version that
        measured them, up to :data:`CALIBRATION_WAIT_S`: one call measures them.
        """
        if self._taken_in >= self.n_calls or not self.timings["reference"]:
            return False
        cost = float(np.median(self.timings["reference"][-20:])) + self._update_s
        if calibrating:
            cost = CALIBRATION_WAIT_S
        elif (self._wait_est is not None and self._wait_pays * cost < self._wait_est
                and self._passed < WAIT_EXPLORE):
            self._passed += 1
            return False
        self._passed = 0
        t0 = time.perf_counter()
        while self._taken_in < self.n_calls and time.perf_counter() - t0 < cost:
            if not self.take_newest():
                time.sleep(WAIT_POLL_S)
        waited = time.perf_counter() - t0
        self.n_waits += 1
        self.wait_s += waited
        if calibrating:  # not a choice: not in the estimates of what waiting brings
            return False
        self._wait_est = waited if self._wait_est is None else (
            (1.0 - WAIT_MEMORY) * self._wait_est + WAIT_MEMORY * waited)
        return True

    def _waited(self, paid: bool) -> None:
        """Record whether a wait ended with the request dropped."""
        self.n_waits_paid += int(paid)
        self._wait_pays = (1.0 - WAIT_MEMORY) * self._wait_pays + WAIT_MEMORY * float(paid)

    def _learn(self, atoms, step, charge, mult, pred, dec) -> StepResult:
        held = self.version
        waited = dec.reason in ("uncertain", "calibrating") and self._wait_for_own_label(
            calibrating=dec.reason == "calibrating")
        if (dec.reason != "requested" and (self.take_newest() or self.version != held)
                and self.model.is_fitted):
            new = self.predict(atoms)
            again = self.policy.decide(step, self.n_calls, self.steps_since_call, new.novelty,
                                       n_frames=self.model.n_frames, numbers=atoms.numbers)
            if waited:
                self._waited(paid=not again.call)
            if not again.call:
                self.n_screened += 1
                self.steps_since_call += 1
                return StepResult(new.energy, new.forces, "model", again.force_std,
                                  again.max_force_std, "screened by a newer model", new)
            pred, dec = new, again
        elif waited:
            self._waited(paid=False)
        check_geometry(atoms, step)
        # fragments counted against this walker's first structure (the coordinator, which
        # learns every walker's labels, does not count them)
        dissociated = self._dissociated(atoms, step)
        label = self._reference_label(atoms, step, charge, mult, pred, compare=not dissociated)
        # sent without waiting: the label moves on while this walker goes on stepping
        while len(self._sends) >= IN_FLIGHT:
            self._sends.pop(0).wait()
        self._sends.append(self.comm.isend(LabelMessage(
            atoms.numbers.copy(), atoms.positions.copy(), atoms.cell.array.copy(),
            atoms.pbc.copy(), {k: v for k, v in atoms.info.items()
                               if k in ("charge", "multiplicity")},
            label.energy, label.forces, label.fingerprint, label.seconds, self.walker, step,
            self.version, float(dec.max_force_std)), dest=0, tag=LABEL))
        self.n_calls += 1
        self.steps_since_call = 0
        self.timings["update"].append(0.0)
        return StepResult(label.energy, label.forces, "reference", np.zeros(len(atoms)),
                          dec.max_force_std, dec.reason)
