"""One ``mpirun`` job of benchmarks/parallel.py: K walkers of a ParallelSession.

    mpirun -n K+1 python benchmarks/parallel_walk.py OUT MOLECULE STEPS FIRST_SEED

Walker w runs Langevin MD (0.5 fs, PM7, the molecule's temperature of otf_md.py) from the
start structure with seed FIRST_SEED + w; the store is OUT/shared.h5 (its frames, if any,
warm-start the model). Rank 0 writes OUT/result.json.
"""

import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from ase import units  # noqa: E402
from ase.calculators.mopac import MOPAC  # noqa: E402
from ase.md.langevin import Langevin  # noqa: E402
from otf_md import MOLECULES, rss_mb, start  # noqa: E402

from otfml.parallel import ParallelSession  # noqa: E402

out, name, steps, first = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
T = MOLECULES[name][1]
atoms0 = start(name, T, 0)
species = sorted({int(z) for z in atoms0.numbers})
t_start = time.time()
with ParallelSession(lambda w: MOPAC(method="PM7", label=os.path.join(out, f"mopac{w}", "m")),
                     store=os.path.join(out, "shared.h5"), species=species) as s:
    if s.walker is not None:
        seed = first + s.walker
        a = start(name, T, seed)
        a.calc = s.calculator()
        dyn = Langevin(a, 0.5 * units.fs, temperature_K=T, friction=0.01, fixcm=False,
                       rng=np.random.default_rng(seed + 1))
        t0 = time.time()
        dyn.run(steps)
        s.extra = {"md_s": time.time() - t0, "rss_MB": rss_mb()}
if s.walker is None:
    c = s.coordinator
    upd = c.update_s
    with open(os.path.join(out, "result.json"), "w") as fh:
        json.dump({"walkers": s.summaries, "versions": c.version,
                   "version_MB": [b / 1e6 for b in c.version_bytes],
                   "update_s": upd, "wall_s": time.time() - t_start,
                   "coordinator_rss_MB": rss_mb()}, fh, default=float)
