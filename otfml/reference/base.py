"""What every reference is: ``compute(atoms, charge, multiplicity) -> Label`` and a fingerprint."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from ase import Atoms

from ..errors import ReferenceFailed

__all__ = ["Label", "Reference"]


@dataclass
class Label:
    """A reference result.

    Attributes
    ----------
    energy : float
        Energy, eV (MOPAC: heat of formation).
    forces : ndarray, shape (n_atoms, 3)
        Forces, eV/Å.
    fingerprint : dict
        Where the label comes from.
    seconds : float
        Wall time of the call.
    """

    energy: float
    forces: np.ndarray
    fingerprint: dict
    seconds: float


class Reference:
    """Base class: ``compute(atoms, charge, multiplicity) -> Label``."""

    #: short name of the code, recorded in fingerprints
    code = "unknown"
    #: the reference runs in a process of its own (the learner then prepares the
    #: model's update meanwhile, ``model.overlap_update``)
    external_process = False

    def fingerprint(self, charge: int, multiplicity: int) -> dict:
        """Fingerprint of labels this reference makes for this charge/multiplicity."""
        raise NotImplementedError

    def compute(self, atoms: Atoms, charge: int = 0, multiplicity: int = 1) -> Label:
        """Label one structure (energy eV, forces eV/Å)."""
        raise NotImplementedError

    def _checked(self, atoms: Atoms, energy: float, forces: np.ndarray) -> tuple[float, np.ndarray]:
        forces = np.asarray(forces, dtype=float).reshape(-1, 3)
        if forces.shape[0] != len(atoms):
            raise ReferenceFailed(
                f"{self.code} returned forces for {forces.shape[0]} atoms, expected {len(atoms)}")
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))):
            raise ReferenceFailed(f"{self.code} returned NaN/inf energy or forces")
        return float(energy), forces


