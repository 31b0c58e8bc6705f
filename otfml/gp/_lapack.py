"""In-place LAPACK/BLAS through SciPy's Cython bindings (no copies, no GIL)."""

from __future__ import annotations

import numpy as np


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

