"""Sparse Gaussian process on local atomic environments.

Model (see ``DESIGN.md`` §3)::

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

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import sys
import threading
import weakref
import zipfile
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack
import scipy.optimize
import scipy.sparse
from ase import Atoms
from ase.data import chemical_symbols
from numba import njit

from .baseline import ScreenedCoulomb
from .descriptor import Descriptor, Environments
from .errors import ConfigError, IsolatedAtoms

__all__ = ["SparseGP", "Prediction", "Hyperparameters", "PreparedFrame"]

log = logging.getLogger(__name__)

_JITTER = 1e-8
#: rules for the frames that leave a model under ``max_frames`` (SparseGP ``evict``)
EVICTIONS = ("thin", "oldest")
#: fraction of ``max_sparse_per_species`` up to which a frame's own, lower sparse tolerance
#: applies (``SparseGP.add_frame``): the rest of the set stays for what the model's own
#: tolerance admits later in a run
ADMISSION_FILL = 0.8
#: largest rank, as a fraction of M, of the changes to B that update its factor (SparseGP.solve)
_UPDATE_RANK = 0.125
#: a hyperparameter fit stops once no component of the log-likelihood's gradient with respect
#: to log(theta) exceeds this (nats): the likelihood is within ~g^2 / (2 curvature) of its
#: maximum, far below what moves a prediction. With L-BFGS-B's own default (1e-5), a fit
#: started at the optimum of an aspirin model (1549 sparse environments, largest gradient
#: 0.003) took 15 evaluations (2.5 s) and ended where it began; with 0.1 it took one (0.3 s).
#: From a start 20-30 % off, 11-12 evaluations either way.
_FIT_GTOL = 0.1
_MODEL_FORMAT = "otfml-sparse-gp"
_MODEL_VERSION = 1


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
    """

    sigma: float = 1.0
    sigma_e: float = 0.005
    sigma_f: float = 0.05

    def as_array(self) -> np.ndarray:
        return np.array([self.sigma, self.sigma_e, self.sigma_f])


#: bounds (low, high) of the fitted hyperparameters: sigma (eV), sigma_e (eV), sigma_f (eV/Å)
DEFAULT_BOUNDS = ((1e-2, 1e2), (1e-3, 1.0), (2e-3, 2.0))


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


def _normalize(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norm = np.sqrt(np.einsum("ij,ij->i", p, p))
    if not norm.all():
        raise IsolatedAtoms(
            "an atom has no neighbour within the cutoff (isolated atom); "
            "increase the descriptor cutoff or check the structure"
        )
    return p / norm[:, None], norm


class _Posterior:
    """The factors the predictive variance needs, fixed at one solve.

    ``C = LB^-1 L^-1`` (M x M, an O(M^3) triangular solve) and its per-species
    products ``C_s^T C_s`` are formed on first use: a run that never reads
    ``local_std``/``energy_std`` does not pay for them at every update.
    """

    def __init__(self, LB: np.ndarray, Linv: np.ndarray, blocks: dict,
                 C: np.ndarray | None = None) -> None:
        # LB (lower, C-ordered) is never changed in place: each solve makes a new one.
        # Its transpose is the upper factor in Fortran order, which LAPACK's triangular
        # solve takes without a copy (40 us at M = 600, where scipy.linalg.solve_triangular
        # on the C-ordered lower factor took 100-250 us per prediction)
        self.U = np.ascontiguousarray(LB).T
        self.blocks = blocks
        self._Linv = Linv
        self._C = C
        self._ctc: dict[int, np.ndarray] = {}

    @property
    def C(self) -> np.ndarray:
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


def _physical_memory() -> float | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


#: products with at most this many sparse descriptors go through :func:`_thin_products`
_THIN = 8


@njit(cache=True, nogil=True, fastmath=True)
def _thin_products(A: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """``A @ Z.T`` (n, k) in double for a few descriptors ``Z`` (k, F): one pass over ``A`` (n, F).

    The new sparse columns' rows read the cached descriptor gradients of every held
    frame once per update, with one to a few columns. OpenBLAS's sgemm then ran far
    below memory speed; this loop (180,000 x 480 single-precision rows, one thread) took
    13 / 23 / 35 ms for 1 / 2 / 3 columns against 31 / 65 / 80 ms, and sums in double.
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
#: ``Z`` and ``L^-1`` (aspirin, 1033 sparse: its 9 carbons split 6 + 3 between two threads
#: took 0.88 ms a prediction, one thread 0.70)
_MIN_SPLIT_ATOMS = 16


#: below this much work (``_split_work``'s units) a prediction stays on one thread: handing
#: work to another thread and back costs 25-45 us. Medians, one vs two threads (2 CPUs):
#: aspirin at 1.9e6 (229 sparse) 0.289 / 0.331 ms, 5.7e6 (602) 0.432 / 0.342, 1.7e7 (1502)
#: 0.924 / 0.647; ethanol at 7e5 (111) 0.164 / 0.232, 6.3e6 (767) 0.330 / 0.291; 64 waters
#: at 4.8e7 (797) 4.50 / 3.05
_MIN_SPLIT_WORK = 4e6


def available_cpus() -> int:
    """CPUs this process may run on (its affinity, where the OS reports one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
        os.cpu_count() or 1)


@functools.cache
def _lapack_fn(module: str, name: str, *argtypes):
    """A routine of SciPy's own BLAS/LAPACK (``scipy.linalg.cython_blas``/``cython_lapack``)
    as a ctypes function: it takes strided blocks in place (a leading dimension), where
    the f2py wrappers copy them, and it runs without the GIL."""
    import ctypes

    from numba.extending import get_cython_function_address

    proto = ctypes.CFUNCTYPE(None, *argtypes)
    return proto(get_cython_function_address(f"scipy.linalg.{module}", name))


def _ptr(a: np.ndarray, offset: int = 0):
    import ctypes

    return ctypes.c_void_p(a.ctypes.data + 8 * offset)


def _int(*values: int):
    import ctypes

    return [ctypes.byref(ctypes.c_int(int(v))) for v in values]


def _update_factor_rows(L: np.ndarray, n: int, V: np.ndarray, block: int = 32) -> bool:
    """``L[:n, :n] <- chol(L L^T + V V^T)`` in place, up to the signs of its columns.

    ``L`` is C-ordered and at least n x n; its leading block is the lower factor
    (its upper triangle is not read). LAPACK ``tpqrt`` on the upper factor
    ``L^T`` (``L``'s memory read in Fortran order, leading dimension ``L.shape[1]``)
    stacked on ``V^T``, O(k n^2) for ``V`` (n, k). The diagonal may come out
    negative: ``L L^T`` does not change, nor anything solved with it.
    Returns False where LAPACK reports an error.
    """
    import ctypes

    k = V.shape[1]
    if not (L.flags.c_contiguous and L.dtype == np.float64):
        raise ValueError("L must be a C-contiguous float64 array")
    Vt = np.asfortranarray(V.T)  # (k, n): V is C-ordered (n, k), so no copy
    nb = max(1, min(block, n))
    T = np.empty(nb * n)
    work = np.empty(nb * n)
    info = ctypes.c_int(0)
    ip = ctypes.c_void_p
    fn = _lapack_fn("cython_lapack", "dtpqrt", *[ip] * 12)
    m_, n_, l_, nb_, lda, ldb, ldt = _int(k, n, 0, nb, L.shape[1], k, nb)
    fn(m_, n_, l_, nb_, _ptr(L), lda, _ptr(Vt), ldb, _ptr(T), ldt, _ptr(work),
       ctypes.byref(info))
    return info.value == 0


def _solve_below(L: np.ndarray, n: int) -> None:
    """``L[n:, :n] <- L[n:, :n] L[:n, :n]^-T`` in place (BLAS ``trsm``, no copies).

    ``L`` as in :func:`_update_factor_rows`: C-ordered, its leading n x n block lower
    triangular. Rows ``n:`` hold ``B21`` on entry and the factor's ``L21`` on exit.
    """
    import ctypes

    m = L.shape[0] - n
    if m == 0 or n == 0:
        return
    ip = ctypes.c_void_p
    fn = _lapack_fn("cython_blas", "dtrsm", *[ip] * 11)
    # in Fortran order L's memory is U = L^T (upper, leading dimension L.shape[1]) and the
    # rows n: are X^T = L21^T (n x m): solve U^T X^T = B21^T, i.e. L11 L21^T = B12
    side, uplo, trans, diag = (ctypes.c_char_p(c) for c in (b"L", b"U", b"T", b"N"))
    m_, n_, ld = _int(n, m, L.shape[1])
    alpha = ctypes.c_double(1.0)
    fn(side, uplo, trans, diag, m_, n_, ctypes.byref(alpha), _ptr(L), ld,
       _ptr(L, n * L.shape[1]), ld)


@functools.cache
def _default_threads() -> int:
    """Threads for a prediction when ``SparseGP.threads`` is None: 2 given 2 CPUs, else 1."""
    return min(2, available_cpus())


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

    Reading ``Z`` in chunks mattered on aspirin (600 x 480, 2.3 MB, beyond the core's
    1 MB of L2): 2.20 against 2.53 ms per prediction. The triangular product by B panels
    does (B + 1) / 2B of a full product's work (5/9 for M = 576 in 64-row panels; BLAS's
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


class _Task:
    """A piece of work that the first thread to claim it runs (see ``SparseGP.prepare_frame``).

    ``join`` runs it if no other thread has, else waits for it; it returns the result
    or raises the error.
    """

    def __init__(self, fn: Callable) -> None:
        self.fn = fn
        self._lock = threading.Lock()
        self._claimed = False
        self._done = threading.Event()
        self._result = self._error = None

    def claim(self) -> bool:
        with self._lock:
            if self._claimed:
                return False
            self._claimed = True
            return True

    def run(self) -> None:
        try:
            self._result = self.fn()
        except BaseException as err:  # handed to join
            self._error = err
        finally:
            self._done.set()

    def join(self):
        if self.claim():
            self.run()
        else:
            self._done.wait()
        if self._error is not None:
            raise self._error
        return self._result


#: fewest rows (or columns) of an update's memory-bound product worth sharing between two
#: threads (:func:`_in_two`): on aspirin at M = 1882 with 330 frames, R_new^T RF (313 MB) took
#: 35 ms on one thread and 18 ms on two, AFw += W W^T 14 and 8 ms
_MIN_SHARED = 256


def _in_two(spawn: Callable[[Callable], _Task] | None, fn: Callable[[int, int], object],
            n: int) -> list:
    """``fn(0, n)`` done as ``fn(0, h)``, offered to another thread through ``spawn``, and
    ``fn(h, n)`` on this one; returns the results in order (one, without ``spawn`` or below
    :data:`_MIN_SHARED`). The parts must not depend on each other (e.g. rows of a product);
    how the range is cut may change rounding (BLAS takes ``W @ W.T`` as one symmetric
    product), never more, and the cut does not depend on which thread ran what."""
    if spawn is None or n < _MIN_SHARED:
        return [fn(0, n)]
    h = n // 2
    first = spawn(functools.partial(fn, 0, h))
    second = fn(h, n)
    return [first.join(), second]


def _refcounts(arrays: list) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]


@functools.cache
def _unheld_refcount() -> int:
    """What :func:`_refcounts` counts for an array only its list holds (interpreters differ)."""
    return _refcounts([np.empty(0)])[0]


class _Spare:
    """Large float arrays, each handed out again once nothing else refers to it.

    Fresh memory costs page faults when it is first written: on the 2-core test
    machine 2-5 ms for aspirin's 29 MB factor, at times 30-70 ms. An array that
    no snapshot holds any more (a prediction keeps the factors of the solve it
    was made at, as views) is written over instead.
    """

    def __init__(self, keep: int = 3) -> None:
        self._arrays: list[np.ndarray] = []
        self.keep = keep

    def take(self, n: int, room: float = 0.0) -> np.ndarray:
        """A flat float64 array of at least ``n`` elements, its values unset. A new one
        gets ``room`` (a fraction) more, so that it fits the next, larger request."""
        for a, refs in zip(self._arrays, _refcounts(self._arrays)):
            # held by the list only: no array and no view of it is alive elsewhere
            if len(a) >= n and refs <= _unheld_refcount():
                return a
        a = np.empty(int(n * (1.0 + room)))
        self._arrays.append(a)
        if len(self._arrays) > self.keep:
            del self._arrays[0]
        return a

    def square(self, M: int, room: float = 0.0) -> np.ndarray:
        """A C-ordered (M, M) view of a spare array."""
        return self.take(M * M, room)[:M * M].reshape(M, M)


class _Grow:
    """Growable 2-D array: rows appended, columns appended.

    Row capacity grows fourfold, column capacity twofold.  Rows beyond the
    used ones are never written, so the operating system does not back them
    with memory; the larger factor only cuts the copies (measured on 40 frames
    of 64 waters: 115 reallocations took 2.8 s of 11.8 s with doubling).
    ``max_cols`` reserves the columns the array will at most need.
    """

    def __init__(self, ncols: int = 0, dtype=float, max_cols: int = 16) -> None:
        self._a = np.zeros((64, max(ncols, max_cols)), dtype=dtype)
        self.n = 0
        self.m = ncols

    @property
    def view(self) -> np.ndarray:
        return self._a[: self.n, : self.m]

    def reserve(self, n: int, m: int | None = None, exact: bool = False) -> None:
        """Make room for ``n`` rows and ``m`` columns (default: the current ones).

        ``exact``: room for ``n`` rows, not the next fourfold capacity (a reservation
        of the rows the array will at most need; see ``SparseGP._reserve``).
        """
        m = self.m if m is None else m
        R, C = self._a.shape
        if n <= R and m <= C:
            return
        if exact:
            R = max(R, n)
        while R < n:
            R *= 4
        while C < m:
            C *= 2
        a = np.empty((R, C), dtype=self._a.dtype)  # only [:n, :m] is ever read
        a[: self.n, : self.m] = self._a[: self.n, : self.m]
        self._a = a

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x).reshape(-1, self.m)
        self.reserve(self.n + len(x), self.m)
        self._a[self.n : self.n + len(x), : self.m] = x
        self.n += len(x)

    def keep_columns(self, keep: np.ndarray,
                     spawn: Callable[[Callable], _Task] | None = None) -> None:
        """Keep only columns ``keep`` (increasing indices), in place, in row chunks
        (shared with another thread through ``spawn``, :func:`_in_two`).

        Each run of consecutive kept columns moves as one slice: ten times
        faster than a gather of the kept columns (1.4 s against 0.14 s for
        50,000 rows of 1800 columns, 30 of them dropped).
        """
        keep = np.asarray(keep, dtype=np.int64)
        m = len(keep)
        cut = np.flatnonzero(np.diff(keep) != 1) + 1
        runs = [(int(a), int(b)) for a, b in zip(np.r_[0, cut], np.r_[cut, m])
                if keep[a] != a]  # runs before the first dropped column stay where they are

        def move(i0: int, i1: int) -> None:
            for i in range(i0, i1, 256):
                block = self._a[i: min(i + 256, i1)]
                for a, b in runs:
                    block[:, a:b] = block[:, keep[a]: keep[a] + b - a]

        _in_two(spawn, move, self.n)
        self.m = m

    def drop_rows(self, n: int) -> None:
        """Drop the first ``n`` rows, moving the others up in place, in row chunks."""
        for i in range(n, self.n, 4096):
            j = min(i + 4096, self.n)
            self._a[i - n: j - n, : self.m] = self._a[i:j, : self.m]
        self.n -= n

    def keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the rows where ``keep`` (bool, (n,)) is true, in order, in place."""
        idx = np.flatnonzero(keep)
        for i in range(0, len(idx), 4096):  # idx[k] >= k: a chunk reads rows not yet written
            j = min(i + 4096, len(idx))
            self._a[i:j, : self.m] = self._a[idx[i:j], : self.m]
        self.n = len(idx)

    def add_columns(self, x: np.ndarray) -> None:
        j = x.shape[1]
        self.reserve(self.n, self.m + j)
        self._a[: self.n, self.m : self.m + j] = x
        self.m += j


def _times_blocks(blocks: list, x: np.ndarray, out: np.ndarray | None = None,
                  transpose: bool = False) -> np.ndarray:
    """``L^-1 x`` (``L^-T x`` with ``transpose``) for ``x`` (M, ...), ``L^-1`` block diagonal
    over species: ``blocks`` lists each species' (columns, block of ``L^-1``), as
    :meth:`SparseGP._species_blocks` gives them. Rows of ``out`` no block covers are left
    as they are."""
    if out is None:
        out = np.empty_like(x)
    for cols, Li in blocks:
        if len(cols):
            out[cols] = (Li.T if transpose else Li) @ x[cols]
    return out


def _take_square(A: np.ndarray, keep: np.ndarray, out: np.ndarray, rows: int = 256
                 ) -> np.ndarray:
    """``out[:] = A[np.ix_(keep, keep)]`` in row chunks (no full-size temporary); ``out``."""
    for i in range(0, len(keep), rows):
        out[i:i + rows] = A[keep[i:i + rows]][:, keep]
    return out


def _B_rows(AE: np.ndarray, AF: np.ndarray, theta: np.ndarray, start: int = 0) -> np.ndarray:
    """Rows ``start:`` of ``B = I + sigma^2 (AE/se^2 + AF/sf^2)`` (see ``SparseGP._whitened``)."""
    sigma, se, sf = theta
    B = sigma**2 * (AE[start:] / se**2 + AF[start:] / sf**2)
    B[:, start:] += np.eye(len(AE) - start)
    return B


def _log_likelihood(data: dict, theta: np.ndarray, eval_gradient: bool = False):
    """DTC log marginal likelihood (and its gradient with respect to log(theta)) of the
    labels summarized in ``data`` (``SparseGP._likelihood_data``) at ``theta`` =
    (sigma, sigma_e, sigma_f); ``-inf`` where B is singular."""
    sigma, se, sf = theta
    M = len(data["c"])
    s2 = sigma**2
    B = _B_rows(data["AE"], data["AF"], theta)
    u = data["c"] / se**2 + data["bF"] / sf**2
    try:
        LB = scipy.linalg.cho_factor(B, lower=True, overwrite_a=True, check_finite=False)
    except np.linalg.LinAlgError:
        return (-np.inf, np.zeros(3)) if eval_gradient else -np.inf
    beta = scipy.linalg.cho_solve(LB, u, check_finite=False)
    T = s2 * u @ beta  # = b^T P^-1 b
    e0, n_e, n_f, ff = data["e0"], data["n_e"], data["n_f"], data["ff"]
    yWy = data["EE"] - 2 * e0 @ data["En"] + e0 @ data["nn"] @ e0
    Q = (yWy / se**2 + ff / sf**2 - T
         + n_e * math.log(se**2) + data["logN"] + n_f * math.log(sf**2)
         + 2 * np.sum(np.log(np.diag(LB[0])))
         + (n_e + n_f) * math.log(2 * math.pi))
    lml = float(-0.5 * Q)
    if not eval_gradient:
        return lml
    # B^-1 from its factor (LAPACK potri: 0.22 s at M = 1600 against 0.28 s for solving
    # against the identity; an L-BFGS fit evaluates this some 3-12 times)
    Binv, info = scipy.linalg.lapack.dpotri(LB[0], lower=1, overwrite_c=1)
    if info:
        return -np.inf, np.zeros(3)
    Binv = np.tril(Binv) + np.tril(Binv, -1).T
    # dQ/dlog(theta); T = s2 u^T B^-1 u, dT = s2 (2 beta.du - beta^T dB beta) (+ 2T for
    # sigma); with dB = 2 (B - I) for sigma, B beta = u and tr(B^-1 B) = M
    dQ_s = -(2 * T - 2 * s2 * (u @ beta - beta @ beta)) + 2 * (M - np.trace(Binv))
    ge, gf = -2 * s2 / se**2, -2 * s2 / sf**2  # dB_e = ge AE, dB_f = gf AF
    du_e = -2 * data["c"] / se**2
    dQ_e = (-2 * yWy / se**2 + 2 * n_e
            - s2 * (2 * beta @ du_e - ge * beta @ data["AE"] @ beta)
            + ge * np.sum(Binv * data["AE"]))
    du_f = -2 * data["bF"] / sf**2
    dQ_f = (-2 * ff / sf**2 + 2 * n_f
            - s2 * (2 * beta @ du_f - gf * beta @ data["AF"] @ beta)
            + gf * np.sum(Binv * data["AF"]))
    return lml, -0.5 * np.array([dQ_s, dQ_e, dQ_f])


class SparseGP:
    """Sparse GP force field on power-spectrum descriptors.

    Parameters
    ----------
    descriptor : Descriptor
        Descriptor settings (its species are the model's species).
    hyperparameters : Hyperparameters, optional
        Starting hyperparameters.
    bounds : tuple of 3 (low, high) pairs, optional
        Bounds of sigma (eV), sigma_e (eV) and sigma_f (eV/Å) in the fit.
    max_sparse_per_species : int, default 600
        Cap on the sparse environments of one species.
    sparse_tolerance : float, default 0.05
        An environment joins the sparse set when the part of it the sparse
        set cannot represent, ``sqrt(1 - k^T K_mm^-1 k)`` in normalized kernel
        units (0: fully represented, 1: new), exceeds this value.
    cache_bytes : int, default 2 GiB
        Memory for the descriptor gradients of training frames, which new
        sparse environments need; frames beyond it are recomputed on demand.
    prune : bool, default True
        When a species' sparse set is full and a new frame brings environments
        it cannot represent, swap out the most redundant ones (those the rest
        of the set represents best, and better than the newcomers): as many as
        the newcomers need, and at least ``max_sparse_per_species // 20`` at a
        time.  False: the set stays as it is once full.
    max_frames : int or None, default 1000
        Most labelled frames the model holds.  When a frame would exceed it,
        a tenth of them is taken out of the model (their contributions are
        subtracted from the accumulators; the store keeps them), so memory
        and the update time stay bounded in long runs.  None: no limit.
    evict : {"thin", "oldest"}, default "thin"
        Which frames leave under ``max_frames``: every other one of the
        oldest fifth ("thin"), so that the model keeps an ever sparser sample
        of the whole run (the first frame stays), or the oldest tenth, so that
        it keeps only the latest stretch.  On the frames of a 10,000-step
        aspirin run that had drifted away from its start (2035 frames, 1000
        held), "oldest" erred by 0.121 eV/Å on an independent trajectory and
        "thin" by 0.057 (all frames: 0.047).
    cache_dtype : numpy dtype, default float32
        Precision of the cached descriptor gradients (see :meth:`_geometry`);
        float64 makes rows computed along different paths (cached or not,
        one frame or all) agree to rounding, as the tests of the algebra need.
    threads : int, optional
        Threads that share each prediction's work, species by species (atoms of a
        species split between them where that balances it). None: two where this
        process may use two CPUs, else one. A runtime setting, not saved.
    baseline : otfml.baseline.ScreenedCoulomb, optional
        A fixed long-range term: the model learns the labels less it and
        predicts with it added (saved with the model).
    """

    def __init__(
        self,
        descriptor: Descriptor,
        hyperparameters: Hyperparameters | None = None,
        bounds=DEFAULT_BOUNDS,
        max_sparse_per_species: int = 600,
        sparse_tolerance: float = 0.05,
        cache_bytes: int = 2 * 1024**3,
        prune: bool = True,
        max_frames: int | None = 1000,
        evict: str = "thin",
        cache_dtype=np.float32,
        threads: int | None = None,
        baseline: ScreenedCoulomb | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads = {threads}: give at least 1, or None for automatic")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames = {max_frames}: give at least 1, or None for no limit")
        if evict not in EVICTIONS:
            raise ValueError(f"evict = {evict!r}: give one of {', '.join(EVICTIONS)}")
        self.descriptor = descriptor
        #: a fixed term the model learns on top of (labels minus it; predictions plus it)
        self.baseline = baseline
        self.hyp = hyperparameters or Hyperparameters()
        self.bounds = tuple(tuple(map(float, b)) for b in bounds)
        self.max_sparse_per_species = int(max_sparse_per_species)
        self.sparse_tolerance = float(sparse_tolerance)
        self.cache_bytes = int(cache_bytes)
        self.prune = bool(prune)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.evict = evict
        self.cache_dtype = np.dtype(cache_dtype)
        #: frames taken out of the model so far (see ``max_frames`` and ``evict``)
        self.n_dropped = 0
        #: sparse environments swapped out so far, per species index
        self.n_pruned: dict[int, int] = {}
        self._cache_bytes = 0
        self._reserved = False  # rows reserved for max_frames frames (see _reserve)
        self._memory_checked = False  # _reserve and _report_memory ran (first frame)
        F = descriptor.n_features
        S = len(descriptor.species)
        M_max = self.max_sparse_per_species * S  # buffer columns are reserved once
        self.Z = np.zeros((0, F))  # normalized sparse descriptors (M, F)
        self.zs = np.zeros(0, dtype=np.int64)  # species index of each column
        self.frames: list[_Frame] = []
        self.e0 = np.zeros(S)
        self._trainable = True
        self._reset_accumulators(0)
        self._square: dict[str, np.ndarray] = {}  # buffers of the growing M x M matrices
        self._spare: dict[str, _Spare] = {}  # arrays to use again (:class:`_Spare`)
        # inverse of the Cholesky factor L of K_mm + jitter (maintained incrementally)
        self._Linv = np.zeros((0, 0))
        self._AFw = np.zeros((0, 0))  # L^-1 A_F L^-T
        # whitened energy rows L^-1 r_f / sqrt(N_f), one row per frame
        self._EwT = _Grow(0, max_cols=M_max)
        self._AEw = np.zeros((0, 0))  # their sum of outer products (kept, not re-formed)
        self._beta = np.zeros(0)
        self._LB = np.zeros((0, 0))  # Cholesky factor of B = I + s2 (AEw/se^2 + AFw/sf^2)
        # what changed B since _LB was factored, for a low-rank update instead of a new
        # factorization (see _updated_factor); None: factor B afresh at the next solve
        self._lb_state: dict | None = None
        self._blocks: dict = {}
        # each species' block of L^-1 and its rows of Z, for the L^-1 they were cut from
        self._species_cache: tuple[weakref.ref, dict] | None = None
        # rows of the design matrix of every frame (normalized kernel units)
        self._RF = _Grow(0, max_cols=M_max)  # force rows, (sum 3N, M)
        self._RE = _Grow(0, max_cols=M_max)  # energy rows, (frames, M)
        self._n_atoms = 0
        # descriptor gradients of the cached frames, per centre species (see _geometry)
        self._geo: dict[int, dict[str, _Grow]] = {}
        self._fitted = False
        self._full_warned: set[int] = set()  # species whose full sparse set was reported
        #: free-form metadata saved with the model (e.g. the force-error calibration)
        self.extra: dict = {}
        #: threads that share a prediction's work (None: two where this process may use
        #: two CPUs, else one); not saved with the model
        self.threads: int | None = threads
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0

    # ------------------------------------------------------------------
    # bookkeeping
    # ------------------------------------------------------------------
    @property
    def n_sparse(self) -> int:
        """Total number M of sparse environments."""
        return len(self.zs)

    @property
    def n_frames(self) -> int:
        """Number of labelled frames the model was trained on."""
        return self._n_e

    def sparse_counts(self) -> dict[str, int]:
        """Sparse environments per element symbol."""
        return {chemical_symbols[z]: int(np.sum(self.zs == k))
                for k, z in enumerate(self.descriptor.species)}

    def _element(self, s: int) -> str:
        """Chemical symbol of species index ``s``."""
        return chemical_symbols[self.descriptor.species[s]]

    def _cols(self, s: int) -> np.ndarray:
        return np.flatnonzero(self.zs == s)

    def _kernel(self, cols: np.ndarray) -> np.ndarray:
        """Normalized K_mm of sparse columns ``cols`` (zero between species), (n, n).

        Formed when needed (a rebuild, tests) rather than kept: K_mm is read nowhere else.
        """
        Zc = self.Z[cols]
        K = (Zc @ Zc.T) ** 2
        K[self.zs[cols][:, None] != self.zs[cols][None, :]] = 0.0
        return K

    def _species_block(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Columns of species ``s``, its block of ``L^-1`` (M_s, M_s) and its rows of ``Z``.

        Contiguous copies, kept until ``L^-1`` is replaced (every change to the sparse set
        replaces it): cutting the block out took 3.4 ms at M_s = 800, and selecting a
        frame's new environments, pruning and the next solve each want it.
        """
        cache = self._species_cache
        if cache is None or cache[0]() is not self._Linv:
            cache = (weakref.ref(self._Linv), {})
            self._species_cache = cache
        if s not in cache[1]:
            cols = self._cols(s)
            cache[1][s] = (cols, self._Linv[np.ix_(cols, cols)], np.ascontiguousarray(self.Z[cols]))
        return cache[1][s]

    def _species_blocks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each species' columns and block of ``L^-1`` (:meth:`_species_block`), by index."""
        return [self._species_block(s)[:2] for s in range(len(self.descriptor.species))]

    def _reset_accumulators(self, M: int) -> None:
        S = len(self.descriptor.species)
        self.c_E = np.zeros(M)
        self.C_E = np.zeros((M, S))
        self.b_F = np.zeros(M)
        self._EE = 0.0  # sum E^2/N
        self._En = np.zeros(S)  # sum E n/N
        self._nn = np.zeros((S, S))  # sum n n^T / N
        self._ff = 0.0
        self._n_e = 0
        self._n_f = 0
        self._logN = 0.0

    # ------------------------------------------------------------------
    # rows of the design matrix
    # ------------------------------------------------------------------
    def _geometry(self, env: Environments) -> dict:
        """What the rows of one frame need besides the sparse set (cached per frame).

        Per centre species ``s``: the pairs it owns as a contiguous block of
        ``G = dp_i/dD_ij`` (P, 3, F), ``u = G p_hat_i`` (P, 3), the centres' unit
        descriptors and norms, and the sparse incidence matrix (n_atoms x P,
        +1 on the neighbour, -1 on the centre) that scatters pair terms to atoms.

        ``G`` and the centres' unit descriptors per pair are kept in
        ``cache_dtype`` (single precision by default): they are the bulk of the
        cache, and the rows new sparse columns need are read from them at every
        such update (memory-bound: on aspirin at 900 frames, 55 of an update's
        270 ms in double precision, 31 in single).  Rows then carry relative
        errors of about 1e-6; a row is stored and used as computed everywhere,
        so every accumulator stays the Gram matrix of the stored rows.
        """
        N = len(env.species)
        ph, norm = _normalize(env.p)
        G = self.descriptor.gradient(env)
        blocks = {}
        for s in np.unique(env.species):
            sel = np.flatnonzero(env.species[env.pi] == s)
            P = len(sel)
            ci = env.pi[sel]
            Gs = np.ascontiguousarray(G[sel]).reshape(P * 3, -1)
            inc = scipy.sparse.csr_matrix(
                (np.concatenate([np.ones(P), -np.ones(P)]),
                 (np.concatenate([env.pj[sel], ci]), np.concatenate([np.arange(P)] * 2))),
                shape=(N, P),
            )
            u = np.einsum("qcf,qf->qc", Gs.reshape(P, 3, -1), ph[ci])
            blocks[int(s)] = {"G": Gs.astype(self.cache_dtype, copy=False), "u": u,
                              "ph": ph[ci].astype(self.cache_dtype, copy=False),
                              "scale": 2.0 / norm[ci],
                              "inc": inc, "atoms": ph[env.species == s],
                              "pi": ci, "pj": env.pj[sel]}
        nbytes = sum(blk["G"].nbytes for blk in blocks.values())
        return {"blocks": blocks, "nbytes": nbytes}

    def _rows(self, env: Environments, cols: np.ndarray, geom: dict | None = None):
        """Energy row (len(cols),) and force rows (3N, len(cols)) of one frame.

        Normalized kernel units (sigma = 1); force rows are ``-d(row_e)/dr``.
        """
        N = len(env.species)
        zc = self.zs[cols]
        row_e = np.zeros(len(cols))
        dEdr = np.zeros((N, 3, len(cols)))
        if len(cols) == 0:
            return row_e, dEdr.reshape(3 * N, 0)
        if geom is None:
            geom = self._geometry(env)
        for s, blk in geom["blocks"].items():
            cs = np.flatnonzero(zc == s)
            if len(cs) == 0:
                continue
            Zc = self.Z[cols[cs]]
            row_e[cs] = np.sum((blk["atoms"] @ Zc.T) ** 2, axis=0)
            P = len(blk["u"])
            if P == 0:
                continue
            T, d = _pair_products(blk["G"], blk["ph"], Zc)
            # d kt_is / d D_ij = 2 d_is / |p_i| (G z_s - d_is G p_hat_i)
            T -= d[:, None, :] * blk["u"][:, :, None]
            T *= (blk["scale"][:, None] * d)[:, None, :]
            dEdr[:, :, cs] += (blk["inc"] @ T.reshape(P, -1)).reshape(N, 3, len(cs))
        return row_e, -dEdr.reshape(3 * N, len(cols))

    def _cache_geometry(self, geom: dict, frame: int, atom_start: int) -> None:
        """Append one frame's geometry to the per-species buffers (global atom indices)."""
        F = self.descriptor.n_features
        for s, blk in geom["blocks"].items():
            g = self._geo.setdefault(s, {
                "G": _Grow(F, self.cache_dtype), "ph": _Grow(F, self.cache_dtype),
                "scale": _Grow(1), "u": _Grow(3),
                "pi": _Grow(1, np.int64), "pj": _Grow(1, np.int64),
                "atoms": _Grow(F), "atom_frame": _Grow(1, np.int64)})
            g["G"].append(blk["G"])
            g["ph"].append(blk["ph"])
            g["scale"].append(blk["scale"])
            g["u"].append(blk["u"])
            g["pi"].append(blk["pi"] + atom_start)
            g["pj"].append(blk["pj"] + atom_start)
            g["atoms"].append(blk["atoms"])
            g["atom_frame"].append(np.full(len(blk["atoms"]), frame))

    def _rows_all(self, cols: np.ndarray, spawn: Callable[[Callable], _Task] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
        """Energy rows (frames, len(cols)) and force rows (sum 3N, len(cols)) of every frame.

        Frames whose descriptor gradients are cached are done together, a few
        large matrix products per species (their pairs shared with another thread
        through ``spawn``, see :func:`_in_two`); the others one by one.
        """
        nf, na = len(self.frames), self._n_atoms
        zc = self.zs[cols]
        E = np.zeros((nf, len(cols)))
        dEdr = np.zeros((na, 3, len(cols)))
        for s, g in self._geo.items():
            cs = np.flatnonzero(zc == s)
            if len(cs) == 0 or g["ph"].n == 0:
                continue
            Zc = self.Z[cols[cs]]
            k_at = (g["atoms"].view @ Zc.T) ** 2
            frames_of = g["atom_frame"].view[:, 0]
            inc_f = scipy.sparse.csr_matrix(
                (np.ones(len(frames_of)), (frames_of, np.arange(len(frames_of)))),
                shape=(nf, len(frames_of)))
            E[:, cs] = inc_f @ k_at
            P = g["ph"].n
            Ts, ds = zip(*_in_two(spawn, functools.partial(_pair_range, g["G"].view,
                                                           g["ph"].view, Zc), P))
            T, d = (Ts[0], ds[0]) if len(Ts) == 1 else (np.concatenate(Ts), np.concatenate(ds))
            T -= d[:, None, :] * g["u"].view[:, :, None]
            T *= (g["scale"].view[:, 0][:, None] * d)[:, None, :]
            pi, pj = g["pi"].view[:, 0], g["pj"].view[:, 0]
            inc = scipy.sparse.csr_matrix(
                (np.concatenate([np.ones(P), -np.ones(P)]),
                 (np.concatenate([pj, pi]), np.concatenate([np.arange(P)] * 2))),
                shape=(na, P))
            dEdr[:, :, cs] += (inc @ T.reshape(P, -1)).reshape(na, 3, len(cs))
        R = -dEdr.reshape(3 * na, len(cols))
        for k, fr in enumerate(self.frames):
            if not fr.cached:
                e, f = self._rows(fr.env, cols)
                E[k] = e
                R[3 * fr.atom_start: 3 * (fr.atom_start + len(fr.numbers))] = f
        return E, R

    def frame_rows(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Energy row (M,) and force rows (3N, M) of stored frame ``k``."""
        fr = self.frames[k]
        a = 3 * fr.atom_start
        return self._RE.view[k].copy(), self._RF.view[a: a + 3 * len(fr.numbers)].copy()

    # ------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------
    def _conditioned(self, s: int, pa: np.ndarray) -> np.ndarray:
        """Normalized kernel of unit descriptors ``pa`` (n, F) of species ``s``,
        conditioned on that species' sparse set: (n, n)."""
        cols, Li, Zs = self._species_block(s)
        C = (pa @ pa.T) ** 2
        if len(cols):
            W = Li @ ((pa @ Zs.T) ** 2).T
            C -= W.T @ W
        return C

    def _pivots(self, C: np.ndarray, limit: int, tol: float
                ) -> tuple[list[int], list[float], np.ndarray]:
        """Greedy pivoted Cholesky of ``C``: at most ``limit`` pivots above ``tol`` (novelty).

        Returns the pivots (indices into ``C``), their unrepresented variances
        and what is left of ``C`` after them.
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

    def _select_sparse(
        self, env: Environments, candidates: np.ndarray | None, max_new: int | None,
        tol: float | None = None, spawn: Callable[[Callable], _Task] | None = None,
    ) -> list[int]:
        """Greedy choice of the atoms of ``env`` that join the sparse set.

        Pivoted Cholesky on the kernel of the candidates conditioned on the
        current sparse set: repeatedly take the candidate the set (plus the
        ones taken so far) represents worst, while its unrepresented fraction
        exceeds ``sparse_tolerance``.  A full species makes room first by
        pruning (see :meth:`_prune_species`) if ``self.prune``.

        A ``tol`` below ``sparse_tolerance`` applies while the species' set is
        below :data:`ADMISSION_FILL` of its cap, and never makes room by pruning:
        on aspirin, finer environments admitted into a full set swapped out 30
        others at almost every call (2015 carbon environments in 600 frames).
        """
        ph, _ = _normalize(env.p)
        if candidates is None:
            candidates = np.arange(len(ph))
        candidates = np.asarray(candidates, dtype=np.int64)
        cap = self.max_sparse_per_species
        own = self.sparse_tolerance
        chosen: list[int] = []
        for s in np.unique(env.species[candidates]):
            at = candidates[env.species[candidates] == s]
            limit = len(at) if max_new is None else min(len(at), max_new)
            C = self._conditioned(s, ph[at])
            n_have = int(np.sum(self.zs == s))
            room = int(ADMISSION_FILL * cap) - n_have
            if tol is not None and tol < own and room > 0:
                picked, _, _ = self._pivots(C, min(limit, room), tol)
                chosen.extend(int(at[i]) for i in picked)
                continue
            if self.prune and n_have + limit > cap:
                want, values, _ = self._pivots(C, limit, own)
                excess = n_have + len(want) - cap
                if excess > 0:
                    gone = self._prune_species(s, max(excess, cap // 20), values[0], spawn)
                    if gone:
                        C = self._conditioned(s, ph[at])
                        n_have -= gone
            picked, _, rest = self._pivots(C, min(limit, cap - n_have), own)
            chosen.extend(int(at[i]) for i in picked)
            full = n_have + len(picked) >= cap
            if full and s not in self._full_warned and len(rest) and np.diag(rest).max() > (
                    own**2):
                self._full_warned.add(s)
                el = self._element(s)
                why = ("and none of its environments is redundant enough to swap out"
                       if self.prune else "and pruning is off")
                log.warning(
                    "the sparse set of %s is full (max_sparse_per_species = %d) %s: new %s "
                    "environments cannot join, so their uncertainty stays high and the "
                    "reference may be asked at most steps. Raise model.max_sparse_per_species "
                    "(each prediction and update costs more) or model.sparse_tolerance (fewer, "
                    "coarser environments)", el, cap, why, el)
        return chosen

    def _prune_species(self, s: int, n: int, threshold: float,
                       spawn: Callable[[Callable], _Task] | None = None) -> int:
        """Remove up to ``n`` of the most redundant sparse environments of species ``s``.

        The redundancy of environment j is its variance given the rest of the
        set, ``1 / [K_ss^-1]_jj`` (normalized kernel units): the smaller, the
        better the others represent it.  Environments are removed greedily
        (the inverse is downdated after each) while that variance is below
        ``threshold`` (the novelty squared of the newcomer that wants in), so
        an environment is never swapped for a less informative one.

        Returns
        -------
        int
            Number removed.
        """
        cols, Li, _ = self._species_block(s)
        Kinv = Li.T @ Li
        alive = np.ones(len(cols), dtype=bool)
        drop: list[int] = []
        for _ in range(min(n, len(cols) - 1)):
            r = np.full(len(cols), np.inf)
            r[alive] = 1.0 / np.diag(Kinv)[alive]
            j = int(np.argmin(r))
            if r[j] >= threshold:
                break
            drop.append(j)
            alive[j] = False
            kj = Kinv[:, j].copy()
            Kinv -= np.outer(kj, kj) / kj[j]
        if drop:
            self._remove_columns(s, cols[drop], spawn)
            self.n_pruned[s] = self.n_pruned.get(s, 0) + len(drop)
            log.info("sparse set of %s full: swapped out %d redundant environments",
                     self._element(s), len(drop))
        return len(drop)

    def _remove_columns(self, s: int, drop: np.ndarray,
                        spawn: Callable[[Callable], _Task] | None = None) -> None:
        """Remove sparse columns ``drop`` (all of species ``s``) and re-whiten.

        K_mm is block diagonal over species, so only species ``s`` changes
        basis: with ``L_s`` its old factor and ``L_k`` the factor of the kept
        block, whitened vectors map by ``W = L_k^-1 L_s[kept]`` (orthonormal
        rows), at O(M_s^2 M) for the whitened accumulators and O(frames M_s^2)
        for the whitened energy rows.  Nothing is recomputed from the frames.
        The two accumulators, and the rows of the held frames, are shared with
        another thread through ``spawn`` (aspirin, 40 of 800 carbon environments
        swapped out at M = 1990: 457 ms on one thread).
        """
        spawn = spawn or _Task
        self._lb_state = None  # B changes in more than a few directions
        M = self.n_sparse
        cs, Li, _ = self._species_block(s)
        kept_local = ~np.isin(cs, drop)
        ks = cs[kept_local]
        keep = np.setdiff1d(np.arange(M), drop)
        Ls = scipy.linalg.solve_triangular(Li, np.eye(len(cs)), lower=True)
        # the kept block of K_mm + jitter as the factor has it (L_s L_s^T), not formed anew
        # from Z: then W's rows are orthonormal to rounding, however K_mm's entries rounded
        Lkept = Ls[kept_local]
        Lk = scipy.linalg.cholesky(Lkept @ Lkept.T, lower=True)
        W = scipy.linalg.solve_triangular(Lk, Lkept, lower=True)  # (kept, M_s)

        def rewhiten(A: np.ndarray, out: np.ndarray) -> np.ndarray:
            X = W @ A[cs]
            A[ks] = X
            A[:, ks] = X.T
            A[np.ix_(ks, ks)] = X[:, cs] @ W.T
            return _take_square(A, keep, out)

        # the kept blocks go straight into squares with room to grow (see _grown)
        AEw, AFw, Linv = (self._kept_square(name, len(keep)) for name in ("_AEw", "_AFw", "_Linv"))
        energy = spawn(functools.partial(rewhiten, self._AEw, AEw))
        self._AFw = rewhiten(self._AFw, AFw)
        self._AEw = energy.join()
        Ew = self._EwT.view
        Ew[:, ks] = Ew[:, cs] @ W.T
        for g in (self._EwT, self._RF, self._RE):
            g.keep_columns(keep, spawn)
        pos = np.searchsorted(keep, ks)
        _take_square(self._Linv, keep, Linv)
        Linv[np.ix_(pos, pos)] = scipy.linalg.solve_triangular(Lk, np.eye(len(ks)), lower=True)
        self._Linv = Linv
        self.Z, self.zs = self.Z[keep], self.zs[keep]
        self.c_E, self.C_E, self.b_F = self.c_E[keep], self.C_E[keep], self.b_F[keep]

    def _kept_square(self, name: str, M: int) -> np.ndarray:
        """An (M, M) block of a spare square for attribute ``name`` (its values unset),
        which the next :meth:`_grown` grows in place."""
        self._square.pop(name, None)
        buf = self._spare.setdefault(name, _Spare()).square(
            max(M, self.max_sparse_per_species * len(self.descriptor.species)))
        self._square[name] = buf
        return buf[:M, :M]

    def _grown(self, name: str, M0: int, M: int) -> np.ndarray:
        """An (M, M) matrix whose [:M0, :M0] block is attribute ``name``; the rest is unset.

        The inverse factor of K_mm and the whitened accumulators live in square
        buffers with room for the largest sparse set, so growing them writes
        only the new rows and columns; a new array would copy the old block
        and touch fresh memory (20 ms of a 126 ms column addition on aspirin at
        M = 1434).  A matrix that is not its buffer's top-left block (e.g.
        after columns were removed) moves to another buffer, so an array handed
        out before (a prediction's snapshot of L^-1) never changes; buffers that
        nothing refers to any more are used again (:class:`_Spare`).
        """
        cur = getattr(self, name)
        buf = self._square.get(name)
        if (buf is not None and M <= len(buf) and cur.base is buf.base
                and cur.ctypes.data == buf.ctypes.data and cur.strides == buf.strides):
            return buf[:M, :M]
        # a square no snapshot holds any more, or a new one
        out = self._kept_square(name, M)
        out[:M0, :M0] = cur
        return out

    def _add_columns(self, new_Z: np.ndarray, new_zs: np.ndarray) -> None:
        """Append sparse environments (both parts) to a model."""
        self._add_column_data(self._add_basis(new_Z, new_zs))

    def _add_basis(self, new_Z: np.ndarray, new_zs: np.ndarray,
                   blocks: list | None = None) -> dict:
        """Append sparse environments, first part: Z, K_mm and L^-1 (what a frame's rows need).

        With ``L = [[L11, 0], [L21, L22]]`` the whitened blocks of the old columns
        stay as they are; the new ones (:meth:`_add_column_data`) cost
        O(M^2 n_new + M n_new n_rows) instead of re-whitening (O(M^3)).
        """
        M0 = self.n_sparse
        n_new = len(new_zs)
        # K_mm and L^-1 are block diagonal over species: each species' old columns and
        # block of L^-1 (taken before the new columns join; ``blocks`` where the caller has
        # them), and its new columns
        if blocks is None:
            blocks = self._species_blocks()
        groups = [(blocks[s][0], np.flatnonzero(new_zs == s), blocks[s][1])
                  for s in np.unique(new_zs)]
        self.Z = np.vstack([self.Z, new_Z])
        self.zs = np.concatenate([self.zs, new_zs])
        cols = np.arange(M0, M0 + n_new)
        M = M0 + n_new
        # the new columns of the kernel matrix and the inverse of its Cholesky factor
        block = (self.Z @ new_Z.T) ** 2
        block[self.zs[:, None] != new_zs[None, :]] = 0.0
        L21 = np.zeros((n_new, M0))  # L11^-1 K12, transposed: nonzero in its species' columns
        L21I = np.zeros((n_new, M0))  # L21 L11^-1
        for cs, js, Ls in groups:
            part = (Ls @ block[np.ix_(cs, js)]).T
            L21[np.ix_(js, cs)] = part
            L21I[np.ix_(js, cs)] = part @ Ls
        S22 = block[M0:] + _JITTER * np.eye(n_new) - L21 @ L21.T
        L22 = scipy.linalg.cholesky(S22, lower=True)
        I22 = scipy.linalg.solve_triangular(L22, np.eye(n_new), lower=True)
        Linv = self._grown("_Linv", M0, M)
        Linv[:M0, M0:] = 0.0
        Linv[M0:, :M0] = -I22 @ L21I
        Linv[M0:, M0:] = I22
        self._Linv = Linv
        return {"M0": M0, "cols": cols, "I22": I22, "L21": L21, "blocks": blocks}

    def _add_column_data(self, basis: dict,
                         spawn: Callable[[Callable], _Task] | None = None) -> None:
        """Append sparse environments, second part: their rows against every held frame and
        the new blocks of every accumulator (``basis`` from :meth:`_add_basis`). The large
        products are shared with another thread through ``spawn`` (:func:`_in_two`)."""
        M0, cols, I22, L21 = (basis[k] for k in ("M0", "cols", "I22", "L21"))
        n_new = len(cols)
        M = M0 + n_new
        # rows of every stored frame against the new columns
        E_rows, R_new = self._rows_all(cols, spawn)  # (frames, n_new), (sum 3N, n_new)
        # (R^T RF)^T: twice as fast as RF^T R for a few columns (OpenBLAS). Shared between
        # threads by columns of RF, which leaves every sum as it was (not by rows: a sum of
        # two halves differs in rounding)
        RF = self._RF.view
        A12 = np.hstack(_in_two(spawn, lambda i, j: R_new.T @ RF[:, i:j], M0)).T
        A22 = R_new.T @ R_new
        labels = self._labels(self.frames)
        E_new = (E_rows * np.sqrt(labels[0])[:, None]).T  # whitening wants rows / sqrt(N)
        sums = self._label_sums(E_rows, R_new, labels)
        self.c_E = np.concatenate([self.c_E, sums["c_E"]])
        self.C_E = np.vstack([self.C_E, sums["C_E"]])
        self.b_F = np.concatenate([self.b_F, sums["b_F"]])
        self._RF.add_columns(R_new)
        self._RE.add_columns(E_rows)
        # whitened force accumulator: new blocks from the old ones (see docstring); L11^-1
        # by its species blocks (its zeros are most of it)
        Y = _times_blocks(basis["blocks"], A12)
        LW = L21 @ self._AFw  # (n_new, M0), 2.7 ms at M0 = 1900: formed once
        b21 = I22 @ (Y.T - LW)
        LY = L21 @ Y
        mid = LW @ L21.T - LY - LY.T + A22
        A22w = I22 @ mid @ I22.T
        AFw = self._grown("_AFw", M0, M)
        AFw[M0:, :M0] = b21
        AFw[:M0, M0:] = b21.T
        AFw[M0:, M0:] = 0.5 * (A22w + A22w.T)
        self._AFw = AFw
        # whitened energy rows and their outer-product sum
        Ew = self._EwT.view.T  # (M0, frames)
        new = I22 @ (E_new - L21 @ Ew) if len(self.frames) else np.zeros((n_new, 0))
        cross = Ew @ new.T
        AEw = self._grown("_AEw", M0, M)
        AEw[:M0, M0:] = cross
        AEw[M0:, :M0] = cross.T
        AEw[M0:, M0:] = new @ new.T
        self._AEw = AEw
        self._EwT.add_columns(new.T)

    def add_frame(
        self,
        atoms: Atoms,
        energy: float,
        forces: np.ndarray,
        env: Environments | None = None,
        candidates: np.ndarray | None = None,
        max_new_sparse: int | None = None,
        solve: bool = True,
        sparse_tolerance: float | None = None,
    ) -> int:
        """Add one labelled structure and update the model incrementally.

        The same as :meth:`prepare_frame` followed by :meth:`add_prepared`.

        Parameters
        ----------
        atoms : ase.Atoms
            The structure.
        energy : float
            Reference energy, eV.
        forces : ndarray, shape (n_atoms, 3)
            Reference forces, eV/Å.
        env : Environments, optional
            Descriptors of ``atoms`` if already computed.
        candidates : array of int, optional
            Atoms that may join the sparse set (default: all).
        max_new_sparse : int, optional
            At most this many new sparse environments per species from this frame.
        solve : bool, default True
            Re-solve for the weights afterwards (set False when adding a batch).
        sparse_tolerance : float, optional
            A lower ``sparse_tolerance`` for this frame only (normalized kernel
            units), to admit the environments that made the learner call the
            reference (see ``LearningPolicy.sparse_admission``); it applies to
            the species whose sparse set is below :data:`ADMISSION_FILL` of
            ``max_sparse_per_species``.

        Returns
        -------
        int
            Number of environments added to the sparse set.
        """
        self._checked_labels(len(atoms), energy, forces)  # before anything changes
        prep = self.prepare_frame(atoms, env, candidates, max_new_sparse, sparse_tolerance)
        self.add_prepared(prep, energy, forces, solve=solve)
        return prep.n_new

    @staticmethod
    def _checked_labels(n_atoms: int, energy: float, forces: np.ndarray) -> np.ndarray:
        """``forces`` as an (n_atoms, 3) float array; ValueError for a wrong shape or NaN/inf."""
        forces = np.asarray(forces, dtype=float).reshape(-1, 3)
        if len(forces) != n_atoms:
            raise ValueError(f"forces have {len(forces)} rows for {n_atoms} atoms")
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise ValueError("reference energy/forces contain NaN or inf; frame refused")
        return forces

    def _state(self) -> tuple:
        """What must not change between :meth:`prepare_frame` and :meth:`add_prepared`."""
        return self.n_sparse, len(self.frames), id(self._Linv), self.n_dropped

    def prepare_frame(
        self,
        atoms: Atoms,
        env: Environments | None = None,
        candidates: np.ndarray | None = None,
        max_new_sparse: int | None = None,
        sparse_tolerance: float | None = None,
        spawn: Callable[[Callable], _Task] | None = None,
    ) -> PreparedFrame:
        """The part of adding a frame that needs only its geometry, not its labels.

        Frames beyond ``max_frames`` leave the model, the frame's new sparse
        environments join the set (their rows against every held frame are
        most of an update's cost) and the frame's own rows are formed.  Its
        labels and contributions to the accumulators come with
        :meth:`add_prepared`; nothing else may change the model in between.
        The learner runs this while the reference computes the labels.  Until
        then predictions are those of the last solve. Parameters as in
        :meth:`add_frame`, and ``spawn``: makes a :class:`_Task` of a function that
        another thread may run meanwhile (the learner's thread that waits for the
        reference, once it returns); default: the prediction's other thread where
        ``threads`` > 1 (:meth:`_spawn_here`), else run at ``join``. The results do not
        depend on which thread ran what.
        """
        if not self._trainable:
            raise RuntimeError(
                "this model was loaded from a model file and can only predict; "
                "rebuild it from its store (otfml.learner.train_from_frames) to train further"
            )
        if env is None:
            env = self.descriptor.environments(atoms)
        ph, _ = _normalize(env.p)
        if self.max_frames is not None and len(self.frames) >= self.max_frames:
            # before the new columns, whose rows the dropped frames would no longer need
            self._evict(len(self.frames) - self.max_frames + max(1, self.max_frames // 10))
        spawn = spawn or self._spawn_here() or _Task
        picked = self._select_sparse(env, candidates, max_new_sparse, sparse_tolerance, spawn)
        # L^-1's species blocks before the new columns (cut out for the selection already)
        blocks = self._species_blocks()
        M0 = self.n_sparse
        basis = self._add_basis(ph[picked], env.species[picked], blocks) if picked else None
        own = spawn(functools.partial(self._frame_rows, env, M0, blocks))  # after the basis
        if basis is not None:
            self._add_column_data(basis, spawn)
        geom, row_e, rows_f, W, ew = own.join()
        # the force rows' buffer grows (a copy of every held frame's rows) here, not later
        self._RF.reserve(self._RF.n + 3 * len(atoms))
        base = None
        if self.baseline is not None:
            atom_e, base_f = self.baseline.energies_forces(atoms)
            base = (float(atom_e.sum()), base_f)
        return PreparedFrame(env=env, n_new=len(picked), geom=geom, row_e=row_e,
                             rows_f=rows_f, W=W, ew=ew, state=self._state(), base=base)

    def _frame_rows(self, env: Environments, M0: int, blocks: list) -> tuple:
        """A frame's geometry, energy and force rows and their whitened forms.

        ``L^-1`` is block diagonal over species in its first ``M0`` columns, whose
        blocks (columns, ``L^-1`` block) ``blocks`` gives; the rows of the columns added
        since are read from ``L^-1`` itself. A third of the product with the whole of
        ``L^-1`` for three elements (aspirin at M = 1990: 7.4 ms of 29).
        """
        geom = self._geometry(env)
        M = self.n_sparse
        row_e, rows_f = self._rows(env, np.arange(M), geom)
        rows = np.vstack([rows_f, row_e / math.sqrt(len(env.species))])  # (3N + 1, M)
        Wall = _times_blocks(blocks, rows.T, out=np.empty((M, len(rows))))
        if M > M0:
            Wall[M0:] = self._Linv[M0:] @ rows.T
        return geom, row_e, rows_f, Wall[:, :-1], np.ascontiguousarray(Wall[:, -1])

    def add_prepared(self, prep: PreparedFrame, energy: float, forces: np.ndarray,
                     solve: bool = True) -> None:
        """Add the labels of a frame :meth:`prepare_frame` prepared.

        Parameters
        ----------
        prep : PreparedFrame
            What :meth:`prepare_frame` returned; the model must not have changed since.
        energy : float
            Reference energy, eV.
        forces : ndarray, shape (n_atoms, 3)
            Reference forces, eV/Å.
        solve : bool, default True
            Re-solve for the weights afterwards.

        Labels with NaN/inf (ValueError) leave the model as if the frame had
        never been prepared (:meth:`discard_prepared`).
        """
        if prep.state != self._state():
            raise RuntimeError("the model changed between prepare_frame and add_prepared; "
                               "prepare the frame again")
        env = prep.env
        try:
            forces = self._checked_labels(len(env.numbers), energy, forces)
        except ValueError:
            self.discard_prepared(prep)
            raise
        prep.state = None  # used up
        if prep.base is not None:  # the model learns the labels less its baseline
            energy = energy - prep.base[0]
            forces = forces - prep.base[1]
        N = len(env.numbers)
        row_e, rows_f, W, ew, geom = prep.row_e, prep.rows_f, prep.W, prep.ew, prep.geom
        counts = np.bincount(env.species, minlength=len(self.descriptor.species)).astype(float)
        f = forces.ravel()

        def rank_update(i: int, j: int) -> None:  # rows i:j of the whitened accumulators
            self._AFw[i:j] += W[i:j] @ W.T
            self._AEw[i:j] += np.outer(ew[i:j], ew)

        _in_two(self._spawn_here(), rank_update, len(ew))
        st = self._lb_state
        if st is not None:  # kept for the factor's update until their rank would not pay
            st["rows"].append((W, ew))
            st["rank"] += W.shape[1] + 1
            if st["rank"] > _UPDATE_RANK * st["M"]:
                self._lb_state = None
        self._EwT.append(ew[None, :])
        self.c_E += row_e * energy / N
        self.C_E += np.outer(row_e, counts) / N
        self.b_F += rows_f.T @ f
        self._EE += energy * energy / N
        self._En += energy * counts / N
        self._nn += np.outer(counts, counts) / N
        self._ff += float(f @ f)
        self._n_e += 1
        self._n_f += len(f)
        self._logN += math.log(N)
        # frames beyond the cache budget are recomputed when new sparse columns need them
        cached = self._cache_bytes + geom["nbytes"] <= self.cache_bytes
        if cached:
            self._cache_bytes += geom["nbytes"]
            self._cache_geometry(geom, len(self.frames), self._n_atoms)
        self._RF.append(rows_f)
        self._RE.append(row_e[None, :])
        # the frame keeps its environments without the pair basis gradients (large for
        # big structures; recomputed from the pair vectors if the frame is not cached)
        self.frames.append(_Frame(env.numbers.copy(), dataclasses.replace(env, dB=None),
                                  float(energy), forces.copy(), counts, self._n_atoms, cached,
                                  geom["nbytes"] if cached else 0))
        self._n_atoms += N
        if not self._memory_checked and self.max_frames is not None:  # once, at the first frame
            self._memory_checked = True
            self._reserve(geom)
            self._report_memory(geom)
        if solve:
            self.solve()

    def memory_estimate(self, geom: dict, n_frames: int) -> dict[str, float]:
        """Bytes the model will hold with ``n_frames`` frames like the first one.

        Parameters
        ----------
        geom : dict
            The frame's geometry (:meth:`_geometry`).
        n_frames : int
            Frames held.

        Returns
        -------
        dict
            ``rows``: the force and energy rows (3N + 2 per frame: forces, energy,
            whitened energy; as many columns as the sparse set can have); ``cache``:
            the cached descriptor gradients (of the frames whose pair gradients fit in
            ``cache_bytes``, with what is cached beside them); ``frames``: each
            frame's environments and labels; ``matrices``: the M x M matrices at the
            full sparse set; ``total``;
            ``peak``: the total while the force rows' buffer grows (it is copied),
            the total where their rows were reserved (:meth:`_reserve`).

        Notes
        -----
        The arrays only: on the 163 frames of a 64-water run (192 atoms, default
        settings, rows reserved) the estimate was 0.73 / 1.37 / 2.18 GB at 50 / 100 /
        163 frames and the process grew by 0.88 / 1.66 / 2.49 GB (the allocator's
        overhead and the update's temporaries; 2.94 GB at its largest).
        """
        env = self.frames[0].env
        rows = n_frames * self._RF._a.shape[1] * 8 * (3 * len(env.numbers) + 2)
        blocks = geom["blocks"].values()
        cached = sum(a.nbytes for blk in blocks for key, a in blk.items() if key != "inc")
        cache = self._frames_cached(geom, n_frames) * cached
        per_frame = sum(a.nbytes for a in (env.p, env.c, env.pi, env.pj, env.D, env.sj,
                                           env.species, env.numbers, self.frames[0].forces))
        M = self.max_sparse_per_species * len(self.descriptor.species)
        out = {"rows": float(rows), "cache": float(cache), "frames": float(n_frames * per_frame),
               "matrices": 8.0 * 8 * M * M}  # L^-1, the accumulators, factors, copies
        out["total"] = sum(out.values())
        out["peak"] = out["total"] + (0.0 if self._reserved else out["rows"])
        return out

    def _frames_cached(self, geom: dict, n_frames: int) -> int:
        """How many of ``n_frames`` frames like ``geom`` the gradient cache takes."""
        return min(n_frames, self.cache_bytes // max(geom["nbytes"], 1))

    def _reserve(self, geom: dict) -> None:
        """Reserve the rows ``max_frames`` frames like the first will need, once.

        The force rows' buffer otherwise grows fourfold, copying the rows it holds
        (64 waters: 2.5 GB of rows copied at 455 frames, 5 GB held at 1000); the cached
        gradients' buffers likewise.  The reservation is address space only: the
        operating system backs the rows as they are written.  Where it refuses
        (strict overcommit), the buffers grow as before.
        """
        nf = self.max_frames
        n_cached = self._frames_cached(geom, nf)
        try:  # the buffers hold the first frame only: their rows are one frame's
            self._RF.reserve(nf * self._RF.n, exact=True)
            for g in self._geo.values():
                for buf in g.values():
                    # a quarter more: the pairs within the cutoff vary from frame to frame
                    buf.reserve(int(1.25 * n_cached * buf.n), exact=True)
        except MemoryError:
            log.debug("address space for %d frames' rows refused: the buffers grow instead", nf)
            return
        self._reserved = True

    def _report_memory(self, geom: dict) -> None:
        """Log what ``max_frames`` frames like the first will take; warn if the machine lacks it."""
        est = self.memory_estimate(geom, self.max_frames)
        gb = 1024.0**3
        n_atoms = len(self.frames[0].numbers)
        what = (f"{self.max_frames} frames of {n_atoms} atoms (model.max_frames) will take "
                f"about {est['total'] / gb:.2f} GB (force rows {est['rows'] / gb:.2f}, cached "
                f"gradients {est['cache'] / gb:.2f}, environments {est['frames'] / gb:.2f}, "
                f"matrices {est['matrices'] / gb:.2f})")
        if est["peak"] > est["total"]:
            what += f" and up to {est['peak'] / gb:.2f} GB while the force rows' buffer grows"
        phys = _physical_memory()
        if phys is None or est["peak"] <= 0.8 * phys:
            log.info("model memory: %s", what)
            return
        fixed = est["matrices"] + est["cache"]
        copies = 1.0 if self._reserved else 2.0  # rows held twice while their buffer grows
        per_frame = (copies * est["rows"] + est["frames"]) / self.max_frames
        fit = max(1, int((0.8 * phys - fixed) / per_frame)) if 0.8 * phys > fixed else 1
        log.warning("model memory: %s, more than 80 %% of this machine's %.1f GB: lower "
                    "model.max_frames to about %d (or model.max_sparse_per_species)",
                    what, phys / gb, min(fit, self.max_frames))

    def discard_prepared(self, prep: PreparedFrame) -> None:
        """Undo :meth:`prepare_frame` for a frame that gets no labels (the reference failed).

        Its new sparse environments leave the set again: without the frame's
        data they would make the model look certain where it has learnt
        nothing.  Frames taken out under ``max_frames`` and environments a full
        species swapped out stay out.  Nothing to do once the frame was added.
        """
        if prep.state is None:
            return
        if prep.state != self._state():
            raise RuntimeError("the model changed after prepare_frame; cannot discard")
        left = prep.n_new
        while left:  # the new columns are the last ones, grouped by species
            tail = np.arange(self.n_sparse - left, self.n_sparse)
            drop = tail[self.zs[tail] == self.zs[tail[0]]]
            self._remove_columns(int(self.zs[tail[0]]), drop)
            left -= len(drop)
        prep.state = None

    def _evict(self, n: int) -> None:
        """Take ``n`` frames out under ``max_frames``, chosen by ``self.evict``."""
        n = min(n, len(self.frames))
        if self.evict == "thin" and 2 * n <= len(self.frames):
            which, how = np.arange(1, 2 * n, 2), "every other one of the oldest"
        else:
            which, how = np.arange(n), "the oldest"
        self.drop_frames(which)
        log.info("model holds %d frames (max_frames = %d): took out %d (%s; %d so far; "
                 "the store keeps them)", len(self.frames), self.max_frames or 0, n, how,
                 self.n_dropped)

    def drop_frames(self, which) -> None:
        """Take frames ``which`` (indices into ``frames``) out of the model (weights not re-solved).

        Their contributions are subtracted from every accumulator: whitened
        force rows ``W = L^-1 R^T`` from ``AFw``, whitened energy rows from
        ``AEw``, and the label sums, O(rows M^2); their rows and cached
        descriptor gradients leave the buffers, and the frames after them move
        up.  The sparse set stays.  The result equals a model built on the
        remaining frames, in their order, with the same sparse set.
        """
        self._lb_state = None  # B changes in more than a few directions
        gone = np.zeros(len(self.frames), dtype=bool)
        gone[np.asarray(which, dtype=np.int64)] = True
        n = int(gone.sum())
        if n == 0:
            return
        old = [fr for fr, g in zip(self.frames, gone) if g]
        atom_gone = np.zeros(self._n_atoms, dtype=bool)
        for fr in old:
            atom_gone[fr.atom_start: fr.atom_start + len(fr.numbers)] = True
        n_atoms = int(atom_gone.sum())
        row_gone = np.repeat(atom_gone, 3)
        R = self._RF.view[row_gone]
        W = self._Linv @ R.T
        self._AFw -= W @ W.T
        self._AFw = 0.5 * (self._AFw + self._AFw.T)
        Ew = self._EwT.view[gone]
        self._AEw -= Ew.T @ Ew
        labels = self._labels(old)
        for name, value in self._label_sums(self._RE.view[gone], R, labels).items():
            setattr(self, name, getattr(self, name) - value)
        self._n_e -= n
        self._n_f -= 3 * n_atoms
        self._logN += float(np.sum(np.log(labels[0])))
        self._RF.keep_rows(~row_gone)
        self._RE.keep_rows(~gone)
        self._EwT.keep_rows(~gone)
        # new global index of a kept atom or frame: the old one less those gone before it
        atom_shift = np.cumsum(atom_gone)
        frame_shift = np.cumsum(gone)
        for g in self._geo.values():
            pi = g["pi"].view[:, 0]
            pair_keep = ~atom_gone[pi]
            atom_keep = ~gone[g["atom_frame"].view[:, 0]]
            g["G"].keep_rows(np.repeat(pair_keep, 3))  # three rows per pair
            for key in ("ph", "scale", "u", "pi", "pj"):
                g[key].keep_rows(pair_keep)
            for key in ("atoms", "atom_frame"):
                g[key].keep_rows(atom_keep)
            for key in ("pi", "pj"):
                g[key].view[:, 0] -= atom_shift[g[key].view[:, 0]]
            g["atom_frame"].view[:, 0] -= frame_shift[g["atom_frame"].view[:, 0]]
        self._cache_bytes -= sum(fr.nbytes for fr in old)
        self.frames = [fr for fr, g in zip(self.frames, gone) if not g]
        start = 0
        for fr in self.frames:
            fr.atom_start = start
            start += len(fr.numbers)
        self._n_atoms -= n_atoms
        self.n_dropped += n

    def rebuild_accumulators(self, chunk: int = 4096) -> None:
        """Re-form the factor of K_mm and every accumulator from the stored rows.

        What the incremental updates maintain, computed afresh: ``L^-1`` from
        ``K_mm``, the whitened force accumulator ``L^-1 (R^T R) L^-T`` (``R^T R``
        summed ``chunk`` force rows at a time), the whitened energy rows and their outer-product
        sum, and the label sums.  O(rows M^2); used when rounding has made the
        incrementally updated system indefinite.
        """
        self._lb_state = None  # B changes in more than a few directions
        M = self.n_sparse
        L = scipy.linalg.cholesky(self._kernel(np.arange(M)) + _JITTER * np.eye(M), lower=True)
        self._Linv = scipy.linalg.solve_triangular(L, np.eye(M), lower=True)
        R = self._RF.view
        A = np.zeros((M, M))
        for i in range(0, len(R), chunk):
            Rc = R[i: i + chunk]
            A += Rc.T @ Rc  # a symmetric rank-k update (BLAS syrk)
        self._AFw = self._Linv @ A @ self._Linv.T
        self._AFw = 0.5 * (self._AFw + self._AFw.T)
        labels = self._labels(self.frames)
        RE = self._RE.view
        Ew = self._Linv @ (RE * np.sqrt(labels[0])[:, None]).T  # (M, frames)
        self._EwT.drop_rows(self._EwT.n)
        self._EwT.append(Ew.T)
        self._AEw = Ew @ Ew.T
        for name, value in self._label_sums(RE, R, labels).items():
            setattr(self, name, value)

    def _labels(self, frames: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """1/N (frames,), energies (frames,) eV, element counts (frames, S) and all
        forces (sum 3N,) eV/Å of ``frames``."""
        inv_n = np.array([1.0 / len(fr.numbers) for fr in frames])
        energies = np.array([fr.energy for fr in frames])
        counts = np.array([fr.counts for fr in frames]).reshape(
            len(frames), len(self.descriptor.species))
        f = np.concatenate([fr.forces.ravel() for fr in frames]) if frames else np.zeros(0)
        return inv_n, energies, counts, f

    @staticmethod
    def _label_sums(RE: np.ndarray, R: np.ndarray, labels: tuple) -> dict:
        """What frames contribute to the label accumulators (attribute name: value).

        ``RE`` (frames, m) and ``R`` (sum 3N, m) are their energy and force rows
        against m sparse columns, ``labels`` what :meth:`_labels` returns for them.
        """
        inv_n, energies, counts, f = labels
        return {"c_E": RE.T @ (energies * inv_n), "C_E": RE.T @ (counts * inv_n[:, None]),
                "b_F": R.T @ f, "_EE": float(np.sum(energies**2 * inv_n)),
                "_En": (energies * inv_n) @ counts,
                "_nn": (counts * inv_n[:, None]).T @ counts, "_ff": float(f @ f)}

    def fit_baseline(self) -> np.ndarray:
        """Per-species energy baselines e0 (eV) by least squares on energy per atom.

        Minimum-norm solution where the compositions do not determine every
        species (e.g. a single molecule).
        """
        if self._n_e == 0:
            return self.e0
        # weighted normal equations: (sum n n^T/N) e0 = sum E n/N
        self.e0 = np.linalg.lstsq(self._nn, self._En, rcond=1e-10)[0]
        return self.e0

    # ------------------------------------------------------------------
    # solution and likelihood
    # ------------------------------------------------------------------
    def _whitened(self) -> dict:
        """Accumulators in the basis whitened by L (the Cholesky factor of K_mm).

        In this basis ``P = K_mm + K_mn Lam^-1 K_nm = sigma^2 L B L^T`` with
        ``B = I + sigma^2 (AEw/se^2 + AFw/sf^2)``, whose eigenvalues are >= 1, so
        the solve stays well conditioned however small the noises get.  The
        energy block is a sum of outer products of the whitened energy rows (PSD
        by construction; its rank is at most the number of frames), kept up to
        date as frames and sparse columns arrive, so a solve costs no O(frames M^2).
        """
        c = self.c_E - self.C_E @ self.e0
        blocks = self._species_blocks()  # L^-1 by them: a third of the memory traffic (aspirin)
        return {
            "AE": self._AEw,
            "AF": self._AFw,
            "c": _times_blocks(blocks, c),
            "bF": _times_blocks(blocks, self.b_F),
        }

    def _B(self, theta: np.ndarray, start: int = 0) -> np.ndarray:
        """Rows ``start:`` of ``B = I + sigma^2 (AEw/se^2 + AFw/sf^2)``, (M - start, M).

        ``theta`` is (sigma, sigma_e, sigma_f); see :meth:`_whitened`.
        """
        return _B_rows(self._AEw, self._AFw, theta, start)

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
                    n_e=self._n_e, n_f=self._n_f, logN=self._logN, e0=self.e0.copy())
        return data

    def log_marginal_likelihood(
        self, theta: np.ndarray | None = None, eval_gradient: bool = False
    ):
        """DTC log marginal likelihood of the training labels.

        Parameters
        ----------
        theta : array (3,), optional
            (sigma, sigma_e, sigma_f) in eV, eV, eV/Å; current values by default.
        eval_gradient : bool, default False
            Also return the gradient with respect to ``log(theta)``.

        Returns
        -------
        float, or (float, ndarray (3,))
            Log likelihood (and its gradient); ``-inf`` if the system is singular.
        """
        theta = self.hyp.as_array() if theta is None else np.asarray(theta, float)
        if self.n_sparse == 0 or self._n_e == 0:
            return (0.0, np.zeros(3)) if eval_gradient else 0.0
        return _log_likelihood(self._likelihood_data(), theta, eval_gradient)

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
            v, g = _log_likelihood(data, np.exp(x), eval_gradient=True)
            if not np.isfinite(v):
                return 1e300, np.zeros(3)
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

    def solve(self) -> None:
        """Solve for the weights at the current hyperparameters.

        O(M^3 / 3) for a new factorization of ``B``; after frames and sparse
        columns were only added since the last solve, at the same hyperparameters,
        the factor is updated instead (see :meth:`_updated_factor`).
        """
        if self._n_e == 0 or self.n_sparse == 0:
            self._fitted = False
            return
        hyp = self.hyp.as_array()
        sigma, se, sf = hyp
        M = self.n_sparse
        s2 = sigma**2
        # the predictions' per-species pieces need only L^-1: cut on another thread, if
        # there is one, while this one updates the factor
        spawn = self._spawn_here() or _Task
        panels = spawn(self._species_panels)
        LB = self._updated_factor(hyp)
        for attempt in (0, 1):
            if LB is not None:
                break
            try:
                # B (symmetric, C-ordered) read as its transpose in Fortran order: LAPACK
                # factors it in place, without the transposing copy (5-9 ms at M = 1900), and
                # the upper factor of B^T, transposed, is B's lower factor, C-ordered
                LB = scipy.linalg.cholesky(self._B(hyp).T, lower=False, overwrite_a=True,
                                           check_finite=False).T
                self._lb_state = self._factored(hyp, 0)
            except np.linalg.LinAlgError:
                if attempt:
                    raise
                # B >= I exactly; rounding in the incremental updates and in the downdates of
                # dropped frames grows with the conditioning of K_mm and can break that
                log.warning("the incrementally updated accumulators lost positive definiteness "
                            "(M = %d, %d frames); re-forming them from the stored rows", M,
                            len(self.frames))
                self.rebuild_accumulators()
        self.fit_baseline()  # free: the accumulators carry e0 linearly
        wh = self._whitened()
        u = wh["c"] / se**2 + wh["bF"] / sf**2
        # weights alpha = P^-1 b = L^-T B^-1 u; local energy eps = kt^T (s2 alpha);
        # LB.T is the upper factor in Fortran order, which LAPACK takes without a copy
        # (s2 times the vector: s2 * Linv.T first formed an M x M product, 16 ms at M = 1900)
        self._beta = s2 * _times_blocks(
            self._species_blocks(), scipy.linalg.cho_solve((LB.T, False), u, check_finite=False),
            transpose=True)
        self._LB = LB
        self._make_blocks(panels=panels.join())
        self._fitted = True

    def _updated_factor(self, hyp: np.ndarray) -> np.ndarray | None:
        """Cholesky factor of ``B`` from the last one, or None where a new factorization is due.

        Since the last factorization (of size ``M0``), frames only added rank-k
        terms ``V V^T`` to ``B`` (their whitened force and energy rows, scaled by
        the hyperparameters), and new sparse columns only appended rows and
        columns (the old block of the whitened accumulators does not change,
        see :meth:`_add_column_data`).  So the old factor takes the rank-k update
        (a QR of the triangle stacked on ``V^T``, LAPACK ``tpqrt``, O(k M0^2)),
        and the new rows follow by a triangular solve and a small Cholesky,
        O(M0^2 n_new): for aspirin's k = 64 at M = 1800, 15 ms against 84 ms
        for a new factorization (one thread).  Both work in place in one new
        array (:func:`_update_factor_rows`, :func:`_solve_below`); the factor's
        diagonal may come out negative, which changes neither ``LB LB^T`` nor any
        solve with it.  A new one is due after other changes (frames
        dropped, columns removed, new hyperparameters), when the rank is large
        (k > ``_UPDATE_RANK`` M0, e.g. big structures: the update's 2 k M0^2
        flops would not beat the factorization's M0^3 / 3), and every 100
        updates, so that rounding cannot build up.
        """
        st = self._lb_state
        if st is None or not np.array_equal(st["hyp"], hyp) or st["updates"] >= 100:
            return None
        M0, M = st["M"], self.n_sparse
        sigma, se, sf = hyp
        k = st["rank"]
        # another array: the last solve's posterior keeps reading the old factor
        LB = self._spare.setdefault("LB", _Spare()).square(M, room=0.1)
        LB[:M0, :M0] = self._LB
        if k:
            V = np.hstack([np.column_stack([W[:M0] * (sigma / sf), ew[:M0] * (sigma / se)])
                           for W, ew in st["rows"]])
            if not _update_factor_rows(LB, M0, V):
                return None
        if M > M0:
            B_new = self._B(hyp, M0)  # the new rows: [B21, B22]
            LB[:M0, M0:] = 0.0
            LB[M0:, :M0] = B_new[:, :M0]
            _solve_below(LB, M0)  # L21 = B21 L11^-T
            L21 = LB[M0:, :M0]
            try:
                LB[M0:, M0:] = scipy.linalg.cholesky(B_new[:, M0:] - L21 @ L21.T, lower=True)
            except np.linalg.LinAlgError:
                return None
        self._lb_state = self._factored(hyp, st["updates"] + 1)
        return LB

    def _factored(self, hyp: np.ndarray, updates: int) -> dict:
        """State after ``B`` was factored at ``hyp``: its size, the whitened rows of the
        frames added since (and their rank), and how many updates the factor has taken."""
        return {"M": self.n_sparse, "hyp": hyp, "rows": [], "rank": 0, "updates": updates}

    def _species_panels(self) -> dict:
        """Each species' columns, rows of ``Z`` and block of ``L^-1`` as row panels
        (:func:`_triangular_panels`), for the current ``L^-1`` (key "Linv")."""
        out: dict = {"Linv": self._Linv}
        for s in range(len(self.descriptor.species)):
            cols, Li, Zs = self._species_block(s)
            out[s] = (cols, Zs, *_triangular_panels(Li))
        return out

    def _make_blocks(self, C: np.ndarray | None = None, panels: dict | None = None) -> None:
        """Per-species slices used at every prediction (no copies in the hot path).

        Each species' block of ``L^-1`` is lower triangular (columns keep their order
        when added or removed; K_mm is block diagonal over species): ``predict``
        multiplies by it as a triangular matrix, kept as row panels. ``panels`` (from
        :meth:`_species_panels`) where already made.
        """
        if panels is None or panels["Linv"] is not self._Linv:
            panels = self._species_panels()
        self._blocks = {}
        for s in range(len(self.descriptor.species)):
            cols, Zs, pan, offsets = panels[s]
            self._blocks[s] = {
                "cols": cols,
                "Z": Zs,
                "beta": np.ascontiguousarray(self._beta[cols]),
                "panels": pan,
                "offsets": offsets,
            }
        self._posterior = _Posterior(self._LB, self._Linv, self._blocks, C)

    # ------------------------------------------------------------------
    # prediction
    # ------------------------------------------------------------------
    @property
    def _n_threads(self) -> int:
        return self.threads if self.threads is not None else _default_threads()

    def _lanes(self, work: list[tuple[int, int, float]]) -> int:
        """Threads for one prediction's work (``threads``; one where the work is small)."""
        n = self._n_threads
        if n > 1 and sum(u * (_FIXED_ATOMS + k) for _, k, u in work) >= _MIN_SPLIT_WORK:
            return n
        return 1

    def _spawn_here(self) -> Callable[[Callable], _Task] | None:
        """``spawn`` for work of an update on the calling thread while nothing else runs
        (:meth:`prepare_frame` without a reference running, :meth:`add_prepared`,
        :meth:`solve`): the prediction's other threads take it; None on one thread
        (``threads``)."""
        if self._n_threads < 2:
            return None
        pool = self._lane_pool()

        def spawn(fn: Callable) -> _Task:
            task = _Task(fn)
            pool.submit(lambda: task.claim() and task.run())
            return task

        return spawn

    def _lane_pool(self) -> ThreadPoolExecutor:
        n = self._n_threads
        if self._pool is None or self._pool_size != n - 1:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="otfml-predict")
            self._pool_size = n - 1
        return self._pool

    @property
    def is_fitted(self) -> bool:
        """True once the model has data to predict from."""
        return self._fitted

    def predict(self, atoms: Atoms, env: Environments | None = None) -> Prediction:
        """Energy, forces and uncertainties of one structure.

        Parameters
        ----------
        atoms : ase.Atoms
            Structure to predict.
        env : Environments, optional
            Precomputed descriptors of ``atoms``.
        """
        if not self._fitted:
            raise RuntimeError("the model has no training data yet; add a labelled frame first")
        if env is None:
            env = self.descriptor.environments(atoms)
        ph, norm = _normalize(env.p)
        N = len(ph)
        sigma2 = self.hyp.sigma**2
        eps = self.e0[env.species].astype(float)
        dE_dp = np.zeros_like(ph)
        ww = np.zeros(N)  # |L^-1 kt_i|^2 (L^-1 is block diagonal over species)
        order = np.argsort(env.species, kind="stable")
        first = np.searchsorted(env.species[order], np.arange(len(self._blocks) + 1))
        chunk = max(16, _CHUNK_BYTES // (8 * ph.shape[1]))
        work = [(s, int(first[s + 1] - first[s]),
                 len(blk["cols"]) * (ph.shape[1] + len(blk["cols"]) / 2))
                for s, blk in self._blocks.items() if len(blk["cols"]) and first[s + 1] > first[s]]

        def run(pieces: list[tuple[int, int, int]]) -> list[tuple]:
            out = []
            for s, start, stop in pieces:
                at = order[first[s] + start:first[s] + stop]
                blk = self._blocks[s]
                out.append((s, at, *_species_terms(ph[at], blk["Z"], blk["beta"], blk["panels"],
                                                   blk["offsets"], _PANEL_ROWS, chunk)))
            return out

        lanes = [x for x in _split_work(work, self._lanes(work)) if x]
        pending = [self._lane_pool().submit(run, x) for x in lanes[1:]]
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
        post = self._posterior  # this solve's factors, even if the model is updated meanwhile

        def posterior() -> tuple[np.ndarray, float]:
            # var(eps_i) = sigma^2 (1 - |L^-1 kt_i|^2 + |LB^-1 L^-1 kt_i|^2)  (DTC);
            # LB^-1 L^-1 (= C) is not block diagonal: the energy needs all of it
            cc = np.zeros(N)
            wE = np.zeros(len(post.U))  # L^-1 sum_i kt_i
            e_var_prior = 0.0
            for s in range(len(self._blocks)):
                pa = ph[order[first[s]:first[s + 1]]]
                e_var_prior += np.sum((pa @ pa.T) ** 2)
            for s, at, kT, wsum in kept:
                cc[at] = np.einsum("ji,ji->i", post.ctc(s) @ kT, kT)
                wE[post.blocks[s]["cols"]] += wsum
            var = sigma2 * (1.0 - ww + cc)
            vE = scipy.linalg.lapack.dtrtrs(post.U, wE, lower=0, trans=1)[0]  # LB^-1 wE
            e_var = sigma2 * (e_var_prior - wE @ wE + vE @ vE)
            return np.sqrt(np.clip(var, 0.0, None)), float(math.sqrt(max(e_var, 0.0)))

        return Prediction(
            energy=float(eps.sum()),
            forces=forces,
            local_energies=eps,
            novelty=self.hyp.sigma * np.sqrt(np.clip(1.0 - ww, 0.0, 1.0)),
            env=env,
            _posterior=posterior,
        )

    # ------------------------------------------------------------------
    # persistence
    # ------------------------------------------------------------------
    def save(self, path: str, extra: dict | None = None) -> None:
        """Save what prediction needs to an ``.npz`` file (exact round trip).

        ``extra`` (JSON-able) is stored alongside and returned by :meth:`load`
        as ``model.extra``.
        """
        meta = {
            "extra": extra or {},
            "format": _MODEL_FORMAT,
            "version": _MODEL_VERSION,
            "descriptor": self.descriptor.to_dict(),
            "hyperparameters": [float(x) for x in self.hyp.as_array()],
            "bounds": self.bounds,
            "max_sparse_per_species": self.max_sparse_per_species,
            "sparse_tolerance": self.sparse_tolerance,
            "n_frames": self._n_e,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
        }
        with open(path, "wb") as fh:
            np.savez(fh, meta=np.array(json.dumps(meta)), Z=self.Z, zs=self.zs,
                     e0=self.e0, beta=self._beta, LB=self._LB, Linv=self._Linv,
                     C=self._posterior.C)

    @classmethod
    def load(cls, path: str) -> SparseGP:
        """Load a model saved by :meth:`save` (prediction only)."""
        if not os.path.isfile(path):
            raise ConfigError(f"model file {path!r} does not exist; give the path of a file "
                              "written by `otfml train` or a run's model.npz")
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                arrays = {k: data[k] for k in ("Z", "zs", "e0", "beta", "LB", "Linv", "C")}
            ok = isinstance(meta, dict) and meta.get("format") == _MODEL_FORMAT
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise ConfigError(
                f"{path!r} is not an otfml model file or is truncated/damaged "
                f"({type(err).__name__}: {err}); rebuild it from its store with "
                "`otfml train STORE.h5 -o model.npz`") from err
        if not ok:
            raise ConfigError(f"{path!r} is not an otfml model file (no otfml model format "
                              "marker); rebuild it with `otfml train STORE.h5 -o model.npz`")
        if meta.get("version") != _MODEL_VERSION:
            raise ConfigError(
                f"{path!r} has model format version {meta.get('version')}, "
                f"this otfml reads version {_MODEL_VERSION}; retrain it from its store"
            )
        gp = cls(Descriptor.from_dict(meta["descriptor"]),
                 Hyperparameters(*meta["hyperparameters"]), bounds=meta["bounds"],
                 max_sparse_per_species=meta["max_sparse_per_species"],
                 sparse_tolerance=meta["sparse_tolerance"],
                 baseline=(None if meta.get("baseline") is None
                           else ScreenedCoulomb.from_dict(meta["baseline"])))
        gp.Z, gp.zs, gp.e0 = arrays["Z"], arrays["zs"].astype(np.int64), arrays["e0"]
        gp._beta, gp._LB, gp._Linv = arrays["beta"], arrays["LB"], arrays["Linv"]
        gp._make_blocks(arrays["C"])
        gp._n_e = int(meta["n_frames"])
        gp.extra = meta.get("extra", {})
        gp._fitted = gp.n_sparse > 0
        gp._trainable = False
        return gp
