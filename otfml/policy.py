"""When to ask the reference: a pure decision on the calibrated uncertainty.

The force-error estimate comes from :mod:`otfml.calibration`; the policy compares
the largest atom's estimate with ``force_tolerance`` (or an adaptive tolerance)
and adds the rules around it: initial calls, a minimum interval, forced calls and
a budget.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .calibration import _Calibration, calibrated
from .errors import ConfigError
from .settings import CALIBRATIONS, CALL_STEP_RESULTS, default

__all__ = ["LearningPolicy", "Decision"]

log = logging.getLogger(__name__)


@dataclass
class Decision:
    """Outcome of :meth:`LearningPolicy.decide`.

    Attributes
    ----------
    call : bool
        Ask the reference for this step.
    reason : str
        Why (``"uncertain"``, ``"forced"``, ``"no model"``, ``"trusted"``,
        ``"budget exhausted"``, ``"min interval"``).
    max_force_std : float
        Largest calibrated per-atom force-error estimate, eV/Å (NaN without a model).
    force_std : ndarray (n_atoms,) or None
        The calibrated per-atom force-error estimate, eV/Å (None without a model).
    """

    call: bool
    reason: str
    max_force_std: float = float("nan")
    force_std: np.ndarray | None = field(default=None, repr=False)


@dataclass
class LearningPolicy(_Calibration):
    """Settings of the learning loop.

    Parameters
    ----------
    force_tolerance : float, default 0.2
        Call the reference when the largest per-atom force-error estimate
        exceeds this, eV/Å.
    adaptive : bool, default False
        Let the tolerance follow the running mean of the observed force errors
        at the recent calls (in the spirit of VASP's ML_CTIFOR), never below
        ``force_tolerance * 0.5`` nor above ``force_tolerance * 2``.
    min_steps_between_calls : int, default 0
        At least this many model steps between two reference calls. The model
        is trusted in between even where it says it is uncertain: use it with an
        accurate model.
    force_call_every : int, optional
        Call the reference every N steps whatever the uncertainty.
    max_calls : int, optional
        Total budget of reference calls; afterwards the model is trusted.
    initial_calls : int, default 2
        The first steps that always call the reference (to have a model at all).
    calibration_window : int, default 50
        Number of recent calls the calibration factor is taken over.
    initial_scale : float, default 1.0
        Calibration factor (1/Å) before any call has been observed.
    on_reference_failure : {"stop", "use_model"}, default "stop"
        When the reference fails (after its own retries) or returns an
        implausible label: stop the run with the error, or use the model's
        prediction for that step (logged; the frame is not stored) and go on.
    max_consecutive_failures : int, default 3
        With ``use_model``: stop anyway after this many failures in a row.
    label_check : float or None, default 1.0
        eV per atom. A reference energy further than this from the model's
        prediction (with at least ``initial_calls`` frames learned) is refused as
        implausible (e.g. a false SCF convergence) and not stored. None: no check.
    allow_fragmentation : bool, default False
        Accept geometries with more bonded fragments than the first one (e.g.
        a dissociation). By default such a geometry stops the run before the
        reference is called, naming the atoms that left.
    calibration : {"atom", "element", "max", "floor", "element_floor"}, default "element_floor"
        How a call's observation updates the factor: a least-squares fit of the
        per-atom errors against the per-atom novelty through the origin
        (``sqrt(sum e_i^2 / sum u_i^2)``), one per element ("element"; an
        element not seen at a call yet uses the fit over all atoms) or one for
        all atoms ("atom"), or the ratio of the largest error to the largest
        novelty ("max"), or a floor plus a factor, ``sqrt(floor^2 + scale^2
        u_i^2)``, fitted to the squared per-atom errors of the recent calls
        ("floor"; see the module's notes), or such a floor and factor for each
        element, fitted on its own atoms ("element_floor").
    decide_on : {"learnable", "estimate"}, default "learnable"
        What is compared with ``force_tolerance``: the part of an atom's estimate another
        label can reduce (``scale_z * u_i``, without the floor of the floor calibrations),
        so that the tolerance means the same at any size, or the whole estimate.
    call_step_result : {"reference", "updated_model"}, default "reference"
        What a step that called the reference returns: the reference's energy
        and forces, or the model's prediction at that geometry after it has
        learned the label.  The label is stored and learned either way.  With
        "updated_model" MD never switches between the model's surface and the
        reference's.
    sparse_admission : float or None, default None
        A fraction: at a call, the environments whose novelty exceeds it times
        the novelty at which the calibrated estimate reaches the tolerance join
        the model's sparse set even when ``model.sparse_tolerance`` would leave
        them out (never below a quarter of it), while that species' set is below
        80 % of ``model.max_sparse_per_species``, so that a call lowers the
        uncertainty that caused it.  None: only ``model.sparse_tolerance``.

    The defaults are those of :data:`otfml.settings.SCHEMA` (``learning.*``).
    """

    force_tolerance: float = default("learning", "force_tolerance")
    adaptive: bool = default("learning", "adaptive")
    min_steps_between_calls: int = default("learning", "min_steps_between_calls")
    force_call_every: int | None = default("learning", "force_call_every")
    max_calls: int | None = default("learning", "max_calls")
    initial_calls: int = default("learning", "initial_calls")
    calibration_window: int = 50
    initial_scale: float = 1.0
    calibration: str = default("learning", "calibration")
    decide_on: str = default("learning", "decide_on")
    on_reference_failure: str = default("learning", "on_reference_failure")
    max_consecutive_failures: int = default("learning", "max_consecutive_failures")
    label_check: float | None = default("learning", "label_check")
    allow_fragmentation: bool = default("learning", "allow_fragmentation")
    call_step_result: str = default("learning", "call_step_result")
    sparse_admission: float | None = default("learning", "sparse_admission")
    _ratios: deque = field(default_factory=deque, init=False, repr=False)
    _errors: deque = field(default_factory=deque, init=False, repr=False)
    _scale: float | None = field(default=None, init=False, repr=False)
    _floor: float | None = field(default=None, init=False, repr=False)
    _pairs: deque = field(default_factory=deque, init=False, repr=False)
    _floor_warned: bool = field(default=False, init=False, repr=False)
    _n_pairs: int = field(default=0, init=False, repr=False)
    _high_since: int | None = field(default=None, init=False, repr=False)
    _by_element: dict = field(default_factory=dict, init=False, repr=False)
    _element_scales: dict | None = field(default=None, init=False, repr=False)
    _element_floors: dict | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.force_tolerance > 0):
            raise ConfigError(f"force_tolerance={self.force_tolerance}; it must be > 0 eV/Å "
                              "(e.g. 0.15)")
        for name in ("min_steps_between_calls", "initial_calls"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name}={getattr(self, name)}; it must be >= 0")
        for name in ("force_call_every", "max_calls"):
            v = getattr(self, name)
            if v is not None and int(v) < 1:
                raise ConfigError(f"{name}={v}; it must be >= 1, or null to switch it off")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration={self.calibration!r}; use 'element' (least-squares "
                              "fit of per-atom errors, per element), 'atom' (the same over all "
                              "atoms), 'max' (largest error / largest novelty), 'floor' (an "
                              "error floor plus a factor of the novelty) or 'element_floor' "
                              "(a floor and a factor per element)")
        if self.decide_on not in ("estimate", "learnable"):
            raise ConfigError(f"decide_on={self.decide_on!r}; use 'estimate' (the whole "
                              "calibrated estimate) or 'learnable' (without the error floor)")
        if self.on_reference_failure not in ("stop", "use_model"):
            raise ConfigError(f"on_reference_failure={self.on_reference_failure!r}; use 'stop' "
                              "or 'use_model'")
        if self.call_step_result not in CALL_STEP_RESULTS:
            raise ConfigError(f"call_step_result={self.call_step_result!r}; use "
                              "'reference' (at the steps that call the reference, its energy "
                              "and forces) or 'updated_model' (the model's prediction after "
                              "learning the label)")
        if self.sparse_admission is not None and not 0 < self.sparse_admission <= 1:
            raise ConfigError(f"sparse_admission={self.sparse_admission}; give a fraction in "
                              "(0, 1] (e.g. 0.5), or null to leave the sparse set to "
                              "model.sparse_tolerance alone")
        if int(self.max_consecutive_failures) < 1:
            raise ConfigError(f"max_consecutive_failures={self.max_consecutive_failures}; it "
                              "must be >= 1")
        if self.label_check is not None and not self.label_check > 0:
            raise ConfigError(f"label_check={self.label_check}; it must be > 0 eV/atom, or "
                              "null to switch the check off")
        if self.calibration_window < 1 or not self.initial_scale > 0:
            raise ConfigError("calibration_window must be >= 1 and initial_scale > 0")
        self._ratios = deque(maxlen=self.calibration_window)
        self._errors = deque(maxlen=self.calibration_window)
        self._pairs = deque(maxlen=self.calibration_window)

    def inherit(self, other: LearningPolicy) -> LearningPolicy:
        """Take over the calibration observed by ``other`` (a previous stage); returns self."""
        self._ratios.extend(other._ratios)
        self._errors.extend(other._errors)
        self._pairs.extend(other._pairs)
        self._n_pairs += len(other._pairs)
        for z, d in other._by_element.items():
            self._element_deque(z).extend(d)
        self._scale = None
        self._floor = None
        self._element_scales = None
        self._element_floors = None
        return self

    def settings(self) -> dict:
        """The user settings (what a config's ``learning`` section holds)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__ if not k.startswith("_")}

    @property
    def tolerance(self) -> float:
        """Force tolerance in force now, eV/Å (adaptive mode moves it)."""
        if not self.adaptive or len(self._errors) < 5:
            return self.force_tolerance
        t = float(np.mean(self._errors))
        return float(np.clip(t, 0.5 * self.force_tolerance, 2.0 * self.force_tolerance))

    def _decided(self, uncertainty: np.ndarray, numbers: np.ndarray | None,
                 est: float) -> float:
        """What ``decide`` compares with the tolerance (``decide_on``), eV/Å."""
        if self.decide_on == "estimate":
            return est
        return float(np.max(calibrated(uncertainty, self.scale, numbers, self.element_scales)))

    def decide(self, step: int, n_calls: int, steps_since_call: int,
               uncertainty: np.ndarray | None, n_frames: int | None = None,
               numbers: np.ndarray | None = None) -> Decision:
        """Decide whether step ``step`` needs the reference.

        A pure function of its inputs and the calibration state.

        Parameters
        ----------
        step : int
            Step number (1-based).
        n_calls : int
            Reference calls made so far in this run (counts against ``max_calls``).
        steps_since_call : int
            Model steps since the last call.
        uncertainty : array (n_atoms,) or None
            Model per-atom uncertainty (novelty), eV; None without a model.
        n_frames : int, optional
            Frames the model holds (warm start included); defaults to ``n_calls``.
        numbers : array of int (n_atoms,), optional
            Atomic numbers (for the "element" calibration).
        """
        n_frames = n_calls if n_frames is None else n_frames
        fstd = None if uncertainty is None else self.force_std(uncertainty, numbers)
        est = float("nan") if fstd is None else float(np.max(fstd))
        if uncertainty is None or n_frames < self.initial_calls:
            if self.max_calls is not None and n_calls >= self.max_calls:
                return Decision(False, "budget exhausted", est, fstd)
            return Decision(True, "no model", est, fstd)
        if self.max_calls is not None and n_calls >= self.max_calls:
            call, reason = False, "budget exhausted"
        elif not self._ratios:
            # a model without a calibration (warm start, resume): its estimate is in
            # uncalibrated units, so one call measures its actual error first
            call, reason = True, "calibrating"
        elif self.force_call_every and steps_since_call >= self.force_call_every:
            call, reason = True, "forced"
        elif self._decided(uncertainty, numbers, est) > self.tolerance:
            call = steps_since_call >= self.min_steps_between_calls
            reason = "uncertain" if call else "min interval"
        else:
            call, reason = False, "trusted"
        return Decision(call, reason, est, fstd)
