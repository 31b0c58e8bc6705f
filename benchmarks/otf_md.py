"""otfml on-the-fly MD vs plain MOPAC MD, side by side in one process.

Plain MOPAC MD runs from the same geometry with other Maxwell-Boltzmann
velocities and thermostat noise (``--seed + 1``): it gives the wall time per
step of plain MOPAC MD *and* an independent labelled trajectory (every 20th
frame, MOPAC's own forces) on which the final model is tested.  The OTF run
(``--seed``) then starts from an empty store, with ``otfml.EnergyCompensation``
attached as README's example does (``--no-compensation``: without).  Printed:

* steps, reference calls and their spread over the quarters of the run;
* wall times and their ratio; where the OTF time went (model, MOPAC, updates);
* median model-only step and MOPAC call, and their ratio;
* the force MAE of the forces the OTF run actually used (every 20th step
  against a fresh MOPAC call);
* the final model on the independent trajectory: force/energy MAE, rank
  correlation of its uncertainty with the actual per-atom force errors, and the
  miss rate (atoms with an actual error above the tolerance the calibrated
  estimate said they were within);
* how the model step and the update time grow with the number of stored frames;
* peak memory of this process (MOPAC runs in its own processes).

    python benchmarks/otf_md.py --molecule ethanol --steps 10000 --plain-steps 2000
    python benchmarks/otf_md.py --molecule aspirin --steps 10000 --plain-steps 1000
    python benchmarks/otf_md.py --molecule water64 --steps 1000 --plain-steps 20

``water64`` starts from ``water64.xyz`` (64 waters minimised with MOPAC from
the grid ``water64-grid`` builds).

``--plain-steps N`` times plain MOPAC MD on N steps only and extrapolates its
wall time per step (said so in the output); the test trajectory is then N steps long.
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
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.mopac import MOPAC
from ase.io import read
from ase.md.langevin import Langevin

HERE = os.path.dirname(os.path.abspath(__file__))


def water_cluster(n_side: int = 4, spacing: float = 3.1, seed: int = 0) -> Atoms:
    """``n_side**3`` randomly oriented waters on a cubic grid (liquid density at 3.1 Å).

    Orientations are redrawn until no two atoms of different molecules are
    closer than 1.7 Å.
    """
    from scipy.spatial.distance import cdist
    from scipy.spatial.transform import Rotation

    rng = np.random.default_rng(seed)
    w = molecule("H2O")
    w.positions -= w.get_center_of_mass()
    pos, nums = [], []
    for idx in np.ndindex(n_side, n_side, n_side):
        centre = spacing * np.array(idx, dtype=float)
        for _ in range(1000):
            p = Rotation.random(random_state=rng).apply(w.positions) + centre
            if not pos or cdist(p, np.concatenate(pos)).min() > 1.7:
                break
        pos.append(p)
        nums.extend(w.numbers)
    return Atoms(numbers=nums, positions=np.concatenate(pos))


def _structure(name: str):
    """A start structure of ``structures/`` (make_panel_structures.py), with its charge and
    multiplicity in ``info``."""
    return lambda: read(os.path.join(HERE, "structures", f"{name}.xyz"))


MOLECULES = {
    "ethanol": (lambda: molecule("CH3CH2OH"), 500.0),
    "aspirin": (lambda: read(os.path.join(HERE, "aspirin.xyz")), 500.0),
    # water_cluster() minimised with MOPAC (PM7, 400 EF cycles): a start near equilibrium
    "water64": (lambda: read(os.path.join(HERE, "water64.xyz")), 300.0),
    "water64-grid": (water_cluster, 300.0),
    "nma": (_structure("nma"), 500.0),
    "acetate": (_structure("acetate"), 500.0),
    "allyl": (_structure("allyl"), 500.0),
    "diphenhydramine": (_structure("diphenhydramine"), 500.0),
    "water27": (_structure("water27"), 300.0),
}


def charge_multiplicity(atoms: Atoms) -> tuple[int, int]:
    """The structure's charge and multiplicity (``info``; neutral singlet by default)."""
    return int(atoms.info.get("charge", 0)), int(atoms.info.get("multiplicity", 1))


def plain_mopac(atoms: Atoms, label: str, command: str) -> MOPAC:
    """ASE's MOPAC calculator for ``atoms`` at its charge and multiplicity (PM7)."""
    from otfml.reference import MopacReference

    charge, mult = charge_multiplicity(atoms)
    task = MopacReference(command=command.split(" > ")[0]).task(mult)
    return MOPAC(method="PM7", label=label, command=command, charge=charge, task=task)


def start(name: str, temperature: float, seed: int) -> Atoms:
    from otfml.drivers import thermalize

    atoms = MOLECULES[name][0]()
    rng = np.random.default_rng(seed)
    thermalize(atoms, temperature, rng)
    return atoms


def rss_mb() -> float | None:
    """Resident memory of this process now, MB (None where /proc is missing)."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1024**2
    except OSError:
        return None


#: Langevin friction in ASE units (about 1/(1000 fs)) unless --thermostat-fs says otherwise
FRICTION = 0.01


def md(atoms, steps, temperature, seed, every=20, observers=(), friction=FRICTION):
    """Langevin MD; returns wall time, temperatures, every `every`-th frame with its forces,
    and the resident memory (MB) at those steps. ``observers`` are attached first."""
    rng = np.random.default_rng(seed + 1)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=temperature, friction=friction,
                   fixcm=False, rng=rng)
    for f in observers:
        dyn.attach(f, interval=1)
    temps, frames, rss = [], [], {}

    def observe():
        temps.append(atoms.get_temperature())
        if dyn.nsteps % every == 0 and dyn.nsteps > 0:
            # cached: the energy and forces this step used
            frames.append((atoms.copy(), atoms.get_potential_energy(), atoms.get_forces().copy()))
            rss[dyn.nsteps] = rss_mb()

    dyn.attach(observe, interval=1)
    t0 = time.perf_counter()
    dyn.run(steps)
    return time.perf_counter() - t0, np.array(temps), frames, rss


def growth(history, rss: dict | None = None) -> list[dict]:
    """Median model step and update time per range of labelled frames (the store's count).

    With ``model.max_frames`` the model holds fewer than were labelled; the
    largest number it held in each range is reported too, and the largest
    resident memory sampled in it (``rss``: MB by MD step).
    """
    rss = rss or {}
    frames = np.array([h.get("labelled", h["frames"]) for h in history])
    edges = [1, 10, 25, 50, 100, 200, 400, 800, 1600, 10**9]
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = [h for h, n in zip(history, frames) if lo <= n < hi]
        model = [h["model_s"] for h in sel if h["model_s"] is not None]
        upd = [h["update_s"] for h in sel if h["update_s"] is not None]
        if not model and not upd:
            continue
        rows.append({
            "frames": f"{lo}-{min(hi, frames.max() + 1) - 1}",
            "sparse": int(max(h["sparse"] for h in sel)),
            "held": int(max(h["frames"] for h in sel)),
            # the learner's step 1 is the forces of MD step 0
            "max_rss_MB": max((rss[h["step"] - 1] for h in sel
                               if rss.get(h["step"] - 1) is not None), default=None),
            "model_steps": len(model),
            "median_model_step_ms": 1e3 * float(np.median(model)) if model else None,
            "updates": len(upd),
            "median_update_ms": 1e3 * float(np.median(upd)) if upd else None,
        })
    return rows


def load_results(paths) -> list[dict]:
    """The ``--json`` results in the files ``paths``."""
    out = []
    for path in paths:
        with open(path) as fh:
            out.append(json.load(fh))
    return out


def parse_settings(items) -> dict:
    out = {}
    for item in items or []:
        key, _, val = item.partition("=")
        out[key] = json.loads(val) if val not in ("", None) else None
    return out


def compensation_min_frames_default() -> int:
    """``EnergyCompensation``'s own default ``min_frames``."""
    import inspect

    from otfml import EnergyCompensation

    return inspect.signature(EnergyCompensation).parameters["min_frames"].default


def label(r: dict) -> str:
    """Column header of one result: the molecule, the seed and every setting not at its default."""
    from otfml.policy import LearningPolicy
    from otfml.training import MODEL_DEFAULTS

    parts = [f"{r['molecule']}, seed {r['otfml']['seed']}"]
    # results from before model.evict_frames existed dropped the oldest frames
    settings = {"evict_frames": "oldest", **r["model_settings"]}
    parts += [f", {k} {v}" for k, v in settings.items() if MODEL_DEFAULTS.get(k) != v]
    if r["force_tolerance_eV_A"] != LearningPolicy.force_tolerance:
        parts.append(f", tolerance {r['force_tolerance_eV_A']:g} eV/Å")
    if r.get("calibration", LearningPolicy.calibration) != LearningPolicy.calibration:
        parts.append(f", calibration {r['calibration']}")
    # results from before learning.call_step_result existed returned MOPAC's values
    if r.get("call_step_result", "reference") != LearningPolicy.call_step_result:
        parts.append(f", call steps return the {r['call_step_result'].replace('_', ' ')}")
    # results from before learning.sparse_admission existed had none
    if r.get("sparse_admission") != LearningPolicy.sparse_admission:
        parts.append(f", sparse admission {r.get('sparse_admission')}")
    if r.get("min_steps_between_calls"):
        parts.append(f", min interval {r['min_steps_between_calls']}")
    if r.get("adaptive"):
        parts.append(", adaptive")
    if r.get("energy_compensation"):
        # "update shifts": a result of the older rule, each update's shift at its geometry
        parts.append(", compensated" if r.get("compensation_rule") == "surface changes"
                     else ", compensated (update shifts)")
        n = r.get("compensation_min_frames", compensation_min_frames_default())
        if n != compensation_min_frames_default():
            parts.append(f" from {n} frames")
    return "".join(parts)


def table(results: list[dict]) -> str:
    """Markdown table of benchmark results (``--json`` outputs), one column per run."""
    def col(r):
        o, p, ev = r["otfml"], r["plain_mopac"], r["final_model_on_independent_trajectory"]
        ex = f" (from {p['steps_timed']} steps)" if p["extrapolated"] else ""
        return [
            f"{r['steps']}",
            f"{o['reference_calls']} ({100 * o['reference_fraction']:.2f} %)",
            " / ".join(map(str, o["calls_per_quarter_of_run"])),
            " / ".join(f"{t:.0f}" for t in o["mean_T_per_quarter_K"]) + " K"
            if "mean_T_per_quarter_K" in o else "-",
            f"{p['wall_s_for_all_steps']:.0f} s{ex}",
            f"{o['wall_s']:.1f} s",
            f"{o['total_model_s']:.1f} / {o['total_mopac_s']:.1f} / {o['total_update_s']:.1f} s",
            f"**{r['wall_ratio_otf_over_plain']:.3f}**",
            f"{o['median_model_step_ms']:.2f} ms / {o['median_mopac_call_ms']:.0f} ms "
            f"(**1/{1 / r['model_step_over_mopac_call']:.0f}**)",
            f"{o['median_update_ms']:.0f} ms",
            (f"{o['hyperparameter_fits']} / {o['total_hyperparameter_s']:.1f} s"
             + (f" ({o['total_fits_apart_s']:.1f} s on another thread)"
                if o.get("total_fits_apart_s") else ""))
            if "hyperparameter_fits" in o else "-",
            f"{o['total_prepared_during_calls_s']:.1f} s" if o.get("overlap_update") else "off",
            f"**{r['used_forces_mae_eV_A']:.4f}**",
            f"**{ev['force_mae_eV_A']:.4f}** ({ev['frames']} frames)",
            f"{ev['energy_mae_meV_per_atom']:.2f} meV/atom",
            f"{ev['spearman_atom']:.2f} / {ev['spearman_frame']:.2f}",
            f"{100 * ev.get('miss_rate', float('nan')):.2f} %",
            f"{p['mean_T_second_half_K']:.0f} K ({p['steps_timed']} steps) / "
            f"{o['mean_T_second_half_K']:.0f} K ({r['steps']} steps; max {o['max_T_K']:.0f} K)",
            f"{o['sparse_environments']}",
            f"{r['peak_rss_MB']:.0f} MB",
        ]
    names = ["steps", "MOPAC calls", "calls per quarter of the run",
             "mean T per quarter of the run", "plain MOPAC MD wall",
             "otfml wall", "of which model / MOPAC / updates", "wall ratio otfml / plain",
             "median model step / MOPAC call", "median update",
             "hyperparameter fits / their time (part of the updates)",
             "update parts prepared during MOPAC calls (not in the updates)",
             "force MAE of the forces used (eV/Å)",
             "final model force MAE, independent trajectory (eV/Å)", "final model energy MAE",
             "Spearman uncertainty vs error (atom / frame)", "miss rate (atoms)",
             "mean T second half of each run, plain / otfml", "sparse environments",
             "peak memory"]
    cols = [col(r) for r in results]
    head = [label(r) for r in results]
    lines = ["| | " + " | ".join(head) + " |", "|---" * (len(results) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(c[k] for c in cols) + " |" for k, n in enumerate(names)]
    for r, h in zip(results, head):
        lines += ["", f"Growth with stored frames, {h}:", "",
                  "| stored frames | held by the model | sparse environments | model steps "
                  "| median model step | updates | median update | memory |",
                  "|---|---|---|---|---|---|---|---|"]
        for g in r["growth_with_stored_frames"]:
            ms = "-" if g["median_model_step_ms"] is None else f"{g['median_model_step_ms']:.2f} ms"
            up = "-" if g["median_update_ms"] is None else f"{g['median_update_ms']:.1f} ms"
            mem = "-" if g.get("max_rss_MB") is None else f"{g['max_rss_MB']:.0f} MB"
            lines.append(f"| {g['frames']} | {g.get('held', '-')} | {g['sparse']} | "
                         f"{g['model_steps']} | {ms} | "
                         f"{g['updates']} | {up} | {mem} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from otfml.settings import CALIBRATIONS, CALL_STEP_RESULTS

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecule", choices=sorted(MOLECULES), default="ethanol")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--plain-steps", type=int, default=None,
                    help="time plain MOPAC MD on this many steps and extrapolate")
    ap.add_argument("--temperature", type=float, default=None,
                    help="K (default: 500, water64: 300)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--thermostat-fs", type=float, default=None,
                    help="Langevin time constant, fs (default: friction 0.01 in ASE units)")
    ap.add_argument("--force-tolerance", type=float, default=None,
                    help="eV/Å (default: otfml's default)")
    ap.add_argument("--min-steps-between-calls", type=int, default=0)
    ap.add_argument("--calibration", choices=CALIBRATIONS, default=None,
                    help="learning.calibration (default: the policy's)")
    ap.add_argument("--decide-on", choices=("estimate", "learnable"), default=None,
                    help="learning.decide_on (default: the policy's)")
    ap.add_argument("--compensation-min-frames", type=int,
                    default=compensation_min_frames_default(), metavar="N",
                    help="EnergyCompensation's min_frames: compensate updates of models "
                         "with at least N frames (default: its own, %(default)s)")
    ap.add_argument("--no-compensation", action="store_true",
                    help="run the OTF MD without otfml.EnergyCompensation")
    ap.add_argument("--call-step-result", choices=CALL_STEP_RESULTS, default=None,
                    help="what the steps that call MOPAC return (learning.call_step_result; "
                         "default: otfml's)")
    ap.add_argument("--sparse-admission", default=None, metavar="F",
                    help="learning.sparse_admission: a fraction, or null (default: otfml's)")
    ap.add_argument("--adaptive", action="store_true",
                    help="the tolerance follows the running errors (learning.adaptive)")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="model setting, e.g. --set sparse_tolerance=0.01 (JSON value)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--table", nargs="+", metavar="JSON",
                    help="print a markdown table of earlier --json outputs and exit")
    args = ap.parse_args(argv)
    if args.table:
        print(table(load_results(args.table)))
        return 0
    temperature = args.temperature or MOLECULES[args.molecule][1]

    from otfml import EnergyCompensation, OTFCalculator
    from otfml.evaluate import evaluate
    from otfml.policy import LearningPolicy
    from otfml.reference import MopacReference

    # the same command otfml runs MOPAC with (stdout/stderr silenced) for every run
    command = MopacReference().command

    work = tempfile.mkdtemp(prefix="otfml-bench-")
    plain_steps = min(args.plain_steps or args.steps, args.steps)

    # plain MOPAC MD with another seed: the timing and the independent test trajectory
    a = start(args.molecule, temperature, args.seed + 1)
    a.calc = plain_mopac(a, os.path.join(work, "plain", "m"), command)
    friction = FRICTION if args.thermostat_fs is None else 1.0 / (args.thermostat_fs * units.fs)
    # every 20th frame is a test frame; short plain runs (water) use more of their frames
    plain_wall, plain_T, test, _ = md(a, plain_steps, temperature, args.seed + 1,
                                   every=min(20, max(1, plain_steps // 10)), friction=friction)
    plain_per_step = plain_wall / (plain_steps + 1)
    plain_extrapolated = plain_per_step * (args.steps + 1)

    # otfml OTF MD from an empty store
    b = start(args.molecule, temperature, args.seed)
    policy = LearningPolicy(min_steps_between_calls=args.min_steps_between_calls,
                            adaptive=args.adaptive,
                            **({"calibration": args.calibration} if args.calibration else {}),
                            **({"decide_on": args.decide_on} if args.decide_on else {}),
                            **({"call_step_result": args.call_step_result}
                               if args.call_step_result else {}),
                            **({"sparse_admission": json.loads(args.sparse_admission)}
                               if args.sparse_admission is not None else {}))
    if args.force_tolerance is not None:
        policy.force_tolerance = args.force_tolerance
    charge, mult = charge_multiplicity(b)
    calc = OTFCalculator(reference=MOPAC(method="PM7"), store=os.path.join(work, "otf.h5"),
                         policy=policy, model_settings=parse_settings(args.set),
                         charge=charge, multiplicity=mult)
    b.calc = calc
    comp = (None if args.no_compensation
            else EnergyCompensation(b, min_frames=args.compensation_min_frames))
    otf_wall, otf_T, frames, rss = md(b, args.steps, temperature, args.seed,
                                      observers=[comp] if comp else [], friction=friction)
    L = calc.learner
    t_fit = time.perf_counter()
    L.finish_hyperparameter_fit()  # as `otfml run` does before it saves the model
    otf_wall += time.perf_counter() - t_fit

    # the forces the OTF run used, against fresh MOPAC on every 20th frame
    chk = plain_mopac(b, os.path.join(work, "check", "m"), command)
    used_err = []
    for atoms, _e, used_f in frames:
        x = atoms.copy()
        x.calc = chk
        used_err.append(np.abs(used_f - x.get_forces()).ravel())
    # by quarter of the run: a young model's share of the error
    used_quarters = [float(q.mean()) for q in np.array_split(np.stack(used_err), 4)]
    used_err = np.concatenate(used_err)
    # the final model on the independent trajectory
    L.model.extra.update(L.policy.model_calibration())
    ev = evaluate(L.model, test, force_tolerance=policy.force_tolerance)
    calc.close()

    t = L.timings
    n = len(b)
    half = len(otf_T) // 2
    result = {
        "molecule": args.molecule,
        "atoms": n,
        "steps": args.steps,
        "temperature_K": temperature,
        "charge": charge,
        "multiplicity": mult,
        "thermostat_fs": args.thermostat_fs,
        "model_settings": L.settings,
        "force_tolerance_eV_A": policy.force_tolerance,
        "adaptive": policy.adaptive,
        "calibration": policy.calibration,
        "decide_on": policy.decide_on,
        "calibration_fit": L.policy.model_calibration(),
        "call_step_result": policy.call_step_result,
        "sparse_admission": policy.sparse_admission,
        "min_steps_between_calls": policy.min_steps_between_calls,
        "energy_compensation": comp is not None,
        "compensation_min_frames": None if comp is None else comp.min_frames,
        "compensation_rule": None if comp is None else "surface changes",
        "plain_mopac": {
            "seed": args.seed + 1,
            "steps_timed": plain_steps,
            "wall_s": plain_wall,
            "wall_s_for_all_steps": plain_extrapolated,
            "extrapolated": plain_steps < args.steps,
            "mean_T_second_half_K": float(plain_T[len(plain_T) // 2:].mean()),
        },
        "otfml": {
            "seed": args.seed,
            "wall_s": otf_wall,
            "reference_calls": L.n_calls,
            "reference_fraction": L.n_calls / (args.steps + 1),
            "sparse_environments": L.model.n_sparse,
            "median_model_step_ms": 1e3 * float(np.median(t["model"])),
            "median_mopac_call_ms": 1e3 * float(np.median(t["reference"])),
            "median_update_ms": 1e3 * float(np.median(t["update"])),
            "total_model_s": float(np.sum(t["model"])),
            "total_mopac_s": float(np.sum(t["reference"])),
            "total_update_s": float(np.sum(t["update"])),
            "hyperparameter_fits": len(t["hyperparameters"]),
            "total_hyperparameter_s": float(np.sum(t["hyperparameters"])),
            # the fits' own time on their thread (model.hyperparameter_lag), not in the updates
            "total_fits_apart_s": float(np.sum(t["fits_apart"])),
            "overlap_update": L._overlap,
            "total_prepared_during_calls_s": float(np.sum(t["prepared"])),
            "calls_per_quarter_of_run": np.histogram(
                [h["step"] for h in L.history if h["called"]],
                bins=4, range=(1, args.steps + 2))[0].tolist(),
            "mean_T_second_half_K": float(otf_T[half:].mean()),
            "mean_T_per_quarter_K": [float(t.mean()) for t in np.array_split(otf_T, 4)],
            "max_T_K": float(otf_T.max()),
            "taken_from_kinetic_energy_eV": None if comp is None else comp.total,
        },
        "wall_ratio_otf_over_plain": otf_wall / plain_extrapolated,
        "model_step_over_mopac_call": float(np.median(t["model"]) / np.median(t["reference"])),
        "used_forces_mae_eV_A": float(used_err.mean()),
        "used_forces_frames": len(frames),
        "used_forces_mae_per_quarter_eV_A": used_quarters,
        "final_model_on_independent_trajectory": ev,
        "growth_with_stored_frames": growth(L.history, rss),
        # the run's labelled frames (offline_fit.py --store re-fits models on them)
        "store": os.path.join(work, "otf.h5"),
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{args.molecule} ({n} atoms) at {temperature:.0f} K, force_tolerance "
              f"{policy.force_tolerance} eV/Å\n")
        print(table([result]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
