"""A model's file: what it holds (:meth:`contents`), saving and loading."""

from __future__ import annotations

import json
import os
import zipfile
import zlib
from typing import TYPE_CHECKING

import numpy as np

from ..baseline import baseline_from_dict
from ..descriptor import Descriptor
from ..errors import ConfigError
from ..settings import default
from ._types import Hyperparameters
from .posterior import ARRAYS, pack_triangles, unpack_triangles

if TYPE_CHECKING:
    from .model import SparseGP

_MODEL_FORMAT = "otfml-sparse-gp"
_MODEL_VERSION = 2  # 2: a longer-range term (version 1 files are models without one)
_READS = (1, 2)


class _Persistence:
    """Mixin of :class:`~otfml.gp.SparseGP`: its model file."""

    def contents(self, extra: dict | None = None, compact: bool = False) -> dict[str, np.ndarray]:
        """What a model file holds, by name: ``"meta"`` (JSON text) and the posterior's
        arrays. ``compact`` leaves out the M x M matrix that only the variances read (they
        form it when first asked, O(M^3)) and holds only the nonzero parts of the
        triangular factors (:func:`~otfml.gp.posterior.pack_triangles`)."""
        meta = {
            "extra": extra or {},
            "format": _MODEL_FORMAT,
            "version": _MODEL_VERSION,
            "descriptor": self.descriptor.to_dict(),
            "long_descriptor": None if len(self.terms) == 1 else self.terms[1].to_dict(),
            "hyperparameters": [float(x) for x in self.hyp.as_array()],
            "bounds": self.bounds,
            "max_sparse_per_species": self.max_sparse_per_species,
            "long_max_sparse": self.long_max_sparse,
            "sparse_tolerance": self.sparse_tolerance,
            "n_frames": self._n_e,
            "baseline": None if self.baseline is None else self.baseline.to_dict(),
        }
        arrays = self.posterior.arrays(not compact)
        return {"meta": np.array(json.dumps(meta)),
                **(pack_triangles(arrays) if compact else arrays)}

    def save(self, path, extra: dict | None = None, compact: bool = False) -> None:
        """Save what prediction needs (:meth:`contents`) to an ``.npz`` file, or a binary
        file object (exact round trip). ``extra`` (JSON-able) is stored alongside and
        returned by :meth:`load` as ``model.extra``."""
        contents = self.contents(extra, compact)
        if hasattr(path, "write"):
            np.savez(path, **contents)
            return
        with open(path, "wb") as fh:
            np.savez(fh, **contents)

    @classmethod
    def load(cls, path) -> SparseGP:
        """Load a model saved by :meth:`save` (prediction only); ``path`` or a binary
        file object."""
        if not hasattr(path, "read") and not os.path.isfile(path):
            raise ConfigError(f"model file {path!r} does not exist; give the path of a file "
                              "written by `otfml train` or a run's model.npz")
        try:
            with np.load(path, allow_pickle=False) as data:
                contents = {k: data[k] for k in data.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
            raise _damaged(path, err) from err
        return cls.from_contents(contents, path)

    @classmethod
    def from_contents(cls, contents: dict[str, np.ndarray], source="model") -> SparseGP:
        """The model (prediction only) of :meth:`contents`; ``source`` names it in errors."""
        try:
            meta = json.loads(str(contents["meta"]))
            arrays = unpack_triangles({k: v for k, v in contents.items() if k != "meta"})
            arrays.setdefault("C", None)
            missing = [k for k in ARRAYS if k not in arrays]
            if missing:
                raise KeyError(f"no {missing}")
        except (ValueError, KeyError) as err:
            raise _damaged(source, err) from err
        if not (isinstance(meta, dict) and meta.get("format") == _MODEL_FORMAT):
            raise ConfigError(f"{source!r} is not an otfml model file (no otfml model format "
                              "marker); rebuild it with `otfml train STORE.h5 -o model.npz`")
        if meta.get("version") not in _READS:
            raise ConfigError(
                f"{source!r} has model format version {meta.get('version')}, "
                f"this otfml reads versions {_READS}; retrain it from its store"
            )
        baseline = (None if meta.get("baseline") is None
                    else baseline_from_dict(meta["baseline"]))
        long = meta.get("long_descriptor")
        gp = cls(Descriptor.from_dict(meta["descriptor"]),
                 Hyperparameters(*meta["hyperparameters"]), bounds=meta["bounds"],
                 max_sparse_per_species=meta["max_sparse_per_species"],
                 long_max_sparse=meta.get("long_max_sparse",
                                          default("model", "long_max_sparse_per_species")),
                 sparse_tolerance=meta["sparse_tolerance"], baseline=baseline,
                 long_descriptor=None if long is None else Descriptor.from_dict(long))
        gp.Z, gp.zs, gp.e0 = arrays["Z"], arrays["zs"].astype(np.int64), arrays["e0"]
        gp._beta, gp._LB, gp._Linv = arrays["beta"], arrays["LB"], arrays["Linv"]
        gp._n_e = int(meta["n_frames"])
        gp._make_blocks(C=arrays["C"])
        gp.extra = meta.get("extra", {})
        gp._fitted = gp.n_sparse > 0
        gp._trainable = False
        return gp


def _damaged(source, err: Exception) -> ConfigError:
    return ConfigError(
        f"{source!r} is not an otfml model file or is truncated/damaged "
        f"({type(err).__name__}: {err}); rebuild it from its store with "
        "`otfml train STORE.h5 -o model.npz`")
