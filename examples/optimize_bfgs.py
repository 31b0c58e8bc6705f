"""Geometry optimization on the learned surface, MOPAC PM7 as reference.

``otfml.drivers.relax`` runs ASE's BFGS on the model and confirms the minimum with
one MOPAC call; where MOPAC's forces are still above fmax it goes on from there.

Run: python examples/optimize_bfgs.py   (after `bash examples/demo.sh` set up .venv)
"""

from ase.build import molecule
from ase.calculators.mopac import MOPAC

from otfml import OTFCalculator
from otfml.drivers import relax

atoms = molecule("CH3CH2OH")
atoms.rattle(0.15, seed=1)
atoms.calc = OTFCalculator(reference=MOPAC(method="PM7"), store="ethanol_opt.h5")
result = relax(atoms, fmax=0.05, steps=300)
learner = atoms.calc.learner
print(f"converged: {result.converged}, MOPAC fmax {result.fmax:.4f} eV/Å, "
      f"E {result.energy:.4f} eV")
print(f"{learner.n_calls} MOPAC calls, {learner.n_steps} energy/force evaluations")
atoms.calc.close()
