"""otfml on-the-fly MD vs plain MOPAC MD, side by side in one process.

Both runs start from the same geometry and velocities (Langevin, same seed).
Prints steps, reference calls, wall times and their ratio, median time of a
model-only step and of a MOPAC call, the errors of the forces the OTF run
actually used and of the final model, both against fresh MOPAC calculations
on every 20th frame of the OTF trajectory, and the temperatures of both runs.

    python benchmarks/otf_md.py --molecule ethanol --steps 2000 --json
    python benchmarks/otf_md.py --molecule aspirin --steps 2000 --plain-steps 500

``--plain-steps N`` times plain MOPAC MD on the first N steps only and
extrapolates its wall time per step (said so in the output).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time

import numpy as np
from ase import units
from ase.build import molecule
from ase.calculators.mopac import MOPAC
from ase.io import read
from ase.md.langevin import Langevin
from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation

HERE = os.path.dirname(os.path.abspath(__file__))
MOLECULES = {
    "ethanol": lambda: molecule("CH3CH2OH"),
    "aspirin": lambda: read(os.path.join(HERE, "aspirin.xyz")),
}


def start(name: str, temperature: float, seed: int):
    atoms = MOLECULES[name]()
    rng = np.random.default_rng(seed)
    MaxwellBoltzmannDistribution(atoms, temperature_K=temperature, rng=rng)
    Stationary(atoms)
    ZeroRotation(atoms)
    return atoms


def md(atoms, steps, temperature, seed, every=20):
    """Langevin MD; returns wall time, temperatures and a copy of every `every`-th frame."""
    rng = np.random.default_rng(seed + 1)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=0.01,
                   fixcm=False, rng=rng)
    temps, frames = [], []

    def observe():
        temps.append(atoms.get_temperature())
        if dyn.nsteps % every == 0 and dyn.nsteps > 0:
            f = atoms.get_forces()  # cached: the forces this step used
            frames.append((atoms.copy(), f.copy(), atoms.calc.results.get("source", "mopac")))

    dyn.attach(observe, interval=1)
    t0 = time.perf_counter()
    dyn.run(steps)
    return time.perf_counter() - t0, np.array(temps), frames


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecule", choices=sorted(MOLECULES), default="ethanol")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--plain-steps", type=int, default=None,
                    help="time plain MOPAC MD on this many steps and extrapolate")
    ap.add_argument("--temperature", type=float, default=500.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force-tolerance", type=float, default=None,
                    help="eV/Å (default: otfml's default)")
    ap.add_argument("--min-steps-between-calls", type=int, default=0)
    ap.add_argument("--calibration", choices=("atom", "max"), default="atom")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from otfml import OTFCalculator
    from otfml.policy import LearningPolicy
    from otfml.reference import MopacReference

    # the same command otfml runs MOPAC with (stdout/stderr silenced) for every run
    command = MopacReference().command

    work = tempfile.mkdtemp(prefix="otfml-bench-")
    plain_steps = min(args.plain_steps or args.steps, args.steps)

    # plain MOPAC MD
    a = start(args.molecule, args.temperature, args.seed)
    a.calc = MOPAC(method="PM7", label=os.path.join(work, "plain", "m"), command=command)
    plain_wall, plain_T, _ = md(a, plain_steps, args.temperature, args.seed)
    plain_per_step = plain_wall / (plain_steps + 1)
    plain_extrapolated = plain_per_step * (args.steps + 1)

    # otfml OTF MD from the same start
    b = start(args.molecule, args.temperature, args.seed)
    policy = LearningPolicy(min_steps_between_calls=args.min_steps_between_calls,
                            calibration=args.calibration)
    if args.force_tolerance is not None:
        policy.force_tolerance = args.force_tolerance
    calc = OTFCalculator(reference=MOPAC(method="PM7"), store=os.path.join(work, "otf.h5"),
                         policy=policy)
    b.calc = calc
    otf_wall, otf_T, frames = md(b, args.steps, args.temperature, args.seed)
    L = calc.learner

    # errors against fresh MOPAC on every 20th frame of the OTF trajectory
    chk = MOPAC(method="PM7", label=os.path.join(work, "check", "m"), command=command)
    used_err, final_err, final_e_err = [], [], []
    for atoms, used_f, _source in frames:
        x = atoms.copy()
        x.calc = chk
        f_ref = x.get_forces()
        e_ref = x.get_potential_energy()
        used_err.append(np.abs(used_f - f_ref).ravel())
        p = L.model.predict(atoms)
        final_err.append(np.abs(p.forces - f_ref).ravel())
        final_e_err.append(abs(p.energy - e_ref) / len(atoms))
    used_err = np.concatenate(used_err)
    final_err = np.concatenate(final_err)
    calc.close()

    n = len(b)
    half = len(otf_T) // 2
    result = {
        "molecule": args.molecule,
        "atoms": n,
        "steps": args.steps,
        "temperature_K": args.temperature,
        "plain_mopac": {
            "steps_timed": plain_steps,
            "wall_s": plain_wall,
            "wall_s_for_all_steps": plain_extrapolated,
            "extrapolated": plain_steps < args.steps,
            "mean_T_second_half_K": float(plain_T[len(plain_T) // 2:].mean()),
        },
        "otfml": {
            "wall_s": otf_wall,
            "reference_calls": L.n_calls,
            "reference_fraction": L.n_calls / (args.steps + 1),
            "sparse_environments": L.model.n_sparse,
            "median_model_step_ms": 1e3 * float(np.median(L.timings["model"])),
            "median_mopac_call_ms": 1e3 * float(np.median(L.timings["reference"])),
            "median_update_ms": 1e3 * float(np.median(L.timings["update"])),
            "total_update_s": float(np.sum(L.timings["update"])),
            "calls_per_quarter_of_run": np.histogram(
                [h["step"] for h in L.history if h["source"] == "reference"],
                bins=4, range=(1, args.steps + 2))[0].tolist(),
            "mean_T_second_half_K": float(otf_T[half:].mean()),
            "max_T_K": float(otf_T.max()),
        },
        "wall_ratio_otf_over_plain": otf_wall / plain_extrapolated,
        "model_step_over_mopac_call": float(np.median(L.timings["model"])
                                            / np.median(L.timings["reference"])),
        "errors_vs_fresh_mopac_every_20th_frame": {
            "frames": len(frames),
            "used_forces_mae_eV_A": float(used_err.mean()),
            "final_model_force_mae_eV_A": float(final_err.mean()),
            "final_model_force_rmse_eV_A": float(np.sqrt(np.mean(final_err**2))),
            "final_model_energy_mae_meV_per_atom": 1e3 * float(np.mean(final_e_err)),
        },
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        o, p, e = result["otfml"], result["plain_mopac"], \
            result["errors_vs_fresh_mopac_every_20th_frame"]
        print(f"{args.molecule} ({n} atoms), {args.steps} steps at {args.temperature:.0f} K")
        print(f"plain MOPAC MD: {p['wall_s_for_all_steps']:.1f} s"
              + (f" (extrapolated from {plain_steps} steps)" if p["extrapolated"] else ""))
        print(f"otfml OTF MD:   {o['wall_s']:.1f} s, {o['reference_calls']} MOPAC calls "
              f"({100 * o['reference_fraction']:.1f} % of steps)")
        print(f"MOPAC calls per quarter of the run: {o['calls_per_quarter_of_run']}")
        print(f"wall ratio otfml/plain: {result['wall_ratio_otf_over_plain']:.3f}")
        print(f"median model step {o['median_model_step_ms']:.2f} ms, MOPAC call "
              f"{o['median_mopac_call_ms']:.1f} ms, update {o['median_update_ms']:.1f} ms")
        print(f"force MAE used {e['used_forces_mae_eV_A']:.4f}, final model "
              f"{e['final_model_force_mae_eV_A']:.4f} eV/Å; energy MAE "
              f"{e['final_model_energy_mae_meV_per_atom']:.2f} meV/atom")
        print(f"mean T (second half): plain {p['mean_T_second_half_K']:.0f} K, "
              f"otfml {o['mean_T_second_half_K']:.0f} K (max {o['max_T_K']:.0f} K)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
