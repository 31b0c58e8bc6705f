"""Run by tests/test_parallel.py under ``mpirun -n K+1``: walkers of a ParallelSession.

    mpirun -n 3 python tests/mpi_walkers.py OUT STEPS REFERENCE [FAIL_WALKER]

REFERENCE: ``emt`` (a Cu13 cluster, 300 K) or ``mopac`` (ethanol, 500 K, PM7). With
FAIL_WALKER, that walker's reference fails from its 3rd call on. Rank 0 writes
OUT/result.json: frames stored, versions made and their checksums, and every walker's
summary (with the reasons of its reference calls). A store already in OUT warm-starts the
model.
"""

import json
import os
import sys

import numpy as np
from ase import units
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron
from ase.md.langevin import Langevin

from otfml.errors import ReferenceFailed
from otfml.parallel import ParallelSession
from otfml.policy import LearningPolicy
from otfml.reference import Reference, make_reference
from otfml.store import Store

out, steps, kind = sys.argv[1], int(sys.argv[2]), sys.argv[3]
fail = int(sys.argv[4]) if len(sys.argv) > 4 else None


class Failing(Reference):
    """A reference that fails from its 3rd call on."""

    def __init__(self, ref):
        self.ref, self.n = ref, 0
        self.code, self.external_process = ref.code, ref.external_process

    def fingerprint(self, charge, multiplicity):
        return self.ref.fingerprint(charge, multiplicity)

    def compute(self, atoms, charge=0, multiplicity=1):
        self.n += 1
        if self.n >= 3:
            raise ReferenceFailed("injected failure")
        return self.ref.compute(atoms, charge, multiplicity)


def reference(w):
    if kind == "emt":
        ref = make_reference(EMT())
    else:
        from ase.calculators.mopac import MOPAC

        ref = make_reference(MOPAC(method="PM7", label=os.path.join(out, f"mopac{w}", "m")))
    return Failing(ref) if w == fail else ref


if kind == "emt":
    species, mult, T = [29], 2, 300
else:
    species, mult, T = [1, 6, 8], 1, 500
with ParallelSession(reference, store=os.path.join(out, "shared.h5"), species=species,
                     multiplicity=mult, policy=LearningPolicy(force_tolerance=0.3)) as s:
    if s.walker is not None:
        if kind == "emt":
            a = Icosahedron("Cu", 2)
        else:
            a = molecule("CH3CH2OH")
        a.rattle(0.05, seed=s.walker)
        a.calc = s.calculator()
        Langevin(a, (2.0 if kind == "emt" else 0.5) * units.fs, temperature_K=T,
                 friction=0.02, rng=np.random.default_rng(s.walker)).run(steps)
        s.extra = {"called_reasons": [h["reason"] for h in a.calc.learner.history
                                      if h["called"]]}
if s.walker is None:
    c = s.coordinator
    with Store(os.path.join(out, "shared.h5")) as st:
        frames = [(fr.walker, fr.step, fr.model_version) for fr in st]
    with open(os.path.join(out, "result.json"), "w") as fh:
        json.dump({"frames": frames, "versions": c.version, "checksums": c.checksums,
                   "summaries": s.summaries}, fh, default=float)
