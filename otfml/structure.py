"""Checks of a structure before it reaches the model or the reference.

One place for what `otfml check`, `otfml run` and the learner refuse: elements
the model cannot describe, overlapping atoms, charge and multiplicity that do
not fit the electron count, and structures that have fallen apart.
"""

from __future__ import annotations

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from .errors import ConfigError, UnphysicalGeometry

__all__ = ["check_elements", "closest_pair", "electron_parity_check", "default_multiplicity",
           "charge_and_multiplicity", "check_geometry", "fragments", "check_fragments",
           "MIN_DISTANCE", "BOND_FACTOR"]


def check_elements(atoms: Atoms, what: str = "the structure") -> None:
    """Refuse dummy atoms (``X``, atomic number 0) and atomic numbers that name no element.

    Raises
    ------
    ConfigError
        Naming the atoms and how to fix the structure.
    """
    z = np.asarray(atoms.numbers)
    bad = np.flatnonzero((z <= 0) | (z >= len(chemical_symbols)))
    if len(bad) == 0:
        return
    names = sorted({chemical_symbols[int(v)] if 0 <= v < len(chemical_symbols) else str(int(v))
                    for v in z[bad]})
    shown = ", ".join(str(int(i)) for i in bad[:10]) + (" ..." if len(bad) > 10 else "")
    raise ConfigError(
        f"{what} has {len(bad)} atom(s) that are no chemical element ({', '.join(names)}; "
        f"atom(s) {shown}); the model and the reference need real elements. Remove dummy "
        "atoms (X) or give their element symbol")


def closest_pair(atoms: Atoms) -> tuple[int, int, float]:
    """Indices and distance (Å) of the two closest atoms (minimum image if periodic)."""
    if len(atoms) < 2:
        return 0, 0, float("inf")
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))
    np.fill_diagonal(d, np.inf)
    i, j = np.unravel_index(np.argmin(d), d.shape)
    return int(i), int(j), float(d[i, j])


def electron_parity_check(atoms: Atoms, charge: int, multiplicity: int) -> None:
    """Refuse a charge/multiplicity pair impossible for the electron count.

    Raises
    ------
    ConfigError
        With the electron count and the multiplicities that would be allowed.
    """
    n_el = int(atoms.numbers.sum()) - int(charge)
    if n_el < 0:
        raise ConfigError(f"charge={charge} removes more electrons than the structure has "
                          f"({int(atoms.numbers.sum())})")
    if multiplicity < 1:
        raise ConfigError(f"multiplicity={multiplicity}; it must be 1 (singlet), 2 (doublet), ...")
    if (n_el % 2) == (multiplicity % 2):
        allowed = "2 (doublet), 4, ..." if n_el % 2 else "1 (singlet), 3 (triplet), ..."
        raise ConfigError(
            f"{atoms.get_chemical_formula()} with charge {charge} has {n_el} electrons "
            f"({'odd' if n_el % 2 else 'even'}); multiplicity {multiplicity} is impossible. "
            f"Set multiplicity to one of {allowed} or change the charge"
        )


def default_multiplicity(atoms: Atoms, charge: int) -> int:
    """Singlet for an even electron count; odd counts need an explicit choice."""
    n_el = int(atoms.numbers.sum()) - int(charge)
    if n_el % 2:
        raise ConfigError(
            f"{atoms.get_chemical_formula()} with charge {charge} has an odd number of electrons "
            f"({n_el}); set the multiplicity explicitly (2 for a doublet radical) in the "
            "config (system.multiplicity) or atoms.info['multiplicity']"
        )
    return 1


def charge_and_multiplicity(atoms: Atoms, charge: int | None = None,
                            multiplicity: int | None = None) -> tuple[int, int]:
    """Checked charge and multiplicity of ``atoms``.

    ``atoms.info['charge']``/``['multiplicity']`` win over the defaults given;
    without either, the charge is the sum of the initial charges and the
    multiplicity a singlet (odd electron counts must set it).

    Raises
    ------
    ConfigError
        Odd electrons without a multiplicity, or an impossible combination.
    """
    charge = atoms.info.get("charge", charge)
    if charge is None:
        charge = int(round(float(atoms.get_initial_charges().sum())))
    mult = atoms.info.get("multiplicity", multiplicity)
    if mult is None:
        mult = default_multiplicity(atoms, charge)
    electron_parity_check(atoms, int(charge), int(mult))
    return int(charge), int(mult)


#: closest approach (Å) a structure may have before it is sent to the reference
MIN_DISTANCE = 0.5


def check_geometry(atoms: Atoms, step: int) -> None:
    """Refuse a collapsed geometry before it reaches the reference.

    Raises
    ------
    UnphysicalGeometry
        Naming the step, the two atoms and their distance (MOPAC itself aborts
        below 0.2 Å; anything under ``MIN_DISTANCE`` means the trajectory broke).
    """
    i, j, dist = closest_pair(atoms)
    if dist < MIN_DISTANCE:
        sym = atoms.get_chemical_symbols()
        raise UnphysicalGeometry(
            f"step {step}: atoms {i} ({sym[i]}) and {j} ({sym[j]}) are {dist:.3f} Å apart "
            f"(< {MIN_DISTANCE} Å); the structure has collapsed and was not sent to the "
            "reference. Nothing was stored. Use a smaller time step or force_tolerance, "
            "or check the starting structure")


#: atoms closer than this multiple of the sum of their covalent radii are bonded
BOND_FACTOR = 1.5


def fragments(atoms: Atoms) -> tuple[int, np.ndarray]:
    """Bonded fragments (bond: distance < BOND_FACTOR x covalent radii sum).

    Returns
    -------
    n : int
        Number of fragments.
    labels : ndarray (n_atoms,) of int
        Atoms with the same label are connected through bonds.
    """
    from ase.neighborlist import natural_cutoffs, neighbor_list
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(atoms)
    radii = np.asarray(natural_cutoffs(atoms, mult=BOND_FACTOR), dtype=float)
    if atoms.pbc.any():
        i, j = neighbor_list("ij", atoms, radii)
    else:  # a molecule or cluster: the descriptors' pair search, then each pair's bond length
        from .descriptor import _molecular_pairs

        i, j, D = _molecular_pairs(np.asarray(atoms.positions, dtype=float),
                                   2.0 * float(radii.max(initial=0.0)))
        bonded = np.einsum("qc,qc->q", D, D) < (radii[i] + radii[j]) ** 2
        i, j = i[bonded], j[bonded]
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    return connected_components(graph, directed=False)


def check_fragments(atoms: Atoms, step: int, n_start: int) -> None:
    """Refuse a structure that has more bonded fragments than it started with.

    Raises
    ------
    UnphysicalGeometry
        Naming the atoms of the smallest new fragment and how far it is from the rest.
    """
    n, labels = fragments(atoms)
    if n <= n_start:
        return
    sizes = np.bincount(labels)
    small = int(np.argmin(sizes))
    idx = np.flatnonzero(labels == small)
    rest = np.flatnonzero(labels != small)
    d = atoms.get_all_distances(mic=bool(atoms.pbc.any()))[np.ix_(idx, rest)]
    sym = atoms.get_chemical_symbols()
    raise UnphysicalGeometry(
        f"step {step}: the structure has fallen apart into {n} bonded fragments (it started "
        f"with {n_start}): atoms {idx.tolist()} ({''.join(sym[k] for k in idx)}) are "
        f"{d.min():.2f} Å from the rest. It was not sent to the reference; nothing was "
        "stored. If the dissociation is expected set learning.allow_fragmentation: true; "
        "otherwise lower the time step, the temperature or learning.force_tolerance")


