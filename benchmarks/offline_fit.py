"""Offline fit: train on one plain-MOPAC trajectory, force MAE on another.

Separates what the model can learn from what the OTF loop chooses to label:
a model is fitted on every 10th frame of one PM7 Langevin trajectory (seed 0)
and tested on every 20th frame of another (seed 1), for the model settings
given with ``--set``.  The trajectories are computed once with MOPAC and cached
as extxyz files in ``--cache``.

    python benchmarks/offline_fit.py --molecule aspirin --train-steps 3000 --test-steps 2000
    python benchmarks/offline_fit.py --molecule aspirin --set l_max=4 --set sparse_tolerance=0.002

``--store`` trains on the frames an OTF run labelled instead (``otf_md.py``'s JSON gives its
store), in the order they were labelled, e.g. to compare what a frame cap keeps:

    python benchmarks/offline_fit.py --store /tmp/otfml-bench-XXXX/otf.h5 --set max_frames=1000 \
        --set 'evict_frames="oldest"'
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from types import SimpleNamespace

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))


def trajectory(name: str, seed: int, steps: int, cache: str, every: int = 10) -> list:
    """Every ``every``-th frame of plain MOPAC MD as (atoms, energy, forces), cached."""
    from ase.calculators.mopac import MOPAC
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.io import read, write
    from otf_md import MOLECULES, md, start

    from otfml.reference import MopacReference

    tag = "" if every == 10 else f"_every{every}"
    path = os.path.join(cache, f"{name}_seed{seed}_{steps}{tag}.extxyz")
    if not os.path.exists(path):
        temperature = MOLECULES[name][1]
        a = start(name, temperature, seed)
        a.calc = MOPAC(method="PM7", label=os.path.join(cache, f"run_{name}_{seed}", "m"),
                       command=MopacReference().command)
        _, _, frames, _ = md(a, steps, temperature, seed, every=every)
        images = []
        for atoms, e, f in frames:
            atoms.calc = SinglePointCalculator(atoms, energy=e, forces=f)
            images.append(atoms)
        write(path + ".part", images, format="extxyz")
        os.replace(path + ".part", path)
    return [(a, a.get_potential_energy(), a.get_forces()) for a in read(path, ":")]


def main(argv=None) -> int:
    from otf_md import MOLECULES, parse_settings

    from otfml.training import train_from_frames

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--molecule", choices=sorted(MOLECULES), default="aspirin")
    ap.add_argument("--train-steps", type=int, default=3000)
    ap.add_argument("--test-steps", type=int, default=2000)
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="model setting")
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/otfml-bench"))
    ap.add_argument("--store", help="train on the frames of this otfml store (an OTF run's)")
    args = ap.parse_args(argv)
    os.makedirs(args.cache, exist_ok=True)
    if args.store:
        from otfml.store import Store

        with Store(args.store, mode="r") as st:
            train = list(st)
    else:
        train = [SimpleNamespace(atoms=a, energy=e, forces=f)
                 for a, e, f in trajectory(args.molecule, 0, args.train_steps, args.cache)]
    test = trajectory(args.molecule, 1, args.test_steps, args.cache)[::2]
    settings = parse_settings(args.set)
    t0 = time.perf_counter()
    model = train_from_frames(train, settings)
    fit_s = time.perf_counter() - t0
    err = np.concatenate([np.abs(model.predict(a).forces - f).ravel() for a, _e, f in test])
    print(f"{args.molecule} {settings or 'defaults'}: {len(train)} training frames "
          f"({args.store or 'plain MOPAC, seed 0'}), {model.n_frames} held, "
          f"{model.n_sparse} sparse environments, fit {fit_s:.0f} s; force MAE on "
          f"{len(test)} frames of the other trajectory {err.mean():.4f} eV/Å; "
          f"hyperparameters {model.hyp}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
