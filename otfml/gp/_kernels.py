"""Compiled loops of a prediction and of the rows of new sparse columns."""

from __future__ import annotations

import numpy as np
from numba import njit

_THIN = 8


@njit(cache=True, nogil=True, fastmath=True)
def _thin_products(A: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """``A @ Z.T`` (n, k) in double for a few descriptors ``Z`` (k, F): one pass over ``A`` (n, F).

    The new sparse columns' rows read the cached descriptor gradients of every held
    frame once per update, with one to a few columns, where single-precision BLAS runs
    far below memory speed; this loop makes one pass and sums in double.
    """
    n, F = A.shape
    k = Z.shape[0]
    out = np.empty((n, k))
    for i in range(n):
        for j in range(k):
            s = 0.0
            for f in range(F):
                s += np.float64(A[i, f]) * Z[j, f]
            out[i, j] = s
    return out


def _pair_products(G: np.ndarray, ph: np.ndarray, Zc: np.ndarray) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """``G z`` (P, 3, m) and ``p_hat_i . z`` (P, m) for P pairs and m sparse descriptors.

    ``G`` (3P, F) and ``ph`` (P, F) are kept in ``cache_dtype`` (see
    ``SparseGP._geometry``). Up to ``_THIN`` descriptors the products are summed in
    double by :func:`_thin_products`; more (a new frame against the whole sparse set)
    go to BLAS in the precision of ``G``. Returned in double.
    """
    if len(Zc) <= _THIN:
        Zc = np.ascontiguousarray(Zc, dtype=np.float64)
        return (_thin_products(G, Zc).reshape(len(ph), 3, len(Zc)),
                _thin_products(ph, Zc))
    Zt = Zc.T.astype(G.dtype)
    T = (G @ Zt).astype(np.float64).reshape(len(ph), 3, len(Zc))
    return T, (ph @ Zt).astype(np.float64)


def _pair_range(G: np.ndarray, ph: np.ndarray, Zc: np.ndarray, i: int, j: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_pair_products` of pairs ``i:j``."""
    return _pair_products(G[3 * i:3 * j], ph[i:j], Zc)


#: rows of a species' sparse descriptors ``Z`` per chunk in :func:`_species_terms`
_CHUNK_BYTES = 256 * 1024
#: rows of L^-1 per panel of the triangular product in :func:`_species_terms`
_PANEL_ROWS = 64
#: a prediction's work on ``n`` atoms of a species with M sparse environments is taken as
#: ``M (F + M / 2) (_FIXED_ATOMS + n)``: reading ``Z`` and ``L^-1`` costs about as much as
#: the products for this many atoms (splitting the work between threads, ``_split_work``)
_FIXED_ATOMS = 8
#: fewest atoms of a species in a part of its work on one thread: each part reads all of
#: ``Z`` and ``L^-1``, so small parts cost more than they share
_MIN_SPLIT_ATOMS = 16


#: below this much work (``_split_work``'s units) a prediction stays on one thread: handing
#: work to another thread and back costs tens of microseconds, more than small work saves
_MIN_SPLIT_WORK = 4e6


def _triangular_panels(Linv: np.ndarray, rows: int = _PANEL_ROWS
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Row panels ``Linv[i0:i1, :i1]`` of a lower triangular matrix, end to end.

    Returns the panels, flattened into one array, and their offsets (n_panels + 1,):
    the part of ``L^-1`` right of each panel's diagonal block is zero and not stored.
    """
    M = len(Linv)
    parts = [Linv[i0:min(M, i0 + rows), :min(M, i0 + rows)].ravel() for i0 in range(0, M, rows)]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in parts])
    return (np.concatenate(parts) if parts else np.zeros(0)), offsets


@njit(cache=True, nogil=True)
def _species_terms(pa: np.ndarray, Z: np.ndarray, beta: np.ndarray, panels: np.ndarray,
                   offsets: np.ndarray, rows: int, chunk: int):
    """A prediction's kernel terms for ``n`` atoms of one species, without the GIL.

    Parameters
    ----------
    pa : ndarray, shape (n, F)
        Normalized descriptors of the atoms.
    Z : ndarray, shape (M, F)
        The species' normalized sparse descriptors; ``beta`` (M,) their weights (eV).
    panels, offsets, rows
        The species' block of ``L^-1`` as :func:`_triangular_panels` stores it.
    chunk : int
        Rows of ``Z`` per pass: both products with a chunk find it still in cache.

    Returns
    -------
    kT : ndarray, shape (M, n)
        Normalized kernel ``kt = (pa . z)^2``, transposed.
    eps : ndarray, shape (n,)
        Local energies without the baseline, eV.
    g : ndarray, shape (n, F)
        ``d eps / d pa`` projected on the tangent of the unit sphere (eV).
    ww : ndarray, shape (n,)
        ``|L^-1 kt|^2`` of each atom.
    wsum : ndarray, shape (M,)
        ``L^-1 sum_i kt_i`` over these atoms.

    ``Z`` is read in chunks that stay in cache for both products with them (a species'
    ``Z`` is often larger than a core's L2 cache). The triangular product by B panels
    does (B + 1) / 2B of a full product's work (BLAS's
    ``dtrmm`` does half, but scipy's wrapper of it holds the GIL).
    """
    n, F = pa.shape
    M = Z.shape[0]
    kT = np.empty((M, n))
    g = np.zeros((n, F))
    paT = pa.T
    for s in range(0, M, chunk):
        e = min(M, s + chunk)
        Zc = Z[s:e]
        dc = np.dot(Zc, paT)
        for r in range(e - s):
            for a in range(n):
                kT[s + r, a] = dc[r, a] * dc[r, a]
                dc[r, a] *= beta[s + r]
        g += np.dot(dc.T, Zc)
    eps = np.dot(beta, kT)
    for a in range(n):
        t = 0.0
        for f in range(F):
            t += g[a, f] * pa[a, f]
        for f in range(F):
            g[a, f] = 2.0 * (g[a, f] - t * pa[a, f])
    wT = np.empty((M, n))
    for c in range(len(offsets) - 1):
        i0 = c * rows
        i1 = min(M, i0 + rows)
        wT[i0:i1] = np.dot(panels[offsets[c]:offsets[c + 1]].reshape((i1 - i0, i1)), kT[:i1])
    ww = np.zeros(n)
    wsum = np.zeros(M)
    for i in range(M):
        for a in range(n):
            ww[a] += wT[i, a] * wT[i, a]
            wsum[i] += wT[i, a]
    return kT, eps, g, ww, wsum


def _split_work(work: list[tuple[int, int, float]], lanes: int
                ) -> list[list[tuple[int, int, int]]]:
    """Share a prediction's per-species work between ``lanes`` threads.

    Parameters
    ----------
    work : list of (species, n_atoms, unit)
        The work on ``n`` atoms of a species costs ``unit * (_FIXED_ATOMS + n)``.
    lanes : int
        Threads.

    Returns
    -------
    list (one per lane) of lists of (species, start, stop)
        Atoms ``start:stop`` of the species (in index order); a species is split
        between lanes only where each part has at least ``_MIN_SPLIT_ATOMS`` atoms.
    """
    target = sum(u * (_FIXED_ATOMS + n) for _, n, u in work) / lanes
    out: list[list[tuple[int, int, int]]] = [[] for _ in range(lanes)]
    load = [0.0] * lanes
    lane = 0
    for s, n, unit in sorted(work, key=lambda w: -w[2] * (_FIXED_ATOMS + w[1])):
        start = 0
        while start < n:
            left = n - start
            take = left
            if lane < lanes - 1:
                fit = (target - load[lane]) / unit - _FIXED_ATOMS
                if fit < left - 0.5:
                    take = int(round(fit))
                    if take < _MIN_SPLIT_ATOMS:  # too few for a part of their own
                        if load[lane]:
                            lane += 1
                            continue
                        take = left  # an empty lane takes the species whole
                    elif left - take < _MIN_SPLIT_ATOMS:
                        take = left  # the rest would be too few
            out[lane].append((s, start, start + take))
            load[lane] += unit * (_FIXED_ATOMS + take)
            start += take
            if take < left:
                lane += 1
    return out
