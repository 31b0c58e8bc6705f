"""Replay: the learning loop along one fixed plain-MOPAC trajectory.

An OTF run's call rate varies widely from one trajectory to the next (aspirin at
0.2 eV/Å: 4.6-22 % over seeds), because the model's forces steer the MD and
rounding alone sends it elsewhere.  That hides the effect of a policy or model
setting.  Here the geometries are those of one plain MOPAC Langevin run (every
step's energy and forces computed once and cached, ``offline_fit.trajectory``);
the learner sees them in order, and a step it sends to the reference gets the
cached label.  Every variant thus walks the same path, so their call rates and
errors compare directly.  The learner is otfml's own (``Learner.step``, its
policy, calibration, updates); only the reference is a table lookup.

What it cannot show: how the model's errors would have changed the trajectory
(an OTF run) or heat it.  Confirm a setting with ``otf_md.py``.

    python benchmarks/replay.py --molecule aspirin --steps 10000 --calibration floor
    python benchmarks/replay.py --molecule aspirin --calibration floor --policy force_tolerance=0.25
    python benchmarks/replay.py --molecule aspirin --set sparse_tolerance=0.01 --json > r.json

Reports the calls, the MAE of the forces the loop would have used (every step:
the model's where it trusted itself, the reference's at the calls, as
``otf_md.py`` measures on every 20th step), the miss rate, the final model's
error on an independent trajectory (seed 1), and the model and update times.
``est. wall ratio`` is (model + updates + calls x the median MOPAC call, timed
here on 20 frames) / (steps x that MOPAC call): an estimate, not a measured
side-by-side ratio, and its updates run after the lookup (the reference is in-process,
so they are not prepared during it as with MOPAC).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def lookup_calculator(frames):
    """An ASE calculator that returns the cached label of a geometry of ``frames``."""
    from ase.calculators.calculator import Calculator, all_changes

    table = {a.positions.tobytes(): (e, f) for a, e, f in frames}

    class Lookup(Calculator):
        implemented_properties = ["energy", "forces"]

        def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
            super().calculate(atoms, properties, system_changes)
            e, f = table[self.atoms.positions.tobytes()]
            self.results = {"energy": float(e), "forces": np.array(f)}

    return Lookup()


def mopac_call_ms(frames, n: int = 20) -> float:
    """Median time of an ASE MOPAC call on ``n`` of ``frames`` (ms)."""
    import tempfile

    from ase.calculators.mopac import MOPAC

    from otfml.reference import MopacReference

    work = tempfile.mkdtemp(prefix="otfml-replay-")
    calc = MOPAC(method="PM7", label=os.path.join(work, "m"), command=MopacReference().command)
    times = []
    for a, _e, _f in frames[:: max(1, len(frames) // n)][:n]:
        x = a.copy()
        x.calc = calc
        t0 = time.perf_counter()
        x.get_forces()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def replay(frames, policy, model_settings: dict, log_every: int = 0) -> dict:
    """Run the learner along ``frames`` [(atoms, energy, forces)] with ``policy`` (a
    ``LearningPolicy``) and ``model_settings``; the figures as a dict."""
    from otfml.learner import Learner
    from otfml.reference import CalculatorReference

    learner = Learner(CalculatorReference(lookup_calculator(frames), name="replay"),
                      policy=policy, model_settings=model_settings)
    err_sum = np.zeros(len(frames))  # sum over components of |F_used - F_ref|
    n_atoms = len(frames[0][0])
    missed = trusted_atoms = 0
    # per step and atom, on trusted steps: |F_model - F_ref| and the estimate (eV/Å)
    err_atoms = np.full((len(frames), n_atoms), np.nan)
    est_atoms = np.full((len(frames), n_atoms), np.nan)
    t0 = time.perf_counter()
    for i, (atoms, _e, f) in enumerate(frames):
        res = learner.step(atoms.copy())
        if not res.called:
            d = res.forces - f
            err_sum[i] = np.abs(d).sum()
            norm = np.linalg.norm(d, axis=1)
            err_atoms[i], est_atoms[i] = norm, res.forces_std
            missed += int(np.sum((norm > policy.tolerance) & (res.forces_std <= policy.tolerance)))
            trusted_atoms += n_atoms
        if log_every and (i + 1) % log_every == 0:
            print(f"  step {i + 1}: {learner.n_calls} calls, {learner.model.n_frames} frames, "
                  f"{learner.model.n_sparse} sparse, {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    called = np.array([h["called"] for h in learner.history])
    t = learner.timings
    learner.close()
    mae = err_sum / (3 * n_atoms)
    return {
        "steps": len(frames),
        "calls": int(called.sum()),
        "call_fraction": float(called.mean()),
        "calls_per_quarter": [int(c.sum()) for c in np.array_split(called, 4)],
        "used_forces_mae_eV_A": float(mae.mean()),
        "used_forces_mae_every_20th_eV_A": float(mae[19::20].mean()),
        "used_forces_mae_per_quarter_eV_A": [float(m.mean()) for m in np.array_split(mae, 4)],
        "trusted_steps_mae_eV_A": float(mae[~called].mean()) if (~called).any() else None,
        "miss_rate_atoms": missed / trusted_atoms if trusted_atoms else None,
        "total_model_s": float(np.sum(t["model"])),
        "total_update_s": float(np.sum(t["update"])),
        "median_model_step_ms": 1e3 * float(np.median(t["model"])),
        "median_update_ms": 1e3 * float(np.median(t["update"])),
        "hyperparameter_fits": len(t["hyperparameters"]),
        "sparse_environments": learner.model.n_sparse,
        "frames_held": learner.model.n_frames,
        "calibration": policy.model_calibration(),
        "replay_wall_s": wall,
        "model": learner.model,
        "per_step": {"called": called, "mae": mae, "err_atoms": err_atoms,
                     "est_atoms": est_atoms,
                     "max_est": np.array([h["max_force_std"] for h in learner.history])},
    }


def main(argv=None) -> int:
    from offline_fit import trajectory
    from otf_md import MOLECULES, parse_settings

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecule", choices=sorted(MOLECULES), default="aspirin")
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--seed", type=int, default=0, help="seed of the replayed trajectory")
    ap.add_argument("--test-steps", type=int, default=2000,
                    help="independent trajectory (seed + 1), every 20th frame tested")
    ap.add_argument("--calibration", default=None, help="learning.calibration")
    ap.add_argument("--policy", action="append", metavar="KEY=VALUE",
                    help="LearningPolicy setting (JSON value), e.g. force_tolerance=0.25")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="model setting (JSON value), e.g. sparse_tolerance=0.01")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/otfml-bench"))
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)

    from otfml.evaluate import evaluate
    from otfml.policy import LearningPolicy

    frames = trajectory(args.molecule, args.seed, args.steps, args.cache, every=1)
    test = trajectory(args.molecule, args.seed + 1, args.test_steps, args.cache, every=20)
    policy_settings = parse_settings(args.policy)
    if args.calibration:
        policy_settings["calibration"] = args.calibration
    model_settings = parse_settings(args.set)
    mopac_ms = mopac_call_ms(frames)
    policy = LearningPolicy(**policy_settings)
    r = replay(frames, policy, model_settings, log_every=0 if args.json else 1000)
    model = r.pop("model")
    r.pop("per_step")
    model.extra.update(r["calibration"])
    ev = evaluate(model, test, force_tolerance=policy.force_tolerance)
    plain = len(frames) * mopac_ms / 1e3
    r.update({
        "molecule": args.molecule, "seed": args.seed, "policy": policy_settings,
        "model_settings": model_settings, "median_mopac_call_ms": mopac_ms,
        "estimated_wall_ratio": (r["total_model_s"] + r["total_update_s"]
                                 + r["calls"] * mopac_ms / 1e3) / plain,
        "final_model_on_independent_trajectory": ev,
    })
    if args.json:
        print(json.dumps(r, indent=1, default=float))
    else:
        print(summary(r))
    return 0


def summary(r: dict) -> str:
    """One line per run."""
    ev = r["final_model_on_independent_trajectory"]
    # with every step called there are no trusted steps
    r = {**r, **{k: float("nan") for k in ("trusted_steps_mae_eV_A", "miss_rate_atoms")
                 if r[k] is None}}
    return (f"{r['molecule']} seed {r['seed']} {r['policy']} {r['model_settings']}: "
            f"{r['calls']} calls ({100 * r['call_fraction']:.2f} %, quarters "
            f"{'/'.join(map(str, r['calls_per_quarter']))}), used MAE "
            f"{r['used_forces_mae_eV_A']:.4f} (every 20th "
            f"{r['used_forces_mae_every_20th_eV_A']:.4f}, quarters "
            f"{'/'.join(f'{m:.3f}' for m in r['used_forces_mae_per_quarter_eV_A'])}, trusted steps "
            f"{r['trusted_steps_mae_eV_A']:.4f}) eV/Å, misses {100 * r['miss_rate_atoms']:.1f} %, "
            f"final model {ev['force_mae_eV_A']:.4f} eV/Å; model "
            f"{r['total_model_s']:.1f} s (median {r['median_model_step_ms']:.2f} ms), updates "
            f"{r['total_update_s']:.1f} s (median {r['median_update_ms']:.0f} ms), MOPAC call "
            f"{r['median_mopac_call_ms']:.0f} ms, est. wall ratio {r['estimated_wall_ratio']:.3f}; "
            f"{r['sparse_environments']} sparse, {r['frames_held']} frames held")


if __name__ == "__main__":
    sys.exit(main())
