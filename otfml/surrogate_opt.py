"""Geometry optimization that calls the reference once per step and walks on the model.

Each step of :class:`SurrogateOpt` labels one geometry with the reference (through the
atoms' :class:`~otfml.OTFCalculator`, so the frame is stored and learned). A model that
does not yet trust itself at the start learns the reference less MMFF94 (``prior``,
:mod:`otfml.prior`), so that from the first call its surface has a force field's bonds,
angles and torsions; one that does (it has learned the region) is used as it is, with
longer first steps. Between two
calls it minimizes the model's surface, corrected so that its forces equal the reference's
at the best geometry so far, within a trust radius that grows where the model predicted the
reference's energy change well and shrinks where it did not. Once the reference's forces
are within ``handover`` of convergence (where a model's error is often about the size of
the remaining forces) and the model's last step changed the reference's energy by other
than it predicted (beyond a factor of 1.5), or the model finds no more descent, it goes on
as quasi-Newton (BFGS) on the reference's forces, starting from the model's Hessian, for
at most ``qn_steps`` steps; the model, which has learned from those calls, then leads
again. A model that predicts well (one warmed up on the molecule) keeps leading: it finds
its way down soft torsions, off flat regions and saddles, where quasi-Newton steps crawl.
"""

from __future__ import annotations

import contextlib
import logging

import numpy as np
import scipy.linalg
from ase import Atoms
from ase.calculators.calculator import Calculator, all_changes
from ase.optimize import BFGS

from .errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["SurrogateOpt"]

#: energy (eV) by which a step may rise and still count as no worse (the reference's noise)
_E_TOL = 1e-4
#: the model-surface minimization stops at this fraction of fmax
_INNER_FMAX = 0.3
#: first trust radius (Å) where the model has no confidence at the start, and where it has
_FIRST_TRUST, _KNOWN_TRUST = 0.1, 0.3


class _Corrected(Calculator):
    """The model's surface plus a constant force ``g`` (eV/Å) that makes its forces equal
    the reference's at ``x0``: ``E(x) = E_model(x) - g . (x - x0)``."""

    implemented_properties = ["energy", "forces"]

    def __init__(self, learner, x0: np.ndarray, g: np.ndarray) -> None:
        super().__init__()
        self.learner, self.x0, self.g = learner, x0, g

    def check_state(self, atoms, tol: float = 1e-15) -> list[str]:
        """Only positions change on this surface (ASE's general comparison of every
        property of the atoms costs as much as a prediction)."""
        if self.atoms is None or not np.array_equal(atoms.positions, self.atoms.positions):
            return ["positions"]
        return []

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        p = self.learner.predict(self.atoms)
        shift = float(np.sum(self.g * (self.atoms.positions - self.x0)))
        self.results = {"energy": p.energy - shift, "forces": p.forces + self.g}


class SurrogateOpt(BFGS):
    """An ASE optimizer for atoms with an :class:`~otfml.OTFCalculator`, frugal with
    reference calls (module notes).

    Parameters
    ----------
    atoms : ase.Atoms
        With an OTFCalculator attached; every geometry the optimizer visits is labelled
        by its reference (stored and learned).
    logfile, trajectory
        As ASE's optimizers.
    trust : float, optional
        First trust radius, Å (largest move of an atom per step on the model). By default
        0.3 Å where the model already trusts itself at the start (its calibrated force
        error there is within the learning tolerance: it has learned this region, e.g. in
        an MD run or an earlier conformer), 0.1 Å otherwise.
    max_trust : float, default 0.5
        Largest trust radius, Å.
    handover : float, default 0.3
        The reference's largest force (eV/Å) below which the steps are quasi-Newton on
        the reference's forces, unless the model predicted its last step well (module
        notes).
    maxstep : float, default 0.1
        Largest move of an atom (Å) in a quasi-Newton step.
    qn_steps : int, default 6
        Quasi-Newton steps after a handover before the model leads again.
    prior : str or None, default "mmff"
        A force field the calculator's model learns on top of from now on
        (``model.prior``, :mod:`otfml.prior`), unless the model already trusts itself at
        the start (as for ``trust``), its settings name another term, its policy lets bonds
        break (``allow_fragmentation``) or RDKit is not installed:
        where the model has no data yet its surface is the force field's, shifted to the
        reference's forces. None: the model as it is.
    """

    def __init__(self, atoms: Atoms, logfile="-", trajectory=None, trust: float | None = None,
                 max_trust: float = 0.5, handover: float = 0.3, maxstep: float = 0.1,
                 qn_steps: int = 6, prior: str | None = "mmff", **kwargs) -> None:
        from .calculator import OTFCalculator

        if not isinstance(atoms.calc, OTFCalculator):
            raise ConfigError(f"SurrogateOpt needs an otfml OTFCalculator on the atoms, not "
                              f"{type(atoms.calc).__name__}")
        if trust is not None and not 0 < trust <= max_trust:
            raise ConfigError(f"trust = {trust} Å and max_trust = {max_trust} Å: give "
                              "0 < trust <= max_trust")
        if qn_steps < 1:
            raise ConfigError(f"qn_steps = {qn_steps}: give at least 1")
        from .prior import PRIORS

        if prior is not None and prior not in PRIORS:
            raise ConfigError(f"prior = {prior!r}; give one of {list(PRIORS)} or None")
        self.learner = atoms.calc.learner
        # a model that trusts itself at the start has learned the molecule: it needs no
        # force field under it, and may take longer first steps
        knows = self._knows(atoms)
        if prior is not None and not knows:
            self._use_prior(prior)
        if trust is None:
            trust = min(_KNOWN_TRUST if knows else _FIRST_TRUST, max_trust)
        self.trust, self.max_trust, self.handover = trust, max_trust, handover
        self.best: tuple[np.ndarray, float, np.ndarray] | None = None
        self.predicted: float | None = None  # the model's energy change of the last step
        #: the reference's energy change of the last kept step over the model's
        self.ratio: float | None = None
        self.rejected = 0
        #: steps whose geometry came out higher than the best so far (trust radius cut)
        self.n_rejected = 0
        self.quasi_newton = False
        self.qn_steps = qn_steps
        self._qn_taken = 0  # quasi-Newton steps since the last handover
        self._model_again = False  # the model leads again after quasi-Newton steps
        #: the Hessian (3N, 3N), eV/Å², the last minimization on the model ended with
        self._inner_H: np.ndarray | None = None
        super().__init__(atoms, logfile=logfile, trajectory=trajectory, maxstep=maxstep,
                         **kwargs)

    def _use_prior(self, prior: str) -> None:
        try:
            import rdkit  # noqa: F401
        except ImportError:
            log.warning("RDKit is not installed: the optimizer's model has no force field "
                        "prior (pip install rdkit)")
            return
        if not self.learner.use_prior(prior):
            log.info("no %s prior: the model keeps the term its settings give it "
                     "(model.coulomb_charges, learning.allow_fragmentation; in a parallel "
                     "run, the run's model.prior)", prior)

    def _knows(self, atoms: Atoms) -> bool:
        """Whether the model trusts itself at ``atoms`` (its calibrated force error within
        the learning tolerance, as an MD step would decide)."""
        L = self.learner
        if L.model is None or not L.model.is_fitted:
            return False
        p = L.predict(atoms)
        dec = L.policy.decide(L.n_steps + 1, L.n_calls, 0, p.novelty, n_frames=L.model.n_frames,
                              numbers=atoms.numbers)
        return dec.reason == "trusted"

    @contextlib.contextmanager
    def _every_geometry_labelled(self):
        """Every geometry visited meanwhile is the reference's (and learned)."""
        self.learner.reference_only = True
        try:
            yield
        finally:
            self.learner.reference_only = False

    def run(self, fmax: float = 0.05, steps: int = 1000) -> bool:
        """Optimize until the reference's largest force is below ``fmax`` (eV/Å)."""
        with self._every_geometry_labelled():
            return super().run(fmax=fmax, steps=steps)

    def irun(self, fmax: float = 0.05, steps: int = 1000):
        with self._every_geometry_labelled():
            yield from super().irun(fmax=fmax, steps=steps)

    def step(self, gradient=None) -> None:
        # small factorizations and the model's predictions: BLAS threads would only wait
        with self.learner.blas_limit:
            self._step(self._get_gradient(gradient))

    def _step(self, gradient: np.ndarray) -> None:
        if self.quasi_newton:
            if self._qn_taken < self.qn_steps:
                self._qn_taken += 1
                return super().step()  # (the calculator holds the reference's forces here)
            # the model leads again from here, judged afresh
            self.quasi_newton, self._model_again = False, True
            self.best, self.predicted, self.ratio, self.rejected = None, None, None, 0
        x = self.optimizable.get_x().reshape(-1, 3)
        forces = -gradient.reshape(-1, 3)
        energy = float(self.atoms.get_potential_energy())
        self._judge(x, energy, forces)
        bx, be, bf = self.best
        again, self._model_again = self._model_again, False
        if (np.linalg.norm(bf, axis=1).max() <= self.handover and not self._model_predicts()
                and not again or self.rejected >= 2):
            return self._hand_over(x)
        y, drop = self._model_step(bx, bf)
        if drop > -_E_TOL / 10:  # the model sees no descent it trusts
            return self._hand_over(x)
        self.predicted = drop
        self.optimizable.set_x(y.ravel())

    def _model_predicts(self) -> bool:
        """The model predicted the last step's energy change within a factor of 1.5."""
        return self.ratio is not None and 1 / 1.5 <= self.ratio <= 1.5

    def _judge(self, x: np.ndarray, energy: float, forces: np.ndarray) -> None:
        """Keep the geometry if it is no worse than the best; move the trust radius by how
        well the model predicted the change."""
        if self.best is not None and energy > self.best[1] + _E_TOL:
            self.rejected += 1
            self.n_rejected += 1
            self.trust = max(0.35 * self.trust, 0.02)
            log.debug("step rejected: E %.5f eV > best %.5f eV; trust %.3f Å", energy,
                      self.best[1], self.trust)
            return
        if self.best is not None and self.predicted is not None and self.predicted < 0:
            ratio = self.ratio = (energy - self.best[1]) / self.predicted
            if ratio > 0.75:
                self.trust = min(2.0 * self.trust, self.max_trust)
            elif ratio < 0.25:
                self.trust = max(0.5 * self.trust, 0.02)
        self.rejected = 0
        self.best = (x.copy(), energy, forces.copy())

    def _model_step(self, x: np.ndarray, forces: np.ndarray) -> tuple[np.ndarray, float]:
        """Minimum of the corrected model within the trust radius from ``x``, and the
        model's energy change to it (eV)."""
        a = self.atoms.copy()
        a.positions = x
        g = forces - self.learner.predict(a).forces
        a.calc = _Corrected(self.learner, x.copy(), g)
        e0 = a.get_potential_energy()
        self._inner_H = _bfgs_within(a, x, self.trust, fmax=_INNER_FMAX * self.fmax,
                                     maxstep=min(0.1, self.trust), H=self._inner_H)
        y = _kept_apart(x, a.positions.copy())
        a.positions = y
        return y, float(a.get_potential_energy()) - e0

    def _hand_over(self, x: np.ndarray) -> None:
        """Quasi-Newton on the reference from here, from the model's Hessian at ``x``."""
        self.quasi_newton, self._qn_taken = True, 1  # this step is the first
        self.H0 = model_hessian(self.learner, self.atoms, x)
        self.state, self.pos0, self.forces0 = None, None, None
        log.debug("quasi-Newton on the reference from step %d", self.nsteps)
        super().step()


def _bfgs_within(atoms: Atoms, x: np.ndarray, trust: float, fmax: float, maxstep: float,
                 steps: int = 300, alpha: float = 70.0, H: np.ndarray | None = None
                 ) -> np.ndarray:
    """Minimize ``atoms``' surface from ``x`` (N, 3), Å, as ASE's BFGS does (Hessian
    ``H`` (3N, 3N), eV/Å², or ``alpha`` I at first, its update, steps scaled to
    ``maxstep``), until the largest force is below ``fmax`` (eV/Å), ``steps`` steps, or an
    atom moved more than ``trust`` (Å) from ``x``: then it is put back onto that radius.
    Returns the Hessian it ended with (the next minimization on a model that learned
    one more frame starts from it).

    The Newton step solves with a Cholesky factor where the Hessian is positive definite,
    and falls back to ASE's eigenvalue decomposition (absolute eigenvalues) where it is not:
    the same step, at a fraction of the cost of a decomposition at every step.
    """
    H = alpha * np.eye(x.size) if H is None else H.copy()
    p0 = f0 = None
    for n in range(steps + 1):
        moved = np.linalg.norm(atoms.positions - x, axis=1).max()
        if moved > trust:
            atoms.positions = x + (atoms.positions - x) * (trust / moved)
            return H
        f = atoms.get_forces().ravel()
        if n == steps or (f.reshape(-1, 3) ** 2).sum(axis=1).max() < fmax**2:
            return H
        p = atoms.positions.ravel().copy()
        if p0 is not None and np.abs(p - p0).max() >= 1e-7:
            dp, dg = p - p0, f0 - f  # the gradient's change
            Hdp = H @ dp
            a, b = dp @ dg, dp @ Hdp
            if abs(a) > 1e-12 and abs(b) > 1e-12:  # else the update would divide by zero
                H += np.outer(dg, dg) / a - np.outer(Hdp, Hdp) / b
        p0, f0 = p, f.copy()
        try:
            dpos = scipy.linalg.cho_solve(scipy.linalg.cho_factor(H, lower=True), f)
        except np.linalg.LinAlgError:
            w, V = np.linalg.eigh(H)
            dpos = V @ (f @ V / np.fabs(w))
        longest = np.linalg.norm(dpos.reshape(-1, 3), axis=1).max()
        if longest >= maxstep:
            dpos *= maxstep / longest
        atoms.positions = (p + dpos).reshape(-1, 3)
    return H


def _kept_apart(x: np.ndarray, y: np.ndarray, shrink: float = 0.75) -> np.ndarray:
    """``y``, or the step from ``x`` halved until no pair of atoms closer than 3 Å at ``x``
    is closer than ``shrink`` times that at ``y`` (the model, untrained there, may pull
    atoms together)."""
    def pairs(p: np.ndarray) -> np.ndarray:
        return np.linalg.norm(p[:, None] - p[None, :], axis=-1)

    dx = pairs(x)
    near = (dx < 3.0) & ~np.eye(len(x), dtype=bool)
    for _ in range(6):
        if np.all(pairs(y)[near] > shrink * dx[near]):
            break
        y = x + 0.5 * (y - x)
    return y


def model_hessian(learner, atoms: Atoms, x: np.ndarray, h: float = 0.005,
                  floor: float = 0.5) -> np.ndarray:
    """The model's Hessian at ``x`` (3N, 3N), eV/Å², by forward differences of its forces
    (3N + 1 predictions), symmetrized, with eigenvalues made positive and at least
    ``floor``."""
    n3 = x.size
    H = np.zeros((n3, n3))
    a = atoms.copy()
    a.positions = x
    f0 = learner.predict(a).forces.ravel()
    for k in range(n3):
        i, c = divmod(k, 3)
        a.positions = x.copy()
        a.positions[i, c] += h
        H[k] = -(learner.predict(a).forces.ravel() - f0) / h
    H = 0.5 * (H + H.T)
    w, V = np.linalg.eigh(H)
    return (V * np.maximum(np.abs(w), floor)) @ V.T
