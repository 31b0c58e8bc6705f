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

import json
import logging
import os
import time

import numpy as np
from ase import Atoms

from .calculator import OTFCalculator
from .drivers import clear_stage, run_md, run_optimize, stage_counts
from .errors import ConfigError
from .policy import LearningPolicy
from .system import build_reference, build_structures

__all__ = ["run", "stage_dirs", "identity"]

log = logging.getLogger(__name__)

STATE = "run.json"


def stage_dirs(cfg: dict, outdir: str) -> list[str]:
    """Output directory of each stage (the run directory itself for a single stage)."""
    stages = cfg["stages"]
    if len(stages) == 1 and stages[0]["single"]:
        return [outdir]
    return [os.path.join(outdir, f"{k + 1:02d}-{st['name']}") for k, st in enumerate(stages)]


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
    from .parallel.workflow import mpi_size, run_parallel, walker_settings

    base = cfg.get("_base", ".")
    outdir = os.path.join(base, cfg["output"]["directory"])
    if mpi_size() > 1:
        return run_parallel(cfg, resume, _run_in)
    walkers = len(walker_settings(cfg))
    if walkers > 1:
        raise ConfigError(f"the walkers section makes {walkers} walkers: run the workflow "
                          f"under `mpirun -n {walkers + 1} otfml run ...` (rank 0 "
                          "coordinates), or remove the walkers lists")
    return _run_in(cfg, outdir, resume)


def _run_in(cfg: dict, outdir: str, resume: bool | None,
            calc: OTFCalculator | None = None) -> dict:
    """:func:`run` in ``outdir``; with ``calc`` (a parallel walker's), on its model and
    reference instead of a calculator of its own."""
    # everything that can be checked is, before the run directory is made or touched
    structures = build_structures(cfg)
    reference = build_reference(cfg) if calc is None else None
    _check_same_run(cfg, outdir, structures)
    os.makedirs(outdir, exist_ok=True)
    handler = logging.FileHandler(os.path.join(outdir, "otfml.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("otfml").addHandler(handler)
    try:
        return _run(cfg, outdir, resume, structures, reference, calc)
    finally:
        logging.getLogger("otfml").removeHandler(handler)
        handler.close()


def identity(cfg: dict, structures: list[Atoms]) -> dict:
    """What a run simulates: its structures, charge and multiplicity, its reference, and
    its store. A run directory holding another run is never resumed or overwritten."""
    return {"structures": [a.get_chemical_formula() for a in structures],
            "system.charge": cfg["system"]["charge"],
            "system.multiplicity": cfg["system"]["multiplicity"],
            **{f"reference.{k}": cfg["reference"][k] for k in ("code", "method", "keywords")},
            "store.path": cfg["store"]["path"]}


def _check_same_run(cfg: dict, outdir: str, structures: list[Atoms]) -> None:
    state = _read_state(outdir)
    if state is None or "identity" not in state:
        return
    new = identity(cfg, structures)
    diff = [f"{k}: {state['identity'].get(k)!r} -> {v!r}" for k, v in new.items()
            if state["identity"].get(k) != v]
    if diff:
        raise ConfigError(
            f"the output directory {outdir!r} holds another run ({'; '.join(diff)}); it is "
            "neither resumed nor overwritten. Give this run a directory of its own, e.g. "
            "--set output.directory=runs/NAME (with store.warm_start pointing at "
            f"{os.path.join(outdir, state['identity'].get('store.path', 'otfml.h5'))!r} to "
            "start from what that run learned), or delete the directory to start over")


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


def _run(cfg: dict, outdir: str, resume: bool | None, structures: list[Atoms],
         reference, calc: OTFCalculator | None = None) -> dict:
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
            clear_stage(d)
        for name in ("evaluation.json", "evaluation.npz", "summary.json"):  # of the old model
            if os.path.exists(os.path.join(outdir, name)):
                os.remove(os.path.join(outdir, name))
    state = {"status": "running", "config": public, "identity": identity(cfg, structures),
             "stages_done": sorted(done_stages)}
    _write_state(outdir, state)

    store = os.path.join(outdir, cfg["store"]["path"])
    if calc is None:
        _warm_start_store(cfg, store)
        first = cfg["stages"][0]["learning"]
        calc = OTFCalculator(reference, store=store, policy=LearningPolicy(**first),
                             model_settings=cfg["model"], charge=cfg["system"]["charge"],
                             multiplicity=cfg["system"]["multiplicity"],
                             species=sorted({int(z) for a in structures for z in a.numbers}))
    else:
        store = None  # the coordinator's
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
        if L.model is not None and L.model.is_fitted and L.store is not None:
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
        "steps": sum(s["steps"] for s in summaries),
        "reference_calls": sum(s["reference_calls"] for s in summaries),
        "reference_failures": L.n_failures,
        "scf_failures_rescued": getattr(L.reference, "n_rescued", 0),
        "warm_start_frames": L.n_warm,
        "wall_s": wall,
        "median_model_step_s": med("model"),
        "median_reference_s": med("reference"),
        "median_update_s": med("update"),
        "sparse_environments": L.model.n_sparse if L.model else 0,
        "hyperparameters": L.model.hyp.as_dict() if L.model else None,
        **L.policy.model_calibration(),
        "fingerprint": L.fingerprint,
        "store": store,
        "model": model_path,
    }
    total["reference_fraction"] = total["reference_calls"] / max(total["steps"], 1)
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
    t0 = time.perf_counter()
    if drv["type"] == "md":
        if len(starts) != 1:
            raise ConfigError(
                f"stage {stage['name']}: MD starts from one structure, but {len(starts)} were "
                "selected (system.index or driver.start/count); select one, or optimize them")
        extra = run_md(starts[0], calc, drv, sdir, stage["name"], cfg["output"], resume)
    else:
        if resume:
            log.info("stage %s: an optimization starts again from its structures (the model "
                     "keeps everything learned so far)", stage["name"])
            clear_stage(sdir)
        extra = run_optimize(starts, calc, drv, sdir, stage["name"], cfg["output"])
    steps, calls = stage_counts(sdir)  # the whole stage, a resumed one's earlier part too
    summary = {
        "stage": stage["name"],
        "driver": drv["type"],
        "steps": steps,
        "reference_calls": calls,
        **({"md_steps": max(steps - 1, 0)} if drv["type"] == "md" else {}),
        "wall_s": time.perf_counter() - t0,
        "learning": stage["learning"],
        **extra,
    }
    with open(os.path.join(sdir, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2, default=float)
    log.info("stage %s done: %d steps, %d reference calls", stage["name"], summary["steps"],
             summary["reference_calls"])
    return summary


