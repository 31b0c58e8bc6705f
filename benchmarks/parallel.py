"""Walkers sharing one model over MPI: throughput against one walker, side by side.

Every job is ``mpirun --oversubscribe -n K+1 python benchmarks/parallel_walk.py`` (rank 0
coordinates, K walkers), PM7 through MOPAC, on this machine's cores:

* model steps dominate: ethanol (500 K) from the store of a warm-up job's labels (as many
  walkers as the largest K, other seeds), K = 1..4
  walkers of ``--steps`` steps each: summed MD steps per second (walkers' MD time), against
  the mean of the same walkers' (seeds') steps per second each run alone;
* MOPAC dominates: 64 waters (300 K) from an empty store, ``--water-steps`` steps each:
  reference labels per second;
* sharing: ethanol from an empty store, 2 walkers sharing one model against the same 2
  walkers run as 2 independent jobs: total reference calls.

Also printed per K: the time from a label's arrival at the coordinator to each walker's use
of the version that learned it (median and worst), the coordinator's update time, the size
of a model version, and the peak memory of a rank.

    python benchmarks/parallel.py                     # the whole benchmark (~9 min on 2 cores)
    python benchmarks/parallel.py --ks 1 2 --steps 500 --water-steps 4   # a quick look
    python benchmarks/parallel.py --seed 1 --water-steps 0 --share-steps 0  # ethanol, seed 1

``--seed S`` gives every walker of every job the seed it has at 0, plus ``1000 * S``; a part
of 0 steps is left out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def job(work: str, k: int, molecule: str, steps: int, first_seed: int = 0,
        store: str | None = None) -> dict:
    """One mpirun job of K walkers in ``work`` (a copy of ``store`` first, if given)."""
    os.makedirs(work, exist_ok=True)
    if store is not None:
        shutil.copy(store, os.path.join(work, "shared.h5"))
    mpirun = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONWARNINGS": "ignore"}
    cmd = [mpirun, "--oversubscribe", "-n", str(k + 1), sys.executable,
           os.path.join(HERE, "parallel_walk.py"), work, molecule, str(steps), str(first_seed)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    with open(os.path.join(work, "result.json")) as fh:
        return json.load(fh)


def figures(res: dict) -> dict:
    w = list(res["walkers"].values())
    md = max(d["md_s"] for d in w)
    lat = [x for d in w for x in d["latency_s"]]
    return {"walkers": len(w), "steps": sum(d["steps"] for d in w),
            "calls": sum(d["reference_calls"] for d in w),
            "screened": sum(d["screened"] for d in w),
            "steps_per_s": sum(d["steps"] for d in w) / md,
            "labels_per_s": sum(d["reference_calls"] for d in w) / md,
            "latency_median_s": statistics.median(lat) if lat else None,
            "latency_worst_s": max(lat) if lat else None,
            "update_median_s": statistics.median(res["update_s"]) if res["update_s"] else None,
            "version_MB": max(res["version_MB"]) if res["version_MB"] else 0.0,
            "peak_rank_MB": max([d["rss_MB"] for d in w] + [res["coordinator_rss_MB"]])}


def _by_k(data: dict) -> tuple[dict, list]:
    """A run's figures per K (``--json`` keys are strings) and each walker's steps/s alone."""
    rows = {reg: {int(k): v for k, v in r.items()} for reg, r in data["rows"].items()}
    return rows, [a["steps_per_s"] for a in data["model_alone"]]


def table(data: dict) -> str:
    """The markdown of one run's figures (``--json``'s content)."""
    args = data["args"]
    rows, alone = _by_k(data)
    ks = sorted(rows["model"])
    one_w = rows["mopac"].get(1)
    out = [f"Ethanol (500 K): {args['steps']} steps per walker from the store of a warm-up "
           f"of {max(args['ks'])} walkers x {args['warm_steps']} steps (other seeds; "
           f"{data['warm_labels']} labels); "
           f"64 waters (300 K): {args['water_steps']} steps per walker from an empty store.",
           "",
           "Ethanol's one walker: each walker (seed) of the K run alone, steps/s: "
           + ", ".join(f"{a:.0f}" for a in alone) + "; x one is against the mean of the K "
           "walkers' own.",
           "",
           "| K walkers | ethanol steps/s (x one) | ethanol calls | water64 labels/s (x one) | "
           "label to every walker's model, median / worst s | update median s | version MB | "
           "peak rank MB |",
           "|---|---|---|---|---|---|---|---|"]
    for k in ks:
        m, w = rows["model"][k], rows["mopac"].get(k)
        xm = f" ({m['steps_per_s'] / statistics.mean(alone[:k]):.2f}x)"
        xw = f" ({w['labels_per_s'] / one_w['labels_per_s']:.2f}x)" if one_w and w else ""
        labels = f"{w['labels_per_s']:.3f}{xw}" if w else "-"
        lat = (f"{m['latency_median_s']:.3f} / {m['latency_worst_s']:.3f}"
               if m["latency_median_s"] is not None else "-")
        upd = f"{m['update_median_s']:.3f}" if m["update_median_s"] is not None else "-"
        peak = max(m["peak_rank_MB"], w["peak_rank_MB"] if w else 0.0)
        out.append(f"| {k} | {m['steps_per_s']:.0f}{xm} | {m['calls']} | {labels} | "
                   f"{lat} | {upd} | {m['version_MB']:.1f} | {peak:.0f} |")
    shared, alone = data["shared"], data["alone"]
    if shared is None:
        return "\n".join(out)
    out += ["", f"Sharing, ethanol, 2 walkers x {args['share_steps']} steps from an empty store: "
            f"{shared['calls']} reference calls with one shared model ({shared['screened']} "
            f"requests screened by a newer version) against {sum(a['calls'] for a in alone)} "
            f"for the same two walkers run apart ({alone[0]['calls']} + {alone[1]['calls']})."]
    return "\n".join(out)


def seeds_table(runs: dict[int, dict]) -> str:
    """Two walkers against one, a row per seed (``--json`` contents of runs with ``--seed``)."""
    out = ["| seed | ethanol steps/s, 2 walkers (x one) | water64 labels/s, 2 walkers (x one) "
           "| ethanol calls, 2 walkers | sharing: calls with one model / run apart |",
           "|---|---|---|---|---|"]
    for seed, data in sorted(runs.items()):
        rows, alone = _by_k(data)
        m, w1, w2 = rows["model"][2], rows["mopac"].get(1), rows["mopac"].get(2)
        water = (f"{w2['labels_per_s'] / w1['labels_per_s']:.2f}x" if w1 and w2 else "-")
        share = (f"{data['shared']['calls']} / {sum(a['calls'] for a in data['alone'])}"
                 if data["shared"] else "-")
        out.append(f"| {seed} | {m['steps_per_s'] / statistics.mean(alone[:2]):.2f}x | {water} "
                   f"| {m['calls']} | {share} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 2, 3, 4])
    ap.add_argument("--steps", type=int, default=10000,
                    help="ethanol steps per walker (the calls a walker makes on starting from "
                         "the warm-up's store weigh less the longer it runs)")
    ap.add_argument("--warm-steps", type=int, default=20000,
                    help="steps per walker of the warm-up job (as many walkers as the largest "
                         "K) whose labels warm-start the timed jobs")
    ap.add_argument("--water-steps", type=int, default=6, help="64-water steps per walker")
    ap.add_argument("--share-steps", type=int, default=2000,
                    help="ethanol steps per walker of the sharing comparison")
    ap.add_argument("--seed", type=int, default=0,
                    help="added, times 1000, to every walker's seed")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="otfml-parallel-")
    # the warm-up covers the geometry of several walkers (seeds other than the timed ones),
    # so that model steps dominate the timed jobs at every K
    s0 = 1000 * args.seed
    warm = job(os.path.join(root, "warm"), max(args.ks), "ethanol", args.warm_steps,
               first_seed=s0 + 100)
    store = os.path.join(root, "warm", "shared.h5")
    rows = {"model": {}, "mopac": {}}
    # each walker alone: the baseline of "x one" (walkers of other seeds see other geometry)
    model_alone = [figures(job(os.path.join(root, f"alone_model{w}"), 1, "ethanol", args.steps,
                               first_seed=s0 + w, store=store)) for w in range(max(args.ks))]
    for k in args.ks:
        rows["model"][k] = model_alone[0] if k == 1 else figures(job(
            os.path.join(root, f"model{k}"), k, "ethanol", args.steps, first_seed=s0,
            store=store))
        if args.water_steps:
            rows["mopac"][k] = figures(job(os.path.join(root, f"water{k}"), k, "water64",
                                           args.water_steps, first_seed=s0))
    shared, alone = None, []
    if args.share_steps:
        shared = figures(job(os.path.join(root, "shared"), 2, "ethanol", args.share_steps,
                             first_seed=s0))
        alone = [figures(job(os.path.join(root, f"alone{w}"), 1, "ethanol", args.share_steps,
                             first_seed=s0 + w)) for w in (0, 1)]
    data = {"args": vars(args), "warm_labels": warm["versions"], "rows": rows,
            "model_alone": model_alone, "shared": shared, "alone": alone}
    print(table(data))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(data, fh, indent=1, default=float)
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
