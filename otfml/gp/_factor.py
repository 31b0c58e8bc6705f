"""The solve: label sums, per-species baselines, and the factor of B and its updates."""

from __future__ import annotations

import logging

import numpy as np
import scipy.linalg

from ._buffers import _Spare, _times_blocks
from ._kernels import _triangular_panels
from ._lapack import _solve_below, _update_factor_rows
from ._threads import _Task
from .posterior import Posterior

log = logging.getLogger(__name__)




class _Factor:
    """Weights of a :class:`SparseGP` at its hyperparameters."""

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
        se, sf = hyp[1], hyp[2]
        M = self.n_sparse
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
                # factors it in place, without the transposing copy, and
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
        s = self._column_sigmas(hyp)
        u = s * (wh["c"] / se**2 + wh["bF"] / sf**2)
        # the local energy eps = kt^T beta with beta = L^-T S B^-1 S u (kt the normalized
        # kernel); LB.T is the upper factor in Fortran order, which LAPACK takes without a
        # copy (S times the vector, not S Linv.T: that would form an M x M product)
        self._beta = _times_blocks(
            self._species_blocks(),
            s * scipy.linalg.cho_solve((LB.T, False), u, check_finite=False), transpose=True)
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
        O(M0^2 n_new), against O(M^3 / 3) for a new factorization.  Both work in place in one new
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
        se, sf = hyp[1], hyp[2]
        s0 = self._column_sigmas(hyp)[:M0, None]
        k = st["rank"]
        # another array: the last solve's posterior keeps reading the old factor
        LB = self._spare.setdefault("LB", _Spare()).square(M, room=0.1)
        LB[:M0, :M0] = self._LB
        if k:
            V = np.hstack([np.column_stack([W[:M0] * (s0 / sf), ew[:M0, None] * (s0 / se)])
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
        for s in range(self.n_channels):
            cols, Li, Zs = self._species_block(s)
            out[s] = (cols, Zs, *_triangular_panels(Li))
        return out

    def _make_blocks(self, panels: dict | None = None, C: np.ndarray | None = None) -> None:
        """The :class:`Posterior` of this solve, with the per-species slices it uses at every
        prediction (no copies in the hot path).

        Each species' block of ``L^-1`` is lower triangular (columns keep their order
        when added or removed; K_mm is block diagonal over species): ``predict``
        multiplies by it as a triangular matrix, kept as row panels. ``panels`` (from
        :meth:`_species_panels`) where already made; ``C`` (``LB^-1 L^-1``) where known (a
        loaded model).
        """
        if panels is None or panels["Linv"] is not self._Linv:
            panels = self._species_panels()
        self._blocks = {}
        for s in range(self.n_channels):
            cols, Zs, pan, offsets = panels[s]
            self._blocks[s] = {
                "cols": cols,
                "Z": Zs,
                "beta": np.ascontiguousarray(self._beta[cols]),
                "panels": pan,
                "offsets": offsets,
            }
        self.posterior = Posterior(self.terms, self.hyp.term_sigmas(), self.e0, self._blocks,
                                   self._LB, self._Linv, self.Z, self.zs, self._beta,
                                   self.baseline, C=C, lanes=self._lanes, n_frames=self._n_e)
