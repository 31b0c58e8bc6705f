"""Arrays that grow in place and large arrays used again."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import numpy as np

from ._threads import _in_two, _Task


def _refcounts(arrays: list) -> list[int]:
    return [sys.getrefcount(a) for a in arrays]


@functools.cache
def _unheld_refcount() -> int:
    """What :func:`_refcounts` counts for an array only its list holds (interpreters differ)."""
    return _refcounts([np.empty(0)])[0]


class _Spare:
    """Large float arrays, each handed out again once nothing else refers to it.

    Fresh memory costs page faults when it is first written, for a large factor
    as much as a solve with it. An array that
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
    with memory; the larger factor only cuts the copies of large structures' rows.
    ``max_cols`` reserves the columns the array will at most need (an array whose rows
    are written in full is backed in full: a column buffer wider than its columns would
    cost memory for nothing); ``rows``, the rows reserved at first.
    """

    def __init__(self, ncols: int = 0, dtype=float, max_cols: int = 1, rows: int = 64) -> None:
        self._a = np.zeros((rows, max(ncols, max_cols, 1)), dtype=dtype)
        self.n = 0
        self.m = ncols

    @property
    def view(self) -> np.ndarray:
        return self._a[: self.n, : self.m]

    @property
    def shape_reserved(self) -> tuple[int, int]:
        """(rows, columns) there is room for."""
        return self._a.shape

    def reserve(self, n: int, m: int | None = None, exact: bool = False,
                exact_cols: bool = False) -> None:
        """Make room for ``n`` rows and ``m`` columns (default: the current ones).

        ``exact``: room for ``n`` rows, not the next fourfold capacity (a reservation
        of the rows the array will at most need; see ``SparseGP._reserve``);
        ``exact_cols``: the same for ``m`` columns.
        """
        m = self.m if m is None else m
        R, C = self._a.shape
        if n <= R and m <= C:
            return
        if exact:
            R = max(R, n)
        while R < n:
            R *= 4
        if exact_cols:
            C = max(C, m)
        while C < m:
            C *= 2
        a = np.empty((R, C), dtype=self._a.dtype)  # only [:n, :m] is ever read
        a[: self.n, : self.m] = self._a[: self.n, : self.m]
        self._a = a

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        if x.ndim != 2:
            x = x.reshape(-1, self.m)
        self.reserve(self.n + len(x), self.m)
        self._a[self.n : self.n + len(x), : self.m] = x
        self.n += len(x)

    def keep_columns(self, keep: np.ndarray,
                     spawn: Callable[[Callable], _Task] | None = None) -> None:
        """Keep only columns ``keep`` (increasing indices), in place, in row chunks
        (shared with another thread through ``spawn``, :func:`_in_two`).

        Each run of consecutive kept columns moves as one slice, far faster than a
        gather of the kept columns when few are dropped.
        """
        keep = np.asarray(keep, dtype=np.int64)
        m = len(keep)
        if m == 0:  # every column goes: nothing to move
            self.m = 0
            return
        cut = np.flatnonzero(np.diff(keep) != 1) + 1
        runs = [(int(a), int(b)) for a, b in zip(np.r_[0, cut], np.r_[cut, m])
                if keep[a] != a]  # runs before the first dropped column stay where they are

        step = min(256, self._chunk())  # an overlapping move copies through a temporary

        def move(i0: int, i1: int) -> None:
            for i in range(i0, i1, step):
                block = self._a[i: min(i + step, i1)]
                for a, b in runs:
                    block[:, a:b] = block[:, keep[a]: keep[a] + b - a]

        _in_two(spawn, move, self.n)
        self.m = m

    def _chunk(self) -> int:
        """Rows moved at a time: about 8 MB (a gather's temporary is that large)."""
        return max(1, (8 << 20) // max(1, self.m * self._a.itemsize))

    def drop_rows(self, n: int) -> None:
        """Drop the first ``n`` rows, moving the others up in place, in row chunks."""
        step = self._chunk()
        for i in range(n, self.n, step):
            j = min(i + step, self.n)
            self._a[i - n: j - n, : self.m] = self._a[i:j, : self.m]
        self.n -= n

    def keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the rows where ``keep`` (bool, (n,)) is true, in order, in place."""
        idx = np.flatnonzero(keep)
        step = self._chunk()
        for i in range(0, len(idx), step):  # idx[k] >= k: a chunk reads rows not yet written
            j = min(i + step, len(idx))
            self._a[i:j, : self.m] = self._a[idx[i:j], : self.m]
        self.n = len(idx)

    def add_columns(self, x: np.ndarray) -> None:
        j = x.shape[1]
        self.reserve(self.n, self.m + j)
        self._a[: self.n, self.m : self.m + j] = x
        self.m += j


class _GrowByColumns:
    """Growable 2-D array stored column by column: rows appended, columns appended.

    The interface of :class:`_Grow`, for an array whose columns the model adds over a run
    (its sparse environments, up to ``max_cols``) and whose rows are many (every held
    frame's force rows): each column is one contiguous run of memory, so the reserved
    columns not yet in use are never backed by the operating system, whereas a row-major
    buffer written row by row backs its full reserved width.
    """

    def __init__(self, max_cols: int) -> None:
        self._t = _Grow(0, max_cols=64, rows=max(max_cols, 1))  # the transpose

    @property
    def n(self) -> int:
        return self._t.m

    @property
    def m(self) -> int:
        return self._t.n

    @property
    def view(self) -> np.ndarray:
        return self._t.view.T

    @property
    def shape_reserved(self) -> tuple[int, int]:
        """(rows, columns) there is room for."""
        R, C = self._t._a.shape
        return C, R

    def reserve(self, n: int, m: int | None = None, exact: bool = False) -> None:
        """As :meth:`_Grow.reserve`: the row capacity grows fourfold, unless ``exact``."""
        rows = self.shape_reserved[0]
        if not exact and n > rows:  # (the transpose's columns double: they land on rows)
            while rows < n:
                rows *= 4
            n = rows
        self._t.reserve(self.m if m is None else m, n, exact_cols=exact)

    def append(self, x: np.ndarray) -> None:
        x = np.asarray(x)
        self.reserve(self.n + len(x))
        self._t.add_columns(x.T)

    def add_columns(self, x: np.ndarray) -> None:
        self._t.append(np.asarray(x).T)

    def keep_columns(self, keep: np.ndarray,
                     spawn: Callable[[Callable], _Task] | None = None) -> None:
        """Keep only columns ``keep`` (increasing indices), in place."""
        mask = np.zeros(self.m, dtype=bool)
        mask[np.asarray(keep, dtype=np.int64)] = True
        self._t.keep_rows(mask)

    def keep_rows(self, keep: np.ndarray) -> None:
        """Keep only the rows where ``keep`` (bool, (n,)) is true, in order, in place."""
        self._t.keep_columns(np.flatnonzero(keep))

    def drop_rows(self, n: int) -> None:
        """Drop the first ``n`` rows."""
        self._t.keep_columns(np.arange(n, self.n))


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
