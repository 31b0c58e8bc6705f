"""A fixed long-range term under the model: screened Coulomb between per-element charges.

The model's local energies see 3 Å around each atom. Between polar molecules
further apart the reference's energy still changes (electrostatics), which a
local model cannot represent; it then errs on every atom, whatever its data.
With ``model.coulomb_charges`` the model learns the reference minus

    E_C = k_e sum_{i<j} q_i q_j erf(r_ij / w) / r_ij,      F_C = -dE_C/dr

(``q`` per element, e; ``w`` = ``model.coulomb_width``, Å; ``k_e`` = 14.40 eV Å).
The error function keeps the term smooth and finite at short range, where the
local model takes over, so it needs no list of molecules or bonds. For water,
TIP3P's charges (O -0.834, H 0.417) with ``w`` = 1.5 Å are a starting point
(``workflows/water_cluster.yaml``).

Only for non-periodic structures (molecules, clusters): a periodic cell would
need an Ewald sum.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import atomic_numbers, chemical_symbols
from ase.units import Bohr, Hartree
from scipy.special import erf

from .errors import ConfigError

__all__ = ["ScreenedCoulomb", "COULOMB_CONSTANT", "baseline_from_dict"]

#: e^2 / (4 pi eps0) in eV Å
COULOMB_CONSTANT = Hartree * Bohr

#: rows of the pair matrices at a time (bounds memory on large structures)
_ROWS = 512


class ScreenedCoulomb:
    """Screened Coulomb energy and forces of fixed per-element charges.

    Parameters
    ----------
    charges : dict
        Charge (e) per element, keyed by symbol ("O") or atomic number (8).
    width : float, default 1.5
        Screening length ``w`` of ``erf(r / w) / r``, Å.
    species : list of int, optional
        Elements the model covers: each must have a charge (0 for none).
    """

    def __init__(self, charges: dict, width: float = 1.5,
                 species: list[int] | None = None) -> None:
        if not isinstance(charges, dict) or not charges:
            raise ConfigError(f"model.coulomb_charges={charges!r}; give a charge (e) per "
                              "element, e.g. {O: -0.834, H: 0.417}, or null for none")
        self.charges: dict[int, float] = {}
        for key, q in charges.items():
            z = atomic_numbers.get(key) if isinstance(key, str) else key
            if not isinstance(z, (int, np.integer)) or not 0 < z < len(chemical_symbols):
                raise ConfigError(f"model.coulomb_charges: {key!r} is not an element; key "
                                  "the charges by element symbol, e.g. O or H")
            if isinstance(q, bool) or not isinstance(q, (int, float)) or not np.isfinite(q):
                raise ConfigError(f"model.coulomb_charges: the charge of {key} is {q!r}; give "
                                  "a number (e)")
            self.charges[int(z)] = float(q)
        if not (isinstance(width, (int, float)) and width > 0):
            raise ConfigError(f"model.coulomb_width={width!r}; give a length > 0 Å (e.g. 1.5)")
        self.width = float(width)
        missing = sorted(set(species or []) - set(self.charges))
        if missing:
            names = ", ".join(chemical_symbols[z] for z in missing)
            raise ConfigError(f"model.coulomb_charges has no charge for {names}; give one for "
                              "each element of the model (0 for none)")

    def to_dict(self) -> dict:
        """Settings that rebuild this term (:meth:`from_dict`)."""
        return {"charges": {chemical_symbols[z]: q for z, q in self.charges.items()},
                "width": self.width}

    @classmethod
    def from_dict(cls, d: dict) -> ScreenedCoulomb:
        return cls(d["charges"], d["width"])

    def energies_forces(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom energies (n_atoms,), eV, half of each pair's to either atom (their sum
        is the energy), and forces (n_atoms, 3), eV/Å, of ``atoms``.

        Raises
        ------
        ConfigError
            For a periodic structure, or an element without a charge.
        """
        if atoms.pbc.any():
            raise ConfigError("model.coulomb_charges works on molecules and clusters only: "
                              "this structure is periodic (it would need an Ewald sum); "
                              "set model.coulomb_charges to null")
        numbers = atoms.numbers
        try:
            q = np.array([self.charges[int(z)] for z in numbers])
        except KeyError as e:
            raise ConfigError(f"model.coulomb_charges has no charge for "
                              f"{chemical_symbols[e.args[0]]}; give one (0 for none)") from None
        pos = np.asarray(atoms.positions, dtype=float)
        n = len(pos)
        energies = np.zeros(n)
        forces = np.zeros((n, 3))
        w = self.width
        for i0 in range(0, n, _ROWS):
            d = pos[None, :, :] - pos[i0:i0 + _ROWS, None, :]  # r_j - r_i, (rows, n, 3)
            r = np.sqrt(np.einsum("ijk,ijk->ij", d, d))
            rows = np.arange(i0, min(n, i0 + _ROWS))
            r[rows - i0, rows] = 1.0  # the atom itself (its pair term is zeroed below)
            qq = q[rows, None] * q[None, :]
            qq[rows - i0, rows] = 0.0
            s = erf(r / w)
            energies[rows] = 0.5 * np.sum(qq * s / r, axis=1)
            # d/dr [erf(r/w)/r] = (2/(sqrt(pi) w)) exp(-(r/w)^2) / r - erf(r/w) / r^2
            dv = qq * (2.0 / (np.sqrt(np.pi) * w) * np.exp(-(r / w) ** 2) / r - s / r**2)
            # force on i: -dE/dr_i = -sum_j dv_ij (r_i - r_j) / r_ij = sum_j dv_ij d_ij / r_ij
            forces[rows] = np.einsum("ij,ijk->ik", dv / r, d)
        return COULOMB_CONSTANT * energies, COULOMB_CONSTANT * forces


def baseline_from_dict(d: dict):
    """The term under a model that ``d`` (its ``to_dict``) describes: a screened Coulomb
    term, or a force field prior (:mod:`otfml.prior`)."""
    if d.get("kind") == "mmff":
        from .prior import ForceFieldPrior

        return ForceFieldPrior.from_dict(d)
    return ScreenedCoulomb.from_dict(d)
