"""Atom-centred power-spectrum descriptor (B2 / SOAP-like) with exact gradients.

For every atom *i* the neighbour density within the cutoff ``r_c`` is expanded
per neighbour species *s*, radial channel *n* and real spherical harmonic
``(l, m)``::

    c[i, s, n, lm] = sum_j g_n(r_ij) f_c(r_ij) Y_lm(r_ij / |r_ij|)

with Gaussian radial functions ``g_n`` and the cosine cutoff
``f_c(r) = (1 + cos(pi r / r_c)) / 2``.  The power spectrum::

    p[i, l, (a, b)] = w_ab * sum_m c[i, a, lm] c[i, b, lm],   a <= b

(``a = (s, n)``, ``w_ab = sqrt(2)`` off the diagonal so that ``p.p`` equals the
dot product of the full symmetric matrices) is invariant to rotation,
translation and permutation of like atoms.

With a centre weight ``w > 0`` (SOAP's central-atom term, as a channel of its
own) the density gets one more channel ``o`` holding ``w`` at ``l = 0``, and
``p`` the ``l = 0`` products with it: ``sqrt(2) w c[i, a, 00]`` for every
neighbour channel ``a`` (the radial distribution itself) and ``w^2``.  The
kernel normalizes ``p``; without the centre's term that discards how large the
neighbour density is, and with it the energy is no longer a function of the
shape of the density alone.

Two gradient paths are provided, both compiled with numba:

* :meth:`Descriptor.backprop` pushes ``dE/dp`` back to forces without ever
  building ``dp/dr`` (the adjoint pass, used at every MD step);
* :meth:`Descriptor.gradient` builds ``dp_i/dr_j`` for every centre/neighbour
  pair (used when a labelled frame is turned into force rows for training).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from ase import Atoms
from ase.neighborlist import primitive_neighbor_list
from numba import njit

from ._descriptor_kernels import INNER, _backprop, _expansion, _gradient, _pair_bases, _power
from .errors import IsolatedAtoms
from .settings import default

__all__ = ["Descriptor", "Environments"]


@dataclass
class Environments:
    """Local environments of one structure.

    Attributes
    ----------
    p : ndarray, shape (n_atoms, F)
        Power-spectrum descriptor of every atom.
    species : ndarray of int, shape (n_atoms,)
        Species index of every atom (position in ``Descriptor.species``).
    numbers : ndarray of int, shape (n_atoms,)
        Atomic numbers.
    """

    p: np.ndarray
    species: np.ndarray
    numbers: np.ndarray
    # internal state reused by the gradient passes
    c: np.ndarray = field(repr=False)
    pi: np.ndarray = field(repr=False)
    pj: np.ndarray = field(repr=False)
    D: np.ndarray = field(repr=False)
    sj: np.ndarray = field(repr=False)
    #: pair basis gradients (n_pairs, n_max, L, 3); None: recomputed from D when needed
    dB: np.ndarray | None = field(repr=False, default=None)
    #: the same atoms' environments for a model's longer-range term, if it has one
    long: Environments | None = field(repr=False, default=None)


class Descriptor:
    """Power-spectrum descriptor settings and evaluation.

    Parameters
    ----------
    species : sequence of int
        Atomic numbers the descriptor distinguishes (neighbour channels).
    cutoff : float, default 3.0
        Cutoff radius r_c in Å.
    n_max : int, default 5
        Number of Gaussian radial functions.
    l_max : int, default 3
        Largest angular momentum.
    r_min : float, default 0.8
        Centre of the first radial Gaussian in Å; the last sits 0.5 Å inside the
        cutoff and their width equals their spacing.
    radial_scaling : float or None, default None
        ``r0`` in Å of the radial scaling ``w(r) = 1 / (1 + (r / r0)^m)`` that
        multiplies every neighbour's contribution (Willatt, Musil and Ceriotti,
        PCCP 20, 29661 (2018)): near neighbours weigh more than the many distant
        ones, which otherwise dominate the normalized kernel at longer cutoffs.
        None: no scaling (w = 1).
    radial_power : float, default 4
        The exponent ``m`` of the radial scaling.
    centre_weight : float, default 0.7
        Weight ``w`` of the centre's own term (module notes), so that the normalized
        kernel sees how dense the neighbourhood is, not only its shape; 0: none.
    inner_cutoff : float or None, default None
        Neighbours closer than ``inner_cutoff - 0.5`` Å do not count; the weight of the
        others rises smoothly (a cosine) to 1 at ``inner_cutoff + 0.5`` Å: a descriptor of
        the shell beyond another's cutoff. An atom with no neighbour in the shell keeps
        the centre's term alone (needs ``centre_weight`` > 0). None: every neighbour counts.

    The defaults are those of :data:`otfml.settings.SCHEMA` (``model.*``).
    """

    def __init__(
        self,
        species: list[int] | tuple[int, ...],
        cutoff: float = default("model", "cutoff"),
        n_max: int = default("model", "n_max"),
        l_max: int = default("model", "l_max"),
        r_min: float = default("model", "r_min"),
        radial_scaling: float | None = default("model", "radial_scaling"),
        radial_power: float = default("model", "radial_power"),
        centre_weight: float = default("model", "centre_weight"),
        inner_cutoff: float | None = None,
    ) -> None:
        species = sorted({int(z) for z in species})
        if not species:
            raise ValueError("Descriptor needs at least one species (atomic number)")
        if not cutoff > r_min + 0.5:
            raise ValueError(f"cutoff={cutoff} Å must exceed r_min + 0.5 = {r_min + 0.5} Å")
        if radial_scaling is not None and not (radial_scaling > 0 and radial_power > 0):
            raise ValueError(f"radial_scaling={radial_scaling} Å and radial_power={radial_power}"
                             " must be positive (radial_scaling None: no scaling)")
        if n_max < 1 or l_max < 0:
            raise ValueError(f"n_max={n_max} must be >= 1 and l_max={l_max} >= 0")
        if not centre_weight >= 0:
            raise ValueError(f"centre_weight={centre_weight} must be >= 0 (0: no centre term)")
        if inner_cutoff is not None and not (0 < inner_cutoff < cutoff - INNER):
            raise ValueError(f"inner_cutoff={inner_cutoff} Å must lie between 0 and the "
                             f"cutoff less {INNER} Å ({cutoff - INNER} Å)")
        if inner_cutoff is not None and not centre_weight > 0:
            raise ValueError("a descriptor with an inner_cutoff needs centre_weight > 0 (an "
                             "atom with no neighbour in its shell keeps the centre's term)")
        self.species = tuple(species)
        self.cutoff = float(cutoff)
        self.n_max = int(n_max)
        self.l_max = int(l_max)
        self.r_min = float(r_min)
        self.radial_scaling = None if radial_scaling is None else float(radial_scaling)
        self.radial_power = float(radial_power)
        self.centre_weight = float(centre_weight)
        self.inner_cutoff = None if inner_cutoff is None else float(inner_cutoff)
        self._ri = 0.0 if inner_cutoff is None else self.inner_cutoff  # 0: off (numba)
        self._r0 = 0.0 if radial_scaling is None else self.radial_scaling  # 0: off (numba)
        self._index = np.full(max(species) + 1, -1, dtype=np.int64)
        self._index[list(species)] = np.arange(len(species))
        self.mu = np.linspace(r_min, cutoff - 0.5, n_max) if n_max > 1 else np.array([r_min])
        self.width = float(self.mu[1] - self.mu[0]) if n_max > 1 else 1.0
        norm = np.zeros((l_max + 1) ** 2)
        for lv in range(l_max + 1):
            for m in range(lv + 1):
                f = (2 * lv + 1) / (4 * math.pi)
                if m > 0:
                    f *= 2.0 * math.factorial(lv - m) / math.factorial(lv + m)
                norm[lv * lv + lv + m] = math.sqrt(f)
        self._norm = norm
        # the features: p[f] = fw[f] sum_m c[fa[f], fl[f] m] c[fb[f], fl[f] m]; every pair
        # a <= b of neighbour channels at every l, then the centre channel K's l = 0 pairs
        K = len(species) * n_max
        qa, qb = np.triu_indices(K)
        fa, fb = np.tile(qa, l_max + 1), np.tile(qb, l_max + 1)
        fl = np.repeat(np.arange(l_max + 1), len(qa))
        if self.centre_weight > 0:
            fa = np.concatenate([fa, np.arange(K + 1)])
            fb = np.concatenate([fb, np.full(K + 1, K)])
            fl = np.concatenate([fl, np.zeros(K + 1, dtype=fl.dtype)])
        self._fa, self._fb, self._fl = (x.astype(np.int64) for x in (fa, fb, fl))
        self._fw = np.where(self._fa == self._fb, 1.0, math.sqrt(2.0))

    # ------------------------------------------------------------------
    @property
    def n_features(self) -> int:
        """Length F of one descriptor vector."""
        return len(self._fl)

    def to_dict(self) -> dict:
        """Settings as a plain dict (for saving; :meth:`from_dict` inverts it)."""
        return {
            "species": list(self.species),
            "cutoff": self.cutoff,
            "n_max": self.n_max,
            "l_max": self.l_max,
            "r_min": self.r_min,
            "radial_scaling": self.radial_scaling,
            "radial_power": self.radial_power,
            "centre_weight": self.centre_weight,
            "inner_cutoff": self.inner_cutoff,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Descriptor:
        """Rebuild a descriptor from :meth:`to_dict` output (a setting a file lacks is off)."""
        return cls(**{"radial_scaling": None, "centre_weight": 0.0, "inner_cutoff": None, **d})

    def species_index(self, numbers: np.ndarray) -> np.ndarray:
        """Map atomic numbers to species indices, refusing unknown elements."""
        numbers = np.asarray(numbers, dtype=np.int64)
        if np.all((numbers >= 0) & (numbers < len(self._index))):
            index = self._index[numbers]
            if np.all(index >= 0):
                return index
        bad = sorted(
            {int(z) for z in numbers if z >= len(self._index) or z < 0 or self._index[z] < 0}
        )
        if bad:
            from ase.data import chemical_symbols

            names = [chemical_symbols[z] if 0 < z < len(chemical_symbols) else str(z) for z in bad]
            known = [chemical_symbols[z] for z in self.species]
            raise ValueError(
                f"element(s) {names} are not among the model's species {known}; "
                "list them in the model's species when it is created"
            )
        return self._index[numbers]

    def environments(self, atoms: Atoms) -> Environments:
        """Compute the descriptors of all atoms of ``atoms``.

        Parameters
        ----------
        atoms : ase.Atoms
            Structure (periodic cells are handled through ASE's neighbour list).

        Returns
        -------
        Environments
            Descriptors ``p`` (n_atoms, F) and what the gradient passes need.
        """
        numbers = atoms.get_atomic_numbers()
        spec = self.species_index(numbers)
        pos = np.asarray(atoms.get_positions(), dtype=float)
        pbc = atoms.get_pbc()
        if pbc.any():
            pi, pj, D = primitive_neighbor_list(
                "ijD", pbc, atoms.get_cell().array, pos, self.cutoff
            )
        else:
            pi, pj, D = _molecular_pairs(pos, self.cutoff)
        if self.inner_cutoff is not None:  # pairs inside the shell have zero weight
            keep = np.einsum("qc,qc->q", D, D) > (self.inner_cutoff - INNER) ** 2
            pi, pj, D = pi[keep], pj[keep], D[keep]
        pi = pi.astype(np.int64)
        pj = pj.astype(np.int64)
        D = np.ascontiguousarray(D, dtype=float)
        sj = spec[pj]
        B, dB = _pair_bases(D, self.cutoff, self.mu, self.width, self.l_max, self._norm,
                            self._r0, self.radial_power, self._ri)
        if self.centre_weight > 0 and self.inner_cutoff is None and len(numbers) and np.bincount(
                pi, minlength=len(numbers)).min() == 0:
            # the centre's term would give such an atom a descriptor; it has no environment
            raise IsolatedAtoms("an atom has no neighbour within the cutoff (isolated atom); "
                                "increase the descriptor cutoff or check the structure")
        c = _expansion(len(numbers), len(self.species), pi, sj, B, self.centre_weight)
        p = _power(c, self._fl, self._fa, self._fb, self._fw)
        return Environments(p=p, species=spec, numbers=numbers, c=c, pi=pi, pj=pj, D=D, sj=sj,
                            dB=dB)

    def backprop(self, env: Environments, dE_dp: np.ndarray) -> np.ndarray:
        """Forces ``-dE/dr`` (n_atoms, 3) in eV/Å given ``dE/dp`` (n_atoms, F)."""
        return _backprop(
            np.ascontiguousarray(dE_dp, dtype=float), env.c, self._dB(env), env.pi, env.pj, env.sj,
            self.n_max, self._fl, self._fa, self._fb, self._fw,
        )

    def gradient(self, env: Environments) -> np.ndarray:
        """``dp_i/dD_ij`` for every neighbour pair, shape (n_pairs, 3, F).

        ``D_ij = r_j - r_i``: the gradient with respect to ``r_j`` is ``G[q]``
        and with respect to ``r_i`` it is ``-G[q]`` (pairs in ``env.pi``,
        ``env.pj``).
        """
        return _gradient(env.c, self._dB(env), env.pi, env.sj, self.n_max,
                         self._fl, self._fa, self._fb, self._fw)

    def _dB(self, env: Environments) -> np.ndarray:
        if env.dB is not None:
            return env.dB
        return _pair_bases(env.D, self.cutoff, self.mu, self.width, self.l_max, self._norm,
                           self._r0, self.radial_power, self._ri)[1]


@njit(cache=True, nogil=True)
def _molecular_pairs(pos: np.ndarray, cutoff: float):
    """All ordered pairs (i, j, r_j - r_i) closer than ``cutoff``, non-periodic, i-major."""
    n = len(pos)
    c2 = cutoff * cutoff
    close = np.zeros((n, n), dtype=np.bool_)
    count = 0
    for i in range(n):
        for j in range(i + 1, n):
            dx = pos[j, 0] - pos[i, 0]
            dy = pos[j, 1] - pos[i, 1]
            dz = pos[j, 2] - pos[i, 2]
            if dx * dx + dy * dy + dz * dz < c2:
                close[i, j] = True
                close[j, i] = True
                count += 2
    pi = np.empty(count, dtype=np.int64)
    pj = np.empty(count, dtype=np.int64)
    D = np.empty((count, 3))
    q = 0
    for i in range(n):
        for j in range(n):
            if close[i, j]:
                pi[q] = i
                pj[q] = j
                for c in range(3):
                    D[q, c] = pos[j, c] - pos[i, c]
                q += 1
    return pi, pj, D
