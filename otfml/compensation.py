"""Keep on-the-fly MD from heating: give back the energy each model update adds.

A model learns where it was wrong. Where MD walks into a region whose energy
the model puts too low, the model's forces speed the atoms up; the update at
the reference call then lifts the model's energy at that geometry, but the
kinetic energy gained stays. On aspirin/PM7 (velocity Verlet, 3000 steps) the
total energy on MOPAC's surface rose by 0.43 eV/ps this way (plain MOPAC MD:
0.001 eV/ps), about as much as the sum of the energy shifts of the updates at
their geometries. In that NVE test, using the updated model's forces instead
of MOPAC's at the call steps did not help (0.49 eV/ps): the updates feed
energy in.  In Langevin MD at 500 K with this compensation, the switch of
surfaces did matter: over 10,000 aspirin steps the runs that took MOPAC's
values at the calls heated to about 600 K while MOPAC was asked at every
third step; the first two with the updated model's values
(``learning.call_step_result: updated_model``) stayed near 500 K with
7-10 % calls.  Later runs of both kinds spread widely (benchmarks/README.md).

:class:`EnergyCompensation` is an ASE dynamics observer that, after each step
the reference labelled, takes the update's energy shift at that geometry out of
the kinetic energy (scaling the momenta), so the model's total energy does not
jump at updates.  Updates of a young model are left alone: they also move its
energy as a whole (the per-element baseline, the hyperparameters), which heats
nothing, and taking those moves out cooled aspirin NVE by 0.31 eV in its first
600 steps; starting at 100 frames, by 0.08 eV (``benchmarks/temperature.py``).
"""

from __future__ import annotations

import logging
import math

import numpy as np
from ase import Atoms

__all__ = ["EnergyCompensation"]

log = logging.getLogger(__name__)


class EnergyCompensation:
    """ASE dynamics observer that takes each model update's energy shift out of the kinetic energy.

    After a step that called the reference, the updated model's energy at
    that geometry minus the model's prediction before the update (eV) is
    the shift; the momenta are scaled so that the kinetic energy changes by
    minus the shift.  At most ``max_fraction`` of the kinetic energy is taken
    at once; what is left over is taken at the following steps.

    Parameters
    ----------
    atoms : ase.Atoms
        The atoms the dynamics moves; their calculator is an
        :class:`otfml.OTFCalculator`.
    max_fraction : float, default 0.5
        Largest fraction of the kinetic energy taken (or added) at one step.
    min_frames : int, default 100
        Updates of a model with fewer frames than this are not compensated
        (their shifts are still measured and kept in ``shifts``).

    Attributes
    ----------
    total : float
        Energy taken out of the kinetic energy so far, eV (negative: given).
    pending : float
        Shift not yet applied (the cap), eV.
    shifts : list of (int, float)
        Every update seen: the learner's step and the shift there, eV, applied
        or not.

    Examples
    --------
    >>> dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.002 / units.fs,
    ...                fixcm=False)
    >>> dyn.attach(EnergyCompensation(atoms), interval=1)
    """

    def __init__(self, atoms: Atoms, max_fraction: float = 0.5, min_frames: int = 100) -> None:
        if not 0 < max_fraction < 1:
            raise ValueError(f"max_fraction={max_fraction}; it must be between 0 and 1")
        if min_frames < 0:
            raise ValueError(f"min_frames={min_frames}; it must be >= 0")
        self.atoms = atoms
        self.max_fraction = float(max_fraction)
        self.min_frames = int(min_frames)
        self.total = 0.0
        self.pending = 0.0
        self.shifts: list[tuple[int, float]] = []

    def __call__(self) -> None:
        calc = self.atoms.calc
        learner = calc.learner
        last = learner.history[-1] if learner.history else None
        if (last is not None and last["called"]
                and last["model_energy"] is not None
                and (not self.shifts or self.shifts[-1][0] != last["step"])
                and calc.atoms is not None
                and np.array_equal(calc.atoms.positions, self.atoms.positions)):
            shift = learner.predict(self.atoms).energy - last["model_energy"]
            self.shifts.append((last["step"], shift))
            if last["frames"] >= self.min_frames:  # frames before this update
                self.pending += shift
        if self.pending == 0.0:
            return
        ke = self.atoms.get_kinetic_energy()
        if ke <= 0.0:
            return
        take = float(np.clip(self.pending, -self.max_fraction * ke, self.max_fraction * ke))
        self.atoms.set_momenta(self.atoms.get_momenta() * math.sqrt((ke - take) / ke),
                               apply_constraint=False)
        self.pending -= take
        self.total += take
        log.debug("%.4f eV taken from the kinetic energy (%.4f eV pending)", take,
                  self.pending)
