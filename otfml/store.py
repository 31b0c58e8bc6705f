"""Append-only HDF5 store of labelled frames (the source of truth).

Schema version 1 (``DESIGN.md`` §6)::

    /                      attrs: format="otfml-store", schema_version=1,
                                  units (JSON: energy eV, positions Å, forces eV/Å)
    /frames/natoms         (n,)     int32   atoms of each frame
    /frames/offset         (n,)     int64   first row of each frame in /atoms/*
    /frames/energy         (n,)     float64 reference energy, eV
    /frames/charge         (n,)     int32
    /frames/multiplicity   (n,)     int32
    /frames/cell           (n,3,3)  float64 Å
    /frames/pbc            (n,3)    bool
    /frames/step           (n,)     int64   MD/optimizer step of the call (-1 unknown)
    /frames/walker         (n,)     int32
    /frames/max_std        (n,)     float64 model uncertainty when the call was made, eV (NaN: none)
    /frames/time           (n,)     float64 UNIX time of the append
    /frames/fingerprint    (n,)     int32   row of /fingerprints
    /atoms/numbers         (N,)     int32
    /atoms/positions       (N,3)    float64 Å
    /atoms/forces          (N,3)    float64 eV/Å
    /fingerprints          (k,)     str     JSON reference fingerprints

Writes go through HDF5's single-writer/multiple-reader (SWMR) mode: every
append resizes the datasets, writes the atom rows first and the frame rows
last (``/frames/fingerprint`` is the commit marker: a frame exists once its
entry is there) and flushes.  Readers open the file in SWMR-read mode, so
another process can read while a run appends, and a file whose writer was
killed stays readable.  One writer at a time is enforced with an advisory lock
on ``STORE.lock`` that the operating system releases when the writer dies.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
from ase import Atoms

from .errors import StoreError

__all__ = ["Store", "Frame", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
_FORMAT = "otfml-store"
UNITS = {"energy": "eV", "positions": "Angstrom", "forces": "eV/Angstrom",
         "cell": "Angstrom", "max_std": "eV"}

_FRAME_FIELDS = {
    "natoms": ("i4", ()),
    "offset": ("i8", ()),
    "energy": ("f8", ()),
    "charge": ("i4", ()),
    "multiplicity": ("i4", ()),
    "cell": ("f8", (3, 3)),
    "pbc": ("bool", (3,)),
    "step": ("i8", ()),
    "walker": ("i4", ()),
    "max_std": ("f8", ()),
    "time": ("f8", ()),
    "fingerprint": ("i4", ()),  # written last: the commit marker
}
_ATOM_FIELDS = {"numbers": ("i4", ()), "positions": ("f8", (3,)), "forces": ("f8", (3,))}
_MAX_FINGERPRINTS = 1024
_FINGERPRINT_BYTES = 2048


def _h5py():
    import h5py

    return h5py


@dataclass
class Frame:
    """One labelled frame as stored.

    Attributes
    ----------
    atoms : ase.Atoms
        Structure with ``info['charge']``, ``info['multiplicity']``.
    energy : float
        Reference energy, eV.
    forces : ndarray, shape (n_atoms, 3)
        Reference forces, eV/Å.
    fingerprint : dict
        Reference fingerprint (code, version, method, keywords, charge, multiplicity).
    step, walker : int
        Where the call was made.
    max_std : float
        Largest per-atom model std when the call was made, eV (NaN if none).
    time : float
        UNIX time of the append.
    """

    atoms: Atoms
    energy: float
    forces: np.ndarray
    fingerprint: dict
    step: int = -1
    walker: int = 0
    max_std: float = float("nan")
    time: float = 0.0


def fingerprint_key(fp: dict) -> str:
    """Canonical JSON text of a fingerprint (how fingerprints are compared)."""
    return json.dumps(fp, sort_keys=True)


class Store:
    """HDF5 store of labelled frames.

    Parameters
    ----------
    path : str or os.PathLike
        File name.
    mode : {"r", "a"}, default "r"
        ``"r"`` opens an existing store for reading (allowed while another
        process writes); ``"a"`` opens or creates it for appending and takes the
        writer lock.

    Raises
    ------
    StoreError
        The file is missing (mode "r"), not an otfml store, of an unknown schema
        version, or already open by another writer.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r") -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode={mode!r}; use 'r' (read) or 'a' (append)")
        self.path = os.fspath(path)
        self.mode = mode
        self._lock_fh = None
        self._f = None
        h5py = _h5py()
        if mode == "r":
            if not os.path.exists(self.path):
                raise StoreError(f"store {self.path!r} does not exist")
            self._f = self._open_read(h5py)
            self._check_schema()
            return
        self._take_lock()
        try:
            if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
                self._f = self._open_append(h5py)
            else:
                self._f = self._create(h5py)
        except BaseException:
            self._release_lock()
            raise

    # ------------------------------------------------------------------
    def _open_read(self, h5py):
        try:
            return h5py.File(self.path, "r", libver="latest", swmr=True)
        except OSError as err:
            raise StoreError(
                f"{self.path!r} cannot be opened as an HDF5 otfml store ({err}); "
                "is it truncated or another kind of file?"
            ) from err

    def _take_lock(self) -> None:
        lock_path = self.path + ".lock"
        try:
            fh = open(lock_path, "a")
        except OSError as err:
            raise StoreError(
                f"cannot create the lock file {lock_path!r} next to the store ({err}); "
                "is the directory writable?"
            ) from err
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            fh.close()
            raise StoreError(
                f"store {self.path!r} is already open for writing by another process "
                f"(lock {lock_path!r}); one writer per store: wait for it to finish "
                "or use another store file"
            ) from err
        self._lock_fh = fh

    def _release_lock(self) -> None:
        if self._lock_fh is not None:
            fcntl.flock(self._lock_fh, fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    def _create(self, h5py):
        try:
            f = h5py.File(self.path, "w", libver="latest")
        except OSError as err:
            raise StoreError(f"cannot create store {self.path!r} ({err})") from err
        f.attrs["format"] = _FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["units"] = json.dumps(UNITS)
        f.attrs["created"] = time.time()
        fr = f.create_group("frames")
        for name, (dt, shape) in _FRAME_FIELDS.items():
            fr.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt,
                              chunks=(256, *shape))
        at = f.create_group("atoms")
        for name, (dt, shape) in _ATOM_FIELDS.items():
            at.create_dataset(name, shape=(0, *shape), maxshape=(None, *shape), dtype=dt,
                              chunks=(4096, *shape))
        # fixed-length bytes: SWMR appends cannot write variable-length data
        f.create_dataset("fingerprints", shape=(0,), maxshape=(_MAX_FINGERPRINTS,),
                         dtype=f"S{_FINGERPRINT_BYTES}", chunks=(16,))
        f.flush()
        f.swmr_mode = True
        self._f = f
        return f

    def _open_append(self, h5py):
        try:
            f = h5py.File(self.path, "a", libver="latest")
        except OSError as err:
            if "already open for write" not in str(err):
                raise StoreError(
                    f"{self.path!r} cannot be opened as an HDF5 otfml store ({err}); "
                    "is it truncated or another kind of file?"
                ) from err
            # the previous writer died (we hold the lock): its frames are intact
            # but HDF5's "open for write" flag is still set -> recover by copy
            self._recover(h5py)
            f = h5py.File(self.path, "a", libver="latest")
        self._f = f
        self._check_schema()
        self._truncate_uncommitted()
        f.swmr_mode = True
        return f

    def _recover(self, h5py) -> None:
        tmp = self.path + ".recover.tmp"
        with h5py.File(self.path, "r", libver="latest", swmr=True) as src, \
                h5py.File(tmp, "w", libver="latest") as dst:
            for key, val in src.attrs.items():
                dst.attrs[key] = val
            for name in ("frames", "atoms", "fingerprints"):
                if name in src:
                    src.copy(name, dst)
        os.replace(tmp, self.path)
        log.warning("store %s was left open by a writer that died; recovered all "
                    "committed frames", self.path)

    def _check_schema(self) -> None:
        attrs = self._f.attrs
        if attrs.get("format") != _FORMAT:
            raise StoreError(f"{self.path!r} is an HDF5 file but not an otfml store")
        ver = int(attrs.get("schema_version", -1))
        if ver != SCHEMA_VERSION:
            raise StoreError(
                f"store {self.path!r} has schema version {ver}; this otfml reads version "
                f"{SCHEMA_VERSION}. Use the otfml release that wrote it to export the "
                "frames (otfml export) and import them into a new store"
            )

    def _truncate_uncommitted(self) -> None:
        """Drop rows of a frame whose append was interrupted before its commit marker."""
        fr = self._f["frames"]
        n = fr["fingerprint"].shape[0]
        for name in _FRAME_FIELDS:
            if fr[name].shape[0] != n:
                fr[name].resize(n, axis=0)
        n_atoms = int(fr["offset"][n - 1] + fr["natoms"][n - 1]) if n else 0
        for name in _ATOM_FIELDS:
            ds = self._f["atoms"][name]
            if ds.shape[0] != n_atoms:
                ds.resize(n_atoms, axis=0)

    # ------------------------------------------------------------------
    def close(self) -> None:
        """Close the file and release the writer lock."""
        if self._f is not None:
            self._f.close()
            self._f = None
        self._release_lock()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def refresh(self) -> None:
        """See frames appended by a writer since this reader opened the file."""
        if self.mode == "r":
            for grp in ("frames", "atoms"):
                for ds in self._f[grp].values():
                    ds.refresh()
            self._f["fingerprints"].refresh()

    def __len__(self) -> int:
        fr = self._f["frames"]
        # committed frames: those with every per-frame field written
        return min(fr[name].shape[0] for name in _FRAME_FIELDS)

    @property
    def fingerprints(self) -> list[dict]:
        """All reference fingerprints in the store."""
        return [json.loads(s) for s in self._fingerprint_texts()]

    def _fingerprint_texts(self) -> list[str]:
        return [b.decode() for b in self._f["fingerprints"][:]]

    # ------------------------------------------------------------------
    def append(
        self,
        atoms: Atoms,
        energy: float,
        forces: np.ndarray,
        fingerprint: dict,
        step: int = -1,
        walker: int = 0,
        max_std: float = float("nan"),
    ) -> int:
        """Append one labelled frame and flush it to disk.

        Parameters
        ----------
        atoms : ase.Atoms
            The labelled structure; charge and multiplicity are taken from
            ``fingerprint``.
        energy : float
            Reference energy, eV.
        forces : ndarray, shape (n_atoms, 3)
            Reference forces, eV/Å.
        fingerprint : dict
            Reference fingerprint; must contain ``charge`` and ``multiplicity``.
        step, walker : int
            Where the call was made.
        max_std : float
            Largest per-atom model std at the call, eV (NaN if none).

        Returns
        -------
        int
            Index of the new frame.
        """
        if self.mode != "a":
            raise StoreError(f"store {self.path!r} is open read-only")
        forces = np.asarray(forces, dtype=float).reshape(-1, 3)
        n_at = len(atoms)
        if forces.shape[0] != n_at:
            raise StoreError(f"{forces.shape[0]} force rows for {n_at} atoms; frame refused")
        if not (np.isfinite(energy) and np.all(np.isfinite(forces))
                and np.all(np.isfinite(atoms.positions))):
            raise StoreError("frame has NaN/inf energy, forces or positions; refused")
        f = self._f
        fid = self._fingerprint_id(fingerprint)
        n = len(self)
        at = f["atoms"]
        start = at["numbers"].shape[0]
        try:
            for name, val in (("numbers", atoms.numbers), ("positions", atoms.positions),
                              ("forces", forces)):
                ds = at[name]
                ds.resize(start + n_at, axis=0)
                ds[start:] = val
            row = {
                "natoms": n_at, "offset": start, "energy": float(energy),
                "charge": int(fingerprint["charge"]),
                "multiplicity": int(fingerprint["multiplicity"]),
                "cell": atoms.cell.array, "pbc": atoms.pbc, "step": int(step),
                "walker": int(walker), "max_std": float(max_std), "time": time.time(),
                "fingerprint": fid,
            }
            for name in _FRAME_FIELDS:  # "fingerprint" last
                ds = f["frames"][name]
                ds.resize(n + 1, axis=0)
                ds[n] = row[name]
            f.flush()
        except OSError as err:
            raise StoreError(
                f"writing frame {n} to {self.path!r} failed ({err}); frames 0..{n - 1} "
                "are intact. Free disk space or check permissions, then rerun"
            ) from err
        return n

    def _fingerprint_id(self, fp: dict) -> int:
        key = fingerprint_key(fp)
        ds = self._f["fingerprints"]
        existing = self._fingerprint_texts()
        if key in existing:
            return existing.index(key)
        if len(key.encode()) > _FINGERPRINT_BYTES:
            raise StoreError(f"reference fingerprint longer than {_FINGERPRINT_BYTES} bytes: {key}")
        if len(existing) >= _MAX_FINGERPRINTS:
            raise StoreError(f"store {self.path!r} holds {_MAX_FINGERPRINTS} fingerprints")
        ds.resize(len(existing) + 1, axis=0)
        ds[len(existing)] = key.encode()
        return len(existing)

    # ------------------------------------------------------------------
    def frame(self, i: int) -> Frame:
        """Read frame ``i`` (negative indices count from the end)."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"frame {i} out of range: the store holds {n} frames")
        fr = self._f["frames"]
        at = self._f["atoms"]
        start = int(fr["offset"][i])
        stop = start + int(fr["natoms"][i])
        fp = json.loads(self._f["fingerprints"][int(fr["fingerprint"][i])].decode())
        atoms = Atoms(numbers=at["numbers"][start:stop], positions=at["positions"][start:stop],
                      cell=fr["cell"][i], pbc=fr["pbc"][i])
        atoms.info["charge"] = int(fr["charge"][i])
        atoms.info["multiplicity"] = int(fr["multiplicity"][i])
        return Frame(atoms=atoms, energy=float(fr["energy"][i]),
                     forces=np.array(at["forces"][start:stop]), fingerprint=fp,
                     step=int(fr["step"][i]), walker=int(fr["walker"][i]),
                     max_std=float(fr["max_std"][i]), time=float(fr["time"][i]))

    def __iter__(self):
        for i in range(len(self)):
            yield self.frame(i)

    def summary(self) -> dict:
        """Counts, species and fingerprints of the store (for ``otfml info``)."""
        from ase.data import chemical_symbols

        n = len(self)
        fr = self._f["frames"]
        n_atoms = int(fr["offset"][n - 1] + fr["natoms"][n - 1]) if n else 0
        numbers = self._f["atoms"]["numbers"][:n_atoms]
        fp_ids = fr["fingerprint"][:n]
        fps = self.fingerprints
        return {
            "path": self.path,
            "schema_version": int(self._f.attrs["schema_version"]),
            "units": json.loads(self._f.attrs["units"]),
            "frames": n,
            "atoms": n_atoms,
            "species": {chemical_symbols[int(z)]: int(c)
                        for z, c in zip(*np.unique(numbers, return_counts=True))},
            "fingerprints": [
                {**fp, "frames": int(np.sum(fp_ids == k))} for k, fp in enumerate(fps)
            ],
            "energy_range_eV": [float(fr["energy"][:n].min()), float(fr["energy"][:n].max())]
            if n else None,
        }
