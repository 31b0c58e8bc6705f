"""Does on-the-fly learning heat the system?  Plain MOPAC MD against otfml MD.

``--ensemble nvt`` (default): ``otf_md.py``'s Langevin thermostat (0.5 fs,
friction 0.01 in ASE units, about 1/(1000 fs)); printed is the mean
temperature of each tenth of the run and of its second half.  A thermostat this
weak lets a 21-atom molecule's block means wander by tens of kelvin, so compare
plain MOPAC runs of several seeds with the otfml run.

``--ensemble nve``: velocity Verlet, 0.5 fs.  Every 10th step the kinetic
energy plus MOPAC's energy of that geometry (one extra MOPAC call, also for the
otfml run) gives the total energy on MOPAC's surface; printed is its drift
(linear fit, eV/ps).  For the otfml run also printed: the sum of the changes
of the force surface that ``EnergyCompensation`` measured (eV; what it takes out
of the kinetic energy with ``--compensate``), and the mean of the model's energy
error at the calls before the update.

Both runs start alike (same seed); they part within a few hundred steps.

    python benchmarks/temperature.py --molecule aspirin --steps 10000 --mode plain --seed 1
    python benchmarks/temperature.py --molecule aspirin --steps 3000 --ensemble nve
    python benchmarks/temperature.py --molecule aspirin --steps 3000 --ensemble nve \
        --mode otfml --compensate --set centre_weight=0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np
from ase import units
from ase.calculators.mopac import MOPAC
from ase.md.verlet import VelocityVerlet
from otf_md import MOLECULES, md, parse_settings, start


def nve(atoms, steps: int, check, compensation=None) -> dict:
    """Velocity Verlet; total energy on MOPAC's surface every 10th step, its drift."""
    dyn = VelocityVerlet(atoms, 0.5 * units.fs)
    if compensation is not None:
        dyn.attach(compensation, interval=1)
    rows = []

    def observe():
        if dyn.nsteps % 10 == 0:
            x = atoms.copy()
            x.calc = check
            rows.append((dyn.nsteps, atoms.get_kinetic_energy() + x.get_potential_energy(),
                         atoms.get_temperature()))

    dyn.attach(observe, interval=1)
    dyn.run(steps)
    r = np.array(rows)
    t_ps = r[:, 0] * 0.5e-3
    fit = np.polyfit(t_ps, r[:, 1], 1)
    k = max(1, len(r) // 10)  # a tenth of the samples at each end
    return {"drift_eV_per_ps": float(fit[0]),
            "total_energy_change_eV": float(r[-k:, 1].mean() - r[:k, 1].mean()),
            "total_energy_by_tenth_eV": [float(b.mean() - r[0, 1])
                                         for b in np.array_split(r[:, 1], 10)],
            "total_energy_scatter_eV": float(np.std(r[:, 1] - np.polyval(fit, t_ps))),
            "mean_T_K": float(r[:, 2].mean())}


def run(mode: str, ensemble: str, molecule: str, steps: int, seed: int, work: str,
        compensate: bool = False, calibration: str | None = None, settings: dict | None = None,
        force_tolerance: float | None = None) -> dict:
    from otfml.reference import MopacReference

    command = MopacReference().command
    temperature = MOLECULES[molecule][1]
    atoms = start(molecule, temperature, seed)
    if mode == "plain":
        atoms.calc = MOPAC(method="PM7", label=os.path.join(work, mode, "m"), command=command)
    else:
        from otfml import OTFCalculator
        from otfml.policy import LearningPolicy

        atoms.calc = OTFCalculator(reference=MOPAC(method="PM7"),
                                   store=os.path.join(work, "otf.h5"),
                                   policy=LearningPolicy(
                                       **({} if calibration is None
                                          else {"calibration": calibration}),
                                       **({} if force_tolerance is None
                                          else {"force_tolerance": force_tolerance})),
                                   model_settings=settings or {})
    out = {"mode": mode, "ensemble": ensemble, "molecule": molecule, "steps": steps,
           "seed": seed}
    compensation = None
    if mode == "otfml":
        from otfml.compensation import EnergyCompensation

        # without --compensate it only measures the changes (min_frames never reached)
        compensation = EnergyCompensation(atoms, **({} if compensate
                                                    else {"min_frames": sys.maxsize}))
        out["energy_compensation"] = compensate
        out["calibration"] = calibration
        out["force_tolerance_eV_A"] = atoms.calc.learner.policy.force_tolerance
        out["model_settings"] = atoms.calc.learner.settings

    if ensemble == "nvt":
        wall, temps, _, _ = md(atoms, steps, temperature, seed,
                               observers=[compensation] if compensation else [])
        out.update({"thermostat_K": temperature, "wall_s": wall,
                    "mean_T_by_tenth_K": [float(b.mean()) for b in np.array_split(temps, 10)],
                    "mean_T_second_half_K": float(temps[len(temps) // 2:].mean()),
                    "max_T_K": float(temps.max())})
    else:
        check = MOPAC(method="PM7", label=os.path.join(work, "check-" + mode, "m"),
                      command=command)
        out.update(nve(atoms, steps, check, compensation))
    if mode == "otfml":
        out["reference_calls"] = atoms.calc.learner.n_calls
        out["taken_from_kinetic_energy_eV"] = compensation.total
        changes = np.array([change for _step, change in compensation.shifts])
        off = [h["model_energy"] - h["energy"] for h in atoms.calc.learner.history
               if h["called"] and h["model_energy"] is not None]
        if len(changes):
            out["sum_of_surface_changes_eV"] = float(changes.sum())
            out["mean_surface_change_meV"] = 1e3 * float(changes.mean())
            out["mean_model_minus_reference_at_calls_meV"] = 1e3 * float(np.mean(off))
        atoms.calc.close()
    return out


def main(argv=None) -> int:
    from otfml.settings import CALIBRATIONS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecule", choices=sorted(MOLECULES), default="aspirin")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mode", choices=("plain", "otfml", "both"), default="both")
    ap.add_argument("--ensemble", choices=("nvt", "nve"), default="nvt")
    ap.add_argument("--compensate", action="store_true",
                    help="otfml run with otfml.compensation.EnergyCompensation attached")
    ap.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                    help="the otfml run's learning.calibration (default: the policy's)")
    ap.add_argument("--force-tolerance", type=float, default=None,
                    help="the otfml run's learning.force_tolerance, eV/Å (default: the policy's)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="the otfml run's model setting, e.g. --set centre_weight=0")
    args = ap.parse_args(argv)
    work = tempfile.mkdtemp(prefix="otfml-temperature-")
    for mode in ("plain", "otfml") if args.mode == "both" else (args.mode,):
        print(json.dumps(run(mode, args.ensemble, args.molecule, args.steps, args.seed, work,
                             args.compensate, args.calibration, parse_settings(args.set),
                             args.force_tolerance)))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
