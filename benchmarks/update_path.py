"""Offline update path: the time of each part of an incremental update, frame by frame.

A model is fitted on the first ``--start`` frames of a store (an OTF run's, in the order they
were labelled); the remaining frames are then added one at a time as the learner adds them
(prepare the geometry, add the labels, solve), with otfml's BLAS on one thread and no
reference running. Prints the median and mean of each part, how many solves updated the
factor and how many factored afresh, and the sparse environments swapped out (pruning).

    python benchmarks/update_path.py --store /tmp/otfml-bench-XXXX/otf.h5 --start 250 \\
        --set sparse_tolerance=0.002 --set max_sparse_per_species=800

The figures are absolute times of this machine; compare code versions by running both on
the same store, one after the other.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def main(argv=None) -> int:
    from otf_md import parse_settings
    from threadpoolctl import threadpool_limits

    from otfml.store import Store
    from otfml.training import train_from_frames

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True, help="an otfml store (an OTF run's)")
    ap.add_argument("--start", type=int, default=250, help="frames fitted before the timing")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="model setting")
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    with Store(args.store, mode="r") as st:
        frames = list(st)
    if not 0 < args.start < len(frames):
        ap.error(f"--start {args.start}: the store has {len(frames)} frames; give 1 to "
                 f"{len(frames) - 1}")
    model = train_from_frames(frames[:args.start], parse_settings(args.set))
    M0 = model.n_sparse
    rows = []
    with threadpool_limits(1):
        for fr in frames[args.start:]:
            fresh = model._lb_state is None
            t0 = time.perf_counter()
            prep = model.prepare_frame(fr.atoms)
            t1 = time.perf_counter()
            model.add_prepared(prep, fr.energy, fr.forces, solve=False)
            t2 = time.perf_counter()
            fresh = fresh or model._lb_state is None
            model.solve()
            t3 = time.perf_counter()
            rows.append((t1 - t0, t2 - t1, t3 - t2, fresh))
    r = np.array(rows)
    ms = 1e3 * r[:, :3]
    fresh = r[:, 3] > 0
    out = {
        "store": args.store, "frames_fitted": args.start, "frames_added": len(r),
        "sparse": [M0, model.n_sparse], "pruned": int(sum(model.n_pruned.values())),
        **{f"{name}_median_ms": float(np.median(ms[:, i])) for i, name in
           enumerate(("prepare", "add", "solve"))},
        **{f"{name}_mean_ms": float(np.mean(ms[:, i])) for i, name in
           enumerate(("prepare", "add", "solve"))},
        "solves_updated": int((~fresh).sum()), "solves_fresh": int(fresh.sum()),
        "updated_solve_mean_ms": float(ms[~fresh, 2].mean()) if (~fresh).any() else None,
        "fresh_solve_mean_ms": float(ms[fresh, 2].mean()) if fresh.any() else None,
    }
    if args.json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"{len(r)} frames added to a model of {args.start} ({M0} -> {model.n_sparse} sparse "
          f"environments, {out['pruned']} swapped out)")
    for name in ("prepare", "add", "solve"):
        print(f"  {name:8s} median {out[name + '_median_ms']:6.1f} ms   mean "
              f"{out[name + '_mean_ms']:6.1f} ms")
    print(f"  solves: {out['solves_updated']} updated the factor (mean "
          f"{out['updated_solve_mean_ms'] or 0:.1f} ms), {out['solves_fresh']} factored afresh "
          f"(mean {out['fresh_solve_mean_ms'] or 0:.1f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
