"""Keep on-the-fly MD from heating: give back the energy each model update adds.

A model learns where it was wrong. Where MD walks into a region whose energy
the model puts too low, the model's forces speed the atoms up; the update at
the reference call then lifts the model's energy at that geometry, but the
kinetic energy gained stays, and the run heats as it learns
(``python benchmarks/temperature.py --ensemble nve`` measures it).

:class:`EnergyCompensation` is an ASE dynamics observer that keeps ``K + U``
constant, ``U`` being the surface that gave the forces at the step (the model
as it is, or the reference at a call), by scaling the momenta whenever ``U``
changes.  A velocity Verlet step from ``x`` to ``x'`` takes its force at ``x``
from the step before's surface ``U_a`` and at ``x'`` from the new one ``U_b``,
so ``K + U`` moves by the mean of ``U_b - U_a`` at the two ends; that is the
energy taken out.  Where an end needs the reference's energy at a geometry the
reference did not see, it is extrapolated from the other end with the
reference's forces there (first order in the step):

* model, then a call returning the reference's values: at the call, the
  reference's energy less the prediction before the update; at the step
  before, the reference's energy extrapolated there less the model's;
* that call, then the model that learned it: the updated model less the
  reference at both ends, the reference extrapolated to the new geometry;
* two calls in a row returning the reference's values: nothing (the step ran on
  the reference alone);
* model, then a call returning the updated model's values
  (``call_step_result: updated_model``): ``V_new - V_old`` at both ends.

Each change costs one more prediction, at the step before's geometry, where the
new surface is a model.  So ``K + U`` is conserved, and the total energy on the
reference's surface, ``K + E_ref = K + U - (U - E_ref)``, differs from it by the
model's present error alone: nothing builds up.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from ase import Atoms

__all__ = ["EnergyCompensation"]

log = logging.getLogger(__name__)


class EnergyCompensation:
    """ASE dynamics observer that takes each change of the force surface out of the kinetic energy.

    Attach it to the dynamics with ``interval=1``: each step is compared with
    the one before (module notes).  When the surface that gives the forces
    changed between them, the momenta are scaled so that the kinetic energy
    drops by that change (eV).  At most ``max_fraction`` of the kinetic energy
    is taken at once; what is left over is taken at the following steps.

    Parameters
    ----------
    atoms : ase.Atoms
        The atoms the dynamics moves; their calculator is an
        :class:`otfml.OTFCalculator`.
    max_fraction : float, default 0.5
        Largest fraction of the kinetic energy taken (or added) at one step.
    min_frames : int, default 0
        Changes at steps where the model held fewer frames than this are not
        compensated (they are still measured and kept in ``shifts``).  Any
        value above 0 lets the run keep the energy those updates add.

    Attributes
    ----------
    total : float
        Energy taken out of the kinetic energy so far, eV (negative: given).
    pending : float
        Energy not yet taken (the cap), eV.
    shifts : list of (int, float)
        Every change of surface seen: the learner's step and the energy, eV,
        applied or not.

    Examples
    --------
    >>> dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.002 / units.fs,
    ...                fixcm=False)
    >>> dyn.attach(EnergyCompensation(atoms), interval=1)
    """

    def __init__(self, atoms: Atoms, max_fraction: float = 0.5, min_frames: int = 0) -> None:
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
        # the step before: learner step, on the reference?, positions (N, 3) Å, energy eV,
        # the reference's forces (N, 3) eV/Å (None on a model step)
        self._before: tuple[int, bool, np.ndarray, float, np.ndarray | None] | None = None
        self._warned = False  # about steps it did not see

    def __call__(self) -> None:
        calc = self.atoms.calc
        learner = calc.learner
        last = learner.history[-1] if learner.history else None
        if (last is not None and (self._before is None or self._before[0] != last["step"])
                and calc.atoms is not None
                and np.array_equal(calc.atoms.positions, self.atoms.positions)):
            on_reference = last["source"] == "reference"
            # the reference's forces extrapolate its energy to a step's other end; the
            # model's are never needed
            forces = np.array(calc.results["forces"], dtype=float) if on_reference else None
            change = self._change(learner, last, forces)
            self._before = (last["step"], on_reference, self.atoms.positions.copy(),
                            last["energy"], forces)
            if change is not None:
                self.shifts.append((last["step"], change))
                if last["frames"] >= self.min_frames:  # frames before this step's update
                    self.pending += change
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

    def _energy_at(self, learner, positions: np.ndarray) -> float:
        """The model's energy (eV) at other positions of these atoms."""
        x = self.atoms.copy()
        x.calc = None
        x.positions = positions
        return learner.predict(x).energy

    def _change(self, learner, last: dict, forces: np.ndarray | None) -> float | None:
        """How much the force surface changed from the step before to this one, eV
        (the mean over the step's two ends); None where it did not change.

        ``forces`` (N, 3), eV/Å: this step's reference forces (None on a model step).
        """
        before = self._before
        called = last["called"]
        old = last["model_energy"]  # the model before this step's update, here
        if before is None or before[0] != last["step"] - 1:
            if before is not None and not self._warned:
                log.warning("EnergyCompensation saw learner step %d after step %d: attach it "
                            "to the dynamics with interval=1, or it compensates only the "
                            "updates it sees, by their shift at the call", last["step"],
                            before[0])
                self._warned = True
            # the step before was not seen: the update's shift at this geometry
            if called and old is not None:
                return self._energy_at(learner, self.atoms.positions) - old
            return None
        _, was_reference, x_before, e_before, f_before = before
        on_reference = forces is not None
        if (not called and not was_reference) or (on_reference and was_reference):
            return None  # the same model, or the reference at both ends
        dx = self.atoms.positions - x_before  # (N, 3), Å
        if on_reference:  # the model as it was before this update -> the reference
            if old is None:
                return None
            here = last["energy"] - old
            there = last["energy"] + float(np.vdot(forces, dx)) - e_before
        else:  # -> the model as it is now (updated at this step if called)
            there = self._energy_at(learner, x_before) - e_before
            if was_reference:
                here = last["energy"] - (e_before - float(np.vdot(f_before, dx)))
            else:
                here = last["energy"] - old
        return 0.5 * (here + there)
