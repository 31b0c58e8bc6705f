"""``mpirun -n K+1 otfml run workflow.yaml``: a workflow's walkers over MPI."""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os

from ..errors import ConfigError

log = logging.getLogger(__name__)


def mpi_size() -> int:
    """Ranks of the MPI job this process belongs to (1 outside mpirun), without importing
    mpi4py where no MPI launcher started the process."""
    launched = any(k in os.environ for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK",
                                            "MPI_LOCALNRANKS"))
    if not launched:
        return 1
    try:
        from mpi4py import MPI
    except ImportError as err:
        raise ConfigError("otfml was started under an MPI launcher, but mpi4py is not "
                          "installed: pip install 'otfml[mpi]'") from err
    return MPI.COMM_WORLD.Get_size()


def walker_settings(cfg: dict) -> list[dict]:
    """Each walker's overrides (structure, temperature_K, seed): the product of the lists of
    the ``walkers`` section, in order (one walker, no overrides, where none is given)."""
    sec = cfg["walkers"]
    lists = {}
    for key in ("structure", "temperature_K", "seed"):
        vals = sec[key]
        if vals is None:
            continue
        if not vals:
            raise ConfigError(f"walkers.{key} is an empty list; give at least one value or "
                              "null")
        for v in vals:
            ok = (isinstance(v, str) if key == "structure" else
                  isinstance(v, int) and not isinstance(v, bool) if key == "seed" else
                  isinstance(v, int | float) and not isinstance(v, bool) and v > 0)
            if not ok:
                want = {"structure": "a file or molecule name", "seed": "an integer",
                        "temperature_K": "a positive number"}[key]
                raise ConfigError(f"walkers.{key} holds {v!r}; each entry must be {want}")
        lists[key] = vals
    return [dict(zip(lists, combo)) for combo in itertools.product(*lists.values())]


def walker_config(cfg: dict, over: dict) -> dict:
    """The workflow as one walker runs it."""
    out = copy.deepcopy(cfg)
    if "structure" in over:
        out["system"]["structure"] = over["structure"]
    for stage in out["stages"]:
        for key in ("temperature_K", "seed"):
            if key in over:
                stage["driver"][key] = over[key]
    return out


def run_parallel(cfg: dict, resume: bool | None, run_one) -> dict:
    """Run a workflow's walkers: rank 0 coordinates, rank w + 1 runs walker w in
    ``output.directory/walkers/wNN`` with ``run_one(cfg, outdir, resume, calc)``.

    Returns the run's summary on rank 0 (also its summary.json), the walker's on the others.
    """
    from mpi4py import MPI

    from ..policy import LearningPolicy
    from ..system import build_reference, build_structures
    from .session import ParallelSession

    comm = MPI.COMM_WORLD
    walkers = walker_settings(cfg)
    if len(walkers) != comm.Get_size() - 1:
        raise ConfigError(
            f"the walkers section makes {len(walkers)} walker(s), but mpirun started "
            f"{comm.Get_size() - 1} walker rank(s): run `mpirun -n {len(walkers) + 1} otfml run "
            "...` (rank 0 coordinates), or change the walkers lists")
    base = cfg.get("_base", ".")
    outdir = os.path.join(base, cfg["output"]["directory"])
    cfgs = [walker_config(cfg, over) for over in walkers]
    species = sorted({int(z) for c in cfgs for a in build_structures(c) for z in a.numbers})
    store = os.path.join(outdir, cfg["store"]["path"])
    if comm.Get_rank() == 0:
        os.makedirs(outdir, exist_ok=True)
        from ..run import _warm_start_store

        _warm_start_store(cfg, store)
    comm.Barrier()
    first = cfg["stages"][0]["learning"]
    session = ParallelSession(lambda w: build_reference(cfgs[w]), store, species,
                              policy=LearningPolicy(**first), model_settings=cfg["model"],
                              charge=cfg["system"]["charge"],
                              multiplicity=cfg["system"]["multiplicity"], directory=outdir)
    result: dict = {}
    with session:
        if session.walker is not None:
            w = session.walker
            wdir = os.path.join(outdir, "walkers", f"w{w:02d}")
            cfg_w = {**cfgs[w], "_base": base}
            cfg_w["output"] = {**cfg_w["output"], "directory": os.path.relpath(wdir, base)}
            result = run_one(cfg_w, wdir, resume, session.calculator())
            session.extra = {"directory": wdir, **walkers[w]}
    if session.walker is not None:
        return {**result, "walker_rank": comm.Get_rank()}
    L = session.coordinator.learner
    model_path = os.path.join(outdir, "model.npz")
    if L.model is not None and L.model.is_fitted:
        L.finish_hyperparameter_fit()
        L.model.save(model_path, extra={**L.policy.model_calibration(),
                                        "store": os.path.abspath(store)})
    per = {str(w): {k: v for k, v in s.items() if k not in ("checksums", "latency_s")}
           for w, s in sorted(session.summaries.items())}
    total = {"walkers": per, "steps": sum(s["steps"] for s in per.values()),
             "reference_calls": sum(s["reference_calls"] for s in per.values()),
             "model_versions": session.coordinator.version, "store": store,
             "model": model_path, "labels": os.path.join(outdir, "labels.csv"),
             "stopped_walkers": [w for w, s in per.items() if "error" in s]}
    total["reference_fraction"] = total["reference_calls"] / max(total["steps"], 1)
    with open(os.path.join(outdir, "summary.json"), "w") as fh:
        json.dump(total, fh, indent=2, default=float)
    return total
