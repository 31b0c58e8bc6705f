"""Rank 0: stores every label once, trains the model, and sends out its versions."""

from __future__ import annotations

import csv
import logging
import os
import statistics
import time

from ..errors import ReferenceFailed
from ..learner import Learner
from ..reference.base import Label, Reference
from .protocol import DONE, LABEL, LabelMessage, ModelVersion, model_parts, send_version

log = logging.getLogger(__name__)

#: seconds between polls for a message while nothing arrives (the coordinator then yields
#: its core to the walkers sharing it: each poll wakes it, and takes a core from a walker
#: for a moment; a label waits at most this long beside its reference call's tens of ms),
#: and while model versions are still being sent (over transports where a large message
#: moves only while its sender calls into MPI; within a node the receiver copies it alone)
_POLL_S, _SENDING_POLL_S = 0.004, 0.001
#: how long after a version is published the coordinator polls at the faster rate, s
_SENDING_S = 0.05
#: longest a learned label waits for the next version while more labels keep arriving, s
_MAX_WAIT_S = 0.25

#: columns of the coordinator's labels.csv
LABEL_COLUMNS = ("frame", "walker", "step", "asked_version", "version", "sent", "arrived",
                 "stored", "reference_s", "update_s")


class _Received(Reference):
    """A reference whose labels were made on the walkers: the coordinator's learner
    "calls" it for the label at hand."""

    code = "walker"

    def __init__(self) -> None:
        self.label: Label | None = None

    def fingerprint(self, charge: int, multiplicity: int) -> dict:
        return {} if self.label is None else dict(self.label.fingerprint)

    def compute(self, atoms, charge: int = 0, multiplicity: int = 1) -> Label:
        label, self.label = self.label, None
        return label


class Coordinator:
    """Serves the walkers of a :class:`otfml.parallel.ParallelSession` until all are done.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm
        The session's communicator; this is its rank 0.
    learner_kwargs : dict
        :class:`otfml.learner.Learner` arguments (store, policy, model_settings, ...).
    directory : str, optional
        Where ``labels.csv`` (one row per label: walker, step, the model version that
        asked and the one it made, times) is written.
    """

    def __init__(self, comm, learner_kwargs: dict, directory: str | None = None) -> None:
        self.comm = comm
        self.received = _Received()
        self.learner = Learner(self.received, **learner_kwargs)
        self.learner.check_dissociation = False  # each walker counts its own, before its call
        self.version = 0
        self.checksums: dict[int, str] = {}
        self.version_bytes: list[int] = []
        self.update_s: list[float] = []
        self.summaries: dict[int, dict] = {}
        #: per walker, how many of its labels were taken in (learned or refused)
        self.taken_in: dict[int, int] = {}
        self._pending: list = []
        #: arrival time of the oldest label learned but not yet in a published version
        self._waiting_since: float | None = None
        self._published = 0.0  # when the last version was sent
        self._csv = None
        if directory is not None:
            os.makedirs(directory, exist_ok=True)
            path = os.path.join(directory, "labels.csv")
            new = not os.path.exists(path)
            self._fh = open(path, "a", newline="")
            self._csv = csv.writer(self._fh)
            if new:
                self._csv.writerow(LABEL_COLUMNS)

    def serve(self) -> dict[int, dict]:
        """Take labels until every walker said it is done; returns their summaries."""
        from mpi4py import MPI

        walkers = self.comm.Get_size() - 1
        if self.learner.model is not None and self.learner.model.is_fitted:
            self._warm_up()
            self._waiting_since = time.time()
            self._publish()  # a warm start: the walkers begin with it
        status = MPI.Status()
        while len(self.summaries) < walkers:
            if not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG, status=status):
                self._tidy()
                sending = self._pending and time.time() - self._published < _SENDING_S
                time.sleep(_SENDING_POLL_S if sending else _POLL_S)
                continue
            src, tag = status.Get_source(), status.Get_tag()
            msg = self.comm.recv(source=src, tag=tag)
            if tag == DONE:
                self.summaries[src - 1] = msg
            elif tag == LABEL:
                self._learn(msg, time.time())
                # labels that came meanwhile are learned first, one version for all of them,
                # unless the oldest of them has waited for _MAX_WAIT_S already
                if (not self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=LABEL)
                        or time.time() - self._waiting_since > _MAX_WAIT_S):
                    self._publish()
        L = self.learner
        L.asked_version = -1
        # the walkers take the versions still on their way until this goodbye (messages
        # from one rank to another arrive in order)
        for rank in range(1, walkers + 1):
            self._pending.append(self.comm.isend(None, dest=rank, tag=DONE))
        for req in self._pending:
            req.wait()
        self._pending = []
        return self.summaries

    def _warm_up(self) -> None:
        """Predict the model's last frame once, before the walkers begin: the compiled
        prediction kernels load now rather than while the walkers step."""
        frames = self.learner.model.frames
        if frames and frames[-1].atoms is not None:
            self.learner.predict(frames[-1].atoms)

    def _learn(self, msg: LabelMessage, arrived: float) -> None:
        L = self.learner
        self.taken_in[msg.walker] = self.taken_in.get(msg.walker, 0) + 1
        self.received.label = Label(msg.energy, msg.forces, msg.fingerprint, msg.seconds)
        L.walker = msg.walker
        L.asked_version = msg.version
        L.n_steps = msg.step - 1  # the store records the walker's step
        L.request_reference = True
        n_before = len(L.store) if L.store is not None else L.n_calls
        t0 = time.perf_counter()
        try:
            L.step(msg.atoms())
        except ReferenceFailed as err:  # the label check: not stored, not learned
            log.error("walker %d, step %d: label refused: %s", msg.walker, msg.step, err)
            if self._waiting_since is None:  # a version tells its walker it was taken in
                self._waiting_since = arrived
            return
        self.update_s.append(time.perf_counter() - t0)
        if self._waiting_since is None:
            self._waiting_since = arrived
        if self._csv is not None:  # the version this label goes into is the next one
            self._csv.writerow([n_before, msg.walker, msg.step, msg.version, self.version + 1,
                                f"{msg.sent:.6f}", f"{arrived:.6f}", f"{time.time():.6f}",
                                f"{msg.seconds:.4f}", f"{self.update_s[-1]:.4f}"])
            self._fh.flush()

    def _publish(self) -> None:
        """Send the model as it is now to every walker, as the next version."""
        L = self.learner
        arrived, self._waiting_since = self._waiting_since, None
        if L.model is None or not L.model.is_fitted or arrived is None:
            return
        self.version += 1
        data, digest = model_parts(L.model)
        self.checksums[self.version] = digest
        self.version_bytes.append(sum(memoryview(p).nbytes for p in data))
        msg = ModelVersion(self.version, data, digest, L.policy, arrived,
                           len(L.store) if L.store is not None else L.n_calls,
                           dict(self.taken_in),
                           statistics.median(self.update_s[-9:]) if self.update_s else 0.0)
        self._pending += send_version(self.comm, msg, range(1, self.comm.Get_size()))
        self._published = time.time()
        self._tidy()

    def _tidy(self) -> None:
        """Forget the sends that completed."""
        self._pending = [r for r in self._pending if not r.Test()]

    def close(self) -> None:
        if self._csv is not None:
            self._fh.close()
            self._csv = None
        self.learner.close()
