"""What a sparse GP takes and gives: hyperparameters, predictions, prepared frames."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..descriptor import Environments
from ..errors import IsolatedAtoms

_JITTER = 1e-8

@dataclass
class Hyperparameters:
    """GP hyperparameters.

    Attributes
    ----------
    sigma : float
        Signal standard deviation of one local energy, eV.
    sigma_e : float
        Energy noise per atom, eV (a frame of N atoms has noise ``sigma_e*sqrt(N)``).
    sigma_f : float
        Force-component noise, eV/Å.
    sigma_long : float or None
        Signal standard deviation of the longer-range term's local energy, eV (None:
        the model has no such term).
    """

    sigma: float = 1.0
    sigma_e: float = 0.005
    sigma_f: float = 0.05
    sigma_long: float | None = None

    def as_array(self) -> np.ndarray:
        """(sigma, sigma_e, sigma_f[, sigma_long]): the fitted values, in this order."""
        extra = [] if self.sigma_long is None else [self.sigma_long]
        return np.array([self.sigma, self.sigma_e, self.sigma_f, *extra])

    def as_dict(self) -> dict[str, float]:
        """The hyperparameters by name (``sigma_long`` only where the model has that term)."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def term_sigmas(self) -> np.ndarray:
        """Signal standard deviation of each model term, eV: (sigma[, sigma_long])."""
        return np.array([self.sigma] + ([] if self.sigma_long is None else [self.sigma_long]))


def term_sigmas(theta: np.ndarray) -> np.ndarray:
    """The terms' signal standard deviations of a vector ``theta`` of
    :meth:`Hyperparameters.as_array`'s layout."""
    return np.concatenate([theta[:1], theta[3:]])


def environments_of(terms, atoms) -> Environments:
    """The environments of ``atoms`` for every descriptor of ``terms`` (a model's)."""
    env = terms[0].environments(atoms)
    if len(terms) > 1:
        env.long = terms[1].environments(atoms)
    return env


def term_env(env: Environments, t: int) -> Environments:
    """The environments of model term ``t`` (0: the many-body term, 1: the longer-range one)."""
    if t == 0:
        return env
    if env.long is None:
        raise ValueError("these environments lack the model's longer-range term; compute "
                         "them with SparseGP.environments")
    return env.long


#: bounds (low, high) of the fitted hyperparameters: sigma (eV), sigma_e (eV), sigma_f (eV/Å)
DEFAULT_BOUNDS = ((1e-2, 1e2), (1e-3, 0.1), (2e-3, 2.0))


@dataclass
class Prediction:
    """What the model predicts for one structure.

    Attributes
    ----------
    energy : float
        Total energy, eV.
    forces : ndarray, shape (n_atoms, 3)
        Forces, eV/Å (exact negative gradient of ``energy``).
    local_energies : ndarray, shape (n_atoms,)
        Local energies including the species baseline (and half of each pair's
        energy of ``SparseGP.baseline``, if any), eV.
    novelty : ndarray, shape (n_atoms,)
        ``sigma * sqrt(1 - kt^T Kt_mm^-1 kt)``: the prior std of each local
        energy that the sparse set leaves unexplained, eV.  Unlike
        ``local_std`` it carries no floor from the per-species energy offsets
        (which forces cannot determine), so it ranks force errors.
    local_std : ndarray, shape (n_atoms,)
        Predictive (DTC) standard deviation of each local energy, eV.
    energy_std : float
        Predictive standard deviation of the total energy, eV.

    ``local_std`` and ``energy_std`` are computed on first access: the
    decision to call the reference needs only ``novelty``, and the two cost
    about a quarter of a prediction (they read the M x M posterior factors).
    """

    energy: float
    forces: np.ndarray
    local_energies: np.ndarray
    novelty: np.ndarray
    env: Environments = field(repr=False)
    _posterior: Callable[[], tuple[np.ndarray, float]] = field(repr=False, compare=False,
                                                               default=None)

    @functools.cached_property
    def _stds(self) -> tuple[np.ndarray, float]:
        return self._posterior()

    @property
    def local_std(self) -> np.ndarray:
        return self._stds[0]

    @property
    def energy_std(self) -> float:
        return self._stds[1]


@dataclass
class _Frame:
    numbers: np.ndarray
    env: Environments
    energy: float
    forces: np.ndarray
    counts: np.ndarray
    atom_start: int  # first atom of the frame in the model's global atom numbering
    cached: bool  # its descriptor gradients are in the model's buffers
    nbytes: int = 0  # bytes of those cached gradients
    atoms: object = None  # its structure (ase.Atoms, no calculator), for a new baseline


@dataclass
class PreparedFrame:
    """A frame's geometry-only part of an update (:meth:`SparseGP.prepare_frame`).

    Attributes
    ----------
    env : Environments
        Descriptors of the frame.
    n_new : int
        Environments of the frame that joined the sparse set.
    row_e : ndarray, shape (M,)
        Energy row (normalized kernel summed over the frame's atoms).
    rows_f : ndarray, shape (3 n_atoms, M)
        Force rows.
    W, ew : ndarray, shapes (M, 3 n_atoms) and (M,)
        The rows whitened by ``L^-1`` (``ew`` divided by sqrt(n_atoms)).
    base : (float, ndarray (n_atoms, 3)) or None
        The model's baseline energy (eV) and forces (eV/Å) at the frame, which
        its labels lose (see ``SparseGP.baseline``).
    """

    env: Environments
    n_new: int
    geom: dict = field(repr=False)
    row_e: np.ndarray = field(repr=False)
    rows_f: np.ndarray = field(repr=False)
    W: np.ndarray = field(repr=False)
    ew: np.ndarray = field(repr=False)
    state: tuple | None = field(repr=False, default=None)
    base: tuple[float, np.ndarray] | None = field(repr=False, default=None)
    atoms: object = field(repr=False, default=None)


def _normalize(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norm = np.sqrt(np.einsum("ij,ij->i", p, p))
    if not norm.all():
        raise IsolatedAtoms(
            "an atom has no neighbour within the cutoff (isolated atom); "
            "increase the descriptor cutoff or check the structure"
        )
    return p / norm[:, None], norm
