"""Execute a validated configuration: build the system, learn, drive, write outputs.

A run is one or more *stages* (``stages:`` in the config; without it the
top-level driver is the only stage).  All stages share one reference, one
store and one model, which keeps learning from stage to stage.

Outputs in ``output.directory``: the store, ``model.npz``, ``summary.json``,
``otfml.log`` and ``run.json`` (the resolved config and which stages are done).
Each stage writes ``trajectory.traj`` (ASE; the restart checkpoint),
``steps.csv`` (one line per step), ``final.extxyz`` (its final geometries) and
``summary.json``: into the run directory for a single stage, into
``NN-name/`` for a multi-stage workflow.
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
from .config import index_of
from .errors import ConfigError, UnstableRun
from .policy import LearningPolicy
from .progress import Progress
from .reference import CalculatorReference, MopacReference, Reference
from .structure import MIN_DISTANCE, charge_and_multiplicity, check_elements, closest_pair

__all__ = ["run", "build_structures", "build_reference", "read_steps", "stage_dirs", "thermalize"]

log = logging.getLogger(__name__)

STATE = "run.json"


def _from_smiles(smiles: str, seed: int = 0) -> Atoms:
    """3D structure (hydrogens added, MMFF-relaxed) of a SMILES string via RDKit."""
    try:
        from rdkit import Chem
        from rdkit.Chem import AllChem
    except ImportError as err:
        raise ConfigError("system.structure = 'smiles:...' needs RDKit: "
                          "pip install 'otfml[smiles]' (or pip install rdkit)") from err
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        raise ConfigError(f"system.structure = 'smiles:{smiles}': RDKit cannot parse this "
                          "SMILES; check brackets, ring closures and charges")
    mol = Chem.AddHs(mol)
    if AllChem.EmbedMolecule(mol, randomSeed=int(seed)) != 0:
        raise ConfigError(f"system.structure = 'smiles:{smiles}': RDKit could not embed a 3D "
                          "structure; give a structure file instead")
    AllChem.MMFFOptimizeMolecule(mol)
    atoms = Atoms(numbers=[a.GetAtomicNum() for a in mol.GetAtoms()],
                  positions=mol.GetConformer().GetPositions())
    atoms.info["smiles_charge"] = int(Chem.GetFormalCharge(mol))
    return atoms


def build_structures(cfg: dict) -> list[Atoms]:
    """The structures of ``system``: a file (one image or a slice of them), a SMILES
    string (``smiles:...``) or an ``ase.build.molecule`` name.

    Raises
    ------
    ConfigError
        Naming the key, the value and what would be accepted.
    """
    from ase.build import molecule
    from ase.collections import g2
    from ase.io import read

    sysc = cfg["system"]
    spec = sysc["structure"]
    index = index_of(sysc["index"])
    path = spec if os.path.isabs(spec) else os.path.join(cfg.get("_base", "."), spec)
    if spec.lower().startswith("smiles:"):
        images = [_from_smiles(spec.split(":", 1)[1].strip(), cfg["driver"]["seed"])]
        if images[0].info["smiles_charge"] != sysc["charge"]:
            raise ConfigError(
                f"system.structure = {spec!r} has a formal charge of "
                f"{images[0].info['smiles_charge']} but system.charge = {sysc['charge']}; "
                "set system.charge to match")
    elif os.path.isfile(path):
        try:
            images = read(path, index=index)
        except Exception as err:
            raise ConfigError(f"system.structure = {spec!r}: ASE could not read image(s) "
                              f"{sysc['index']!r} of {path!r} ({type(err).__name__}: {err})"
                              ) from err
        images = images if isinstance(images, list) else [images]
        if not images:
            raise ConfigError(f"system.index = {sysc['index']!r} selects no image of {path!r}")
    elif spec in g2.names:
        images = [molecule(spec)]
    else:
        raise ConfigError(
            f"system.structure = {spec!r} is neither an existing file ({path!r}), a "
            "'smiles:...' string nor an ase.build.molecule name (e.g. CH3CH2OH, H2O, C6H6)")
    for k, atoms in enumerate(images):
        what = f"system.structure = {spec!r}" + (f" (image {k})" if len(images) > 1 else "")
        if len(atoms) < 2:
            raise ConfigError(f"{what} has {len(atoms)} atom(s); otfml needs at least 2")
        if not np.all(np.isfinite(atoms.positions)):
            raise ConfigError(f"{what} has NaN/inf coordinates")
        check_elements(atoms, what)
        if len(atoms) > sysc["max_atoms"]:
            raise ConfigError(f"{what} has {len(atoms)} atoms, more than system.max_atoms = "
                              f"{sysc['max_atoms']}; check the file, or raise system.max_atoms")
        i, j, dist = closest_pair(atoms)
        if dist < MIN_DISTANCE:
            raise ConfigError(f"{what}: atoms {i} ({atoms[i].symbol}) and {j} "
                              f"({atoms[j].symbol}) are {dist:.3f} Å apart (< {MIN_DISTANCE} "
                              "Å); fix the overlapping atoms in the structure")
        if cfg["reference"]["code"] == "mopac" and atoms.pbc.any():
            raise ConfigError(f"{what} is periodic (pbc={atoms.pbc.tolist()}), but the MOPAC "
                              "reference is molecular in otfml; use a non-periodic structure "
                              "(atoms.pbc = False) of the molecule")
        atoms.info["charge"] = sysc["charge"]
        if sysc["multiplicity"] is not None:
            atoms.info["multiplicity"] = sysc["multiplicity"]
        try:  # odd electrons without a multiplicity, impossible charge/multiplicity
            charge_and_multiplicity(atoms)
        except ConfigError as err:
            raise ConfigError(f"{what}: {err} (system.charge = {sysc['charge']}, "
                              f"system.multiplicity = {sysc['multiplicity']})") from None
    return images


def build_reference(cfg: dict, workdir: str | None = None) -> Reference:
    """The reference named by ``reference.code``."""
    ref = cfg["reference"]
    code = ref["code"]
    if code == "mopac":
        return MopacReference(method=ref["method"], keywords=ref["keywords"],
                              command=ref["command"], workdir=workdir,
                              timeout=ref["timeout_s"], scf_retries=ref["scf_retries"])
    if code == "emt":
        from ase.calculators.emt import EMT

        return CalculatorReference(EMT(), name="EMT")
    if code == "lj":
        from ase.calculators.lj import LennardJones

        return CalculatorReference(LennardJones(sigma=1.0, epsilon=0.01, rc=4.0), name="LJ")
    raise ConfigError(f"reference.code = {code!r} is not known")  # schema prevents this


class _StepLog:
    """Writes steps.csv (every step), the trajectory (every ``interval`` steps) and progress."""

    FIELDS = ["step", "image", "time_fs", "energy_eV", "temperature_K", "fmax_eV_A", "source",
              "max_force_std_eV_A", "threshold_eV_A", "reference_calls"]

    def __init__(self, atoms: Atoms, calc: OTFCalculator, sdir: str, interval: int,
                 dt_fs: float, progress: Progress) -> None:
        from ase.io.trajectory import Trajectory

        self.atoms, self.calc, self.dt_fs, self.interval = atoms, calc, dt_fs, interval
        self.progress = progress
        new = not os.path.exists(os.path.join(sdir, "steps.csv"))
        self.fh = open(os.path.join(sdir, "steps.csv"), "a", newline="")
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
        self.writer.writerow([
            self.n, self.image, f"{self.n * self.dt_fs:.3f}", f"{a.get_potential_energy():.6f}",
            f"{temp:.2f}", f"{fmax:.5f}", last.get("source", ""), f"{std:.5f}",
            f"{L.policy.tolerance:.5f}", L.n_calls,
        ])
        if self.n % self.interval == 0:
            self.fh.flush()
            if self.n != self.resumed_at:  # that image is the checkpoint itself
                self.traj.write(a)
        self.n += 1
        shown = {"calls": L.n_calls, "max_std": std}
        shown.update({"T_K": round(temp)} if self.dt_fs else {"fmax": fmax})
        self.progress.update(self.n, **shown)

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


def stage_dirs(cfg: dict, outdir: str) -> list[str]:
    """Output directory of each stage (the run directory itself for a single stage)."""
    stages = cfg["stages"]
    if len(stages) == 1 and stages[0]["single"]:
        return [outdir]
    return [os.path.join(outdir, f"{k + 1:02d}-{st['name']}") for k, st in enumerate(stages)]


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


def run(cfg: dict, resume: bool | None = None) -> dict:
    """Run the workflow of a validated config; returns the summary (also in summary.json).

    Parameters
    ----------
    cfg : dict
        From :func:`otfml.config.load_config`.
    resume : bool, optional
        Continue an interrupted run in the same output directory: finished stages
        are skipped, an MD stage continues from its last checkpoint (the last
        image of its ``trajectory.traj``: positions and momenta, written every
        ``driver.log_interval`` steps), an optimization stage starts again; the
        model is rebuilt from the store, so no labelled frame is lost.  Default:
        resume when ``run.json`` says the run did not finish.  ``False`` starts
        over (the store is kept and warm-starts the model).  Changed settings take
        effect and are logged.
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        elif isinstance(v, list):
            for i, item in enumerate(v):
                out.update(_flatten(item, f"{prefix}{k}[{i}].") if isinstance(item, dict)
                           else {f"{prefix}{k}[{i}]": item})
        else:
            out[prefix + k] = v
    return out


def _changes(old: dict, new: dict) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]


def _read_state(outdir: str) -> dict | None:
    path = os.path.join(outdir, STATE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as err:
        log.warning("cannot read %s (%s): treating the run as new", path, err)
        return None


def _write_state(outdir: str, state: dict) -> None:
    tmp = os.path.join(outdir, STATE + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(state, fh, indent=2, default=str)
    os.replace(tmp, os.path.join(outdir, STATE))


def _checkpoint(sdir: str, interval: int):
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


def _clear(sdir: str) -> None:
    for name in _STAGE_FILES:
        if os.path.exists(os.path.join(sdir, name)):
            os.remove(os.path.join(sdir, name))


def _warm_start_store(cfg: dict, store_path: str) -> None:
    """Copy the frames of ``store.warm_start`` (a store, or the store a model names) into
    the run's store when it is empty."""
    from .store import Store

    src = cfg["store"]["warm_start"]
    if src is None:
        return
    base = cfg.get("_base", ".")
    src = src if os.path.isabs(src) else os.path.join(base, src)
    if not os.path.exists(src):
        raise ConfigError(f"store.warm_start = {cfg['store']['warm_start']!r}: {src!r} does "
                          "not exist; give a store (.h5) or a saved model (.npz)")
    if src.endswith(".npz"):
        from .gp import SparseGP

        named = SparseGP.load(src).extra.get("store")
        if not named or not os.path.exists(named):
            raise ConfigError(f"store.warm_start = {src!r}: the model does not name an existing "
                              f"store ({named!r}); give the store (.h5) it was trained on")
        src = named
    if os.path.abspath(src) == os.path.abspath(store_path):
        return
    with Store(store_path, "a") as dst:
        if len(dst):
            log.info("store.warm_start %s ignored: %s already holds %d frames", src,
                     store_path, len(dst))
            return
        with Store(src) as st:
            for fr in st:
                dst.append(fr.atoms, fr.energy, fr.forces, fr.fingerprint, step=fr.step,
                           walker=fr.walker, max_std=fr.max_std)
            log.info("warm start: copied %d frames of %s into %s", len(st), src, store_path)


def _lowest_frames(store, count: int) -> list[Atoms]:
    """The ``count`` lowest-energy labelled frames of the store (current fingerprint)."""
    frames = list(store)
    if not frames:
        raise ConfigError("driver.start = 'lowest' but the store holds no labelled frames yet; "
                          "put a learning stage (MD) before this one")
    order = np.argsort([fr.energy for fr in frames])[:count]
    out = []
    for k in order:
        a = frames[k].atoms
        a.info["store_frame"] = int(k)
        out.append(a)
    return out


def _run(cfg: dict, outdir: str, resume: bool | None) -> dict:
    state = _read_state(outdir)
    unfinished = state is not None and state.get("status") == "running"
    public = {k: v for k, v in cfg.items() if not k.startswith("_")}
    if resume is None:
        resume = unfinished
        if resume:
            log.info("%s holds an interrupted run: resuming it (otfml run --restart starts "
                     "over)", outdir)
    if resume and state is not None:
        changed = _changes(state.get("config", {}), json.loads(json.dumps(public)))
        for line in changed:
            log.info("changed for the resumed run: %s", line)
        if not changed:
            log.info("resuming with unchanged settings")
    done_stages = set(state.get("stages_done", [])) if (resume and state) else set()
    dirs = stage_dirs(cfg, outdir)
    if not resume:
        for d in dirs:
            _clear(d)
    state = {"status": "running", "config": public, "stages_done": sorted(done_stages)}
    _write_state(outdir, state)

    structures = build_structures(cfg)
    reference = build_reference(cfg)
    store = os.path.join(outdir, cfg["store"]["path"])
    _warm_start_store(cfg, store)
    first = cfg["stages"][0]["learning"]
    calc = OTFCalculator(reference, store=store, policy=LearningPolicy(**first),
                         model_settings=cfg["model"], charge=cfg["system"]["charge"],
                         multiplicity=cfg["system"]["multiplicity"])
    L = calc.learner
    t0 = time.perf_counter()
    summaries, previous = [], None
    try:
        for k, (stage, sdir) in enumerate(zip(cfg["stages"], dirs)):
            os.makedirs(sdir, exist_ok=True)
            if stage["name"] in done_stages:
                log.info("stage %s finished before: skipped", stage["name"])
                with open(os.path.join(sdir, "summary.json")) as fh:
                    summaries.append(json.load(fh))
                previous = _read_final(sdir)
                continue
            L.policy = LearningPolicy(**stage["learning"]).inherit(L.policy)
            starts = _starts(stage, structures, previous, L)
            summary = _run_stage(cfg, stage, sdir, starts, calc, resume and k == len(
                done_stages))
            summaries.append(summary)
            previous = _read_final(sdir)
            done_stages.add(stage["name"])
            state["stages_done"] = sorted(done_stages)
            _write_state(outdir, state)
    finally:
        L.finish_hyperparameter_fit()  # the model the run leaves has the last fit
        wall = time.perf_counter() - t0
        model_path = os.path.join(outdir, "model.npz")
        if L.model is not None and L.model.is_fitted:
            L.model.save(model_path, extra={**L.policy.model_calibration(),
                                            "store": os.path.abspath(store)})
        calc.close()

    def med(key):
        v = L.timings[key]
        return float(np.median(v)) if v else None

    last = summaries[-1]
    total = {
        "structure": structures[0].get_chemical_formula(),
        "atoms": len(structures[0]),
        "driver": last["driver"],
        "steps": L.n_steps,
        "reference_calls": L.n_calls,
        "reference_fraction": L.n_calls / max(L.n_steps, 1),
        "reference_failures": L.n_failures,
        "scf_failures_rescued": getattr(L.reference, "n_rescued", 0),
        "warm_start_frames": L.n_warm,
        "wall_s": wall,
        "median_model_step_s": med("model"),
        "median_reference_s": med("reference"),
        "median_update_s": med("update"),
        "sparse_environments": L.model.n_sparse if L.model else 0,
        "hyperparameters": vars(L.model.hyp) if L.model else None,
        **L.policy.model_calibration(),
        "fingerprint": L.fingerprint,
        "store": store,
        "model": model_path,
    }
    if len(summaries) == 1 and cfg["stages"][0]["single"]:
        total = {**last, **total}
    else:
        total["stages"] = summaries
    with open(os.path.join(outdir, "summary.json"), "w") as fh:
        json.dump(total, fh, indent=2, default=float)
    state["status"] = "done"
    _write_state(outdir, state)
    log.info("done: %d steps, %d reference calls, %.1f s", L.n_steps, L.n_calls, wall)
    return total


def _read_final(sdir: str) -> list[Atoms] | None:
    from ase.io import read

    path = os.path.join(sdir, "final.extxyz")
    return read(path, ":") if os.path.exists(path) else None


def _starts(stage: dict, structures: list[Atoms], previous, learner) -> list[Atoms]:
    how = stage["driver"]["start"]
    if how == "structure":
        return [a.copy() for a in structures]
    if how == "previous":
        if not previous:
            raise ConfigError(f"stage {stage['name']}: driver.start = 'previous' but the "
                              "previous stage left no final geometry")
        out = []
        for a in previous:
            b = Atoms(numbers=a.numbers, positions=a.positions, cell=a.cell, pbc=a.pbc)
            b.info.update({k: a.info[k] for k in ("charge", "multiplicity") if k in a.info})
            if a.has("momenta"):
                b.set_momenta(a.get_momenta())
            out.append(b)
        return out
    starts = _lowest_frames(learner.store, stage["driver"]["count"])
    log.info("stage %s starts from the %d lowest-energy stored frames %s", stage["name"],
             len(starts), [a.info["store_frame"] for a in starts])
    return starts


def _run_stage(cfg: dict, stage: dict, sdir: str, starts: list[Atoms], calc: OTFCalculator,
               resume: bool) -> dict:
    drv = stage["driver"]
    L = calc.learner
    steps0, calls0, t0 = L.n_steps, L.n_calls, time.perf_counter()
    if drv["type"] == "md":
        if len(starts) != 1:
            raise ConfigError(
                f"stage {stage['name']}: MD starts from one structure, but {len(starts)} were "
                "selected (system.index or driver.start/count); select one, or optimize them")
        extra = _run_md(starts[0], calc, drv, sdir, stage["name"], cfg["output"], resume)
    else:
        if resume:
            log.info("stage %s: an optimization starts again from its structures (the model "
                     "keeps everything learned so far)", stage["name"])
            _clear(sdir)
        extra = _run_optimize(starts, calc, drv, sdir, stage["name"], cfg["output"])
    summary = {
        "stage": stage["name"],
        "driver": drv["type"],
        "steps": L.n_steps - steps0,
        "reference_calls": L.n_calls - calls0,
        "wall_s": time.perf_counter() - t0,
        "learning": stage["learning"],
        **extra,
    }
    with open(os.path.join(sdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    log.info("stage %s done: %d steps, %d reference calls", stage["name"], summary["steps"],
             summary["reference_calls"])
    return summary


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


def _run_md(atoms: Atoms, calc: OTFCalculator, drv: dict, sdir: str, name: str,
            out: dict, resume: bool) -> dict:
    from ase.md.langevin import Langevin
    from ase.md.verlet import VelocityVerlet

    done = 0
    if resume:
        cp = _checkpoint(sdir, drv["log_interval"])
        if cp is None:
            log.info("stage %s: no checkpoint in %s; starting the stage from its structure",
                     name, sdir)
            _clear(sdir)
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
    progress = Progress(drv["steps"] + 1, name, out["progress_every"], start=done)
    steplog = _StepLog(atoms, calc, sdir, drv["log_interval"], drv["timestep_fs"], progress)
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


def _run_optimize(starts: list[Atoms], calc: OTFCalculator, drv: dict, sdir: str, name: str,
                  out: dict) -> dict:
    """Optimize each structure on the model; confirm convergence with the reference."""
    from ase import optimize

    opt_cls = getattr(optimize, drv["optimizer"])
    progress = Progress(drv["steps"] * len(starts), name, out["progress_every"])
    steplog = _StepLog(starts[0], calc, sdir, drv["log_interval"], 0.0, progress)
    results, finals = [], []
    try:
        for k, atoms in enumerate(starts):
            atoms.calc = calc
            steplog.atoms, steplog.image = atoms, k
            opt = opt_cls(atoms, logfile=os.path.join(sdir, "optimizer.log"))
            opt.attach(steplog, interval=1)
            budget, converged, fmax = drv["steps"], False, float("nan")
            while budget > 0:
                before = opt.nsteps
                opt.run(fmax=drv["fmax"], steps=budget)
                budget -= max(opt.nsteps - before, 1)
                # the model says converged: confirm with the reference
                calc.learner.request_reference = True
                calc.reset()  # the same geometry must be recomputed
                fmax = float(np.linalg.norm(atoms.get_forces(), axis=1).max())
                if fmax <= drv["fmax"]:
                    converged = True
                    break
                log.info("image %d: reference fmax %.4f eV/Å > %.4f at the model's minimum; "
                         "continuing", k, fmax, drv["fmax"])
            energy = float(atoms.get_potential_energy())
            results.append({"image": k, "converged": converged, "fmax_eV_A": fmax,
                            "energy_eV": energy, "optimizer_steps": opt.nsteps})
            log.info("image %d: %s, fmax %.4f eV/Å, E %.4f eV (reference)", k,
                     "converged" if converged else "NOT converged", fmax, energy)
            final = atoms.copy()
            final.info.update({"converged": converged, "fmax": fmax, "energy": energy})
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
