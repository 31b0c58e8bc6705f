"""The DTC log marginal likelihood, its gradient, and the hyperparameter fit."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.optimize

from ._buffers import _times_blocks
from ._types import Hyperparameters, term_sigmas

log = logging.getLogger(__name__)


#: a hyperparameter fit stops once no component of the log-likelihood's gradient with respect
#: to log(theta) exceeds this (nats): the likelihood is within ~g^2 / (2 curvature) of its
#: maximum, far below what moves a prediction. L-BFGS-B's own default (1e-5) spends
#: many O(M^3) evaluations on a fit that starts at the optimum and ends where it began.
_FIT_GTOL = 0.1
#: rows per panel where an M x M product is formed in place
_ROWS = 256

def _B_rows(AE: np.ndarray, AF: np.ndarray, theta: np.ndarray, term: np.ndarray,
            start: int = 0) -> np.ndarray:
    """Rows ``start:`` of ``B = I + S (AE/se^2 + AF/sf^2) S`` (see ``SparseGP._whitened``):
    ``S`` the diagonal of each column's signal standard deviation, its term's (``term``,
    (M,)) of ``theta``."""
    se, sf = theta[1], theta[2]
    s = term_sigmas(theta)[term]
    B = AE[start:] / se**2
    for i in range(0, len(B), _ROWS):  # (AF / sf^2 row panels: no M x M temporary)
        B[i:i + _ROWS] += AF[start + i:start + i + _ROWS] / sf**2
    B *= s[start:, None]
    B *= s[None, :]
    rows = np.arange(len(B))
    B[rows, start + rows] += 1.0  # the identity's part, on its diagonal alone
    return B


def _mirror_lower(A: np.ndarray) -> np.ndarray:
    """Square ``A`` made symmetric from its lower triangle, in place, by row panels (no
    M x M temporary); ``A``."""
    M = len(A)
    for i in range(0, M, _ROWS):
        j = min(i + _ROWS, M)
        block = A[i:j, i:j]
        block[...] = np.tril(block) + np.tril(block, -1).T
        A[i:j, j:] = A[j:, i:j].T
    return A


def log_likelihood(data: dict, theta: np.ndarray, eval_gradient: bool = False):
    """DTC log marginal likelihood (and its gradient with respect to log(theta)) of the
    labels summarized in ``data`` (``SparseGP._likelihood_data``) at ``theta`` =
    (sigma, sigma_e, sigma_f[, sigma_long]); ``-inf`` where B is singular."""
    se, sf = theta[1], theta[2]
    term = data["term"]
    s = term_sigmas(theta)[term]
    B = _B_rows(data["AE"], data["AF"], theta, term)
    u = s * (data["c"] / se**2 + data["bF"] / sf**2)
    n = len(theta)
    try:
        LB = scipy.linalg.cho_factor(B, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return (-np.inf, np.zeros(n)) if eval_gradient else -np.inf
    v = scipy.linalg.cho_solve(LB, u, check_finite=False)  # B^-1 S u
    T = u @ v  # = b^T P^-1 b
    e0, n_e, n_f, ff = data["e0"], data["n_e"], data["n_f"], data["ff"]
    yWy = data["EE"] - 2 * e0 @ data["En"] + e0 @ data["nn"] @ e0
    Q = (yWy / se**2 + ff / sf**2 - T
         + n_e * math.log(se**2) + data["logN"] + n_f * math.log(sf**2)
         + 2 * np.sum(np.log(np.diag(LB[0])))
         + (n_e + n_f) * math.log(2 * math.pi))
    lml = float(-0.5 * Q)
    if not eval_gradient:
        return lml
    # B^-1 from its factor (LAPACK potri, cheaper than solving against the identity)
    Binv, info = scipy.linalg.lapack.dpotri(LB[0], lower=1, overwrite_c=1)
    if info:
        return -np.inf, np.zeros(n)
    Binv = _mirror_lower(Binv)
    # dQ/dlog(theta); T = u^T B^-1 u with u = S u0, v = B^-1 u.
    # A term's sigma: dS = D_t S, dB = D_t (B - I) + (B - I) D_t, so dT = 2 |v_t|^2 and
    # d log det B = 2 (M_t - tr_t B^-1).
    # The noises: dB_e = -2/se^2 S AE S and du_e = -2 S c / se^2 (likewise for sf).
    dBinv = np.diag(Binv).copy()
    dQ_t = [-2 * v[term == t] @ v[term == t] + 2 * (np.sum(term == t) - dBinv[term == t].sum())
            for t in range(n - 2)]
    sv = s * v
    SBS = Binv  # S B^-1 S, in place of B^-1
    SBS *= s[:, None]
    SBS *= s[None, :]
    du_e = -2 * s * data["c"] / se**2
    dQ_e = (-2 * yWy / se**2 + 2 * n_e
            - (2 * v @ du_e + 2 / se**2 * sv @ data["AE"] @ sv)
            - 2 / se**2 * np.einsum("ij,ij->", SBS, data["AE"]))
    du_f = -2 * s * data["bF"] / sf**2
    dQ_f = (-2 * ff / sf**2 + 2 * n_f
            - (2 * v @ du_f + 2 / sf**2 * sv @ data["AF"] @ sv)
            - 2 / sf**2 * np.einsum("ij,ij->", SBS, data["AF"]))
    return lml, -0.5 * np.array([dQ_t[0], dQ_e, dQ_f, *dQ_t[1:]])



class _Likelihood:
    """Log marginal likelihood and hyperparameter fits of a :class:`SparseGP`."""

    def _whitened(self) -> dict:
        """Accumulators in the basis whitened by L (the Cholesky factor of K_mm).

        In this basis ``P = K_mm + K_mn Lam^-1 K_nm = L S B S L^T`` with
        ``B = I + S (AEw/se^2 + AFw/sf^2) S`` (``S``: each column's signal standard
        deviation, its term's, on the diagonal), whose eigenvalues are >= 1, so
        the solve stays well conditioned however small the noises get.  The
        energy block is a sum of outer products of the whitened energy rows (PSD
        by construction; its rank is at most the number of frames), kept up to
        date as frames and sparse columns arrive, so a solve costs no O(frames M^2).
        """
        c = self.c_E - self.C_E @ self.e0
        blocks = self._species_blocks()  # L^-1 by its blocks: 1/S of the memory traffic
        return {
            "AE": self._AEw,
            "AF": self._AFw,
            "c": _times_blocks(blocks, c),
            "bF": _times_blocks(blocks, self.b_F),
        }

    def _B(self, theta: np.ndarray, start: int = 0) -> np.ndarray:
        """Rows ``start:`` of ``B = I + S (AEw/se^2 + AFw/sf^2) S``, (M - start, M).

        ``theta`` as :meth:`Hyperparameters.as_array`; see :meth:`_whitened`.
        """
        return _B_rows(self._AEw, self._AFw, theta, self._column_terms(), start)

    def _column_terms(self) -> np.ndarray:
        """The model term of each sparse column, (M,)."""
        return self.zs // len(self.descriptor.species)

    def _likelihood_data(self, copy: bool = False) -> dict:
        """What the log marginal likelihood needs: the whitened accumulators
        (:meth:`_whitened`), the label sums and the baselines ``e0``.

        With ``copy`` the arrays are the model's own no longer, so a fit may run on
        them in another thread while frames keep arriving (two M x M copies).
        """
        data = self._whitened()
        if copy:
            data["AE"], data["AF"] = data["AE"].copy(), data["AF"].copy()
        data.update(EE=self._EE, En=self._En.copy(), nn=self._nn.copy(), ff=self._ff,
                    term=self._column_terms(),
                    n_e=self._n_e, n_f=self._n_f, logN=self._logN, e0=self.e0.copy())
        return data

    def log_marginal_likelihood(
        self, theta: np.ndarray | None = None, eval_gradient: bool = False
    ):
        """DTC log marginal likelihood of the training labels.

        Parameters
        ----------
        theta : array (3,) or (4,), optional
            (sigma, sigma_e, sigma_f[, sigma_long]) in eV, eV, eV/Å, eV; current values
            by default.
        eval_gradient : bool, default False
            Also return the gradient with respect to ``log(theta)``.

        Returns
        -------
        float, or (float, ndarray like theta)
            Log likelihood (and its gradient); ``-inf`` if the system is singular.
        """
        theta = self.hyp.as_array() if theta is None else np.asarray(theta, float)
        if self.n_sparse == 0 or self._n_e == 0:
            return (0.0, np.zeros(len(theta))) if eval_gradient else 0.0
        return log_likelihood(self._likelihood_data(), theta, eval_gradient)

    def hyperparameter_fit(self, maxiter: int = 100, copy: bool = True
                           ) -> Callable[[], Hyperparameters | None]:
        """A fit of the hyperparameters to the data as they are now, to run later.

        Fits the baselines ``e0`` first (see :meth:`fit_baseline`). The returned
        function maximizes the log marginal likelihood within ``self.bounds``
        (L-BFGS-B on log-parameters, analytic gradient) and returns the new
        :class:`Hyperparameters`, or None where the optimizer did not improve on
        the current values; it changes nothing in the model. With ``copy`` (the
        default) it works on copies of the accumulators, so it may run in another
        thread while the model takes more frames (the learner's ``hyperparameter_lag``).
        """
        if self._n_e == 0 or self.n_sparse == 0:
            return lambda: None
        self.fit_baseline()
        lb = np.log([b[0] for b in self.bounds])
        ub = np.log([b[1] for b in self.bounds])
        x0 = np.clip(np.log(self.hyp.as_array()), lb, ub)
        data = self._likelihood_data(copy=copy)

        def neg(x):
            v, g = log_likelihood(data, np.exp(x), eval_gradient=True)
            if not np.isfinite(v):
                return 1e300, np.zeros(len(x))
            return -v, -g

        def run() -> Hyperparameters | None:
            f0 = neg(x0)[0]
            res = scipy.optimize.minimize(neg, x0, jac=True, method="L-BFGS-B",
                                          bounds=list(zip(lb, ub)),
                                          options={"maxiter": maxiter, "gtol": _FIT_GTOL})
            if res.fun < f0 and np.all(np.isfinite(res.x)):
                log.debug("hyperparameter fit: log-likelihood %.3f -> %.3f (M = %d)", -f0,
                          -res.fun, len(data["c"]))
                return Hyperparameters(*(float(v) for v in np.exp(np.clip(res.x, lb, ub))))
            return None

        return run

    def fit_hyperparameters(self, maxiter: int = 100) -> Hyperparameters:
        """Maximize the log marginal likelihood within ``self.bounds`` and solve.

        L-BFGS-B on log-parameters with the analytic gradient; the result always
        lies within the bounds, so a run cannot be derailed by a diverging
        signal variance.  Keeps the previous values if the optimizer does not
        improve on them. See :meth:`hyperparameter_fit` for a fit that runs apart.
        """
        if self._n_e == 0 or self.n_sparse == 0:
            return self.hyp
        new = self.hyperparameter_fit(maxiter, copy=False)()
        if new is not None:
            self.hyp = new
        log.debug("hyperparameters %s", self.hyp)
        self.solve()
        return self.hyp

