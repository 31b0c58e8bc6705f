"""Geometry optimization with ASE's BFGS on the learned surface, MOPAC PM7 as reference.

The optimizer runs on the model; at the end one MOPAC call confirms the minimum
(and, if MOPAC's forces are still above fmax, the optimization continues).
"""

import numpy as np
from ase.build import molecule
from ase.calculators.mopac import MOPAC
from ase.optimize import BFGS

from otfml import OTFCalculator

atoms = molecule("CH3CH2OH")
atoms.rattle(0.15, seed=1)
calc = OTFCalculator(reference=MOPAC(method="PM7"), store="ethanol_opt.h5")
atoms.calc = calc
fmax = 0.05
for _ in range(10):
    BFGS(atoms).run(fmax=fmax, steps=300)
    calc.learner.request_reference = True  # confirm with MOPAC
    calc.reset()
    ref_fmax = np.linalg.norm(atoms.get_forces(), axis=1).max()
    print(f"MOPAC fmax at the model's minimum: {ref_fmax:.4f} eV/Å")
    if ref_fmax <= fmax:
        break
print(f"{calc.learner.n_calls} MOPAC calls, {calc.learner.n_steps} energy/force evaluations")
calc.close()
