"""Ranks 1..K: dynamics on the latest model version; labels go to the coordinator."""

from __future__ import annotations

import logging
import time

import numpy as np
from ase import Atoms

from ..learner import Learner
from ..outcome import StepResult
from ..structure import check_geometry, fragments
from .protocol import LABEL, LabelMessage, checksum, model_from_bytes, receive_versions

log = logging.getLogger(__name__)

#: most of a walker's time spent taking model versions between its reference calls (a
#: version waits beyond it; before a call the newest is always taken)
INSTALL_SHARE = 0.05

#: most labels of one walker on their way to the coordinator; a walker with this many waits
#: for the oldest. One: a walker that needs labels faster than the coordinator learns them
#: waits rather than asks again where the model it will receive is already sure
IN_FLIGHT = 1


class WalkerLearner(Learner):
    """A :class:`otfml.learner.Learner` that predicts with the coordinator's model versions.

    Where its decision asks for the reference, it first takes a newer version if one has
    come (and trusts it if that one is sure: the request is dropped); otherwise it calls
    its own reference, sends the label to the coordinator (rank 0), and returns the
    label's values. It never trains: every version comes from the coordinator, taken at
    a step boundary without waiting for it.

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
        self.model = model_from_bytes(newest.data)
        if self.settings["predict_threads"] is not None:
            self.model.threads = self.settings["predict_threads"]
        # this walker's settings (its stage's), the coordinator's calibration
        self.policy = type(self.policy)(**self.policy.settings()).inherit(newest.policy)
        self.version = newest.version
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

    def _learn(self, atoms, step, charge, mult, pred, dec) -> StepResult:
        if dec.reason != "requested" and self.take_newest() and self.model.is_fitted:
            new = self.predict(atoms)
            again = self.policy.decide(step, self.n_calls, self.steps_since_call, new.novelty,
                                       n_frames=self.model.n_frames, numbers=atoms.numbers)
            if not again.call:
                self.n_screened += 1
                self.steps_since_call += 1
                return StepResult(new.energy, new.forces, "model", again.force_std,
                                  again.max_force_std, "screened by a newer model", new)
            pred, dec = new, again
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
