"""The posterior of one solve: what predicts, and what a model file holds.

A :class:`Posterior` is fixed when it is made: later updates of the model make
a new one, so a prediction in progress, a saved model file and (in parallel
runs) a copy sent to another process all see one consistent set of factors.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
from ase import Atoms

from ..baseline import ScreenedCoulomb
from ..descriptor import Descriptor, Environments
from ._kernels import _CHUNK_BYTES, _PANEL_ROWS, _species_terms, _split_work
from ._threads import Lanes
from ._types import Prediction, _normalize

__all__ = ["Posterior"]

#: the arrays of a posterior, in the order :meth:`Posterior.arrays` gives them
ARRAYS = ("Z", "zs", "e0", "beta", "LB", "Linv", "C")


class Posterior:
    """Predictions of a sparse GP at one solve.

    Parameters
    ----------
    descriptor : Descriptor
        Descriptor settings; its species index the blocks.
    sigma : float
        Signal standard deviation of one local energy, eV.
    e0 : ndarray, shape (n_species,)
        Per-species energy baselines, eV.
    blocks : dict
        Per species index: ``cols`` (its sparse columns), ``Z`` (their normalized
        descriptors), ``beta`` (their weights, eV), ``panels`` and ``offsets`` (its
        block of ``L^-1`` as row panels, :func:`otfml.gp._kernels._triangular_panels`).
    LB : ndarray, shape (M, M)
        Lower Cholesky factor of ``B`` (see :mod:`otfml.gp`); never changed in place.
    Linv : ndarray, shape (M, M)
        Inverse of the Cholesky factor of ``K_mm``.
    Z, zs, beta : ndarray
        All sparse descriptors (M, F), their species indices (M,) and weights (M,).
    baseline : ScreenedCoulomb, optional
        A fixed term added to every prediction.
    C : ndarray, shape (M, M), optional
        ``LB^-1 L^-1`` where already known (a loaded model); else formed on first use.
    lanes : Lanes, optional
        Threads that share a prediction's work.
    n_frames : int
        Frames the model was trained on.
    """

    def __init__(self, descriptor: Descriptor, sigma: float, e0: np.ndarray, blocks: dict,
                 LB: np.ndarray, Linv: np.ndarray, Z: np.ndarray, zs: np.ndarray,
                 beta: np.ndarray, baseline: ScreenedCoulomb | None = None,
                 C: np.ndarray | None = None, lanes: Lanes | None = None,
                 n_frames: int = 0) -> None:
        self.descriptor = descriptor
        self.sigma = float(sigma)
        self.e0 = e0
        self.blocks = blocks
        self.Z, self.zs, self.beta = Z, zs, beta
        self.baseline = baseline
        self.lanes = lanes or Lanes()
        self.n_frames = n_frames
        self.LB = LB
        # LB's transpose is the upper factor in Fortran order, which LAPACK's triangular
        # solve takes without a copy
        self.U = np.ascontiguousarray(LB).T
        self._Linv = Linv
        self._C = C
        self._ctc: dict[int, np.ndarray] = {}

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array a model file holds, by name (:data:`ARRAYS`)."""
        return {"Z": self.Z, "zs": self.zs, "e0": self.e0, "beta": self.beta, "LB": self.LB,
                "Linv": self._Linv, "C": self.C}

    @property
    def n_sparse(self) -> int:
        """Number M of sparse environments."""
        return len(self.zs)

    @property
    def C(self) -> np.ndarray:
        """``LB^-1 L^-1`` (M, M), formed on first use (O(M^3)): only variances read it."""
        if self._C is None:
            self._C = scipy.linalg.solve_triangular(self.U, self._Linv, lower=False,
                                                    trans="T")
        return self._C

    def ctc(self, s: int) -> np.ndarray:
        """``C_s^T C_s`` for species ``s``: |C kt|^2 = kt^T (C_s^T C_s) kt, M_s^2 per atom."""
        if s not in self._ctc:
            Cs = self.C[:, self.blocks[s]["cols"]]
            self._ctc[s] = Cs.T @ Cs
        return self._ctc[s]

    def predict(self, atoms: Atoms, env: Environments | None = None) -> Prediction:
        """Energy, forces and uncertainties of one structure.

        Parameters
        ----------
        atoms : ase.Atoms
            Structure to predict.
        env : Environments, optional
            Precomputed descriptors of ``atoms``.
        """
        if env is None:
            env = self.descriptor.environments(atoms)
        ph, norm = _normalize(env.p)
        N = len(ph)
        sigma2 = self.sigma**2
        eps = self.e0[env.species].astype(float)
        dE_dp = np.zeros_like(ph)
        ww = np.zeros(N)  # |L^-1 kt_i|^2 (L^-1 is block diagonal over species)
        order = np.argsort(env.species, kind="stable")
        first = np.searchsorted(env.species[order], np.arange(len(self.blocks) + 1))
        chunk = max(16, _CHUNK_BYTES // (8 * ph.shape[1]))
        work = [(s, int(first[s + 1] - first[s]),
                 len(blk["cols"]) * (ph.shape[1] + len(blk["cols"]) / 2))
                for s, blk in self.blocks.items() if len(blk["cols"]) and first[s + 1] > first[s]]

        def run(pieces: list[tuple[int, int, int]]) -> list[tuple]:
            out = []
            for s, start, stop in pieces:
                at = order[first[s] + start:first[s] + stop]
                blk = self.blocks[s]
                out.append((s, at, *_species_terms(ph[at], blk["Z"], blk["beta"], blk["panels"],
                                                   blk["offsets"], _PANEL_ROWS, chunk)))
            return out

        lanes = [x for x in _split_work(work, self.lanes.for_work(work)) if x]
        pending = [self.lanes.pool().submit(run, x) for x in lanes[1:]]
        pieces = run(lanes[0]) if lanes else []
        for f in pending:
            pieces += f.result()
        kept = []  # what the variances need
        for s, at, kT, e, g, w2, wsum in pieces:
            eps[at] += e
            dE_dp[at] = g / norm[at][:, None]
            ww[at] = w2
            kept.append((s, at, kT, wsum))
        forces = self.descriptor.backprop(env, dE_dp)
        if self.baseline is not None:
            atom_e, base_f = self.baseline.energies_forces(atoms)
            eps += atom_e
            forces += base_f

        def variances() -> tuple[np.ndarray, float]:
            # var(eps_i) = sigma^2 (1 - |L^-1 kt_i|^2 + |LB^-1 L^-1 kt_i|^2)  (DTC);
            # LB^-1 L^-1 (= C) is not block diagonal: the energy needs all of it
            cc = np.zeros(N)
            wE = np.zeros(len(self.U))  # L^-1 sum_i kt_i
            e_var_prior = 0.0
            for s in range(len(self.blocks)):
                pa = ph[order[first[s]:first[s + 1]]]
                e_var_prior += np.sum((pa @ pa.T) ** 2)
            for s, at, kT, wsum in kept:
                cc[at] = np.einsum("ji,ji->i", self.ctc(s) @ kT, kT)
                wE[self.blocks[s]["cols"]] += wsum
            var = sigma2 * (1.0 - ww + cc)
            vE = scipy.linalg.lapack.dtrtrs(self.U, wE, lower=0, trans=1)[0]  # LB^-1 wE
            e_var = sigma2 * (e_var_prior - wE @ wE + vE @ vE)
            return np.sqrt(np.clip(var, 0.0, None)), float(math.sqrt(max(e_var, 0.0)))

        return Prediction(
            energy=float(eps.sum()),
            forces=forces,
            local_energies=eps,
            novelty=self.sigma * np.sqrt(np.clip(1.0 - ww, 0.0, 1.0)),
            env=env,
            _posterior=variances,
        )
