"""Calibration of the model's uncertainty into a force-error estimate (eV/Å).

The model's raw per-atom uncertainty ``u_i`` is its novelty (eV; see
:class:`otfml.gp.Prediction`).  It ranks errors but is not in force units, so
the policy keeps a calibration factor (1/Å) learned from what it observes: at
every reference call the model had predicted that geometry, so its actual
per-atom force errors are known.  The calibrated estimate::

    forces_std_i = scale * u_i        (eV/Å)

with ``scale`` the median over the recent calls of the least-squares fit of
the per-atom errors ``|F_model - F_ref|_i`` against ``u_i``, is what
``force_tolerance`` (eV/Å) is compared with (largest atom).  ``u`` is the
model's novelty (see :class:`otfml.gp.Prediction`), eV.  With the "element"
calibration each element has its own factor, fitted on its own atoms (the same
novelty can mean quite different errors on H and on C).

With the "floor" calibration the estimate is::

    forces_std_i = sqrt(floor**2 + (scale * u_i)**2)        (eV/Å)

with ``floor`` (eV/Å) and ``scale`` (1/Å) a non-negative least-squares fit of
the squared per-atom errors ``e_i**2 ~ floor**2 + scale**2 u_i**2`` over the
atoms of the recent calls.  A model's force error has a part its novelty does
not see (a floor, whatever the novelty); a fit through the origin turns that floor into a large
``scale``, so the estimate of every atom is inflated and the largest of many
crosses the tolerance by chance.  The floor model keeps it apart, so the
reference is asked where the novelty is high.

The "element_floor" calibration fits that floor and factor for each element on
its own atoms.  Where elements err differently whatever their novelty, one
floor misranks them (in water, oxygen's floor is well above hydrogen's).
"""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np
from ase.data import chemical_symbols

__all__ = ["calibrated"]

log = logging.getLogger(__name__)


def calibrated(uncertainty: np.ndarray, scale: float, numbers: np.ndarray | None = None,
               element_scales: dict | None = None, floor: float = 0.0,
               element_floors: dict | None = None) -> np.ndarray:
    """Per-atom force-error estimate (eV/Å) from the uncertainty (eV).

    Parameters
    ----------
    uncertainty : array (n_atoms,)
        Novelty, eV.
    scale : float
        Factor for every atom, or for the elements without their own, 1/Å.
    numbers : array of int (n_atoms,), optional
        Atomic numbers, needed for ``element_scales``.
    element_scales : dict, optional
        Factor per atomic number (int or str keys), 1/Å.
    floor : float, default 0
        Error the novelty does not see, eV/Å: the estimate is
        ``sqrt(floor**2 + (scale * u)**2)`` (the "floor" calibration).
    element_floors : dict, optional
        Floor per atomic number (int or str keys), eV/Å, with ``element_scales``
        the factors of the same fits (the "element_floor" calibration); elements
        without their own use ``floor`` and ``scale``.
    """
    u = np.asarray(uncertainty, dtype=float)
    per_element = numbers is not None and (element_scales or element_floors)
    if not per_element:
        return np.hypot(floor, scale * u) if floor else scale * u
    numbers = np.asarray(numbers, dtype=np.int64)

    def table(values: dict | None, default: float) -> np.ndarray:
        zs = [int(z) for z in (values or {})]
        t = np.full(max(int(numbers.max()), *zs) + 1, float(default))
        for z, v in (values or {}).items():
            t[int(z)] = v
        return t[numbers]

    scales = table(element_scales, scale)
    if not (floor or element_floors):
        return scales * u
    return np.hypot(table(element_floors, floor), scales * u)



class _Calibration:
    """The part of :class:`otfml.policy.LearningPolicy` that learns, at each reference call,
    how the model's novelty maps to its force error (``learning.calibration``)."""

    def _element_deque(self, z: int) -> deque:
        return self._by_element.setdefault(int(z), deque(maxlen=self.calibration_window))

    @property
    def scale(self) -> float:
        """Calibration factor from uncertainty (eV) to force error (eV/Å), 1/Å."""
        if self._scale is None:  # the median is asked for at every step: kept until a call
            if self._floored and self._pairs:
                self._fit_floor()
            else:
                self._scale = self._median_ratio()
        return self._scale

    def _median_ratio(self) -> float:
        """Median of the recent calls' factors (``initial_scale`` before the first call)."""
        return float(np.median(self._ratios)) if self._ratios else self.initial_scale

    @property
    def _floored(self) -> bool:
        return self.calibration in ("floor", "element_floor")

    @property
    def floor(self) -> float:
        """Error floor of the "floor" calibration, eV/Å (0 for the others; with
        "element_floor", the fit over all atoms, for elements not seen at a call)."""
        if not self._floored or not self._pairs:
            return 0.0
        if self._floor is None:
            self._fit_floor()
        return self._floor

    @staticmethod
    def _nnls_floor(u: np.ndarray, e: np.ndarray) -> tuple[float, float | None]:
        """Floor and factor of ``e^2 ~ floor^2 + scale^2 u^2`` (NNLS); factor None if 0."""
        from scipy.optimize import nnls

        (f2, s2), _ = nnls(np.column_stack([np.ones_like(u), u * u]), e * e)
        return float(np.sqrt(f2)), (float(np.sqrt(s2)) if s2 > 0 else None)

    def _fit_floor(self) -> None:
        """``e_i^2 ~ floor^2 + scale^2 u_i^2`` over the atoms of the recent calls (NNLS);
        with "element_floor", also over each element's atoms."""
        u = np.concatenate([p[0] for p in self._pairs])
        e = np.concatenate([p[1] for p in self._pairs])
        self._floor, s = self._nnls_floor(u, e)
        # no slope seen yet (e.g. every atom equally novel): the fit through the origin
        self._scale = s if s is not None else self._median_ratio()
        worst, where = self._floor, ""
        if self.calibration == "element_floor":
            self._element_floors, self._element_scales = {}, {}
            # atoms of pairs without atomic numbers (inherited from a "floor" stage): -1,
            # counted in the fit over all atoms above only
            z = np.concatenate([np.full(len(p[0]), -1) if p[2] is None else p[2]
                                for p in self._pairs])
            for el in np.unique(z[z >= 0]):
                sel = z == el
                f, s = self._nnls_floor(u[sel], e[sel])
                self._element_floors[int(el)] = f
                uu = float(u[sel] @ u[sel])
                self._element_scales[int(el)] = (
                    s if s is not None else
                    float(np.sqrt(e[sel] @ e[sel] / uu)) if uu > 0 else self._scale)
            if self._element_floors:
                el = max(self._element_floors, key=self._element_floors.get)
                worst, where = self._element_floors[el], f" of {chemical_symbols[el]}"
        # a young model's floor is high and falls as it learns: warn only when it has
        # stayed at or above the tolerance for a whole window of calls after the window
        # first filled
        high = worst >= self.force_tolerance and len(self._pairs) == self.calibration_window
        if not high:
            self._high_since = None
            self._floor_warned = False
        elif self._high_since is None:
            self._high_since = self._n_pairs
        elif (self._n_pairs - self._high_since >= self.calibration_window
              and not self._floor_warned):
            log.warning(
                "the model's force-error floor%s (%.3g eV/Å per atom, fitted at the last %d "
                "calls) has stayed at or above force_tolerance = %g eV/Å for the last %d calls: "
                "every step asks the reference. Raise learning.force_tolerance above the floor, "
                "or give the model more capacity (model.sparse_tolerance, "
                "model.max_sparse_per_species)", where, worst, len(self._pairs),
                self.force_tolerance, self._n_pairs - self._high_since)
            self._floor_warned = True

    @property
    def element_floors(self) -> dict[int, float]:
        """Floor per atomic number (eV/Å) of the "element_floor" calibration ({} otherwise)."""
        if self.calibration != "element_floor" or not self._pairs:
            return {}
        if self._element_floors is None:
            self._fit_floor()
        return self._element_floors

    @property
    def element_scales(self) -> dict[int, float]:
        """Factor per atomic number (1/Å) of the "element" and "element_floor" calibrations
        ({} otherwise)."""
        if self.calibration == "element_floor":
            return self.element_floors and self._element_scales
        if self.calibration != "element":
            return {}
        if self._element_scales is None:  # kept until a call, like scale
            self._element_scales = {z: float(np.median(d)) for z, d in self._by_element.items()}
        return self._element_scales

    def error_floors(self) -> dict[str, float]:
        """Per element, the force error (eV/Å per atom) the model keeps however certain it
        is: the floor of ``e^2 ~ floor^2 + scale^2 u^2`` fitted on that element's atoms at
        the recent calls, whatever the calibration. {} before a call."""
        out = {}
        pairs = [p for p in self._pairs if p[2] is not None]
        if not pairs:
            return out
        u, e, z = (np.concatenate([p[k] for p in pairs]) for k in range(3))
        for el in np.unique(z):
            out[chemical_symbols[int(el)]] = self._nnls_floor(u[z == el], e[z == el])[0]
        return out

    def model_calibration(self) -> dict:
        """The calibration to save with a model (``SparseGP.save``'s ``extra``), with the
        error floors per element (:meth:`error_floors`)."""
        out = {"force_std_scale": self.scale}
        floors = self.error_floors()
        if floors:
            out["force_error_floor_eV_A"] = floors
        if self.floor:
            out["force_std_floor"] = self.floor
        if self.element_scales:
            out["force_std_element_scales"] = {str(z): f for z, f in self.element_scales.items()}
        if self.element_floors:
            out["force_std_element_floors"] = {str(z): f for z, f in self.element_floors.items()}
        return out

    def force_std(self, uncertainty: np.ndarray, numbers: np.ndarray | None = None) -> np.ndarray:
        """Calibrated per-atom force-error estimate (eV/Å) from the uncertainty (eV).

        ``numbers`` (atomic numbers, n_atoms) select the per-element factors of
        the "element" calibration.
        """
        return calibrated(uncertainty, self.scale, numbers, self.element_scales, self.floor,
                          self.element_floors)

    def novelty_at_tolerance(self, numbers: np.ndarray | None = None) -> float | None:
        """Novelty (eV) at which the calibrated estimate reaches the tolerance.

        The smallest over the elements ``numbers`` (atomic numbers) holds with
        the per-element calibrations.  None before the first observed call, and
        with a floor when the floor alone reaches the tolerance (for every element).
        """
        if not self._ratios:
            return None
        tol, scale, floor = self.tolerance, self.scale, self.floor
        floors, scales = self.element_floors, self.element_scales
        # the estimate sqrt(f^2 + (s u)^2) reaches tol at u = sqrt(tol^2 - f^2) / s (f = 0
        # without a floor), per element where the calibration has one
        per_element = numbers is not None and (floors or scales)
        zs = [int(z) for z in np.unique(numbers)] if per_element else [None]
        at = [math.sqrt(tol**2 - f**2) / s
              for f, s in ((floors.get(z, floor), scales.get(z, scale)) for z in zs) if f < tol]
        return min(at) if at else None

    def observe(self, uncertainty: np.ndarray, force_error: np.ndarray,
                numbers: np.ndarray | None = None) -> None:
        """Record a call's prediction uncertainty and the model's actual error.

        Parameters
        ----------
        uncertainty : array (n_atoms,)
            Model per-atom uncertainty (novelty) at that geometry, eV.
        force_error : array (n_atoms,)
            ``|F_model - F_ref|`` per atom, eV/Å.
        numbers : array of int (n_atoms,), optional
            Atomic numbers, for the per-element factors.
        """
        u = np.asarray(uncertainty, dtype=float)
        e = np.asarray(force_error, dtype=float)
        uu = float(u @ u)
        if uu > 0 and np.all(np.isfinite(u)) and np.all(np.isfinite(e)):
            if self.calibration == "max":
                self._ratios.append(float(e.max() / u.max()))
            else:  # per atom: least-squares fit e_i ~ scale * u_i through the origin
                self._ratios.append(float(np.sqrt((e @ e) / uu)))
            self._errors.append(float(e.max()))
            self._scale = None
            # kept whatever the calibration: the floors are reported (error_floors)
            self._pairs.append((u.copy(), e.copy(), None if numbers is None
                                else np.asarray(numbers).copy()))
            self._n_pairs += 1
            self._floor = None
            self._element_floors = None
            if numbers is not None:
                numbers = np.asarray(numbers)
                for z in np.unique(numbers):
                    uz, ez = u[numbers == z], e[numbers == z]
                    if uz @ uz > 0:
                        self._element_deque(z).append(float(np.sqrt((ez @ ez) / (uz @ uz))))
                self._element_scales = None

