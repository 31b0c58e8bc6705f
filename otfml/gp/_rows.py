"""Rows of the design matrix: each frame's energy and force rows against sparse columns."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg
import scipy.sparse

from ..descriptor import Environments
from ._buffers import _Grow
from ._kernels import _pair_range
from ._threads import _in_two, _Task
from ._types import _normalize, term_env

#: bytes of a chunk's pair terms (pairs x 3 x columns, in double) in
#: :func:`_pair_force_terms`: its temporaries stay tens of MB however many frames the model
#: holds and however many columns a frame's rows have
_PAIR_CHUNK_BYTES = 8 * 2**20


def _incidence(pi: np.ndarray, pj: np.ndarray, n_atoms: int) -> scipy.sparse.csc_matrix:
    """Sparse (n_atoms, P) matrix that scatters pair terms to atoms: +1 on each pair's
    neighbour ``pj``, -1 on its centre ``pi`` (by columns: its pairs are taken in chunks)."""
    P = len(pi)
    return scipy.sparse.csc_matrix(
        (np.concatenate([np.ones(P), -np.ones(P)]),
         (np.concatenate([pj, pi]), np.concatenate([np.arange(P)] * 2))),
        shape=(n_atoms, P))


def _pair_force_terms(G: np.ndarray, ph: np.ndarray, u: np.ndarray, scale: np.ndarray,
                      inc: scipy.sparse.csc_matrix, Zc: np.ndarray,
                      spawn: Callable[[Callable], _Task] | None = None) -> np.ndarray:
    """``d kt / d r`` (n_atoms, 3, m) of m sparse columns ``Zc`` through P pairs.

    ``G`` (3P, F), ``ph`` (P, F), ``u`` (P, 3) and ``scale`` (P,) as
    :meth:`_Rows._geometry` keeps them; ``inc`` from :func:`_incidence`. The pairs are taken
    in chunks of :data:`_PAIR_CHUNK_BYTES` of terms, each chunk's products shared with
    another thread through ``spawn`` (:func:`_in_two`) and scattered to the atoms on this one.
    """
    P, m = len(u), len(Zc)
    chunk = max(256, _PAIR_CHUNK_BYTES // (24 * max(m, 1)))

    def terms(i: int, j: int) -> np.ndarray:
        T, d = _pair_range(G, ph, Zc, i, j)
        # d kt_is / d D_ij = 2 d_is / |p_i| (G z_s - d_is G p_hat_i), a direction at a time
        for k in range(3):
            T[:, k] -= d * u[i:j, k, None]
        d *= scale[i:j, None]
        T *= d[:, None, :]
        return T.reshape(j - i, 3 * m)

    out = np.zeros((inc.shape[0], 3 * m))
    for a in range(0, P, chunk):
        b = min(a + chunk, P)
        for i, j, T in _in_two(spawn, lambda i, j, a=a: (a + i, a + j, terms(a + i, a + j)),
                               b - a):
            out += (inc if j - i == P else inc[:, i:j]) @ T  # a slice copies
    return out.reshape(inc.shape[0], 3, m)


class _Rows:
    """Energy and force rows of the frames of a :class:`SparseGP`."""

    def _term_Z(self, cols: np.ndarray, channel: int) -> np.ndarray:
        """Rows ``cols`` of ``Z`` (all of ``channel``) in their term's features."""
        return self.Z[cols, self._slices[self._channel_term(channel)]]

    def _geometry(self, env: Environments) -> dict:
        """What the rows of one frame need besides the sparse set (cached per frame).

        Per channel ``s`` (a term's centre species): the pairs it owns as a contiguous block of
        ``G = dp_i/dD_ij`` (P, 3, F), ``u = G p_hat_i`` (P, 3), the centres' unit
        descriptors and norms, and the sparse incidence matrix (n_atoms x P,
        +1 on the neighbour, -1 on the centre) that scatters pair terms to atoms.

        ``G`` and the centres' unit descriptors per pair are kept in
        ``cache_dtype`` (single precision by default): they are the bulk of the
        cache, and the rows new sparse columns need are read from them at every
        such update (memory-bound, so half the bytes is about half the time).  Rows then
        carry relative
        errors of about 1e-6; a row is stored and used as computed everywhere,
        so every accumulator stays the Gram matrix of the stored rows.
        """
        N = len(env.species)
        S = len(self.descriptor.species)
        blocks = {}
        for t, desc in enumerate(self.terms):
            et = term_env(env, t)
            ph, norm = _normalize(et.p)
            G = desc.gradient(et)
            for s in np.unique(et.species):
                sel = np.flatnonzero(et.species[et.pi] == s)
                P = len(sel)
                ci = et.pi[sel]
                Gs = np.ascontiguousarray(G[sel]).reshape(P * 3, G.shape[2])
                inc = _incidence(ci, et.pj[sel], N)
                u = np.einsum("qcf,qf->qc", Gs.reshape(P, 3, G.shape[2]), ph[ci])
                blocks[int(t * S + s)] = {
                    "G": Gs.astype(self.cache_dtype, copy=False), "u": u,
                    "ph": ph[ci].astype(self.cache_dtype, copy=False),
                    "scale": 2.0 / norm[ci], "inc": inc, "atoms": ph[et.species == s],
                    "pi": ci, "pj": et.pj[sel]}
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
            Zc = self._term_Z(cols[cs], s)
            row_e[cs] = np.sum((blk["atoms"] @ Zc.T) ** 2, axis=0)
            if len(blk["u"]):
                dEdr[:, :, cs] += _pair_force_terms(blk["G"], blk["ph"], blk["u"], blk["scale"],
                                                    blk["inc"], Zc)
        return row_e, -dEdr.reshape(3 * N, len(cols))

    def _cache_geometry(self, geom: dict, frame: int, atom_start: int) -> None:
        """Append one frame's geometry to the per-channel buffers (global atom indices)."""
        for s, blk in geom["blocks"].items():
            F = blk["atoms"].shape[1]
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
            if len(cs) == 0 or g["atoms"].n == 0:
                continue
            Zc = self._term_Z(cols[cs], s)
            k_at = (g["atoms"].view @ Zc.T) ** 2
            frames_of = g["atom_frame"].view[:, 0]
            inc_f = scipy.sparse.csr_matrix(
                (np.ones(len(frames_of)), (frames_of, np.arange(len(frames_of)))),
                shape=(nf, len(frames_of)))
            E[:, cs] = inc_f @ k_at
            if g["ph"].n == 0:  # no pairs (a shell with nobody in it): energy rows only
                continue
            inc = _incidence(g["pi"].view[:, 0], g["pj"].view[:, 0], na)
            dEdr[:, :, cs] += _pair_force_terms(g["G"].view, g["ph"].view, g["u"].view,
                                                g["scale"].view[:, 0], inc, Zc, spawn)
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
