"""Evaluate a model (or a store, trained on the fly) on a labelled test set."""

from __future__ import annotations

import logging
import os

import numpy as np

from .calibration import calibrated
from .errors import ConfigError
from .gp import SparseGP
from .training import check_covers, model_from_store

__all__ = ["load_model", "evaluate", "read_labelled"]

log = logging.getLogger(__name__)


def load_model(path: str, settings: dict | None = None,
               elements: set[int] | None = None) -> SparseGP:
    """A model from a saved ``.npz`` or, for an HDF5 store, trained on the frames of its most
    recent reference fingerprint (:func:`otfml.training.model_from_store`). With
    ``elements``, a model that lacks one of them is refused (before training, for a store)."""
    if not os.path.exists(path):
        raise ConfigError(f"{path!r} does not exist; give a store (.h5) or a model (.npz)")
    with open(path, "rb") as fh:
        magic = fh.read(8)
    if magic.startswith(b"\x89HDF"):  # HDF5 signature: a store
        return model_from_store(path, settings, elements=elements)
    model = SparseGP.load(path)
    if elements:
        check_covers(set(model.descriptor.species), elements, f"model {path!r}")
    return model


def read_labelled(path: str) -> list:
    """Frames of an extxyz (or any ASE file) that carry energy and forces."""
    from ase.io import read

    try:
        images = read(path, index=":")
    except Exception as err:
        raise ConfigError(f"cannot read test set {path!r}: {type(err).__name__}: {err}") from err
    out = []
    for k, a in enumerate(images):
        try:
            e = a.get_potential_energy()
            f = a.get_forces()
        except Exception as err:
            raise ConfigError(f"{path!r}: frame {k} has no energy/forces; write the test set "
                              "with ase.io.write from atoms that carry a calculator") from err
        out.append((a, float(e), np.asarray(f)))
    if not out:
        raise ConfigError(f"{path!r} holds no frames")
    return out


def evaluate(model: SparseGP, data: list, force_tolerance: float | None = None,
             output: str | None = None) -> dict:
    """Errors of ``model`` on labelled frames, and how well its uncertainty ranks them.

    Parameters
    ----------
    model : SparseGP
    data : list of (atoms, energy eV, forces eV/Å)
    force_tolerance : float, optional
        eV/Å; with a force-error calibration in the model (``extra['force_std_scale']``
        and, per element, ``extra['force_std_element_scales']``, or a floor,
        ``extra['force_std_floor']``, or one per element,
        ``extra['force_std_element_floors']``) reports the miss
        rate: the fraction of atoms whose actual force error exceeds the
        tolerance while the estimate said it was within it.
    output : str, optional
        Directory to write ``evaluation.json``, ``evaluation.npz`` (per-atom
        forces, errors and estimates) and, with matplotlib, ``plots/parity.png``
        and ``plots/error_vs_uncertainty.png``.

    Returns
    -------
    dict
        energy_mae_meV_per_atom, force_mae_eV_A, force_rmse_eV_A (per component),
        spearman_atom (estimate vs per-atom force error norm), spearman_frame
        (largest estimate vs largest error per frame), frames, atoms.  The
        estimate is the calibrated one where the model has a calibration, else
        the novelty.
    """
    from scipy.stats import spearmanr

    if not data:
        raise ConfigError("no labelled frames to evaluate the model on; give a test set with "
                          "energies and forces")
    scale = model.extra.get("force_std_scale")
    element_scales = model.extra.get("force_std_element_scales")
    floor = model.extra.get("force_std_floor", 0.0)
    element_floors = model.extra.get("force_std_element_floors")
    de, dfs, est, err_atom, fr_est, fr_err, f_ref, f_mod = [], [], [], [], [], [], [], []
    for atoms, e, f in data:
        p = model.predict(atoms)
        f_ref.append(f)
        f_mod.append(p.forces)
        de.append(abs(p.energy - e) / len(atoms))
        d = p.forces - f
        dfs.append(d.ravel())
        ea = np.linalg.norm(d, axis=1)
        err_atom.append(ea)
        ua = calibrated(p.novelty, scale or 1.0, atoms.numbers, element_scales, floor,
                        element_floors)
        est.append(ua)
        fr_est.append(ua.max())
        fr_err.append(ea.max())
    dfs = np.concatenate(dfs)
    est = np.concatenate(est)
    err_atom = np.concatenate(err_atom)
    out = {
        "frames": len(data),
        "atoms": int(len(err_atom)),
        "energy_mae_meV_per_atom": float(np.mean(de) * 1000),
        "force_mae_eV_A": float(np.mean(np.abs(dfs))),
        "force_rmse_eV_A": float(np.sqrt(np.mean(dfs**2))),
        "spearman_atom": float(spearmanr(est, err_atom).correlation) if len(est) > 2 else None,
        "spearman_frame": float(spearmanr(fr_est, fr_err).correlation) if len(data) > 2 else None,
    }
    if force_tolerance is not None and scale:
        out["force_tolerance_eV_A"] = force_tolerance
        out["miss_rate"] = float(np.mean((err_atom > force_tolerance) & (est <= force_tolerance)))
    if output is not None:
        _write(output, out, np.concatenate(f_ref), np.concatenate(f_mod), err_atom, est,
               force_tolerance)
    return out


def _write(output: str, result: dict, f_ref, f_mod, err_atom, est, tol) -> None:
    import json

    os.makedirs(output, exist_ok=True)
    with open(os.path.join(output, "evaluation.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    path = os.path.join(output, "evaluation.npz")
    np.savez(path, forces_reference=f_ref, forces_model=f_mod, force_error=err_atom,
             force_error_estimate=est,
             force_tolerance=np.nan if tol is None else float(tol))
    try:
        from .plot import plot_evaluation

        plot_evaluation(path, os.path.join(output, "plots"))
    except ConfigError as err:  # no matplotlib: the data are written, the figures not
        log.warning("%s", err)
