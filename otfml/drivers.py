"""What drives the steps: MD and geometry optimization on an OTFCalculator.

ASE's dynamics and optimizers take every step; these functions attach otfml's
observers (the step log, energy compensation, a temperature guard) and, for an
optimization, confirm the minimum with the reference (:func:`relax`).
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass

import numpy as np
from ase import Atoms, units

from .calculator import OTFCalculator
from .errors import ConfigError, UnstableRun
from .progress import Progress

__all__ = ["relax", "Relaxed", "run_md", "run_optimize", "thermalize", "StepLog", "read_steps",
           "checkpoint", "clear_stage", "stage_counts"]

log = logging.getLogger(__name__)


class StepLog:
    """Writes steps.csv (every step), the trajectory (every ``interval`` steps) and progress."""

    FIELDS = ["step", "image", "time_fs", "energy_eV", "temperature_K", "fmax_eV_A", "source",
              "max_force_std_eV_A", "threshold_eV_A", "reference_calls"]

    def __init__(self, atoms: Atoms, calc: OTFCalculator, sdir: str, interval: int,
                 dt_fs: float, progress: Progress) -> None:
        from ase.io.trajectory import Trajectory

        self.atoms, self.calc, self.dt_fs, self.interval = atoms, calc, dt_fs, interval
        self.progress = progress
        path = os.path.join(sdir, "steps.csv")
        new = not os.path.exists(path)
        #: reference calls of the stage so far (a resumed stage's earlier ones included)
        self.calls = 0 if new else stage_counts(sdir)[1]
        self.fh = open(path, "a", newline="")
        self.writer = csv.writer(self.fh)
        if new:
            self.writer.writerow(self.FIELDS)
        self.traj = Trajectory(os.path.join(sdir, "trajectory.traj"), "a")
        self.n = 0
        self.image = 0
        self.resumed_at = -1

    def __call__(self) -> None:
        a = self.atoms
        L = self.calc.learner
        last = L.history[-1] if L.history else {}
        f = a.get_forces()
        fmax = float(np.linalg.norm(f, axis=1).max())
        temp = a.get_temperature()
        std = last.get("max_force_std", float("nan"))
        source = last.get("source", "")
        self.calls += source == "reference"
        self.writer.writerow([
            self.n, self.image, f"{self.n * self.dt_fs:.3f}", f"{a.get_potential_energy():.6f}",
            f"{temp:.2f}", f"{fmax:.5f}", source, f"{std:.5f}",
            f"{L.policy.tolerance:.5f}", self.calls,
        ])
        if self.n % self.interval == 0:
            self.fh.flush()
            if self.n != self.resumed_at:  # that image is the checkpoint itself
                self.traj.write(a)
        self.n += 1
        shown = {"calls": self.calls, "err_est": std}
        shown.update({"T_K": round(temp)} if self.dt_fs else {"fmax": fmax})
        # MD counts steps from the start geometry (step 0); an optimizer its evaluations
        self.progress.update(self.n - 1 if self.dt_fs else self.n, **shown)

    def close(self) -> None:
        self.fh.close()
        self.traj.close()
        self.progress.close()


def thermalize(atoms: Atoms, temperature_K: float, rng: np.random.Generator | None = None,
               zero_drift: bool = True) -> None:
    """Draw Maxwell-Boltzmann momenta for ``atoms`` at ``temperature_K`` (K), in place.

    ASE's ``thermalize_momenta`` (``MaxwellBoltzmannDistribution`` before ASE 3.29,
    which deprecates it; both draw the same momenta). ``zero_drift``: then remove the
    centre-of-mass momentum and the angular momentum (ASE's ``Stationary`` and
    ``ZeroRotation``), as for a free molecule.
    """
    from ase.md import velocitydistribution as vd

    if hasattr(vd, "thermalize_momenta"):
        vd.thermalize_momenta(atoms, temperature_K, rng=rng)
    else:  # ASE < 3.29
        vd.MaxwellBoltzmannDistribution(atoms, temperature_K=temperature_K, rng=rng)
    if zero_drift:
        vd.Stationary(atoms)
        vd.ZeroRotation(atoms)


def stage_counts(sdir: str) -> tuple[int, int]:
    """Rows of a stage's steps.csv (energy/force evaluations) and those the reference gave."""
    path = os.path.join(sdir, "steps.csv")
    if not os.path.exists(path):
        return 0, 0
    cols = read_steps(path)
    source = cols.get("source", np.zeros(0))
    return len(source), int(np.sum(source == "reference"))


def read_steps(path: str) -> dict[str, np.ndarray]:
    """Columns of a ``steps.csv`` (numeric where they are numbers)."""
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows:
        return {}
    out = {}
    for k, name in enumerate(rows[0]):
        col = [r[k] for r in rows[1:] if len(r) > k]
        try:
            out[name] = np.array(col, dtype=float)
        except ValueError:
            out[name] = np.array(col)
    return out


def checkpoint(sdir: str, interval: int):
    """Last complete trajectory image and the MD step it was written at (or None)."""
    from ase.io.trajectory import Trajectory

    path = os.path.join(sdir, "trajectory.traj")
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return None
    try:
        with Trajectory(path) as traj:
            n = len(traj)
            if n == 0:
                return None
            atoms = traj[n - 1]
    except Exception as err:  # a file cut mid-header: no usable checkpoint
        log.warning("cannot read checkpoint %s (%s); starting the stage over", path, err)
        return None
    return atoms, (n - 1) * interval


_STAGE_FILES = ("trajectory.traj", "steps.csv", "summary.json", "final.extxyz",
                "optimizer.log")


def clear_stage(sdir: str) -> None:
    for name in _STAGE_FILES:
        if os.path.exists(os.path.join(sdir, name)):
            os.remove(os.path.join(sdir, name))


def _truncate_steps_csv(sdir: str, step: int) -> None:
    """Drop step-log lines written after the checkpoint (they will be rerun)."""
    path = os.path.join(sdir, "steps.csv")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        lines = fh.readlines()
    with open(path, "w") as fh:
        fh.writelines(lines[:1 + step])  # header + one line per step 0..step-1


def _write_final(sdir: str, images: list[Atoms]) -> None:
    from ase.io import write

    write(os.path.join(sdir, "final.extxyz"), [a.copy() for a in images])  # without calc


def run_md(atoms: Atoms, calc: OTFCalculator, drv: dict, sdir: str, name: str,
           out: dict, resume: bool) -> dict:
    """MD of one stage (``driver`` section ``drv``) on ``calc``, resumed from the last
    checkpoint in ``sdir`` with ``resume``; writes steps.csv, the trajectory and final.extxyz."""
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    done = 0
    if resume:
        cp = checkpoint(sdir, drv["log_interval"])
        if cp is None:
            log.info("stage %s: no checkpoint in %s; starting the stage from its structure",
                     name, sdir)
            clear_stage(sdir)
        else:
            start, done = cp
            atoms.positions = start.positions
            atoms.set_momenta(start.get_momenta())
            log.info("stage %s: resuming at MD step %d of %d", name, done, drv["steps"])
            _truncate_steps_csv(sdir, done)
    rng = np.random.default_rng(drv["seed"] + done)
    if done == 0 and not atoms.has("momenta"):
        thermalize(atoms, drv["temperature_K"], rng)
    atoms.calc = calc
    dt = drv["timestep_fs"] * units.fs
    t_start, t_end = drv["temperature_K"], drv["temperature_end_K"]
    if drv["ensemble"] == "langevin":
        dyn = Langevin(atoms, dt, temperature_K=t_start,
                       friction=drv["friction_per_fs"] / units.fs, fixcm=False, rng=rng)
    else:
        dyn = VelocityVerlet(atoms, dt)
    log.info("stage %s: %s MD of %s (%d atoms), %d steps of %g fs at %g K%s", name,
             drv["ensemble"], atoms.get_chemical_formula(), len(atoms), drv["steps"],
             drv["timestep_fs"], t_start, f" -> {t_end} K" if t_end is not None else "")
    compensation = None
    if drv["compensate_updates"]:
        from .compensation import EnergyCompensation

        compensation = EnergyCompensation(atoms)
        dyn.attach(compensation, interval=1)  # before the step log: it logs the result
    progress = Progress(drv["steps"], name, out["progress_every"], start=done)
    steplog = StepLog(atoms, calc, sdir, drv["log_interval"], drv["timestep_fs"], progress)
    dyn.attach(steplog, interval=1)
    if t_end is not None:
        def ramp():
            dyn.set_temperature(temperature_K=t_start + (t_end - t_start) * min(
                steplog.n / drv["steps"], 1.0))
        dyn.attach(ramp, interval=1)
    limit = drv["max_temperature_K"] or max(2000.0, 5.0 * max(t_start, t_end or 0.0))

    def guard():
        temp = atoms.get_temperature()
        if temp > limit:
            raise UnstableRun(
                f"stage {name}, MD step {steplog.n - 1}: the temperature is {temp:.0f} K, above "
                f"driver.max_temperature_K = {limit:g} K (thermostat at {t_start:g} K): the "
                "run was stopped. Every labelled frame is in the store. Lower "
                "driver.timestep_fs or learning.force_tolerance and resume (otfml run again)")
    dyn.attach(guard, interval=1)
    steplog.n = done
    steplog.resumed_at = done if done else -1
    try:
        dyn.run(max(drv["steps"] - done, 0))
    finally:
        steplog.close()
    atoms.info["energy"] = float(atoms.get_potential_energy())
    _write_final(sdir, [atoms])
    return {"final_temperature_K": float(atoms.get_temperature()),
            "energy_taken_by_compensation_eV": None if compensation is None
            else compensation.total,
            "final_energy_eV": float(atoms.get_potential_energy()),
            "resumed_from_md_step": done}


@dataclass
class Relaxed:
    """The outcome of :func:`relax`.

    Attributes
    ----------
    converged : bool
        The reference's largest force is at most ``fmax``.
    fmax : float
        The reference's largest atomic force at the final geometry, eV/Å.
    energy : float
        The reference's energy there, eV.
    steps : int
        Optimizer steps taken (on the model, and at the reference's checks).
    checks : int
        Reference calls made to confirm a minimum.
    """

    converged: bool
    fmax: float
    energy: float
    steps: int
    checks: int


def relax(atoms: Atoms, fmax: float = 0.05, steps: int = 1000, optimizer: str = "surrogate",
          logfile: str | None = "-", observers: tuple = ()) -> Relaxed:
    """Optimize ``atoms`` with the model of its :class:`~otfml.OTFCalculator` and the fewest
    reference calls, to a minimum the reference confirms.

    ``optimizer="surrogate"`` (the default): :class:`otfml.surrogate_opt.SurrogateOpt`, one
    reference call per step, steps chosen on the model; converged when the reference's
    largest force at a step is below ``fmax``.

    An ASE optimizer's name instead: it runs on the model until the forces it sees are
    below ``fmax``; the reference then labels that geometry (:meth:`OTFCalculator.confirm`).
    Where its forces are still above ``fmax`` the model cannot resolve the minimum (its
    error is larger than ``fmax`` there): the optimizer goes on from there with every step
    labelled by the reference (and learned), until the reference's forces are below
    ``fmax`` or ``steps`` are used up.

    Parameters
    ----------
    atoms : ase.Atoms
        With an :class:`~otfml.OTFCalculator` attached; changed in place.
    fmax : float
        Convergence: the largest atomic force, eV/Å.
    steps : int
        Optimizer steps at most.
    optimizer : str
        ``"surrogate"``, or an optimizer of ``ase.optimize`` (BFGS, LBFGS, FIRE, ...).
    logfile : str or None
        The optimizer's log ("-": standard output).
    observers : tuple of callables
        Attached to the optimizer at every step.
    """
    from ase import optimize

    calc = atoms.calc
    if not isinstance(calc, OTFCalculator):
        raise ConfigError(f"relax needs an otfml OTFCalculator on the atoms, not "
                          f"{type(calc).__name__}; attach one with atoms.calc = OTFCalculator(...)")
    if optimizer == "surrogate":
        from .surrogate_opt import SurrogateOpt

        opt = SurrogateOpt(atoms, logfile=logfile)
        for obs in observers:
            opt.attach(obs, interval=1)
        opt.run(fmax=fmax, steps=steps)
        energy = float(calc.results["energy"])  # the reference's, at the last step
        largest = float(np.linalg.norm(calc.results["forces"], axis=1).max())
        return Relaxed(largest <= fmax, largest, energy, opt.nsteps, 1)
    try:
        opt_cls = getattr(optimize, optimizer)
    except AttributeError:
        raise ConfigError(f"optimizer = {optimizer!r} is not an optimizer of ase.optimize; "
                          "use BFGS, LBFGS or FIRE") from None
    opt = opt_cls(atoms, logfile=logfile)
    for obs in observers:
        opt.attach(obs, interval=1)
    learner = calc.learner
    energy, forces = float("nan"), None
    try:
        opt.run(fmax=fmax, steps=steps)  # on the model, the reference where it is unsure
        if calc.results.get("source") == "reference":
            energy, forces = float(calc.results["energy"]), calc.results["forces"]
        else:  # the model says converged: ask the reference
            energy, forces = calc.confirm(atoms)
            for obs in observers:  # the confirmation is a step of the log too
                obs()
        checks = 1
        largest = float(np.linalg.norm(forces, axis=1).max())
        if largest > fmax and opt.nsteps < steps:
            log.info("reference fmax %.4f eV/Å > %.4f at the model's minimum; going on with "
                     "the reference at every step", largest, fmax)
            learner.reference_only = True  # (the calculator holds the reference's results)
            opt.run(fmax=fmax, steps=steps - opt.nsteps)
            energy = float(atoms.get_potential_energy())
            largest = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
    finally:
        learner.reference_only = False
    return Relaxed(largest <= fmax, largest, energy, opt.nsteps, checks)


def run_optimize(starts: list[Atoms], calc: OTFCalculator, drv: dict, sdir: str, name: str,
                 out: dict) -> dict:
    """Relax each structure (:func:`relax`); writes steps.csv, the trajectory and
    final.extxyz of the stage in ``sdir``."""
    progress = Progress(drv["steps"] * len(starts), name, out["progress_every"])
    steplog = StepLog(starts[0], calc, sdir, drv["log_interval"], 0.0, progress)
    results, finals = [], []
    try:
        for k, atoms in enumerate(starts):
            atoms.calc = calc
            steplog.atoms, steplog.image = atoms, k
            r = relax(atoms, drv["fmax"], drv["steps"], drv["optimizer"],
                      logfile=os.path.join(sdir, "optimizer.log"), observers=(steplog,))
            results.append({"image": k, "converged": r.converged, "fmax_eV_A": r.fmax,
                            "energy_eV": r.energy, "optimizer_steps": r.steps})
            log.info("image %d: %s, fmax %.4f eV/Å, E %.4f eV (reference)", k,
                     "converged" if r.converged else "NOT converged", r.fmax, r.energy)
            final = atoms.copy()
            final.info.update({"converged": r.converged, "fmax": r.fmax, "energy": r.energy})
            finals.append(final)
    finally:
        steplog.close()
    _write_final(sdir, finals)
    extra = {"converged": all(r["converged"] for r in results),
             "final_fmax_eV_A": max(r["fmax_eV_A"] for r in results),
             "final_energy_eV": results[-1]["energy_eV"]}
    if len(results) > 1:
        extra["images"] = results
    return extra
