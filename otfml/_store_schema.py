"""The store's layout: schema versions, row types, and one labelled frame as read."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from ase import Atoms

SCHEMA_VERSION = 2
#: schema versions this otfml reads and appends to
_READS = (1, 2)
_FORMAT = "otfml-store"
UNITS = {"energy": "eV", "positions": "Angstrom", "forces": "eV/Angstrom",
         "cell": "Angstrom", "max_std": "eV/Angstrom"}

_FRAME_DTYPE = np.dtype([
    ("natoms", "i4"), ("offset", "i8"), ("energy", "f8"), ("charge", "i4"),
    ("multiplicity", "i4"), ("cell", "f8", (3, 3)), ("pbc", "?", (3,)), ("step", "i8"),
    ("walker", "i4"), ("max_std", "f8"), ("time", "f8"), ("fingerprint", "i4"),
    ("model_version", "i8"),
])
_ATOM_DTYPE = np.dtype([("number", "i4"), ("position", "f8", (3,)), ("force", "f8", (3,))])
_MAX_FINGERPRINTS = 1024
_FINGERPRINT_BYTES = 2048


@dataclass
class Frame:
    """One labelled frame as stored.

    Attributes
    ----------
    atoms : ase.Atoms
        Structure with ``info['charge']``, ``info['multiplicity']``.
    energy : float
        Reference energy, eV.
    forces : ndarray, shape (n_atoms, 3)
        Reference forces, eV/Å.
    fingerprint : dict
        Reference fingerprint (code, version, method, keywords, charge, multiplicity).
    step, walker : int
        Where the call was made.
    max_std : float
        Largest per-atom force-error estimate when the call was made, eV/Å (NaN if none).
    time : float
        UNIX time of the append.
    model_version : int
        The model version a parallel run's walker predicted with when it asked (-1: none).
    """

    atoms: Atoms
    energy: float
    forces: np.ndarray
    fingerprint: dict
    step: int = -1
    walker: int = 0
    max_std: float = float("nan")
    time: float = 0.0
    model_version: int = -1


def fingerprint_key(fp: dict) -> str:
    """Canonical JSON text of a fingerprint (how fingerprints are compared)."""
    return json.dumps(fp, sort_keys=True)
