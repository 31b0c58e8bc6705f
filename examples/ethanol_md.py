"""On-the-fly MD of ethanol at 500 K with MOPAC PM7 as the reference.

Run: python examples/ethanol_md.py   (after `bash examples/demo.sh` set up .venv)
"""

import logging

from ase import units
from ase.build import molecule
from ase.calculators.mopac import MOPAC
from ase.md.langevin import Langevin

from otfml import EnergyCompensation, OTFCalculator

logging.basicConfig(level=logging.INFO)

atoms = molecule("CH3CH2OH")
atoms.calc = OTFCalculator(reference=MOPAC(method="PM7"), store="ethanol.h5")
dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=500, friction=0.01, fixcm=False)
dyn.attach(EnergyCompensation(atoms), interval=1)  # keeps learning from heating the run


def report():
    r = atoms.calc.results
    print(f"step {dyn.nsteps:5d}  T {atoms.get_temperature():6.1f} K  source {r['source']:9s}  "
          f"max force error estimate {r['forces_std'].max():.3f} eV/Å")


dyn.attach(report, interval=100)
dyn.run(2000)
learner = atoms.calc.learner
print(f"{learner.n_calls} MOPAC calls in {learner.n_steps} steps; frames stored in ethanol.h5")
atoms.calc.close()
