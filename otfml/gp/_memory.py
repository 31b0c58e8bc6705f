"""Memory of the held frames: estimates, reservations, and frames taken out."""

from __future__ import annotations

import logging
import os

import numpy as np
import scipy.linalg

from ._types import _JITTER

log = logging.getLogger(__name__)


def _physical_memory() -> float | None:
    """Bytes of physical memory of this machine, or None where the OS does not say."""
    try:
        return float(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        return None


#: fewest frames a memory budget leaves the model
_MIN_FRAMES = 50


def _evicted(n_held: int, n: int, evict: str) -> tuple[np.ndarray, str]:
    """Which ``n`` of ``n_held`` frames (indices, oldest first) leave under ``max_frames``
    by rule ``evict``, and the rule in words."""
    n = min(n, n_held)
    if evict == "thin" and 2 * n <= n_held:
        return np.arange(1, 2 * n, 2), "every other one of the oldest"
    return np.arange(n), "the oldest"


def evict_count(n_held: int, max_frames: int | None) -> int:
    """How many of ``n_held`` frames leave before another joins (0 below ``max_frames``): a
    tenth of ``max_frames`` (at least one), and those above it."""
    if max_frames is None or n_held < max_frames:
        return 0
    return n_held - max_frames + max(1, max_frames // 10)


def held_after(n_frames: int, max_frames: int | None, evict: str) -> list[int]:
    """Which of ``n_frames`` frames added one by one a model holds at the end (indices).

    Eviction as :meth:`_Memory._evict` does it: before a frame joins a model holding
    ``max_frames``, a tenth of them (at least one) leave.
    """
    held: list[int] = []
    for i in range(n_frames):
        n = evict_count(len(held), max_frames)
        if n:
            gone = set(_evicted(len(held), n, evict)[0].tolist())
            held = [k for j, k in enumerate(held) if j not in gone]
        held.append(i)
    return held


class _Memory:
    """Memory bounds and frame removal of a :class:`SparseGP`."""

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
        The arrays only: the process grows by more (the allocator's overhead and
        an update's temporaries).
        """
        env = self.frames[0].env
        rows = n_frames * self._RF.shape_reserved[1] * 8 * (3 * len(env.numbers) + 2)
        blocks = geom["blocks"].values()
        cached = sum(a.nbytes for blk in blocks for key, a in blk.items() if key != "inc")
        cache = self._frames_cached(geom, n_frames) * cached
        per_frame = sum(a.nbytes for e in (env, env.long) if e is not None
                        for a in (e.p, e.c, e.pi, e.pj, e.D, e.sj, e.species, e.numbers))
        per_frame += self.frames[0].forces.nbytes
        M = self.max_sparse()
        out = {"rows": float(rows), "cache": float(cache), "frames": float(n_frames * per_frame),
               "matrices": 8.0 * 8 * M * M}  # L^-1, the accumulators, factors, copies
        out["total"] = sum(out.values())
        out["peak"] = out["total"] + (0.0 if self._reserved else out["rows"])
        return out

    def _fit_budget(self, geom: dict) -> None:
        """Lower ``max_frames`` and ``cache_bytes`` so that frames like the first fit in
        ``memory_gb`` (once, at the first frame)."""
        if self.memory_gb is None:
            return
        budget = self.memory_gb * 1024.0**3
        self.cache_bytes = min(self.cache_bytes, int(budget / 3))

        def fits(n: int) -> bool:
            return self.memory_estimate(geom, n)["total"] <= budget

        lo, hi = 1, self.max_frames
        if fits(hi):
            return
        while lo < hi:  # the largest n that fits (the estimate grows with n)
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
        n = max(lo, _MIN_FRAMES)
        log.info("model.memory_gb = %g: the model holds at most %d frames of %d atoms "
                 "(model.max_frames %d)", self.memory_gb, n, len(self.frames[0].numbers),
                 self.max_frames)
        if not fits(n):
            log.warning("model.memory_gb = %g GB is too little for %d frames of %d atoms; "
                        "raise it", self.memory_gb, n, len(self.frames[0].numbers))
        self.max_frames = n

    def _frames_cached(self, geom: dict, n_frames: int) -> int:
        """How many of ``n_frames`` frames like ``geom`` the gradient cache takes."""
        return min(n_frames, self.cache_bytes // max(geom["nbytes"], 1))

    def _reserve(self, geom: dict) -> None:
        """Reserve the rows ``max_frames`` frames like the first will need, once.

        The force rows' buffer otherwise grows fourfold, copying the rows it holds
        and holding old and new at once for large structures; the cached
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

    def _evict(self, n: int) -> None:
        """Take ``n`` frames out under ``max_frames``, chosen by ``self.evict``."""
        which, how = _evicted(len(self.frames), n, self.evict)
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
