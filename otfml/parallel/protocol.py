"""What ranks send each other: labels, model versions, and the end of a walker's work."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

#: message tags (a model version's bytes follow its header as MODEL_DATA)
LABEL, MODEL, DONE, MODEL_DATA, START = 11, 12, 13, 14, 15
#: seconds between polls of a rank that waits for a message (a blocking MPI receive
#: would hold a core that the walkers sharing it need)
POLL_S = 0.005


@dataclass
class LabelMessage:
    """A reference label a walker made, for the coordinator to store and learn.

    Attributes
    ----------
    numbers, positions, cell, pbc, info
        The labelled structure (Å).
    energy : float
        Reference energy, eV.
    forces : ndarray, shape (n_atoms, 3)
        Reference forces, eV/Å.
    fingerprint : dict
        The reference's fingerprint.
    seconds : float
        Wall time of the reference call.
    walker, step : int
        Which walker made it, at which of its steps.
    version : int
        The model version the walker was using when it asked (0: none yet).
    max_std : float
        Largest per-atom force-error estimate at the call, eV/Å (NaN: no model).
    sent : float
        UNIX time it was sent.
    """

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    info: dict
    energy: float
    forces: np.ndarray
    fingerprint: dict
    seconds: float
    walker: int
    step: int
    version: int
    max_std: float
    sent: float = field(default_factory=time.time)

    def atoms(self) -> Atoms:
        return Atoms(numbers=self.numbers, positions=self.positions, cell=self.cell,
                     pbc=self.pbc, info=dict(self.info))


@dataclass
class ModelVersion:
    """A model version as the coordinator sends it.

    Attributes
    ----------
    version : int
        1, 2, ... in the order the coordinator made them.
    data : bytes
        The model's contents (:func:`model_bytes`); in the header :func:`send_version`
        sends ahead of them, their length.
    checksum : str
        SHA-256 digest of ``data`` (every rank holds the same model of a version: each
        walker checks the bytes it received against it).
    policy : object
        The coordinator's learning policy (its calibration) at this version.
    label_arrived : float
        UNIX time the label that made this version reached the coordinator.
    n_frames : int
        Frames the coordinator's store holds.
    """

    version: int
    data: bytes
    checksum: str
    policy: object
    label_arrived: float
    n_frames: int


def send_version(comm, msg: ModelVersion, ranks) -> list:
    """Send ``msg`` to each of ``ranks`` without waiting: its header pickled once (tag
    MODEL), then its bytes as they are (tag MODEL_DATA), so that neither is copied into
    a second message. Returns the requests."""
    from mpi4py import MPI

    header = MPI.pickle.dumps(dataclasses.replace(msg, data=len(msg.data)))
    reqs = []
    for rank in ranks:
        reqs.append(comm.Isend([header, MPI.BYTE], dest=rank, tag=MODEL))
        reqs.append(comm.Isend([msg.data, MPI.BYTE], dest=rank, tag=MODEL_DATA))
    return reqs


def receive_versions(comm) -> ModelVersion | None:
    """Every model version that has reached this rank from rank 0; the newest of them
    (None: none came)."""
    from mpi4py import MPI

    newest = None
    while comm.Iprobe(source=0, tag=MODEL):
        newest = comm.recv(source=0, tag=MODEL)
        data = bytearray(newest.data)  # (the header holds the size)
        comm.Recv([data, MPI.BYTE], source=0, tag=MODEL_DATA)
        newest.data = data
    return newest


def model_bytes(model) -> tuple[bytes, str]:
    """A model's contents (:meth:`otfml.gp.SparseGP.contents`, compact) as bytes, and their
    checksum."""
    data = pickle.dumps(model.contents(compact=True), protocol=pickle.HIGHEST_PROTOCOL)
    return data, checksum(data)


def checksum(data: bytes) -> str:
    """Hex SHA-256 digest of ``data`` (the first 32 hex digits)."""
    return hashlib.sha256(data).hexdigest()[:32]


def model_from_bytes(data: bytes):
    """The model (prediction only) of :func:`model_bytes`'s bytes."""
    from ..gp import SparseGP

    return SparseGP.from_contents(pickle.loads(data), "a model version")


def wait_for(comm, tags: tuple[int, ...], source: int = 0):
    """The next message from ``source`` (in the order sent), received without holding a
    core while none has come; returns ``(tag, message)``. A version's bytes (MODEL_DATA)
    are received as a bytearray."""
    from mpi4py import MPI

    status = MPI.Status()
    while not comm.Iprobe(source=source, tag=MPI.ANY_TAG, status=status):
        time.sleep(POLL_S)
    tag = status.Get_tag()
    if tag == MODEL_DATA:
        data = bytearray(status.Get_count(MPI.BYTE))
        comm.Recv([data, MPI.BYTE], source=source, tag=tag)
        return tag, data
    msg = comm.recv(source=source, tag=tag)
    if tag not in tags and tag not in (MODEL, MODEL_DATA):
        raise RuntimeError(f"rank {comm.Get_rank()} received tag {tag}, expected {tags}")
    return tag, msg
