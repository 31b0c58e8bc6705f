"""Write the start structures of the panel's own systems (benchmarks/structures/*.xyz).

    python benchmarks/make_panel_structures.py

Molecules come from SMILES (RDKit: ETKDG, then MMFF), the water cluster from 27 randomly
oriented waters on a 3 x 3 x 3 grid; each is then relaxed with MOPAC PM7 (ASE's BFGS,
fmax 0.1 eV/Å, at most 300 steps) with its charge and multiplicity, so that MD starts
near a minimum of the reference's surface.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from ase import Atoms
from ase.io import write
from ase.optimize import BFGS

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

#: name: (SMILES or None for the water cluster, charge, multiplicity)
SYSTEMS = {
    "nma": ("CC(=O)NC", 0, 1),  # N-methylacetamide, a small amide
    "acetate": ("CC(=O)[O-]", -1, 1),  # a charged molecule
    "allyl": ("[CH2]C=C", 0, 2),  # a radical (doublet)
    "diphenhydramine": ("CN(C)CCOC(c1ccccc1)c1ccccc1", 0, 1),  # 40 atoms
    "water27": (None, 0, 1),  # a water cluster
}


def from_smiles(smiles: str) -> Atoms:
    from rdkit import Chem
    from rdkit.Chem import AllChem

    mol = Chem.AddHs(Chem.MolFromSmiles(smiles))
    AllChem.EmbedMolecule(mol, randomSeed=7)
    AllChem.MMFFOptimizeMolecule(mol)
    pos = mol.GetConformer().GetPositions()
    return Atoms([a.GetSymbol() for a in mol.GetAtoms()], positions=pos)


def relaxed(atoms: Atoms, charge: int, multiplicity: int) -> Atoms:
    from otfml.reference import MopacReference

    ref = MopacReference()

    from ase.calculators.calculator import Calculator, all_changes

    class RefCalc(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            label = ref.compute(self.atoms, charge, multiplicity)
            self.results = {"energy": label.energy, "forces": label.forces}

    atoms.calc = RefCalc()
    BFGS(atoms, logfile=None).run(fmax=0.1, steps=300)
    out = Atoms(atoms.numbers, positions=atoms.positions)
    out.info.update(charge=charge, multiplicity=multiplicity)
    return out


def main() -> int:
    from otf_md import water_cluster

    os.makedirs(os.path.join(HERE, "structures"), exist_ok=True)
    for name, (smiles, charge, mult) in SYSTEMS.items():
        atoms = water_cluster(n_side=3, seed=1) if smiles is None else from_smiles(smiles)
        atoms = relaxed(atoms, charge, mult)
        path = os.path.join(HERE, "structures", f"{name}.xyz")
        write(path, atoms, format="extxyz")
        print(path, atoms.get_chemical_formula(), len(atoms), "atoms",
              f"charge {charge}, multiplicity {mult}", np.round(atoms.get_center_of_mass(), 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
