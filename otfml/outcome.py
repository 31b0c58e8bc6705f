"""What a learner's step returns, and what happens to a step whose reference failed."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from .errors import ReferenceFailed, UnphysicalGeometry
from .gp import Prediction

__all__ = ["StepResult"]

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    """What one step returned.

    Attributes
    ----------
    energy : float
        eV.
    forces : ndarray (n_atoms, 3)
        eV/Å.
    source : str
        Where energy and forces come from (never mixed): ``"model"``,
        ``"reference"``, or ``"updated_model"`` (the reference was called, and
        the model's prediction after learning its label is returned; see
        ``LearningPolicy.call_step_result``).
    forces_std : ndarray (n_atoms,)
        Calibrated force-error estimate per atom, eV/Å (zero for reference values).
    max_force_std : float
        Largest calibrated force-error estimate of the model at this geometry,
        before any update, eV/Å (NaN where there was no model yet).
    reason : str
        Why the reference was or was not asked.
    prediction : Prediction or None
        The model's prediction the values come from (None for reference values).
    energy_std, local_std
        Predictive std of the returned energy (eV) and of each local energy
        (eV per atom); zero for reference values.  Computed on first access.
    """

    energy: float
    forces: np.ndarray
    source: str
    forces_std: np.ndarray
    max_force_std: float
    reason: str
    prediction: Prediction | None = None

    @property
    def called(self) -> bool:
        """True if this step's geometry was labelled by the reference (and learned)."""
        return self.source != "model"

    @property
    def energy_std(self) -> float:
        return 0.0 if self.prediction is None else self.prediction.energy_std

    @property
    def local_std(self) -> np.ndarray:
        if self.prediction is None:
            return np.zeros(len(self.forces))
        return self.prediction.local_std



class _Failures:
    """The part of :class:`otfml.learner.Learner` that handles geometries and labels it
    refuses, and reference failures (``learning.on_reference_failure``)."""

    def _isolated(self, atoms: Atoms, step: int) -> UnphysicalGeometry:
        """The error for atoms with no neighbour within the descriptor cutoff."""
        cutoff = self.model.descriptor.cutoff
        d = atoms.get_all_distances()
        np.fill_diagonal(d, np.inf)
        lonely = np.flatnonzero(d.min(axis=1) >= cutoff)
        names = ", ".join(f"{i} ({atoms[i].symbol}, {d[i].min():.2f} Å)" for i in lonely[:10])
        return UnphysicalGeometry(
            f"step {step}: atoms {names} have no neighbour within the model's cutoff of "
            f"{cutoff:g} Å: the structure has flown apart. It was not sent to the "
            "reference; nothing was stored. Lower the time step, the temperature or "
            "learning.force_tolerance")

    def _after_failure(self, err: ReferenceFailed, pred, step: int, dec) -> StepResult:
        """Stop, or (``on_reference_failure: use_model``) go on with the model's prediction."""
        self.n_failures += 1
        self.failures_in_a_row += 1
        p = self.policy
        if (p.on_reference_failure != "use_model" or pred is None
                or isinstance(err, UnphysicalGeometry)):
            raise err
        if self.failures_in_a_row > p.max_consecutive_failures:
            log.error("%d reference failures in a row (learning.max_consecutive_failures = %d):"
                      " stopping", self.failures_in_a_row, p.max_consecutive_failures)
            raise err
        log.warning("%s\n-> step %d uses the model's prediction (learning.on_reference_failure"
                    " = use_model; %d failure(s) in a row); nothing was stored", err, step,
                    self.failures_in_a_row)
        return StepResult(pred.energy, pred.forces, "model", dec.force_std, dec.max_force_std,
                          "reference failed", pred)

    def _check_label(self, label, pred, atoms, step: int) -> None:
        """Refuse a label implausibly far from a trained model's prediction and from the
        last label alike, per atom (e.g. a false SCF). A young model can be far off where
        the labels themselves are not."""
        limit = self.policy.label_check
        if limit is None or pred is None or self.model.n_frames < max(self.policy.initial_calls,
                                                                       2):
            return
        per_atom = abs(label.energy - pred.energy) / len(atoms)
        last = self.last_label_per_atom
        if last is not None and abs(label.energy / len(atoms) - last) <= limit:
            return
        if per_atom > limit:
            raise ReferenceFailed(
                f"step {step}: implausible reference label: energy {label.energy:.4f} eV "
                f"against the model's {pred.energy:.4f} eV, {per_atom:.3f} eV/atom apart "
                f"(learning.label_check = {limit} eV/atom). A reference that reports success "
                "with a wrong energy (e.g. MOPAC with too few SCF iterations) would poison the "
                "model, so the frame was not stored. If the change is real (a reaction), raise "
                "learning.label_check or set it to null")

