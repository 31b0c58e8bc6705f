"""Building a model: its settings, and training it on labelled frames or a store.

Every rebuild of a model from stored frames (a run's warm start, `otfml train`,
`otfml evaluate STORE`) goes through :func:`one_fingerprint`, so frames labelled by
different references, methods, charges or multiplicities never train one model.
"""

from __future__ import annotations

import logging

import numpy as np

from ._descriptor_kernels import INNER
from .baseline import ScreenedCoulomb
from .config import SCHEMA, check_value
from .descriptor import Descriptor
from .errors import ConfigError
from .gp import SparseGP
from .settings import defaults
from .store import Store, fingerprint_key

__all__ = ["MODEL_DEFAULTS", "check_model_settings", "model_from_settings", "train_from_frames",
           "one_fingerprint", "model_from_store", "check_covers"]

log = logging.getLogger(__name__)

#: default model settings (descriptor and sparse GP), from :data:`otfml.settings.SCHEMA`
MODEL_DEFAULTS = defaults("model")


def check_model_settings(settings: dict | None) -> dict:
    """Merge user model settings over :data:`MODEL_DEFAULTS`.

    Unknown keys and values of the wrong type or range are refused with the YAML
    schema's own checks (``ConfigError`` naming ``model.<key>``), whether they come
    from a workflow file or from Python; NumPy scalars count as the Python numbers
    they hold.
    """
    out = dict(MODEL_DEFAULTS)
    for key, val in (settings or {}).items():
        if key not in MODEL_DEFAULTS:
            import difflib

            near = difflib.get_close_matches(key, MODEL_DEFAULTS, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(
                f"unknown model setting {key!r}{hint}; valid: {sorted(MODEL_DEFAULTS)}")
        if isinstance(val, np.generic):
            val = val.item()
        out[key] = check_value(f"model.{key}", val, SCHEMA["model"][key], "model settings")
    if out["coulomb_charges"] is not None:  # element names and charges (species come later)
        ScreenedCoulomb(out["coulomb_charges"], out["coulomb_width"])
    return out


def model_from_settings(species, settings: dict, charge: int = 0) -> SparseGP:
    """An empty model of ``settings`` (merged, :func:`check_model_settings`) for the
    elements ``species``; ``charge`` (e): that of molecules whose ``atoms.info`` has none,
    for ``model.prior``."""
    desc = Descriptor(species, cutoff=settings["cutoff"], n_max=settings["n_max"],
                      l_max=settings["l_max"], r_min=settings["r_min"],
                      radial_scaling=settings["radial_scaling"],
                      radial_power=settings["radial_power"],
                      centre_weight=settings["centre_weight"])
    if settings["prior"] is not None and settings["coulomb_charges"] is not None:
        raise ConfigError("model.prior and model.coulomb_charges both set: the model takes "
                          "one term under it; set one of them to null")
    baseline = (None if settings["coulomb_charges"] is None else
                ScreenedCoulomb(settings["coulomb_charges"], settings["coulomb_width"],
                                species=list(species)))
    if settings["prior"] == "mmff":
        from .prior import ForceFieldPrior

        baseline = ForceFieldPrior(charge)
    long = None
    if settings["long_cutoff"] is not None:
        inner = settings["long_inner_cutoff"]
        if inner is not None and not settings["long_cutoff"] > inner + 1.0:
            raise ConfigError(f"model.long_cutoff = {settings['long_cutoff']} Å must exceed "
                              f"model.long_inner_cutoff + 1 Å = {inner + 1.0} Å")
        if inner is not None and not settings["centre_weight"] > 0:
            raise ConfigError("model.long_inner_cutoff needs model.centre_weight > 0 (an atom "
                              "with nobody in the shell keeps the centre's term)")
        # radial functions from where the inner switch begins, if any
        r_min = settings["r_min"] if inner is None else inner - INNER
        long = Descriptor(species, cutoff=settings["long_cutoff"], n_max=settings["long_n_max"],
                          l_max=settings["long_l_max"], r_min=r_min,
                          centre_weight=settings["centre_weight"], inner_cutoff=inner)
    return SparseGP(desc, long_descriptor=long,
                    long_max_sparse=settings["long_max_sparse_per_species"],
                    max_sparse_per_species=settings["max_sparse_per_species"],
                    sparse_tolerance=settings["sparse_tolerance"],
                    prune=settings["prune_sparse"], max_frames=settings["max_frames"],
                    evict=settings["evict_frames"], threads=settings["predict_threads"],
                    memory_gb=settings["memory_gb"],
                    baseline=baseline)


def train_from_frames(frames, settings: dict | None = None,
                      species: list[int] | None = None, charge: int = 0) -> SparseGP:
    """Fit a model offline on labelled frames (e.g. those of a store).

    Parameters
    ----------
    frames : iterable of otfml.store.Frame
        Labelled frames (energy eV, forces eV/Å).
    settings : dict, optional
        Overrides of :data:`MODEL_DEFAULTS`.
    species : list of int, optional
        Extra atomic numbers to cover.
    charge : int, default 0
        Charge (e) of molecules whose ``atoms.info`` has none, for ``model.prior``.
    """
    frames = list(frames)
    if not frames:
        raise ConfigError("no labelled frames to train on")
    settings = check_model_settings(settings)
    zs = set(species or [])
    for fr in frames:
        zs.update(int(z) for z in fr.atoms.numbers)
    model = model_from_settings(sorted(zs), settings, charge)
    model.add_frames((fr.atoms, fr.energy, fr.forces) for fr in frames)
    model.fit_hyperparameters()
    return model



def one_fingerprint(frames: list, source: str = "the store") -> list:
    """The frames of the most recent reference fingerprint among ``frames``.

    Frames of other fingerprints are left out, with a warning that says how many.

    Parameters
    ----------
    frames : list of otfml.store.Frame
        Stored frames, oldest first.
    source : str
        What they came from, for the warning.
    """
    if not frames:
        return []
    latest = fingerprint_key(frames[-1].fingerprint)
    kept = [fr for fr in frames if fingerprint_key(fr.fingerprint) == latest]
    if len(kept) < len(frames):
        log.warning("%s holds %d frames of other reference fingerprints; the model is built "
                    "from the %d frames of the most recent one (%s)", source,
                    len(frames) - len(kept), len(kept), latest)
    return kept


def model_from_store(path: str, settings: dict | None = None,
                     species: list[int] | None = None,
                     elements: set[int] | None = None) -> SparseGP:
    """A model trained on the frames of one fingerprint of a store (:func:`one_fingerprint`).

    ``model.extra["frames_left_out"]`` counts the frames of other fingerprints. With
    ``elements``, a store whose frames lack one of them is refused before any training.
    """
    with Store(path) as store:
        frames = list(store)
    kept = one_fingerprint(frames, f"store {path!r}")
    if elements:
        check_covers({int(z) for fr in kept for z in fr.atoms.numbers}, elements,
                     f"the frames of store {path!r}")
    model = train_from_frames(kept, settings, species,
                              charge=int(kept[-1].fingerprint.get("charge", 0) or 0))
    model.extra["frames_left_out"] = len(frames) - len(kept)
    return model


def check_covers(known: set[int], wanted: set[int], what: str) -> None:
    """Refuse elements ``wanted`` that ``known`` lacks, naming them (ConfigError)."""
    from ase.data import chemical_symbols

    missing = sorted(set(wanted) - set(known))
    if missing:
        raise ConfigError(
            f"element(s) {[chemical_symbols[z] for z in missing]} are not in {what}, which "
            f"hold(s) {[chemical_symbols[z] for z in sorted(known)]}: the model cannot predict "
            "them. Evaluate on structures of those elements, or train on frames that have them")
