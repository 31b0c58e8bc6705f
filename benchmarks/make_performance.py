"""Write docs/performance.md from the benchmark results in benchmarks/results/.

    python benchmarks/make_performance.py

Each ``benchmarks/results/otf_md_*.json`` is the ``--json`` output of ``otf_md.py`` and each
``replay_*.json`` that of ``replay.py``; the page shows them as they are, with the command
that reproduces each.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
PAGE = os.path.join(os.path.dirname(HERE), "docs", "performance.md")

HEAD = """# Performance

Figures of the current code on the project's machine (2 cores, MOPAC 22 from Debian, PM7),
measured side by side in one process: plain MOPAC MD and otfml on-the-fly MD from the same
start, with the defaults. This page is written by `python benchmarks/make_performance.py`
from the JSON results in `benchmarks/results/`; `benchmarks/README.md` says how to run each
benchmark.
"""


def _load(pattern: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(HERE, "results", pattern))):
        with open(path) as fh:
            out.append(json.load(fh))
    return out


def _otf_rows(results: list[dict]) -> list[str]:
    rows = ["| molecule | steps | seed | MOPAC calls | wall / plain MOPAC MD | model step / "
            "MOPAC call | forces used MAE (eV/Å) | final model MAE (eV/Å) | Spearman (atom) | "
            "miss rate | peak memory |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        fm = r["final_model_on_independent_trajectory"]
        rows.append(
            f"| {r['molecule']} | {r['steps']} | {r['seed']} | "
            f"{100 * r['call_fraction']:.2f} % | {r['wall_ratio_otf_over_plain']:.3f} | "
            f"1/{1 / r['model_step_over_mopac_call']:.0f} | {r['used_forces_mae_eV_A']:.4f} | "
            f"{fm['force_mae_eV_A']:.4f} | {fm['spearman_atom']:.2f} | "
            f"{100 * fm['miss_rate']:.1f} % | {r['peak_rss_MB']:.0f} MB |")
    return rows


def _medians(results: list[dict]) -> list[str]:
    rows = []
    by = {}
    for r in results:
        by.setdefault((r["molecule"], r["steps"]), []).append(r)
    for (mol, steps), rs in sorted(by.items()):
        if len(rs) < 2:
            continue
        med = {k: statistics.median(f(r) for r in rs) for k, f in {
            "calls": lambda r: 100 * r["call_fraction"],
            "wall": lambda r: r["wall_ratio_otf_over_plain"],
            "used": lambda r: r["used_forces_mae_eV_A"],
            "final": lambda r: r["final_model_on_independent_trajectory"]["force_mae_eV_A"],
        }.items()}
        rows.append(f"- {mol}, {steps} steps, median of {len(rs)} seeds: {med['calls']:.2f} % "
                    f"calls, wall ratio {med['wall']:.3f}, forces used {med['used']:.4f} eV/Å, "
                    f"final model {med['final']:.4f} eV/Å.")
    return rows


def main() -> int:
    lines = [HEAD]
    otf = _load("otf_md_*.json")
    if otf:
        lines += ["## On-the-fly MD against plain MOPAC MD (`otf_md.py`)", "",
                  "Langevin MD at 500 K, 0.5 fs, from an empty store; the final model is "
                  "tested on an independent plain-MOPAC trajectory (another seed).", ""]
        lines += _otf_rows(otf) + [""] + _medians(otf)
        lines += ["", "Reproduce a row: `python benchmarks/otf_md.py --molecule MOLECULE "
                  "--steps STEPS --plain-steps 2000 --seed SEED --json`.", ""]
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
