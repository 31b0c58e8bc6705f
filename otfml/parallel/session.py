"""The Python API: one :class:`ParallelSession` per ``mpirun`` job."""

from __future__ import annotations

import logging
import os
import time

import numpy as np

from ..calculator import OTFCalculator
from ..errors import ConfigError
from ..policy import LearningPolicy
from ..reference import make_reference
from .coordinator import Coordinator
from .protocol import DONE, START, wait_for
from .walker import WalkerLearner

log = logging.getLogger(__name__)

__all__ = ["ParallelSession"]


def _serial_ase() -> None:
    """Make ASE work serially on this rank: its dynamics would otherwise share random
    numbers over ``MPI.COMM_WORLD`` and write trajectories and logs on rank 0 only, while
    here every walker runs dynamics of its own."""
    import ase.parallel

    ase.parallel.world.comm = ase.parallel.DummyMPI()


class ParallelSession:
    """Walkers that share one model and one store, under ``mpirun -n K+1``.

    Rank 0 coordinates (it alone opens ``store`` and trains the model); ranks 1..K are
    walkers, and ASE works serially on each (every walker's dynamics, trajectory and log
    are its own). Entering the session on rank 0 serves the walkers until every one has left
    its session, so the body of the ``with`` block is for the walkers::

        with ParallelSession(lambda w: MOPAC(method="PM7", label=f"mopac/w{w}"),
                             store="shared.h5", species=[1, 6, 8]) as session:
            if session.walker is not None:           # ranks 1..K
                atoms = starts[session.walker]
                atoms.calc = session.calculator()
                Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.01).run(2000)

    Parameters
    ----------
    reference : callable
        ``reference(walker) -> ASE calculator or otfml Reference``: each walker's own
        reference (e.g. its own MOPAC label, so that walkers do not share files).
    store : str
        The HDF5 store (written by rank 0 only; its frames warm-start the model).
    policy : LearningPolicy, optional
        Learning settings (the coordinator's calibration reaches the walkers with every
        model version).
    model_settings : dict, optional
        Overrides of :data:`otfml.training.MODEL_DEFAULTS`. ``predict_threads`` and
        ``blas_threads`` default to the node's cores shared between the ranks (at least 1;
        all ranks are taken to share one node).
    species : list of int
        Atomic numbers of every structure any walker will see.
    charge, multiplicity : int, optional
        Used where ``atoms.info`` has no ``charge`` / ``multiplicity``.
    directory : str, optional
        Where rank 0 writes ``labels.csv`` (default: the store's directory).
    comm : mpi4py.MPI.Comm, optional
        Default ``MPI.COMM_WORLD``; it needs at least 2 ranks.
    """

    def __init__(self, reference, store: str, species: list[int],
                 policy: LearningPolicy | None = None, model_settings: dict | None = None,
                 charge: int | None = None, multiplicity: int | None = None,
                 directory: str | None = None, comm=None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        if comm.Get_size() < 2:
            raise ConfigError(
                f"a parallel session needs a coordinator and at least one walker: run it "
                f"under `mpirun -n K+1` (this job has {comm.Get_size()} rank)")
        if not species:
            raise ConfigError("give species= with every element any walker will see")
        self.comm = comm
        self.rank = comm.Get_rank()
        _serial_ase()
        # the ranks share the node's cores: threads per rank, unless the settings say
        share = max(1, (os.cpu_count() or 1) // comm.Get_size())
        model_settings = {"predict_threads": share, "blas_threads": share,
                          **(model_settings or {})}
        self._kwargs = {"policy": policy or LearningPolicy(), "model_settings": model_settings,
                        "species": sorted({int(z) for z in species}), "charge": charge,
                        "multiplicity": multiplicity}
        self._reference = reference
        self._store = os.fspath(store)
        self._directory = directory or os.path.dirname(os.path.abspath(self._store))
        self._calc: OTFCalculator | None = None
        self._warm = False  # rank 0 warm-started a model from the store
        #: rank 0, after the session: every walker's summary (walker index: dict)
        self.summaries: dict[int, dict] = {}
        #: rank 0: the coordinator (its learner holds the model and the store)
        self.coordinator: Coordinator | None = None
        #: a walker's own figures to add to its summary (JSON-able), e.g. its MD's wall time
        self.extra: dict = {}

    @property
    def walker(self) -> int | None:
        """This rank's walker index (0..K-1), or None on the coordinator."""
        return None if self.rank == 0 else self.rank - 1

    @property
    def n_walkers(self) -> int:
        return self.comm.Get_size() - 1

    def __enter__(self) -> ParallelSession:
        if self.rank != 0:
            # a store's frames warm-start the model on rank 0 first: walkers then begin
            # with that model rather than asking the reference what it already knows
            self._warm = wait_for(self.comm, (START,))[1]
            return self
        try:
            self.coordinator = Coordinator(
                self.comm, {"store": self._store, **self._kwargs}, self._directory)
        except BaseException:
            log.exception("the coordinator could not start: aborting every rank")
            self.comm.Abort(1)
            raise
        L = self.coordinator.learner
        for rank in range(1, self.comm.Get_size()):
            self.comm.send(L.model is not None and L.model.is_fitted, dest=rank, tag=START)
        try:
            self.summaries = self.coordinator.serve()
        except BaseException:
            log.exception("the coordinator failed: aborting every rank (the store keeps "
                          "every committed frame)")
            self.coordinator.close()
            self.comm.Abort(1)
            raise
        return self

    def calculator(self) -> OTFCalculator:
        """This walker's ASE calculator (one per walker; attach it to its atoms)."""
        if self.walker is None:
            raise RuntimeError("the coordinator (rank 0) has no calculator")
        if self._calc is None:
            learner = WalkerLearner(self.comm, make_reference(self._reference(self.walker)),
                                    **self._kwargs)
            if self._warm:  # the warm-started model is on its way: take it first
                while not learner.take_newest():
                    time.sleep(0.001)
            self._calc = OTFCalculator.from_learner(learner)
        return self._calc

    def summary(self) -> dict:
        """This walker's figures (steps, calls, versions used and their checksums, ...)."""
        L = self._calc.learner if self._calc is not None else None
        if L is None:
            return {"walker": self.walker, "steps": 0, "reference_calls": 0}

        def med(v: list) -> float | None:
            return float(np.median(v)) if v else None

        return {"walker": self.walker, "steps": L.n_steps, "reference_calls": L.n_calls,
                "screened": L.n_screened, "reference_failures": L.n_failures,
                "versions_used": len(L.checksums), "last_version": L.version,
                "version_install_s": L.install_s, "waits": L.n_waits,
                "waits_paid": L.n_waits_paid, "wait_s": L.wait_s,
                "checksums": L.checksums, "latency_s": L.latency,
                "median_model_step_s": med(L.timings["model"]),
                "median_reference_s": med(L.timings["reference"]), **self.extra}

    def __exit__(self, exc_type, exc, tb) -> bool:
        """A walker leaves the session (its summary goes to rank 0). One whose work
        raised (e.g. a reference failure under ``on_reference_failure: stop``) leaves
        with the error in its summary and the exception suppressed, so that the job
        and the other walkers go on; rank 0's :attr:`summaries` say which stopped."""
        if self.rank == 0:
            if self.coordinator is not None:
                self.coordinator.close()
            return False
        if self._calc is not None:
            self._calc.learner.flush()  # every label reaches rank 0 before the goodbye
        summary = self.summary()
        failed = isinstance(exc, Exception)
        if failed:
            summary["error"] = f"{exc_type.__name__}: {exc}"
            log.error("walker %d stopped at its step %d: %s; the other walkers go on",
                      self.walker, summary["steps"], summary["error"])
        self.comm.send(summary, dest=0, tag=DONE)
        # versions still on their way, until the coordinator's goodbye (which comes when
        # every walker is done: meanwhile this rank leaves its core to those still running)
        while wait_for(self.comm, (DONE,))[0] != DONE:
            pass
        if self._calc is not None:
            self._calc.learner.close()
        return failed
