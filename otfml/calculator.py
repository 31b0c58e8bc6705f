"""ASE calculator that learns on the fly (the user-facing entry point)."""

from __future__ import annotations

import logging

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .learner import Learner
from .policy import LearningPolicy
from .reference import make_reference
from .settings import default

__all__ = ["OTFCalculator"]

log = logging.getLogger(__name__)


class _Results(dict):
    """Calculator results of which some are computed on first read.

    ``in``, ``[]``, ``get`` and ``copy`` see the lazy entries as present; a
    read computes and stores the value.
    """

    def __init__(self, values: dict, lazy: dict) -> None:
        super().__init__(values)
        self._lazy = lazy

    def __missing__(self, key):
        if key not in self._lazy:
            raise KeyError(key)
        value = self[key] = self._lazy.pop(key)()
        return value

    def __contains__(self, key) -> bool:
        return super().__contains__(key) or key in self._lazy

    def get(self, key, default=None):
        return self[key] if key in self else default

    def copy(self) -> dict:
        return {**self, **{key: self[key] for key in list(self._lazy)}}


def _identical(a, b) -> bool:
    """True if every property ASE's ``compare_atoms`` checks is exactly equal."""
    if not (np.array_equal(a.cell.array, b.cell.array) and np.array_equal(a.pbc, b.pbc)):
        return False
    for key in set(all_changes) - {"cell", "pbc"}:
        x, y = a.arrays.get(key), b.arrays.get(key)
        if (x is None) != (y is None) or (x is not None and not np.array_equal(x, y)):
            return False
    return True


class OTFCalculator(Calculator):
    """On-the-fly learning calculator.

    Energy and forces come from the sparse GP model. Where the model is unsure,
    the reference labels the geometry first: the label is appended to the HDF5
    store and the model is updated before the step returns, and the step returns
    the reference's values (``learning.call_step_result: reference``, the
    default) or the updated model's prediction there (``updated_model``).
    Energy and forces of one step always come from one source.

    Parameters
    ----------
    reference : ase Calculator or otfml Reference
        The reference, e.g. ``ase.calculators.mopac.MOPAC(method="PM7")``; any
        ASE calculator that gives energy and forces works.
    store : str, optional
        HDF5 store of labelled frames (created if missing; its frames
        warm-start the model). Without it nothing is kept on disk.
    force_tolerance : float, default 0.2
        Call the reference when the largest per-atom force-error estimate
        exceeds this, eV/Å (shortcut for ``policy``).
    policy : LearningPolicy, optional
        All learning settings (overrides ``force_tolerance``).
    model_settings : dict, optional
        Overrides of :data:`otfml.training.MODEL_DEFAULTS`.
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
    source : str -- "model", "reference", or "updated_model" (a step that called the
    reference and returns the updated model's prediction; ``learning.call_step_result``)
    The ``*_std`` results are 0 on reference steps (the values are the reference's).
    ``energy_std`` and ``local_std`` are computed when first read (from
    ``results`` or ``get_property``): the MD step does not need them.
    """

    implemented_properties = ["energy", "free_energy", "forces", "energy_std",
                              "local_std", "forces_std", "source"]

    def __init__(
        self,
        reference,
        store: str | None = None,
        force_tolerance: float = default("learning", "force_tolerance"),
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

    @classmethod
    def from_learner(cls, learner: Learner) -> OTFCalculator:
        """A calculator around an existing learner (e.g. a parallel session's walker,
        :class:`otfml.parallel.ParallelSession`)."""
        calc = cls.__new__(cls)
        Calculator.__init__(calc)
        calc.learner = learner
        return calc

    @property
    def model(self):
        """The :class:`otfml.gp.SparseGP` being trained."""
        return self.learner.model

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """What changed since the last calculation (ASE's check, with fast paths).

        ASE's generic comparison of every checked property is slow next to a model
        step, and an ASE MD step asks three times (once after the move, twice
        more with the same atoms). Positions differ: the answer is known.
        Everything ASE compares is exactly equal: nothing changed. Otherwise
        ASE's own check decides.
        """
        old = self.atoms
        if old is not None and len(old) == len(atoms):
            if not np.array_equal(old.positions, atoms.positions):
                return ["positions"]
            if _identical(old, atoms):
                return []
        return super().check_state(atoms, tol)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        r = self.learner.step(self.atoms)
        self.results = _Results(
            {"energy": r.energy, "free_energy": r.energy, "forces": r.forces,
             "forces_std": r.forces_std, "source": r.source},
            lazy={"energy_std": lambda: r.energy_std, "local_std": lambda: r.local_std})

    def confirm(self, atoms) -> tuple[float, np.ndarray]:
        """Label ``atoms`` with the reference now, whatever the model's uncertainty.

        The frame is stored and learned like any reference call; ``atoms`` then holds
        the reference's results (e.g. to confirm a minimum found on the model).

        Returns
        -------
        energy : float
            The reference's energy, eV.
        forces : ndarray, shape (n_atoms, 3)
            The reference's forces, eV/Å.
        """
        self.learner.request_reference = True
        self.reset()  # the same geometry must be computed again
        atoms.calc = self
        return float(atoms.get_potential_energy()), atoms.get_forces()

    def close(self) -> None:
        """Close the store (also done when the process ends)."""
        self.learner.close()
