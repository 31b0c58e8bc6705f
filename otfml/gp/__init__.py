"""Sparse Gaussian process on local atomic environments.

Model (``docs/design.md``)::

    E = sum_i [ e0[z_i] + eps_i ],   eps_i = sum_{s in S(z_i)} alpha_s k(p_i, p_s)
    k(p, q) = sigma^2 (p.q / |p||q|)^2

trained on total energies and all force components with the DTC/SoR
approximation.  Energies and forces are labels with noise ``sigma_e * sqrt(N)``
(eV, per-atom noise ``sigma_e`` summed over ``N`` independent atoms) and
``sigma_f`` (eV/Å).

Everything the solution and the log marginal likelihood need is kept in
accumulators, in units of the normalized kernel ``kt = k / sigma^2``::

    b_F = sum_f R_f^T F_f        c_E = sum_f r_f E_f / N_f    C_E = sum_f r_f n_f^T / N_f
    L^-1 A_F L^-T  with  A_F = sum_f R_f^T R_f  (A_F itself is not kept)

where ``r_f`` (M,) is the energy row and ``R_f`` (3N, M) the force rows of
frame *f* and ``n_f`` its composition (M = number of sparse environments).
The inverse of the Cholesky factor ``L`` of K_mm, ``L^-1 A_F L^-T`` and the
whitened energy rows ``L^-1 r_f / sqrt(N_f)`` are maintained incrementally:
adding a frame costs O(M^2 3N), adding sparse environments O(M^2 new) plus one
pass over the cached rows; changing the hyperparameters or the per-species
baselines ``e0`` needs no pass over the data.  A solve is one Cholesky of
``B = I + sigma^2 L^-1 (A_E/se^2 + A_F/sf^2) L^-T`` (eigenvalues >= 1).
"""

from ._threads import available_cpus
from ._types import DEFAULT_BOUNDS, Hyperparameters, Prediction, PreparedFrame
from .likelihood import log_likelihood
from .model import SparseGP
from .posterior import Posterior

__all__ = ["SparseGP", "Posterior", "Prediction", "Hyperparameters", "PreparedFrame",
           "DEFAULT_BOUNDS", "available_cpus", "log_likelihood"]
