"""Write docs/performance.md from the benchmark results in benchmarks/results/.

    python benchmarks/make_performance.py

Each ``benchmarks/results/otf_md_*.json`` is the ``--json`` output of ``otf_md.py`` and each
``replay_*.json`` that of ``replay.py``; the page shows them as they are, with the command
that reproduces each.
"""

from __future__ import annotations

import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import optimize  # noqa: E402  (benchmarks/ is not a package)
import panel  # noqa: E402
from otf_md import load_results  # noqa: E402

PAGE = os.path.join(os.path.dirname(HERE), "docs", "performance.md")

HEAD = """# Performance

Figures of the current code on the project's machine (2 cores, MOPAC 22 from Debian, PM7),
measured side by side in one process: plain MOPAC MD and otfml on-the-fly MD from the same
start, with the defaults. This page is written by `python benchmarks/make_performance.py`
from the JSON results in `benchmarks/results/`; `benchmarks/README.md` says how to run each
benchmark.
"""


def _load(pattern: str) -> list[dict]:
    return load_results(sorted(glob.glob(os.path.join(HERE, "results", pattern))))


def main() -> int:
    lines = [HEAD]
    otf = _load("otf_md_*.json")
    if otf:
        lines += ["## On-the-fly MD against plain MOPAC MD (`otf_md.py`, `panel.py`)", "",
                  "Langevin MD at 500 K, 0.5 fs, a 100 fs thermostat, from an empty store; the "
                  "final model is tested on an independent plain-MOPAC trajectory (another "
                  "seed). The wall ratio is plain MOPAC MD's time over otfml's for the same "
                  "steps, measured in the same process.", ""]
        lines += [panel.table(otf), "",
                  "Each cell: the median over the seeds run (worst seed); met / missed: the "
                  "target of the panel (median within it, no seed worse than 1.5 times it). "
                  "Targets: docs of `benchmarks/panel.py`."]
        lines += ["", "Reproduce: `python benchmarks/panel.py --systems MOLECULE` (three "
                  "seeds), or one row with `python benchmarks/otf_md.py --molecule MOLECULE "
                  "--steps STEPS --plain-steps 2000 --seed SEED --thermostat-fs 100`.", ""]
    opt = os.path.join(HERE, "results", "optimize.json")
    if os.path.exists(opt):
        lines += ["## Geometry optimization (`optimize.py`)", "",
                  "The 18 starts of `shared/geoopt` to fmax 0.05 eV/Å, each checked by an "
                  "independent MOPAC call; otfml from an empty store (otfml-warm: after 500 "
                  "steps of on-the-fly MD of the molecule), BFGS on MOPAC directly, Sella and "
                  "geomeTRIC on MOPAC in internal coordinates.", "",
                  optimize.table(load_results([opt])[0]), "",
                  "Reproduce: `python benchmarks/optimize.py`.", ""]
    opt = os.path.join(HERE, "results", "optimize_smiles.json")
    if os.path.exists(opt):
        rows = load_results([opt])[0]
        smiles = " ".join(f"'{s}'" for s in dict.fromkeys(r["start"] for r in rows))
        methods = " ".join(dict.fromkeys(r["method"] for r in rows))
        lines += ["Molecules not in the repository: RDKit's MMFF94 structure of each SMILES, "
                  "rattled by 0.15 Å; the best is the lowest energy any method reached.", "",
                  optimize.table(rows), "",
                  f"Reproduce: `python benchmarks/optimize.py --methods {methods} "
                  f"--smiles {smiles}`.", ""]
    par = os.path.join(HERE, "results", "parallel.json")
    if os.path.exists(par):
        import json

        import parallel

        with open(par) as fh:
            lines += ["## Walkers over MPI (`parallel.py`)", "",
                      "`mpirun --oversubscribe -n K+1` on the 2 cores, rank 0 coordinating; "
                      "summed over the walkers' MD time (docs/parallel.md).", "",
                      "Seed 0 (`benchmarks/results/parallel.json`):", "",
                      parallel.table(json.load(fh)), ""]
        runs = {0: par} | {int(f.rsplit("seed", 1)[1].split(".")[0]): f for f in
                           glob.glob(os.path.join(HERE, "results", "parallel_seed*.json"))}
        if len(runs) > 1:
            seeds = {}
            for seed, f in runs.items():
                with open(f) as fh:
                    seeds[seed] = json.load(fh)
            lines += ["Two walkers against one, seeds " + ", ".join(map(str, sorted(seeds)))
                      + " (`--seed`; `benchmarks/results/parallel_seed*.json`):", "",
                      parallel.seeds_table(seeds), ""]
        lines += ["Reproduce: `python benchmarks/parallel.py [--seed S]`.", ""]
    rep = _load("replay_*.json")
    if rep:
        lines += ["## The loop along one fixed MOPAC trajectory (`replay.py`)", "",
                  "| molecule | steps | calls | forces used MAE (eV/Å) | final model MAE (eV/Å) "
                  "| sparse environments |", "|---|---|---|---|---|---|"]
        for r in rep:
            fm = r["final_model_on_independent_trajectory"]
            lines.append(f"| {r['molecule']} | {r['steps']} | {r['calls']} | "
                         f"{r['used_forces_mae_eV_A']:.4f} | {fm['force_mae_eV_A']:.4f} | "
                         f"{r['sparse_environments']} |")
        lines += ["", "Reproduce: `python benchmarks/replay.py --molecule MOLECULE --steps STEPS "
                  "--json`.", ""]
    with open(PAGE, "w") as fh:
        fh.write("\n".join(lines).rstrip() + "\n")
    print(PAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
