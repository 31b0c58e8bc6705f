"""Execute a validated configuration: build the system, learn, drive, write outputs.

Outputs in ``output.directory``: the store, ``trajectory.traj`` (ASE),
``steps.csv`` (one line per step), ``model.npz``, ``summary.json`` and
``otfml.log``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time

import numpy as np
from ase import Atoms, units

from .calculator import OTFCalculator
from .errors import ConfigError
from .policy import LearningPolicy
from .reference import CalculatorReference, MopacReference, Reference

__all__ = ["run", "build_structure", "build_reference"]

log = logging.getLogger(__name__)


def build_structure(cfg: dict) -> Atoms:
    """The starting structure of ``system`` (file or ase.build.molecule name)."""
    from ase.build import molecule
    from ase.collections import g2
    from ase.io import read

    sysc = cfg["system"]
    spec = sysc["structure"]
    path = spec if os.path.isabs(spec) else os.path.join(cfg.get("_base", "."), spec)
    if os.path.isfile(path):
        try:
            atoms = read(path, index=sysc["index"])
        except Exception as err:
            raise ConfigError(f"system.structure = {spec!r}: ASE could not read {path!r} "
                              f"({type(err).__name__}: {err})") from err
    elif spec in g2.names:
        atoms = molecule(spec)
    else:
        raise ConfigError(
            f"system.structure = {spec!r} is neither an existing file ({path!r}) nor an "
            "ase.build.molecule name (e.g. CH3CH2OH, H2O, C6H6)")
    if len(atoms) < 2:
        raise ConfigError(f"system.structure = {spec!r} has {len(atoms)} atom(s); "
                          "otfml needs at least 2")
    if not np.all(np.isfinite(atoms.positions)):
        raise ConfigError(f"system.structure = {spec!r} has NaN/inf coordinates")
    atoms.info["charge"] = sysc["charge"]
    if sysc["multiplicity"] is not None:
        atoms.info["multiplicity"] = sysc["multiplicity"]
    return atoms


def build_reference(cfg: dict, workdir: str | None = None) -> Reference:
    """The reference named by ``reference.code``."""
    ref = cfg["reference"]
    code = ref["code"]
    if code == "mopac":
        return MopacReference(method=ref["method"], keywords=ref["keywords"],
                              command=ref["command"], workdir=workdir)
    if code == "emt":
        from ase.calculators.emt import EMT

        return CalculatorReference(EMT(), name="EMT")
    if code == "lj":
        from ase.calculators.lj import LennardJones

        return CalculatorReference(LennardJones(sigma=1.0, epsilon=0.01, rc=4.0), name="LJ")
    raise ConfigError(f"reference.code = {code!r} is not known")  # schema prevents this


class _StepLog:
    """Writes steps.csv (every step) and the trajectory (every log_interval steps)."""

    FIELDS = ["md_step", "time_fs", "energy_eV", "temperature_K", "fmax_eV_A", "source",
              "max_force_std_eV_A", "reference_calls"]

    def __init__(self, atoms, calc: OTFCalculator, outdir: str, interval: int, dt_fs: float):
        from ase.io.trajectory import Trajectory

        self.atoms, self.calc, self.dt_fs, self.interval = atoms, calc, dt_fs, interval
        new = not os.path.exists(os.path.join(outdir, "steps.csv"))
        self.fh = open(os.path.join(outdir, "steps.csv"), "a", newline="")
        self.writer = csv.writer(self.fh)
        if new:
            self.writer.writerow(self.FIELDS)
        self.traj = Trajectory(os.path.join(outdir, "trajectory.traj"), "a", atoms)
        self.n = 0
        self.resumed_at = -1

    def __call__(self) -> None:
        a = self.atoms
        L = self.calc.learner
        last = L.history[-1] if L.history else {}
        f = a.get_forces()
        self.writer.writerow([
            self.n, f"{self.n * self.dt_fs:.3f}", f"{a.get_potential_energy():.6f}",
            f"{a.get_temperature():.2f}", f"{np.linalg.norm(f, axis=1).max():.5f}",
            last.get("source", ""), f"{last.get('max_force_std', float('nan')):.5f}", L.n_calls,
        ])
        if self.n % self.interval == 0:
            self.fh.flush()
            if self.n != self.resumed_at:  # that image is the checkpoint itself
                self.traj.write()
        self.n += 1

    def close(self) -> None:
        self.fh.close()
        self.traj.close()


def run(cfg: dict, resume: bool = False) -> dict:
    """Run the workflow of a validated config; returns the summary (also in summary.json).

    With ``resume`` an MD run continues from its last checkpoint (the last image
    of ``trajectory.traj``: positions and momenta, written every
    ``driver.log_interval`` steps) for the steps that remain; the model is
    rebuilt from the store, so no labelled frame is lost.  The thermostat's
    random stream restarts from the seed.
    """
    base = cfg.get("_base", ".")
    outdir = os.path.join(base, cfg["output"]["directory"])
    os.makedirs(outdir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(outdir, "otfml.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("otfml").addHandler(handler)
    try:
        return _run(cfg, outdir, resume)
    finally:
        logging.getLogger("otfml").removeHandler(handler)
        handler.close()


def _checkpoint(outdir: str, interval: int):
    """Last complete trajectory image and the MD step it was written at (or None)."""
    from ase.io.trajectory import Trajectory

    path = os.path.join(outdir, "trajectory.traj")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        with Trajectory(path) as traj:
            n = len(traj)
            if n == 0:
                return None
            atoms = traj[n - 1]
    except Exception as err:  # a file cut mid-header: no usable checkpoint
        log.warning("cannot read checkpoint %s (%s); starting over", path, err)
        return None
    return atoms, (n - 1) * interval


def _run(cfg: dict, outdir: str, resume: bool = False) -> dict:
    atoms = build_structure(cfg)
    drv = cfg["driver"]
    done = 0
    if resume:
        if drv["type"] != "md":
            raise ConfigError("--resume continues MD runs; an optimization restarts from its "
                              "structure (with the model warm-started from the store)")
        cp = _checkpoint(outdir, drv["log_interval"])
        if cp is None:
            log.info("no checkpoint in %s: starting from the structure", outdir)
        else:
            start, done = cp
            atoms.positions = start.positions
            atoms.set_momenta(start.get_momenta())
            log.info("resuming at MD step %d of %d from %s", done, drv["steps"], outdir)
            _truncate_steps_csv(outdir, done)
    elif os.path.exists(os.path.join(outdir, "trajectory.traj")):
        os.remove(os.path.join(outdir, "trajectory.traj"))
        if os.path.exists(os.path.join(outdir, "steps.csv")):
            os.remove(os.path.join(outdir, "steps.csv"))
    reference = build_reference(cfg)
    lc = cfg["learning"]
    policy = LearningPolicy(**lc)
    store = os.path.join(outdir, cfg["store"]["path"])
    calc = OTFCalculator(reference, store=store, policy=policy, model_settings=cfg["model"],
                         charge=cfg["system"]["charge"],
                         multiplicity=cfg["system"]["multiplicity"])
    atoms.calc = calc
    log.info("otfml run: %s, %d atoms, driver %s, store %s", atoms.get_chemical_formula(),
             len(atoms), drv["type"], store)
    t0 = time.perf_counter()
    steplog = _StepLog(atoms, calc, outdir, drv["log_interval"],
                       drv["timestep_fs"] if drv["type"] == "md" else 0.0)
    try:
        if drv["type"] == "md":
            extra = _run_md(atoms, drv, steplog, done)
        else:
            extra = _run_optimize(atoms, calc, drv, steplog, outdir)
    finally:
        steplog.close()
    wall = time.perf_counter() - t0
    L = calc.learner
    model_path = os.path.join(outdir, "model.npz")
    if L.model is not None and L.model.is_fitted:
        L.model.save(model_path, extra={"force_std_scale": L.policy.scale})

    def med(key):
        v = L.timings[key]
        return float(np.median(v)) if v else None

    summary = {
        "structure": atoms.get_chemical_formula(),
        "atoms": len(atoms),
        "driver": drv["type"],
        "steps": L.n_steps,
        "reference_calls": L.n_calls,
        "reference_fraction": L.n_calls / max(L.n_steps, 1),
        "warm_start_frames": L.n_warm,
        "resumed_from_md_step": done,
        "wall_s": wall,
        "median_model_step_s": med("model"),
        "median_reference_s": med("reference"),
        "median_update_s": med("update"),
        "sparse_environments": L.model.n_sparse if L.model else 0,
        "hyperparameters": vars(L.model.hyp) if L.model else None,
        "force_std_scale": L.policy.scale,
        "final_energy_eV": float(atoms.get_potential_energy()),
        "fingerprint": L.fingerprint,
        "store": store,
        "model": model_path,
        **extra,
    }
    with open(os.path.join(outdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    calc.close()
    log.info("done: %d steps, %d reference calls, %.1f s", L.n_steps, L.n_calls, wall)
    return summary


def _truncate_steps_csv(outdir: str, step: int) -> None:
    """Drop step-log lines written after the checkpoint (they will be rerun)."""
    path = os.path.join(outdir, "steps.csv")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.readlines()
    keep = lines[:1 + step]  # header + one line per step 0..step-1
    with open(path, "w") as fh:
        fh.writelines(keep)


def _run_md(atoms: Atoms, drv: dict, steplog: _StepLog, done: int = 0) -> dict:
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution, Stationary, ZeroRotation
    from ase.md.verlet import VelocityVerlet

    rng = np.random.default_rng(drv["seed"] + done)
    if done == 0:
        MaxwellBoltzmannDistribution(atoms, temperature_K=drv["temperature_K"], rng=rng)
        Stationary(atoms)
        ZeroRotation(atoms)
    dt = drv["timestep_fs"] * units.fs
    if drv["ensemble"] == "langevin":
        dyn = Langevin(atoms, dt, temperature_K=drv["temperature_K"],
                       friction=drv["friction_per_fs"] / units.fs, fixcm=False, rng=rng)
    else:
        dyn = VelocityVerlet(atoms, dt)
    dyn.attach(steplog, interval=1)
    steplog.n = done
    steplog.resumed_at = done if done else -1
    dyn.run(max(drv["steps"] - done, 0))
    return {"final_temperature_K": float(atoms.get_temperature())}


def _run_optimize(atoms: Atoms, calc: OTFCalculator, drv: dict, steplog: _StepLog,
                  outdir: str) -> dict:
    """Optimize on the model; confirm convergence with the reference at the end."""
    from ase import optimize

    opt_cls = getattr(optimize, drv["optimizer"])
    opt = opt_cls(atoms, logfile=os.path.join(outdir, "optimizer.log"))
    opt.attach(steplog, interval=1)
    budget = drv["steps"]
    converged = False
    while budget > 0:
        done_before = opt.nsteps
        opt.run(fmax=drv["fmax"], steps=budget)
        budget -= max(opt.nsteps - done_before, 1)
        # the model said converged: confirm with the reference
        calc.learner.request_reference = True
        atoms.calc.reset()  # the same geometry must be recomputed
        fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
        if fmax <= drv["fmax"]:
            converged = True
            break
        log.info("reference fmax %.4f eV/Å > %.4f at the model's minimum; continuing",
                 fmax, drv["fmax"])
    return {"converged": converged, "final_fmax_eV_A": fmax}
