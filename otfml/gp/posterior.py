"""The posterior of one solve: what predicts, and what a model file holds.

A :class:`Posterior` is fixed when it is made: later updates of the model make
a new one, so a prediction in progress, a saved model file and (in parallel
runs) a copy sent to another process all see one consistent set of factors.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import scipy.linalg
import scipy.linalg.lapack
from ase import Atoms

from ..baseline import ScreenedCoulomb
from ..descriptor import Descriptor, Environments
from ._kernels import _CHUNK_BYTES, _PANEL_ROWS, _species_terms, _split_work
from ._threads import Lanes
from ._types import Prediction, _normalize, environments_of, term_env

__all__ = ["Posterior"]

#: the arrays of a posterior, in the order :meth:`Posterior.arrays` gives them
ARRAYS = ("Z", "zs", "e0", "beta", "LB", "Linv", "C")
#: the triangular M x M factors: a compact model file holds their lower triangles
TRIANGULAR = ("LB", "Linv")


@functools.lru_cache(maxsize=8)
def _tril(M: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.tril_indices(M)``, kept for the next model of the same size."""
    return np.tril_indices(M)


def pack_triangles(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``arrays`` with each of :data:`TRIANGULAR` as ``NAME_tril``, its lower triangle
    row by row (M (M + 1) / 2 values: half the bytes, the same values). ``L^-1``, which is
    block diagonal over the channels ``zs`` (sparse environments of different channels
    share no kernel), is ``Linv_blocks`` instead: each channel's block's lower triangle,
    channel by channel."""
    out = dict(arrays)
    zs, Linv = out["zs"], out["Linv"]
    blocks = Linv[_channel_tril(zs)]
    for name in TRIANGULAR:
        if name == "Linv" and np.count_nonzero(blocks) == np.count_nonzero(Linv):
            out["Linv_blocks"] = blocks
            del out["Linv"]
        else:
            out[name + "_tril"] = _packed(out.pop(name))
    return out


def unpack_triangles(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The inverse of :func:`pack_triangles` (arrays already whole are left as they are)."""
    out = dict(arrays)
    zs = out["zs"]
    M = len(zs)
    for name in TRIANGULAR:
        if name + "_tril" in out:
            out[name] = _unpacked(out.pop(name + "_tril"), M)
    if "Linv_blocks" in out:
        full = np.zeros((M, M))
        full[_channel_tril(zs)] = out.pop("Linv_blocks")
        out["Linv"] = full
    return out


def _packed(L: np.ndarray) -> np.ndarray:
    """The lower triangle of ``L`` (M, M), row by row (LAPACK's packed upper triangle of
    ``L.T``, which is ``L``'s memory read in Fortran order)."""
    if len(L) == 0:
        return np.zeros(0)
    ap, info = scipy.linalg.lapack.dtrttp(np.ascontiguousarray(L, dtype=float).T, uplo="U")
    if info:
        raise ValueError(f"dtrttp failed (info {info})")
    return ap


def _unpacked(ap: np.ndarray, M: int) -> np.ndarray:
    """The C-ordered (M, M) lower triangular matrix whose triangle :func:`_packed` gave;
    zero above the diagonal."""
    if M == 0:
        return np.zeros((0, 0))
    a, info = scipy.linalg.lapack.dtpttr(M, np.asarray(ap, dtype=float), uplo="U")
    if info:
        raise ValueError(f"dtpttr failed (info {info})")
    return a.T  # Fortran-ordered upper triangle: its transpose is C-ordered and lower


def _channel_tril(zs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices of each channel's diagonal block's lower triangle in an
    M x M matrix over the sparse environments of channels ``zs``, channel by channel."""
    rows, cols = [np.zeros(0, dtype=np.intp)], [np.zeros(0, dtype=np.intp)]
    for c in np.unique(zs):
        at = np.flatnonzero(zs == c)
        r, k = _tril(len(at))
        rows.append(at[r])
        cols.append(at[k])
    return np.concatenate(rows), np.concatenate(cols)


class Posterior:
    """Predictions of a sparse GP at one solve.

    Parameters
    ----------
    terms : sequence of Descriptor
        The descriptors of the model's terms (the first's species index the blocks).
    sigmas : ndarray, shape (n_terms,)
        Signal standard deviation of each term's local energy, eV.
    e0 : ndarray, shape (n_species,)
        Per-species energy baselines, eV.
    blocks : dict
        Per channel ``t * n_species + s`` (term t, species index s): ``cols`` (its sparse
        columns), ``Z`` (their normalized descriptors, in the term's features), ``beta``
        (their weights, eV), ``panels`` and ``offsets`` (its block of ``L^-1`` as row
        panels, :func:`otfml.gp._kernels._triangular_panels`).
    LB : ndarray, shape (M, M)
        Lower Cholesky factor of ``B`` (see :mod:`otfml.gp`); never changed in place.
    Linv : ndarray, shape (M, M)
        Inverse of the Cholesky factor of ``K_mm``.
    Z, zs, beta : ndarray
        All sparse descriptors (M, F), their channels (M,) and weights (M,).
    baseline : ScreenedCoulomb, optional
        A fixed term added to every prediction.
    C : ndarray, shape (M, M), optional
        ``LB^-1 S L^-1`` where already known (a loaded model); else formed on first use.
    lanes : Lanes, optional
        Threads that share a prediction's work.
    n_frames : int
        Frames the model was trained on.
    """

    def __init__(self, terms: Sequence[Descriptor], sigmas: np.ndarray, e0: np.ndarray,
                 blocks: dict, LB: np.ndarray, Linv: np.ndarray, Z: np.ndarray,
                 zs: np.ndarray, beta: np.ndarray, baseline: ScreenedCoulomb | None = None,
                 C: np.ndarray | None = None, lanes: Lanes | None = None,
                 n_frames: int = 0) -> None:
        self.terms = tuple(terms)
        self.descriptor = self.terms[0]
        self.sigmas = np.asarray(sigmas, dtype=float)
        self._S = len(self.descriptor.species)
        self.e0 = e0
        self.blocks = blocks
        self.Z, self.zs, self.beta = Z, zs, beta
        self.baseline = baseline
        self.lanes = lanes or Lanes()
        self.n_frames = n_frames
        self.LB = LB
        # LB's transpose is the upper factor in Fortran order, which LAPACK's triangular
        # solve takes without a copy
        self.U = np.ascontiguousarray(LB).T
        self._Linv = Linv
        self._C = C
        self._ctc: dict = {}

    def arrays(self, with_C: bool = True) -> dict[str, np.ndarray]:
        """Every array a model file holds, by name (:data:`ARRAYS`); without ``C`` (which
        the variances form on first use, O(M^3)) unless ``with_C``."""
        out = {"Z": self.Z, "zs": self.zs, "e0": self.e0, "beta": self.beta, "LB": self.LB,
               "Linv": self._Linv}
        if with_C:
            out["C"] = self.C
        return out

    @property
    def n_sparse(self) -> int:
        """Number M of sparse environments."""
        return len(self.zs)

    @property
    def C(self) -> np.ndarray:
        """``LB^-1 S L^-1`` (M, M), formed on first use (O(M^3)): only variances read it."""
        if self._C is None:
            s = self.sigmas[self.zs // self._S]
            self._C = scipy.linalg.solve_triangular(self.U, s[:, None] * self._Linv,
                                                    lower=False, trans="T")
        return self._C

    def ctc(self, s: int) -> np.ndarray:
        """``C_s^T C_s`` for channel ``s``: |C kt|^2 = kt^T (C_s^T C_s) kt, M_s^2 per atom."""
        if s not in self._ctc:
            Cs = self.C[:, self.blocks[s]["cols"]]
            self._ctc[s] = Cs.T @ Cs
        return self._ctc[s]

    def _cross_terms(self, kept: list, N: int) -> np.ndarray:
        """``2 kt_a^T C_a^T C_b kt_b`` per atom (N,): the part of ``|C kt|^2`` between an
        atom's two terms (channels a and b of its species); zero with one term."""
        out = np.zeros(N)
        if len(self.terms) == 1:
            return out
        S = self._S
        by: dict[int, list] = {}
        for c, at, kT, _ in kept:
            by.setdefault(c, []).append((at, kT))
        for sp in range(S):
            a, b = by.get(sp), by.get(S + sp)
            if not a or not b:
                continue
            at_a, k_a = np.concatenate([x[0] for x in a]), np.hstack([x[1] for x in a])
            at_b, k_b = np.concatenate([x[0] for x in b]), np.hstack([x[1] for x in b])
            pos = np.argsort(at_b)
            k_b = k_b[:, pos[np.searchsorted(at_b[pos], at_a)]]  # the atoms of a, in order
            key = (sp, S + sp)
            if key not in self._ctc:
                self._ctc[key] = self.C[:, self.blocks[sp]["cols"]].T @ self.C[
                    :, self.blocks[S + sp]["cols"]]
            out[at_a] += 2.0 * np.einsum("ji,ji->i", self._ctc[key] @ k_b, k_a)
        return out

    def predict(self, atoms: Atoms, env: Environments | None = None) -> Prediction:
        """Energy, forces and uncertainties of one structure.

        Parameters
        ----------
        atoms : ase.Atoms
            Structure to predict.
        env : Environments, optional
            Precomputed descriptors of ``atoms``.
        """
        if env is None:
            env = environments_of(self.terms, atoms)
        S, T = self._S, len(self.terms)
        units = [_normalize(term_env(env, t).p) for t in range(T)]
        N = len(env.species)
        eps = self.e0[env.species].astype(float)
        dE_dp = [np.zeros_like(ph) for ph, _ in units]
        ww = np.zeros((T, N))  # |L^-1 kt_i|^2 per term (L^-1 is block diagonal over channels)
        order = np.argsort(env.species, kind="stable")
        first = np.searchsorted(env.species[order], np.arange(S + 1))
        n_at = first[1:] - first[:-1]
        work = [(c, int(n_at[c % S]),
                 len(blk["cols"]) * (blk["Z"].shape[1] + len(blk["cols"]) / 2))
                for c, blk in self.blocks.items() if len(blk["cols"]) and n_at[c % S]]

        def run(pieces: list[tuple[int, int, int]]) -> list[tuple]:
            out = []
            for c, start, stop in pieces:
                t, sp = divmod(c, S)
                at = order[first[sp] + start:first[sp] + stop]
                blk = self.blocks[c]
                ph = units[t][0]
                chunk = max(16, _CHUNK_BYTES // (8 * ph.shape[1]))
                out.append((c, at, *_species_terms(ph[at], blk["Z"], blk["beta"], blk["panels"],
                                                   blk["offsets"], _PANEL_ROWS, chunk)))
            return out

        lanes = [x for x in _split_work(work, self.lanes.for_work(work)) if x]
        pending = [self.lanes.pool().submit(run, x) for x in lanes[1:]]
        pieces = run(lanes[0]) if lanes else []
        for f in pending:
            pieces += f.result()
        kept = []  # what the variances need
        for c, at, kT, e, g, w2, wsum in pieces:
            t = c // S
            eps[at] += e
            dE_dp[t][at] = g / units[t][1][at][:, None]
            ww[t, at] = w2
            kept.append((c, at, kT, wsum))
        forces = sum(d.backprop(term_env(env, t), dE_dp[t]) for t, d in enumerate(self.terms))
        if self.baseline is not None:
            atom_e, base_f = self.baseline.energies_forces(atoms)
            eps += atom_e
            forces += base_f
        s2 = (self.sigmas**2)[:, None]
        unexplained = np.sum(s2 * np.clip(1.0 - ww, 0.0, 1.0), axis=0)

        def variances() -> tuple[np.ndarray, float]:
            # var(eps_i) = sum_t sigma_t^2 (1 - |L_t^-1 kt_i|^2) + |LB^-1 S L^-1 kt_i|^2
            # (DTC); LB^-1 S L^-1 (= C) is not block diagonal: the energy needs all of it
            cc = np.zeros(N)
            wE = np.zeros(len(self.U))  # L^-1 sum_i kt_i
            e_var_prior = 0.0
            for t in range(T):
                for sp in range(S):
                    pa = units[t][0][order[first[sp]:first[sp + 1]]]
                    e_var_prior += s2[t, 0] * np.sum((pa @ pa.T) ** 2)
            for c, at, kT, wsum in kept:
                cc[at] += np.einsum("ji,ji->i", self.ctc(c) @ kT, kT)
                wE[self.blocks[c]["cols"]] += wsum
            # the cross terms of C between channels, where an atom has more than one
            cross = self._cross_terms(kept, N)
            var = np.sum(s2 * (1.0 - ww), axis=0) + cc + cross
            sw = self.sigmas[self.zs // S] * wE
            vE = scipy.linalg.lapack.dtrtrs(self.U, sw, lower=0, trans=1)[0]  # LB^-1 S wE
            e_var = e_var_prior - sw @ sw + vE @ vE
            return np.sqrt(np.clip(var, 0.0, None)), float(math.sqrt(max(e_var, 0.0)))

        return Prediction(
            energy=float(eps.sum()),
            forces=forces,
            local_energies=eps,
            novelty=np.sqrt(unexplained),
            env=env,
            _posterior=variances,
        )
