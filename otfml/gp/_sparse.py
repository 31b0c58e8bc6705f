"""The sparse set: which environments join it, which leave it, and the basis that follows."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import numpy as np
import scipy.linalg

from ..descriptor import Environments
from ._buffers import _Spare, _take_square, _times_blocks
from ._threads import _in_two, _Task
from ._types import _JITTER, _normalize, term_env
from .selection import conditioned, pivots, redundant

log = logging.getLogger(__name__)


#: fraction of ``max_sparse_per_species`` up to which a frame's own, lower sparse tolerance
#: applies (``SparseGP.add_frame``): the rest of the set stays for what the model's own
#: tolerance admits later in a run
ADMISSION_FILL = 0.8


class _SparseSet:
    """Selection, pruning and addition of sparse environments of a :class:`SparseGP`."""

    def _conditioned(self, s: int, pa: np.ndarray) -> np.ndarray:
        """:func:`conditioned` on species ``s``'s sparse set."""
        _, Li, Zs = self._species_block(s)
        return conditioned(pa, Zs, Li)

    def _select_sparse(
        self, env: Environments, candidates: np.ndarray | None, max_new: int | None,
        tol: float | None = None, spawn: Callable[[Callable], _Task] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Greedy choice of the environments of ``env`` that join the sparse set, term by term.

        Pivoted Cholesky on the kernel of the candidates conditioned on the
        current sparse set: repeatedly take the candidate the set (plus the
        ones taken so far) represents worst, while its unrepresented fraction
        exceeds ``sparse_tolerance``.  A full species makes room first by
        pruning (see :meth:`_prune_species`) if ``self.prune``.

        A ``tol`` below ``sparse_tolerance`` applies while the species' set is
        below :data:`ADMISSION_FILL` of its cap, and never makes room by pruning:
        finer environments admitted into a full set would swap others out at almost
        every call.

        Returns
        -------
        Z : ndarray, shape (n_new, F)
            The new columns' normalized descriptors (in their term's features of ``Z``).
        channels : ndarray of int, shape (n_new,)
            Their channels.
        """
        if candidates is None:
            candidates = np.arange(len(env.species))
        candidates = np.asarray(candidates, dtype=np.int64)
        S = len(self.descriptor.species)
        new_Z, new_zs = [], []
        for t in range(len(self.terms)):
            ph, _ = _normalize(term_env(env, t).p)
            for s, at in self._select_term(ph, env.species, candidates, t * S, max_new, tol,
                                           spawn):
                z = np.zeros((len(at), self.Z.shape[1]))
                z[:, self._slices[t]] = ph[at]
                new_Z.append(z)
                new_zs.append(np.full(len(at), s, dtype=np.int64))
        if not new_Z:
            return np.zeros((0, self.Z.shape[1])), np.zeros(0, dtype=np.int64)
        return np.vstack(new_Z), np.concatenate(new_zs)

    def _select_term(self, ph: np.ndarray, species: np.ndarray, candidates: np.ndarray,
                     first: int, max_new: int | None, tol: float | None,
                     spawn: Callable[[Callable], _Task] | None) -> list[tuple[int, np.ndarray]]:
        """:meth:`_select_sparse` for one term: ``ph`` its unit descriptors, ``first`` its
        first channel. Returns (channel, chosen atoms) pairs."""
        own = self.sparse_tolerance
        out = []
        for sp in np.unique(species[candidates]):
            s = int(first + sp)
            cap = self._cap(s)
            at = candidates[species[candidates] == sp]
            limit = len(at) if max_new is None else min(len(at), max_new)
            C = self._conditioned(s, ph[at])
            n_have = int(np.sum(self.zs == s))
            room = int(ADMISSION_FILL * cap) - n_have
            if tol is not None and tol < own and room > 0:
                picked, _, _ = pivots(C, min(limit, room), tol)
                out.append((s, at[np.asarray(picked, dtype=np.int64)]))
                continue
            if self.prune and n_have + limit > cap:
                want, values, _ = pivots(C, limit, own)
                excess = n_have + len(want) - cap
                if excess > 0:
                    gone = self._prune_species(s, max(excess, cap // 20), values[0], spawn)
                    if gone:
                        C = self._conditioned(s, ph[at])
                        n_have -= gone
            picked, _, rest = pivots(C, min(limit, cap - n_have), own)
            out.append((s, at[np.asarray(picked, dtype=np.int64)]))
            full = n_have + len(picked) >= cap
            if full and s not in self._full_warned and len(rest) and np.diag(rest).max() > (
                    own**2):
                self._full_warned.add(s)
                el = self._element(s)
                why = ("and none of its environments is redundant enough to swap out"
                       if self.prune else "and pruning is off")
                log.warning(
                    "the sparse set of %s is full (cap %d) %s: new %s "
                    "environments cannot join, so their uncertainty stays high and the "
                    "reference may be asked at most steps. Raise model.max_sparse_per_species "
                    "(model.long_max_sparse_per_species for the longer-range term) "
                    "(each prediction and update costs more) or model.sparse_tolerance (fewer, "
                    "coarser environments)", el, cap, why, el)
        return out

    def _prune_species(self, s: int, n: int, threshold: float,
                       spawn: Callable[[Callable], _Task] | None = None) -> int:
        """Remove up to ``n`` of the most redundant sparse environments of species ``s``
        (:func:`otfml.gp.selection.redundant`).

        Returns
        -------
        int
            Number removed.
        """
        cols, Li, _ = self._species_block(s)
        drop = redundant(Li, n, threshold)
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
        another thread through ``spawn``.
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

        def rewhiten(A: np.ndarray, out: np.ndarray) -> np.ndarray:
            X = W @ A[cs]
            A[ks] = X
            A[:, ks] = X.T
            A[np.ix_(ks, ks)] = X[:, cs] @ W.T
            return _take_square(A, keep, out)

        # the kept blocks go straight into squares with room to grow (see _grown)
        AEw, AFw, Linv = (self._kept_square(name, len(keep)) for name in ("_AEw", "_AFw", "_Linv"))
        if self.frames:
            W = scipy.linalg.solve_triangular(Lk, Lkept, lower=True)  # (kept, M_s)
            energy = spawn(functools.partial(rewhiten, self._AEw, AEw))
            self._AFw = rewhiten(self._AFw, AFw)
            self._AEw = energy.join()
            Ew = self._EwT.view
            Ew[:, ks] = Ew[:, cs] @ W.T
        else:  # no frame, no sums (add_frames chooses the sparse set before the frames join)
            AEw[:] = 0.0
            AFw[:] = 0.0
            self._AEw, self._AFw = AEw, AFw
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
            max(M, self.max_sparse()))
        self._square[name] = buf
        return buf[:M, :M]

    def _grown(self, name: str, M0: int, M: int) -> np.ndarray:
        """An (M, M) matrix whose [:M0, :M0] block is attribute ``name``; the rest is unset.

        The inverse factor of K_mm and the whitened accumulators live in square
        buffers with room for the largest sparse set, so growing them writes
        only the new rows and columns; a new array would copy the old block
        and touch fresh memory.  A matrix that is not its buffer's top-left block (e.g.
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
        LW = L21 @ self._AFw  # (n_new, M0), formed once
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
