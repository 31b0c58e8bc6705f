"""What ranks send each other: labels, model versions, and the end of a walker's work."""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms

#: message tags
LABEL, MODEL, DONE = 11, 12, 13


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
        The model file (:meth:`otfml.gp.SparseGP.save`).
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


def model_bytes(model) -> tuple[bytes, str]:
    """A model's file as bytes, and their checksum."""
    buf = io.BytesIO()
    model.save(buf, compact=True)
    data = buf.getvalue()
    return data, checksum(data)


def checksum(data: bytes) -> str:
    """Hex SHA-256 digest of ``data`` (the first 32 hex digits)."""
    return hashlib.sha256(data).hexdigest()[:32]


def model_from_bytes(data: bytes):
    """The model (prediction only) of :func:`model_bytes`'s bytes."""
    from ..gp import SparseGP

    return SparseGP.load(io.BytesIO(data))
