"""ASE calculator that learns on the fly (the user-facing entry point)."""

from __future__ import annotations

import logging

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .learner import Learner
from .policy import LearningPolicy
from .reference import make_reference

__all__ = ["OTFCalculator"]

log = logging.getLogger(__name__)


class OTFCalculator(Calculator):
    """On-the-fly learning calculator.

    Energy and forces come either from the sparse GP model or, where the model
    is unsure, from the reference; they are never mixed. Each reference result is
    appended to the HDF5 store and the model is updated before the step returns.

    Parameters
    ----------
    reference : ase Calculator or otfml Reference
        The reference, e.g. ``ase.calculators.mopac.MOPAC(method="PM7")``; any
        ASE calculator that gives energy and forces works.
    store : str, optional
        HDF5 store of labelled frames (created if missing; its frames
        warm-start the model). Without it nothing is kept on disk.
    force_tolerance : float, default 0.25
        Call the reference when the largest per-atom force-error estimate
        exceeds this, eV/Å (shortcut for ``policy``).
    policy : LearningPolicy, optional
        All learning settings (overrides ``force_tolerance``).
    model_settings : dict, optional
        Overrides of :data:`otfml.learner.MODEL_DEFAULTS`.
    charge, multiplicity : int, optional
        Used when ``atoms.info`` has no ``charge`` / ``multiplicity``.
    species : list of int, optional
        Atomic numbers the model must cover beyond those of the first structure.

    Results
    -------
    energy, free_energy : float, eV
    forces : (n_atoms, 3), eV/Å
    energy_std : float, eV -- standard deviation of the returned energy
    local_std : (n_atoms,), eV -- std of each local energy
    forces_std : (n_atoms,), eV/Å -- calibrated per-atom force-error estimate
    source : str -- "model" or "reference"
    The ``*_std`` results are 0 on reference steps (the values are the reference's).
    """

    implemented_properties = ["energy", "free_energy", "forces", "energy_std",
                              "local_std", "forces_std", "source"]

    def __init__(
        self,
        reference,
        store: str | None = None,
        force_tolerance: float = 0.25,
        policy: LearningPolicy | None = None,
        model_settings: dict | None = None,
        charge: int | None = None,
        multiplicity: int | None = None,
        species: list[int] | None = None,
    ) -> None:
        super().__init__()
        self.learner = Learner(
            make_reference(reference), store=store,
            policy=policy or LearningPolicy(force_tolerance=force_tolerance),
            model_settings=model_settings, species=species, charge=charge,
            multiplicity=multiplicity,
        )

    @property
    def model(self):
        """The :class:`otfml.gp.SparseGP` being trained."""
        return self.learner.model

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation (ASE's check, with a fast path).

        In MD the positions change at every step, and ASE's full comparison of
        every array took about 0.5 ms per step, a third of a model step. When
        the positions differ the answer is known; otherwise ASE compares the rest.
        """
        old = self.atoms
        if (old is not None and len(old) == len(atoms)
                and not np.array_equal(old.positions, atoms.positions)):
            return ["positions"]
        return super().check_state(atoms, tol)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        r = self.learner.step(self.atoms)
        self.results = {
            "energy": r.energy,
            "free_energy": r.energy,
            "forces": r.forces,
            "energy_std": r.energy_std,
            "local_std": r.local_std,
            "forces_std": r.forces_std,
            "source": r.source,
        }

    def close(self) -> None:
        """Close the store (also done when the process ends)."""
        self.learner.close()
