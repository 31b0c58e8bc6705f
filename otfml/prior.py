"""A force field under the model: MMFF94 through RDKit.

With ``model.prior: mmff`` the model learns the reference less MMFF94's energy and forces,
so that from its first label it has a force field's bonds, angles and torsions to go by:
its curvature, where it has no data, is MMFF's rather than none. :class:`SurrogateOpt`
uses it by default; the reference's labels are stored as they are (the store does not
depend on the prior).

Bonds and their orders are perceived once per molecule (its elements in order and its
charge), from the first geometry of it the model sees (:func:`_perceive`), and kept: the
prior suits optimizations and MD that keep the bonds, not reactions. A molecule that cannot
be typed (no bond orders fit its electrons without separating charges, an element MMFF94
lacks, a periodic cell) gets no prior: the model learns the reference's values, with a
warning saying why.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from ase import Atoms, units

from .errors import ConfigError
from .structure import BOND_FACTOR

log = logging.getLogger(__name__)

__all__ = ["ForceFieldPrior", "PRIORS"]

#: the priors model.prior can name
PRIORS = ("mmff",)

#: kcal/mol in eV
_KCAL = units.kcal / units.mol


class ForceFieldPrior:
    """MMFF94 energy and forces (RDKit), one set of bonds per molecule.

    Parameters
    ----------
    charge : int, default 0
        Total charge (e) of a molecule whose ``atoms.info`` has no ``"charge"``; bond
        orders are perceived for it.
    topologies : list of dict, optional
        What :meth:`to_dict` saved: each molecule's atomic numbers, charge and MDL mol
        block (None: RDKit could not type it).
    """

    kind = "mmff"

    def __init__(self, charge: int = 0, topologies: list[dict] | None = None) -> None:
        try:
            import rdkit  # noqa: F401
        except ImportError as err:
            raise ConfigError("model.prior = 'mmff' needs RDKit: pip install rdkit (or set "
                              "model.prior to null)") from err
        self.charge = int(charge)
        self._blocks: dict[tuple, str | None] = {}
        self._fields: dict[tuple, object] = {}
        self._lock = threading.Lock()  # one force field evaluation at a time
        self._periodic_warned = False
        for t in topologies or []:
            key = (tuple(int(z) for z in t["numbers"]), int(t["charge"]))
            self._blocks[key] = t["molblock"]

    def to_dict(self) -> dict:
        """Settings and bonds that rebuild this prior (:meth:`from_dict`)."""
        return {"kind": self.kind, "charge": self.charge,
                "topologies": [{"numbers": list(k[0]), "charge": k[1], "molblock": b}
                               for k, b in self._blocks.items()]}

    @classmethod
    def from_dict(cls, d: dict) -> ForceFieldPrior:
        return cls(d.get("charge", 0), d.get("topologies"))

    def energies_forces(self, atoms: Atoms) -> tuple[np.ndarray, np.ndarray]:
        """Per-atom energies (n_atoms,), eV (MMFF's energy shared equally; their sum is
        the energy), and forces (n_atoms, 3), eV/Å, of ``atoms``; zeros for a molecule
        without a prior (module notes)."""
        n = len(atoms)
        with self._lock:
            ff = self._field(atoms)
            if ff is None:
                return np.zeros(n), np.zeros((n, 3))
            x = np.asarray(atoms.positions, dtype=float).ravel().tolist()
            energy = ff.CalcEnergy(x) * _KCAL
            grad = np.asarray(ff.CalcGrad(x), dtype=float).reshape(n, 3) * _KCAL
        return np.full(n, energy / n), -grad

    def _field(self, atoms: Atoms):
        if atoms.pbc.any():
            if not self._periodic_warned:
                log.warning("no MMFF prior for the periodic %s: the model learns the "
                            "reference's values", atoms.get_chemical_formula())
                self._periodic_warned = True
            return None
        charge = int(atoms.info.get("charge", self.charge))
        key = (tuple(int(z) for z in atoms.numbers), charge)
        if key in self._fields:
            return self._fields[key]
        if key not in self._blocks:
            self._blocks[key] = _perceive(atoms, charge)
        block = self._blocks[key]
        self._fields[key] = None if block is None else _force_field(block)
        return self._fields[key]


#: heavy-atom bond lengths tried after RDKit's own perception, as multiples of the
#: covalent radii sum
_BOND_FACTORS = (1.2, 1.3, 1.4, BOND_FACTOR)


def _perceive(atoms: Atoms, charge: int) -> str | None:
    """The mol block of ``atoms`` with bonds and bond orders perceived, typed for MMFF94,
    or None (with a warning) where that fails.

    RDKit's ``DetermineBonds`` first; then, for a rough start whose stretched bonds it
    misses, each hydrogen bonded to its nearest atom and heavy atoms closer than a factor
    (:data:`_BOND_FACTORS`) times their covalent radii. The first that gives bond orders
    without separated charges (:func:`_unpaired_charge` no more than the molecule's
    charge) and that MMFF94 can type is taken: a wrong guess would pull the optimization
    towards another molecule. A zwitterion whose charges sit apart gets no prior.
    """
    from rdkit import Chem, rdBase
    from rdkit.Chem import AllChem, rdDetermineBonds

    quiet = rdBase.BlockLogs()  # noqa: F841  (RDKit's messages about the guesses it refuses)
    why = "no bonds give it a closed-shell structure without separated charges"
    for bonds in _candidate_bonds(atoms):
        mol = _bare(atoms, bonds)
        try:
            if bonds is None:
                rdDetermineBonds.DetermineBonds(mol, charge=charge)
            else:
                rdDetermineBonds.DetermineBondOrders(mol, charge=charge)
            Chem.SanitizeMol(mol)
        except (ValueError, RuntimeError):
            continue
        if _unpaired_charge(mol) > abs(charge):
            continue
        if not AllChem.MMFFHasAllMoleculeParams(mol):
            why = "MMFF94 has no parameters for some of its atoms"
            continue
        return Chem.MolToMolBlock(mol)
    log.warning("no MMFF prior for %s (charge %d): %s; the model learns the reference's "
                "values", atoms.get_chemical_formula(), charge, why)
    return None


def _unpaired_charge(mol) -> int:
    """The formal charges (e, in magnitude) on atoms with no bonded neighbour of the other
    sign: a nitro or sulfoxide group's N+/O- or S+/O- pair is a molecule's own; charges
    apart from each other are a bond perception's guess at another molecule."""
    total = 0
    for a in mol.GetAtoms():
        q = a.GetFormalCharge()
        if q and not any(n.GetFormalCharge() * q < 0 for n in a.GetNeighbors()):
            total += abs(q)
    return total


def _candidate_bonds(atoms: Atoms):
    """None (RDKit's own perception), then for each of :data:`_BOND_FACTORS`: each
    hydrogen to its nearest atom, heavy atoms closer than the factor times their covalent
    radii sum. Computed only as far as they are asked for."""
    yield None
    from ase.data import covalent_radii

    d = atoms.get_all_distances()
    np.fill_diagonal(d, np.inf)
    r = covalent_radii[atoms.numbers]
    heavy = atoms.numbers > 1
    hydrogens = {(min(i, j), max(i, j)) for i in np.flatnonzero(~heavy)
                 for j in [int(np.argmin(d[i]))]}
    radii_sum = r[:, None] + r[None, :]
    for factor in _BOND_FACTORS:
        close = np.triu(d < factor * radii_sum, k=1) & np.outer(heavy, heavy)
        yield sorted(hydrogens | {(int(i), int(j)) for i, j in zip(*np.nonzero(close))})


def _bare(atoms: Atoms, bonds: list[tuple[int, int]] | None):
    """An RDKit molecule of ``atoms`` (their coordinates) with ``bonds`` as single bonds."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    mol = Chem.RWMol()
    for z in atoms.numbers:
        mol.AddAtom(Chem.Atom(int(z)))
    for i, j in bonds or []:
        mol.AddBond(int(i), int(j), Chem.BondType.SINGLE)
    conf = Chem.Conformer(len(atoms))
    for i, p in enumerate(atoms.positions):
        conf.SetAtomPosition(i, Point3D(*(float(v) for v in p)))
    mol.AddConformer(conf)
    return mol.GetMol()


def _force_field(block: str):
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.MolFromMolBlock(block, removeHs=False)
    props = AllChem.MMFFGetMoleculeProperties(mol)
    return AllChem.MMFFGetMoleculeForceField(mol, props)
