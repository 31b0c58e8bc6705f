"""The public panel: otfml's defaults on systems nobody tuned for, three seeds each.

Each system runs ``otf_md.py`` with the defaults (Langevin at its temperature, 0.5 fs, a
thermostat of 100 fs, PM7, an empty store) against plain MOPAC MD from the same start, one
process per run; the final model is tested on the independent plain-MOPAC trajectory.
Printed: one row per system with the median over seeds and the worst seed of each figure,
and whether the targets hold (median meets the target, no seed worse than 1.5 times it).

    python benchmarks/panel.py                          # every system, seeds 0 1 2
    python benchmarks/panel.py --systems nma allyl --seeds 0 --scale 0.05   # a quick look
    python benchmarks/panel.py --table results/*.json  # the table of earlier runs

``--scale`` shortens every run (steps and the timed plain MD) by that factor: a short run
shows that the pipeline works, not whether the targets hold. Results (``--json`` of
``otf_md.py``) are written to ``--out`` (default ``benchmarks/results/panel``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from otf_md import load_results  # noqa: E402  (benchmarks/ is not a package)

#: system: (steps, plain MOPAC steps timed, targets) -- the targets of the panel
#: (calls %, wall ratio, final-model MAE eV/Å, forces-used MAE eV/Å)
SYSTEMS = {
    "ethanol": (10000, 2000, (2.0, 0.10, 0.03, 0.04)),
    "aspirin": (10000, 1000, (3.0, 0.10, 0.05, 0.06)),
    "water64": (1000, 20, (5.0, 0.05, 0.05, 0.06)),
    "nma": (10000, 2000, (3.0, 0.15, 0.05, 0.06)),
    "acetate": (10000, 2000, (3.0, 0.15, 0.05, 0.06)),
    "allyl": (10000, 2000, (3.0, 0.15, 0.05, 0.06)),
    "diphenhydramine": (5000, 500, (3.0, 0.15, 0.05, 0.06)),
    "water27": (10000, 200, (3.0, 0.15, 0.05, 0.06)),
}
#: targets every system shares: peak memory (MB), Spearman (atom), miss rate, temperature
MEMORY_MB, SPEARMAN, MISS_RATE, TEMPERATURE = 1536.0, 0.5, 0.02, 0.05


def figures(r: dict) -> dict:
    """The figures of one run that the targets judge."""
    fm = r["final_model_on_independent_trajectory"]
    plain_t = r["plain_mopac"]["mean_T_second_half_K"]
    return {"calls": 100 * r["otfml"]["reference_fraction"],
            "wall": r["wall_ratio_otf_over_plain"],
            "final": fm["force_mae_eV_A"], "used": r["used_forces_mae_eV_A"],
            "spearman": fm["spearman_atom"], "miss": fm["miss_rate"],
            "memory": r["peak_rss_MB"],
            "dT": abs(r["otfml"]["mean_T_second_half_K"] - plain_t) / plain_t,
            "step": 1.0 / r["model_step_over_mopac_call"]}


def verdict(values: list[float], target: float, lower_is_better: bool = True) -> str:
    """'met' where the median meets ``target`` and no value is worse than 1.5 times it."""
    med = statistics.median(values)
    if lower_is_better:
        ok = med <= target and max(values) <= 1.5 * target
    else:
        ok = med >= target and min(values) >= target / 1.5
    return "met" if ok else "missed"


def table(results: list[dict]) -> str:
    by: dict[str, list[dict]] = {}
    for r in results:
        by.setdefault(r["molecule"], []).append(figures(r))
    head = ("| system | seeds | calls % | wall ratio | final MAE | used MAE | Spearman | "
            "miss rate | peak MB | ΔT | model step / call |")
    lines = [head, "|---" * 11 + "|"]
    for name, runs in by.items():
        calls, wall, final, used = SYSTEMS.get(name, (0, 0, (None,) * 4))[2]

        def cell(key, target=None, lower=True, fmt="{:.3g}", runs=runs):
            v = [f[key] for f in runs]
            worst = max(v) if lower else min(v)
            text = f"{fmt.format(statistics.median(v))} (worst {fmt.format(worst)})"
            return text + (f" {verdict(v, target, lower)}" if target is not None else "")

        lines.append(" | ".join([
            f"| {name}", str(len(runs)), cell("calls", calls), cell("wall", wall),
            cell("final", final), cell("used", used), cell("spearman", SPEARMAN, lower=False),
            cell("miss", MISS_RATE), cell("memory", MEMORY_MB, fmt="{:.0f}"),
            cell("dT", TEMPERATURE), "1/" + f"{statistics.median(f['step'] for f in runs):.0f}",
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--scale", type=float, default=1.0,
                    help="shorten every run by this factor (a quick look, not the targets)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "panel"))
    ap.add_argument("--table", nargs="+", metavar="JSON", help="print the table of results")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="options passed to otf_md.py (a variant, not the defaults)")
    args = ap.parse_args(argv)
    if args.table:
        print(table(load_results(args.table)))
        return 0
    os.makedirs(args.out, exist_ok=True)
    results = []
    for name in args.systems:
        steps, plain, _ = SYSTEMS[name]
        steps, plain = max(20, int(steps * args.scale)), max(10, int(plain * args.scale))
        for seed in args.seeds:
            cmd = [sys.executable, os.path.join(HERE, "otf_md.py"), "--molecule", name,
                   "--steps", str(steps), "--plain-steps", str(plain), "--seed", str(seed),
                   "--thermostat-fs", "100", "--json", *args.extra]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                print(f"{name} seed {seed} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            r = json.loads(out.stdout)
            results.append(r)
            path = os.path.join(args.out, f"{name}_{steps}_seed{seed}.json")
            with open(path, "w") as fh:
                json.dump(r, fh, indent=1)
            print(f"{name} seed {seed}: {figures(r)['calls']:.2f} % calls, "
                  f"wall ratio {r['wall_ratio_otf_over_plain']:.3f}", file=sys.stderr)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
