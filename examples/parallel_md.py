"""Four ethanol walkers (two temperatures, two seeds each) sharing one model and one store.

    mpirun -n 5 python examples/parallel_md.py        # rank 0 coordinates, ranks 1-4 walk

Each walker writes walker<w>.traj; the store is shared.h5 (rank 0 writes it alone).
"""

import numpy as np
from ase import units
from ase.build import molecule
from ase.calculators.mopac import MOPAC
from ase.io import Trajectory
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

from otfml import EnergyCompensation
from otfml.parallel import ParallelSession

TEMPERATURES = [300, 300, 500, 500]

with ParallelSession(lambda w: MOPAC(method="PM7", label=f"mopac/walker{w}"),
                     store="shared.h5", species=[1, 6, 8]) as session:
    if session.walker is not None:
        w = session.walker
        T = TEMPERATURES[w % len(TEMPERATURES)]
        rng = np.random.default_rng(w)
        atoms = molecule("CH3CH2OH")
        MaxwellBoltzmannDistribution(atoms, temperature_K=T, rng=rng)
        atoms.calc = session.calculator()
        dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=T, friction=0.01, fixcm=False,
                       rng=rng)
        dyn.attach(EnergyCompensation(atoms), interval=1)
        dyn.attach(Trajectory(f"walker{w}.traj", "w", atoms), interval=20)
        dyn.run(2000)
if session.walker is None:
    for w, s in sorted(session.summaries.items()):
        print(f"walker {w}: {s['steps']} steps, {s['reference_calls']} MOPAC calls, "
              f"{s['versions_used']} model versions used")
