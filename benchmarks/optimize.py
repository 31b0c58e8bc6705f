"""Geometry optimization: reference calls to a confirmed minimum, side by side in one run.

The 18 start structures of ``shared/geoopt`` (9 molecules, a rough build and an MMFF
minimum of each, both far from the PM7 minimum) are optimized to fmax 0.05 eV/Å:

* ``BFGS``: ASE's BFGS on MOPAC directly;
* ``otfml``: otfml's default optimizer (``otfml.drivers.relax``, which runs
  ``otfml.surrogate_opt.SurrogateOpt``: one reference call per step, each step chosen on the
  model) from an empty store;
* ``otfml-warm``: the same after 500 steps of on-the-fly MD (300 K) of the same molecule
  from the start, with one store and model (only the optimization's calls count);
* ``Sella``: a minimization (``order=0``) in internal coordinates;
* ``geomeTRIC`` in internal coordinates through its ASE engine, converged on the largest
  atomic force alone (its other criteria opened wide), as the others are.

Sella and geomeTRIC run where they are installed (``pip install -e ".[compare]"``).
``--smiles`` optimizes molecules of your own instead, from RDKit structures rattled by 0.15 Å.

Every run ends with an independent MOPAC call at the returned geometry: a start counts as
converged when its largest force is at most fmax there. Printed per start: the reference
calls (every MOPAC execution of the run; the independent check not counted), whether it
converged, the final energy against the best in ``anchors.json`` (with ``--smiles``: the
lowest any method reached in the run), and the optimizer's own
time per call (its wall time less the MOPAC time). Then the geometric mean of the calls.

    python benchmarks/optimize.py                       # every start
    python benchmarks/optimize.py --starts ethanol_raw benzene_mmff --methods otfml
    python benchmarks/optimize.py --smiles 'CC(=O)Nc1ccc(O)cc1' OCCO --methods otfml Sella
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import tempfile
import time

import numpy as np
from ase import units
from ase.calculators.calculator import Calculator, all_changes
from ase.io import read

HERE = os.path.dirname(os.path.abspath(__file__))
GEOOPT = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "geoopt")
FMAX = 0.05


class Counting(Calculator):
    """MOPAC PM7 as an ASE calculator, through :func:`counting_reference` (its ``calls``
    and ``seconds``)."""

    implemented_properties = ["energy", "forces"]

    def __init__(self) -> None:
        super().__init__()
        self.ref = counting_reference()

    @property
    def calls(self) -> int:
        return self.ref.calls

    @property
    def seconds(self) -> float:
        return self.ref.seconds

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        label = self.ref.compute(self.atoms, 0, 1)
        self.results = {"energy": label.energy, "forces": label.forces}


#: where a run's working folders go (removed at its end; the system's temporary folder
#: for the functions used from elsewhere)
WORK: str | None = None


def _workdir() -> str:
    return tempfile.mkdtemp(prefix="otfml-opt-", dir=WORK)


def counting_reference():
    """otfml's MOPAC reference, counting its calls and their time (``calls``, ``seconds``):
    otfml then runs as with MOPAC given directly (its update prepared while MOPAC runs)."""
    from otfml.reference import MopacReference

    class CountingReference(MopacReference):
        calls, seconds = 0, 0.0

        def compute(self, atoms, charge=0, multiplicity=1):
            t0 = time.perf_counter()
            try:
                return super().compute(atoms, charge, multiplicity)
            finally:
                self.seconds += time.perf_counter() - t0
                self.calls += 1

    return CountingReference(workdir=_workdir())


def run_bfgs(atoms, steps: int) -> tuple[int, float]:
    from ase.optimize import BFGS

    calc = Counting()
    atoms.calc = calc
    BFGS(atoms, logfile=None).run(fmax=FMAX, steps=steps)
    return calc.calls, calc.seconds


def run_otfml(atoms, steps: int) -> tuple[int, float]:
    from otfml import OTFCalculator
    from otfml.drivers import relax

    work = _workdir()
    ref = counting_reference()
    calc = OTFCalculator(reference=ref, store=os.path.join(work, "s.h5"))
    atoms.calc = calc
    relax(atoms, fmax=FMAX, steps=steps, logfile=None)
    calc.close()
    return ref.calls, ref.seconds


def run_otfml_warm(atoms, steps: int) -> tuple[int, float, float]:
    """otfml after 500 steps of on-the-fly MD of the same molecule at 300 K from the start
    (0.5 fs, Langevin): only the optimization's calls count; the MD's wall time (s) is the
    third value (left out of the optimizer's own time)."""
    from ase import units
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    from otfml import EnergyCompensation, OTFCalculator
    from otfml.drivers import relax

    work = _workdir()
    ref = counting_reference()
    calc = OTFCalculator(reference=ref, store=os.path.join(work, "s.h5"))
    md = atoms.copy()
    rng = np.random.default_rng(0)
    MaxwellBoltzmannDistribution(md, temperature_K=300, rng=rng)
    md.calc = calc
    dyn = Langevin(md, 0.5 * units.fs, temperature_K=300, friction=0.01, fixcm=False, rng=rng)
    dyn.attach(EnergyCompensation(md), interval=1)
    t0 = time.perf_counter()
    dyn.run(500)
    md_s = time.perf_counter() - t0
    before_calls, before_s = ref.calls, ref.seconds
    atoms.calc = calc
    relax(atoms, fmax=FMAX, steps=steps, logfile=None)
    calc.close()
    return ref.calls - before_calls, ref.seconds - before_s, md_s


def run_sella(atoms, steps: int) -> tuple[int, float]:
    from sella import Sella

    calc = Counting()
    atoms.calc = calc
    Sella(atoms, order=0, internal=True, logfile=None).run(fmax=FMAX, steps=steps)
    return calc.calls, calc.seconds


def run_geometric(atoms, steps: int) -> tuple[int, float]:
    import geometric
    import geometric.errors
    from geometric.ase_engine import EngineASE
    from geometric.molecule import Molecule
    from geometric.optimize import run_optimizer

    calc = Counting()
    molecule = Molecule()
    molecule.elem = atoms.get_chemical_symbols()
    molecule.xyzs = [atoms.positions.copy()]
    prefix = os.path.join(_workdir(), "geometric")
    quiet = os.path.join(os.path.dirname(geometric.__file__), "config", "logJson.ini")
    try:
        result = run_optimizer(customengine=EngineASE(molecule, calc), input=prefix,
                               prefix=prefix, maxiter=steps, logIni=quiet,
                               convergence_gmax=FMAX / (units.Hartree / units.Bohr),
                               convergence_energy=1.0, convergence_grms=1.0,
                               convergence_drms=1.0, convergence_dmax=1.0)
        atoms.positions = result.xyzs[-1]
    except geometric.errors.Error as err:  # not converged: the check judges the last geometry
        print(f"geomeTRIC: {type(err).__name__}", file=sys.stderr)
        atoms.positions = calc.atoms.positions
    return calc.calls, calc.seconds


METHODS = {"BFGS": run_bfgs, "otfml": run_otfml, "otfml-warm": run_otfml_warm,
           "Sella": run_sella, "geomeTRIC": run_geometric}


def check(atoms) -> tuple[float, float]:
    """An independent MOPAC call: the largest force (eV/Å) and the energy (eV)."""
    calc = Counting()
    a = atoms.copy()
    a.calc = calc
    return float(np.linalg.norm(a.get_forces(), axis=1).max()), float(a.get_potential_energy())


def table(rows: list[dict]) -> str:
    """Per method: starts, geometric mean of the calls, failures, starts within 10 meV of the
    best minimum, and the median of the optimizer's own and MOPAC's time per call."""
    out = ["| method | starts | geometric mean of calls | failures | within 10 meV of the best "
           "| own / MOPAC time per call |", "|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == method]
        gm = math.exp(np.mean([math.log(max(r["calls"], 1)) for r in rs]))
        own = np.median([r["own_s_per_call"] for r in rs])
        mop = np.median([r["mopac_s_per_call"] for r in rs])
        out.append(f"| {method} | {len(rs)} | {gm:.1f} | {sum(not r['converged'] for r in rs)} "
                   f"| {sum(r['above_best_meV'] <= 10 for r in rs)} / {len(rs)} | "
                   f"{1e3 * own:.0f} / {1e3 * mop:.0f} ms |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--geoopt", default=GEOOPT, help="folder of the starts and anchors.json")
    ap.add_argument("--starts", nargs="+", default=None)
    ap.add_argument("--smiles", nargs="+", default=None,
                    help="molecules of your own instead of the starts: each embedded by RDKit "
                         "(MMFF94) and rattled by 0.15 Å; their best is the lowest energy any "
                         "method reaches in this run")
    ap.add_argument("--methods", nargs="+", choices=sorted(METHODS), default=list(METHODS))
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.smiles:
        starts = {smi: functools.partial(from_smiles, smi) for smi in args.smiles}
    else:
        with open(os.path.join(args.geoopt, "anchors.json")) as fh:
            anchors = json.load(fh)
        starts = {name: functools.partial(read, os.path.join(args.geoopt, f"{name}.xyz"))
                  for name in args.starts or sorted(anchors)}
        best = {name: anchors[name]["best_energy_eV"] for name in starts}
    global WORK
    with tempfile.TemporaryDirectory(prefix="otfml-opt-") as WORK:
        rows = _runs(args, starts)
    if args.smiles:  # the lowest energy any method reached from each start
        best = {name: min(r["energy"] for r in rows if r["start"] == name) for name in starts}
    for r in rows:
        r["above_best_meV"] = 1e3 * (r["energy"] - best[r["start"]])
    print(json.dumps(rows, indent=1) if args.json else table(rows))
    return 0


def from_smiles(smiles: str, rattle: float = 0.15, seed: int = 0):
    """A start of ``smiles``: RDKit's MMFF94 structure, every atom moved by a normal
    deviate of ``rattle`` Å per coordinate."""
    from otfml.system import _from_smiles

    atoms = _from_smiles(smiles, seed)
    if atoms.info["smiles_charge"] or atoms.numbers.sum() % 2:
        raise SystemExit(f"--smiles {smiles!r}: a charge or an odd number of electrons; the "
                         "methods here run MOPAC neutral and closed-shell: give neutral "
                         "closed-shell molecules")
    atoms.positions += np.random.default_rng(seed).normal(0.0, rattle, atoms.positions.shape)
    return atoms


def _runs(args, starts: dict) -> list[dict]:
    rows = []
    for method in args.methods:
        for name, make in starts.items():
            atoms = make()
            t0 = time.perf_counter()
            try:
                calls, mopac_s, *before = METHODS[method](atoms, args.steps)
            except ImportError as err:
                print(f"{method}: not installed ({err}); skipped", file=sys.stderr)
                break
            wall = time.perf_counter() - t0 - sum(before)  # less a warm-up's time
            fmax, energy = check(atoms)
            rows.append({"method": method, "start": name, "calls": calls,
                         "converged": fmax <= FMAX, "fmax": fmax, "energy": energy,
                         "own_s_per_call": (wall - mopac_s) / max(calls, 1),
                         "mopac_s_per_call": mopac_s / max(calls, 1)})
            print(f"{method:9s} {name:22s} {calls:4d} calls  converged {fmax <= FMAX!s:5s} "
                  f"energy {energy:10.4f} eV  "
                  f"own {1e3 * rows[-1]['own_s_per_call']:.0f} ms/call "
                  f"(MOPAC {1e3 * rows[-1]['mopac_s_per_call']:.0f} ms)", file=sys.stderr)
    return rows


if __name__ == "__main__":
    sys.exit(main())
