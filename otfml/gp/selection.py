"""Which environments join a sparse set and which leave it: pure functions of the set's
factor and the candidates, in normalized kernel units (``kt = (p.q)^2`` of unit descriptors).

The model (:class:`otfml.gp.SparseGP`) applies what they return: it adds the chosen
environments' columns and removes the redundant ones (``otfml/gp/_sparse.py``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["conditioned", "pivots", "redundant"]


def conditioned(pa: np.ndarray, Zs: np.ndarray, Li: np.ndarray) -> np.ndarray:
    """Kernel of candidates conditioned on a species' sparse set.

    Parameters
    ----------
    pa : ndarray, shape (n, F)
        Unit descriptors of the candidates.
    Zs : ndarray, shape (M_s, F)
        Unit descriptors of the species' sparse set.
    Li : ndarray, shape (M_s, M_s)
        Inverse Cholesky factor of the set's kernel matrix (plus jitter).

    Returns
    -------
    ndarray, shape (n, n)
        ``K_aa - K_as K_ss^-1 K_sa``; its diagonal is each candidate's squared novelty.
    """
    C = (pa @ pa.T) ** 2
    if len(Zs):
        W = Li @ ((pa @ Zs.T) ** 2).T
        C -= W.T @ W
    return C


def pivots(C: np.ndarray, limit: int, tol: float) -> tuple[list[int], list[float], np.ndarray]:
    """Greedy pivoted Cholesky of ``C``: at most ``limit`` pivots whose novelty exceeds ``tol``.

    Repeatedly takes the candidate the set (plus those taken so far) represents worst.

    Returns
    -------
    chosen : list of int
        The pivots, indices into ``C``, in the order taken.
    values : list of float
        Their unrepresented variances (novelty squared) when taken.
    rest : ndarray
        What is left of ``C`` after them.
    """
    tol2 = tol**2
    chosen: list[int] = []
    values: list[float] = []
    while len(chosen) < limit:
        diag = np.diag(C)
        best = int(np.argmax(diag))
        if diag[best] <= tol2:
            break
        chosen.append(best)
        values.append(float(diag[best]))
        C = C - np.outer(C[:, best], C[best, :]) / C[best, best]
    return chosen, values, C


def redundant(Li: np.ndarray, n: int, threshold: float) -> list[int]:
    """Up to ``n`` of a species' sparse environments that the rest of its set represents best.

    The redundancy of environment j is its variance given the rest of the set,
    ``1 / [K^-1]_jj``: the smaller, the better the others represent it. Environments
    are taken greedily (the inverse downdated after each) while that variance is below
    ``threshold`` (the novelty squared of the newcomer that wants in), so an environment
    is never swapped for a less informative one; one always stays.

    Parameters
    ----------
    Li : ndarray, shape (M_s, M_s)
        Inverse Cholesky factor of the set's kernel matrix.
    n : int
        Most environments to return.
    threshold : float
        Variance (normalized kernel units) below which an environment counts as redundant.

    Returns
    -------
    list of int
        Indices into the set, in the order taken.
    """
    M = len(Li)
    # diag(K^-1) from the columns of L^-1 first: a full set often has nothing to give up
    if M < 2 or n < 1 or np.min(1.0 / np.einsum("ij,ij->j", Li, Li)) >= threshold:
        return []
    Kinv = Li.T @ Li
    alive = np.ones(M, dtype=bool)
    drop: list[int] = []
    for _ in range(min(n, M - 1)):
        r = np.full(M, np.inf)
        r[alive] = 1.0 / np.diag(Kinv)[alive]
        j = int(np.argmin(r))
        if r[j] >= threshold:
            break
        drop.append(j)
        alive[j] = False
        kj = Kinv[:, j].copy()
        Kinv -= np.outer(kj, kj) / kj[j]
    return drop
