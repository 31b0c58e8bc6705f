"""The system of a workflow: its structures and its reference, built from a checked config."""

from __future__ import annotations

import logging
import os

import numpy as np
from ase import Atoms

from .config import index_of
from .errors import ConfigError
from .reference import CalculatorReference, MopacReference, Reference
from .structure import MIN_DISTANCE, charge_and_multiplicity, check_elements, closest_pair

__all__ = ["build_structures", "build_reference"]

log = logging.getLogger(__name__)


def _from_smiles(smiles: str, seed: int = 0) -> Atoms:
    """3D structure (hydrogens added, MMFF-relaxed) of a SMILES string via RDKit."""
    try:
        from rdkit import Chem
        from rdkit.Chem import AllChem
    except ImportError as err:
        raise ConfigError("system.structure = 'smiles:...' needs RDKit: "
                          "pip install rdkit") from err
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ConfigError(f"system.structure = 'smiles:{smiles}': RDKit cannot parse this "
                          "SMILES; check brackets, ring closures and charges")
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=int(seed)) != 0:
        raise ConfigError(f"system.structure = 'smiles:{smiles}': RDKit could not embed a 3D "
                          "structure; give a structure file instead")
    AllChem.MMFFOptimizeMolecule(mol)
    atoms = Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
                  positions=mol.GetConformer().GetPositions())
    atoms.info["smiles_charge"] = int(Chem.GetFormalCharge(mol))
    return atoms


def build_structures(cfg: dict) -> list[Atoms]:
    """The structures of ``system``: a file (one image or a slice of them), a SMILES
    string (``smiles:...``) or an ``ase.build.molecule`` name.

    Raises
    ------
    ConfigError
        Naming the key, the value and what would be accepted.
    """
    from ase.build import molecule
    from ase.collections import g2
    from ase.io import read

    sysc = cfg["system"]
    spec = sysc["structure"]
    index = index_of(sysc["index"])
    path = spec if os.path.isabs(spec) else os.path.join(cfg.get("_base", "."), spec)
    if spec.lower().startswith("smiles:"):
        images = [_from_smiles(spec.split(":", 1)[1].strip(), cfg["driver"]["seed"])]
        if images[0].info["smiles_charge"] != sysc["charge"]:
            raise ConfigError(
                f"system.structure = {spec!r} has a formal charge of "
                f"{images[0].info['smiles_charge']} but system.charge = {sysc['charge']}; "
                "set system.charge to match")
    elif os.path.isfile(path):
        try:
            images = read(path, index=index)
        except Exception as err:
            raise ConfigError(f"system.structure = {spec!r}: ASE could not read image(s) "
                              f"{sysc['index']!r} of {path!r} ({type(err).__name__}: {err})"
                              ) from err
        images = images if isinstance(images, list) else [images]
        if not images:
            raise ConfigError(f"system.index = {sysc['index']!r} selects no image of {path!r}")
    elif spec in g2.names:
        images = [molecule(spec)]
    else:
        raise ConfigError(
            f"system.structure = {spec!r} is neither an existing file ({path!r}), a "
            "'smiles:...' string nor an ase.build.molecule name (e.g. CH3CH2OH, H2O, C6H6)")
    for k, atoms in enumerate(images):
        what = f"system.structure = {spec!r}" + (f" (image {k})" if len(images) > 1 else "")
        if len(atoms) < 2:
            raise ConfigError(f"{what} has {len(atoms)} atom(s); otfml needs at least 2")
        if not np.all(np.isfinite(atoms.positions)):
            raise ConfigError(f"{what} has NaN/inf coordinates")
        check_elements(atoms, what)
        if len(atoms) > sysc["max_atoms"]:
            raise ConfigError(f"{what} has {len(atoms)} atoms, more than system.max_atoms = "
                              f"{sysc['max_atoms']}; check the file, or raise system.max_atoms")
        i, j, dist = closest_pair(atoms)
        if dist < MIN_DISTANCE:
            raise ConfigError(f"{what}: atoms {i} ({atoms[i].symbol}) and {j} "
                              f"({atoms[j].symbol}) are {dist:.3f} Å apart (< {MIN_DISTANCE} "
                              "Å); fix the overlapping atoms in the structure")
        if cfg["reference"]["code"] == "mopac" and atoms.pbc.any():
            raise ConfigError(f"{what} is periodic (pbc={atoms.pbc.tolist()}), but the MOPAC "
                              "reference is molecular in otfml; use a non-periodic structure "
                              "(atoms.pbc = False) of the molecule")
        atoms.info["charge"] = sysc["charge"]
        if sysc["multiplicity"] is not None:
            atoms.info["multiplicity"] = sysc["multiplicity"]
        try:  # odd electrons without a multiplicity, impossible charge/multiplicity
            charge_and_multiplicity(atoms)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err} (system.charge = {sysc['charge']}, "
                              f"system.multiplicity = {sysc['multiplicity']})") from None
    return images


def build_reference(cfg: dict, workdir: str | None = None) -> Reference:
    """The reference named by ``reference.code``."""
    ref = cfg["reference"]
    code = ref["code"]
    if code == "mopac":
        return MopacReference(method=ref["method"], keywords=ref["keywords"],
                              command=ref["command"], workdir=workdir,
                              timeout=ref["timeout_s"], scf_retries=ref["scf_retries"])
    if code == "emt":
        from ase.calculators.emt import EMT

        return CalculatorReference(EMT(), name="EMT")
    if code == "lj":
        from ase.calculators.lj import LennardJones

        return CalculatorReference(LennardJones(sigma=1.0, epsilon=0.01, rc=4.0), name="LJ")
    raise ConfigError(f"reference.code = {code!r} is not known")  # schema prevents this


