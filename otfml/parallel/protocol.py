"""What ranks send each other: labels, model versions, and the end of a walker's work."""

from __future__ import annotations

import dataclasses
import pickle
import time
import zlib
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
    data : list of bytes-like
        The model's contents as parts (:func:`model_parts`); in the header
        :func:`send_version` sends ahead of them, their lengths.
    checksum : str
        CRC-32 of the parts (:func:`checksum`; every rank holds the same model of a
        version: each walker checks the bytes it received against it).
    policy : object
        The coordinator's learning policy (its calibration) at this version.
    label_arrived : float
        UNIX time the label that made this version reached the coordinator.
    n_frames : int
        Frames the coordinator's store holds.
    taken_in : dict
        Per walker, how many of its labels the coordinator has taken in (learned, or
        refused by the label check) up to this version.
    update_s : float
        The coordinator's recent update time per label (median), s.
    """

    version: int
    data: list
    checksum: str
    policy: object
    label_arrived: float
    n_frames: int
    taken_in: dict = field(default_factory=dict)
    update_s: float = 0.0


def send_version(comm, msg: ModelVersion, ranks) -> list:
    """Send ``msg`` to each of ``ranks`` without waiting: its header pickled once (tag
    MODEL), then each of its parts as it is (tag MODEL_DATA), so that no array is copied
    into a message. Returns the requests."""
    from mpi4py import MPI

    header = MPI.pickle.dumps(dataclasses.replace(
        msg, data=[memoryview(p).nbytes for p in msg.data]))
    reqs = []
    for rank in ranks:
        reqs.append(comm.Isend([header, MPI.BYTE], dest=rank, tag=MODEL))
        reqs += [comm.Isend([p, MPI.BYTE], dest=rank, tag=MODEL_DATA) for p in msg.data]
    return reqs


def receive_versions(comm) -> ModelVersion | None:
    """Every model version that has reached this rank from rank 0; the newest of them
    (None: none came)."""
    from mpi4py import MPI

    newest = None
    while comm.Iprobe(source=0, tag=MODEL):
        newest = comm.recv(source=0, tag=MODEL)
        parts = []
        for n in newest.data:  # (the header holds the parts' sizes)
            parts.append(bytearray(n))
            comm.Recv([parts[-1], MPI.BYTE], source=0, tag=MODEL_DATA)
        newest.data = parts
    return newest


def model_parts(model) -> tuple[list, str]:
    """A model's contents (:meth:`otfml.gp.SparseGP.contents`, compact) as parts to send,
    and their checksum: a pickle stream, then the bytes of each of its arrays as they are
    in memory (out of band: not copied)."""
    buffers: list = []
    stream = pickle.dumps(model.contents(compact=True), protocol=5,
                          buffer_callback=buffers.append)
    parts = [stream] + [b.raw() for b in buffers]
    return parts, checksum(parts)


def checksum(parts: list) -> str:
    """CRC-32 of the bytes of ``parts`` in turn, as 8 hex digits."""
    crc = 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    return f"{crc:08x}"


def model_from_parts(parts: list):
    """The model (prediction only) of :func:`model_parts`'s parts (arrays made on the
    received bytes, not copied)."""
    from ..gp import SparseGP

    return SparseGP.from_contents(pickle.loads(parts[0], buffers=parts[1:]),
                                  "a model version")


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
