"""Geometry optimization with few MOPAC calls: otfml's SurrogateOpt, PM7 as reference.

Each step labels one geometry with MOPAC (stored and learned); the step to the next is
chosen on the model, which learns MOPAC less MMFF94 (``SurrogateOpt(atoms, prior=None)``:
without it). ``otfml.drivers.relax(atoms)`` does the same and returns a summary.

Run: python examples/optimize.py   (after `bash examples/demo.sh` set up .venv)
"""

from ase.build import molecule
from ase.calculators.mopac import MOPAC

from otfml import OTFCalculator
from otfml.surrogate_opt import SurrogateOpt

atoms = molecule("CH3CH2OH")
atoms.rattle(0.15, seed=1)
atoms.calc = OTFCalculator(reference=MOPAC(method="PM7"), store="ethanol_opt.h5")
converged = SurrogateOpt(atoms).run(fmax=0.05, steps=300)
learner = atoms.calc.learner
print(f"converged: {converged}, E {atoms.get_potential_energy():.4f} eV (MOPAC), "
      f"{learner.n_calls} MOPAC calls")
atoms.calc.close()
