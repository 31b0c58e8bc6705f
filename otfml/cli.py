"""The ``otfml`` command: run, check, info, evaluate, plot, report, export, train.

``main()`` only parses arguments and calls the functions tests import.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ase.data import chemical_symbols

from .errors import OTFMLError

__all__ = ["main"]


def _cmd_run(args) -> int:
    from .config import load_config
    from .run import run

    cfg = load_config(args.config, args.set)
    if args.resume and args.restart:
        raise OTFMLError("--resume and --restart exclude each other")
    summary = run(cfg, resume=True if args.resume else (False if args.restart else None))
    if "walkers" in summary:  # rank 0 of a parallel run
        print(parallel_summary(summary))
    elif "walker_rank" not in summary:  # a parallel walker's rank prints nothing
        print(human_summary(summary))
    return 0


def parallel_summary(s: dict) -> str:
    """A few lines at the end of a parallel run (rank 0's summary.json has everything)."""
    lines = [f"{len(s['walkers'])} walkers: {s['steps']} energy/force evaluations, "
             f"{s['reference_calls']} reference calls ({100 * s['reference_fraction']:.1f} %), "
             f"{s['model_versions']} model versions"]
    for w, ws in s["walkers"].items():
        lines.append(f"  walker {w}: {ws['steps']} steps, {ws['reference_calls']} calls"
                     + (f", stopped: {ws['error']}" if "error" in ws else "")
                     + f" ({ws.get('directory', '')})")
    lines.append(f"store {s['store']}, model {s['model']}, labels {s['labels']}")
    return "\n".join(lines)


def human_summary(s: dict) -> str:
    """A few lines a person reads at the end of a run (summary.json has everything)."""
    calls, steps = s["reference_calls"], max(s["steps"], 1)
    stages = s.get("stages", [s])
    md = sum(st.get("md_steps", 0) for st in stages)
    what = f"{md} MD steps, " if md else ""
    lines = [f"{s['structure']}: {what}{s['steps']} energy/force evaluations, {calls} reference "
             f"calls ({100 * calls / steps:.1f} %), {s['wall_s']:.1f} s"]
    floors = s.get("force_error_floor_eV_A")
    if floors:
        lines.append("force-error floor (eV/Å): " + ", ".join(
            f"{el} {v:.3f}" for el, v in floors.items()))
    if "converged" in s:
        lines.append(f"converged: {s['converged']} (largest force {s['final_fmax_eV_A']:.4f} "
                     "eV/Å from the reference)")
    out = os.path.dirname(s["store"])
    lines.append(f"outputs in {out}: otfml.h5 (store), model.npz, steps.csv, summary.json, "
                 "otfml.log; otfml report " + out + " writes report.html")
    return "\n".join(lines)


def _cmd_check(args) -> int:
    from .config import keys_markdown, load_config
    from .system import build_reference, build_structures

    if args.keys:
        print(keys_markdown())
        return 0
    if not args.config:
        raise OTFMLError("otfml check needs a config file (or --keys)")
    from .parallel.workflow import walker_config, walker_settings

    cfg = load_config(args.config, args.set)
    images = build_structures(cfg)
    build_reference(cfg)  # what run refuses, check refuses (method, keywords, command)
    walkers = walker_settings(cfg)
    for over in walkers:  # each walker's own structure too
        if "structure" in over:
            build_structures(walker_config(cfg, over))
    atoms = images[0]
    stages = ", ".join(f"{s['name']} ({s['driver']['type']})" for s in cfg["stages"])
    print(f"{args.config}: valid ({atoms.get_chemical_formula()}, {len(atoms)} atoms"
          + (f", {len(images)} structures" if len(images) > 1 else "")
          + f"; stages: {stages}; reference {cfg['reference']['code']}"
          + (f"; {len(walkers)} walkers: run with mpirun -n {len(walkers) + 1}"
             if len(walkers) > 1 else "") + ")")
    return 0


def _store_or_model(path: str) -> str:
    """``path``, or for a run directory the store it holds."""
    if not os.path.isdir(path):
        return path
    store = "otfml.h5"
    state = os.path.join(path, "run.json")
    if os.path.exists(state):
        with open(state) as fh:
            store = json.load(fh).get("config", {}).get("store", {}).get("path", store)
    if os.path.exists(os.path.join(path, store)):
        return os.path.join(path, store)
    raise OTFMLError(f"{path!r} is a directory without a store ({store}); give a run "
                     "directory, a store (.h5) or a model (.npz)")


def _cmd_info(args) -> int:
    from .gp import SparseGP
    from .store import Store

    path = _store_or_model(args.path)
    if path.endswith(".npz"):
        m = SparseGP.load(path)
        info = {"model": path, "frames": m.n_frames,
                "species": [chemical_symbols[z] for z in m.descriptor.species],
                "sparse": m.sparse_counts(), "hyperparameters": m.hyp.as_dict(),
                "descriptor": m.descriptor.to_dict(), **m.extra}
    else:
        with Store(path, "a" if args.repair else "r", repair=args.repair) as st:
            info = st.summary()
        model_path = os.path.join(os.path.dirname(os.path.abspath(path)), "model.npz")
        if os.path.exists(model_path):
            m = SparseGP.load(model_path)
            info["model"] = {"path": model_path, "frames": m.n_frames,
                             "sparse": m.sparse_counts(), "hyperparameters": m.hyp.as_dict(),
                             "force_error_floor_eV_A": m.extra.get("force_error_floor_eV_A")}
        else:
            info["model"] = None
    if args.json:
        print(json.dumps(info, indent=2, default=float))
    else:
        for key, val in info.items():
            print(f"{key:>16}: {val}")
    return 0


def _cmd_evaluate(args) -> int:
    from .evaluate import evaluate, load_model, read_labelled

    data = read_labelled(args.data)  # first: a bad test set is found before any training
    model = load_model(args.model, elements={int(z) for a, _, _ in data for z in a.numbers})
    result = evaluate(model, data, force_tolerance=args.force_tolerance, output=args.output)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"frames {result['frames']}, atoms {result['atoms']}")
        print(f"energy MAE  {result['energy_mae_meV_per_atom']:.3f} meV/atom")
        print(f"force MAE   {result['force_mae_eV_A']:.4f} eV/Å")
        print(f"force RMSE  {result['force_rmse_eV_A']:.4f} eV/Å")
        print(f"uncertainty vs error, Spearman: per atom {result['spearman_atom']:.3f}, "
              f"per frame {result['spearman_frame']:.3f}")
        if "miss_rate" in result:
            print(f"miss rate at {result['force_tolerance_eV_A']} eV/Å: {result['miss_rate']:.4f}")
    return 0


def _cmd_plot(args) -> int:
    from .plot import plot_run

    for path in plot_run(args.run_dir):
        print(path)
    return 0


def _cmd_report(args) -> int:
    from .plot import write_report

    print(write_report(args.run_dir))
    return 0


def _cmd_export(args) -> int:
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import write

    from .store import Store

    images = []
    with Store(args.store) as st:
        for k, fr in enumerate(st):
            a = fr.atoms
            a.calc = SinglePointCalculator(a, energy=fr.energy, forces=fr.forces)
            a.info.update({"frame": k, "step": fr.step, "walker": fr.walker,
                           "fingerprint": json.dumps(fr.fingerprint, sort_keys=True)})
            images.append(a)
    try:
        write(args.output, images)
    except Exception as err:
        raise OTFMLError(f"cannot write {args.output!r} ({type(err).__name__}: {err}); use a "
                         "format ASE writes, e.g. .extxyz or .db") from err
    print(f"wrote {len(images)} frames to {args.output}")
    return 0


def _cmd_train(args) -> int:
    from .evaluate import load_model

    model = load_model(args.store)
    model.save(args.output)
    left = model.extra.get("frames_left_out", 0)
    held = (f" ({model.n_dropped} more taken out under model.max_frames / model.memory_gb; "
            "their sparse environments stay)" if model.n_dropped else "")
    print(f"trained on {model.n_frames} frames{held}, {model.n_sparse} sparse environments "
          f"{model.sparse_counts()}; saved {args.output}"
          + (f" ({left} frames of other reference fingerprints left out)" if left else ""))
    return 0


_SET = (("--set",), dict(action="append", default=[], metavar="SECTION.KEY=VALUE",
                          help="override a config value (repeatable)"))
_JSON = (("--json",), dict(action="store_true", help="print JSON"))

#: each command: (function, help, arguments as (names, keywords) for add_argument)
COMMANDS = {
    "run": (_cmd_run, "run a YAML workflow", [
        (("config",), {}), _SET,
        (("--resume",), dict(action="store_true", help="continue a killed run from its last "
                             "checkpoint (the default when the output directory holds an "
                             "interrupted run)")),
        (("--restart",), dict(action="store_true", help="start over even if the output "
                              "directory holds an interrupted run (the store is kept and "
                              "warm-starts the model)"))]),
    "check": (_cmd_check, "validate a config without running it", [
        (("config",), dict(nargs="?")), _SET,
        (("--keys",), dict(action="store_true", help="print the reference of all keys"))]),
    "info": (_cmd_info, "summarize a store (.h5) or model (.npz)", [
        (("path",), {}), _JSON,
        (("--repair",), dict(action="store_true", help="open the store for writing: recovers "
                             "it after a writer died or a write failed (disk full), keeping "
                             "every committed frame"))]),
    "evaluate": (_cmd_evaluate, "errors of a model/store on a labelled extxyz", [
        (("model",), dict(help="store (.h5, trained on the fly) or model (.npz)")),
        (("data",), dict(help="labelled test set (extxyz with energies and forces)")), _JSON,
        (("--force-tolerance",), dict(type=float, default=None,
                                      help="eV/Å; also report the miss rate at this tolerance")),
        (("-o", "--output"), dict(default=None, metavar="DIR", help="write evaluation.json/.npz "
                                  "and parity and error-vs-uncertainty plots here (e.g. the run "
                                  "directory, so `otfml report` includes them)"))]),
    "plot": (_cmd_plot, "write PNG figures of a run directory (RUN_DIR/plots)",
             [(("run_dir",), {})]),
    "report": (_cmd_report, "write RUN_DIR/report.html: summary and figures",
               [(("run_dir",), {})]),
    "export": (_cmd_export, "write a store's labelled frames for other tools", [
        (("store",), {}),
        (("output",), dict(help="any file ASE writes: out.extxyz, out.db (ASE database), ..."))]),
    "train": (_cmd_train, "fit a model offline from a store", [
        (("store",), {}), (("-o", "--output"), dict(default="model.npz"))]),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="otfml", description="On-the-fly learning with ASE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    for name, (func, text, arguments) in COMMANDS.items():
        c = sub.add_parser(name, help=text)
        for names, kw in arguments:
            c.add_argument(*names, **kw)
        c.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = build_parser()
    parser.add_argument("--version", action="version", version=f"otfml {__version__}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except OTFMLError as err:
        print(f"otfml: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("otfml: interrupted; every labelled frame so far is in the store", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader went away (otfml check --keys | head)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
