"""Append-only HDF5 store of labelled frames (the source of truth).

Schema version 2 (``docs/design.md``)::

    /                 attrs: format="otfml-store", schema_version=2,
                             units (JSON: energy eV, positions Å, forces eV/Å)
    /frames           (n,) compound, one row per frame:
                        natoms i4, offset i8 (first row in /atoms), energy f8 (eV),
                        charge i4, multiplicity i4, cell (3,3) f8 (Å), pbc (3,) bool,
                        step i8 (-1 unknown), walker i4,
                        max_std f8 (largest per-atom force-error estimate at the
                                    call, eV/Å; NaN: no model yet),
                        time f8 (UNIX), fingerprint i4 (row of /fingerprints),
                        model_version i8 (the model version the walker of a parallel
                                          run predicted with when it asked; -1: none)
    /atoms            (N,) compound, one row per atom: number i4, position (3,) f8 (Å),
                        force (3,) f8 (eV/Å)
    /fingerprints     (k,) bytes, JSON reference fingerprints
    /committed        (1,) i8, number of complete frames

Version 1 stores (without ``model_version``) are read and appended to as they are.

Writes go through HDF5's single-writer/multiple-reader (SWMR) mode: an append
writes the atom rows, then the frame row, flushes, and only then raises
``/committed`` and flushes again.  Readers see ``/committed`` frames, so a
frame is either entirely there or not at all; another process can read while
a run appends, and a file whose writer was killed stays readable.  One writer
at a time is enforced with an advisory lock on ``STORE.lock`` that the
operating system releases when the writer dies.
"""

from __future__ import annotations

import json
import logging
import os
import time

import numpy as np
from ase import Atoms

from ._store_safety import _DATASETS, _CrashSafety
from ._store_schema import (
    _ATOM_DTYPE,
    _FINGERPRINT_BYTES,
    _FORMAT,
    _FRAME_DTYPE,
    _MAX_FINGERPRINTS,
    _READS,
    SCHEMA_VERSION,
    UNITS,
    Frame,
    fingerprint_key,
)
from .errors import StoreError

__all__ = ["Store", "Frame", "SCHEMA_VERSION"]

log = logging.getLogger(__name__)



def _h5py():
    import h5py

    return h5py


class Store(_CrashSafety):
    """HDF5 store of labelled frames.

    Parameters
    ----------
    path : str or os.PathLike
        File name.
    mode : {"r", "a"}, default "r"
        ``"r"`` opens an existing store for reading (allowed while another
        process writes); ``"a"`` opens or creates it for appending and takes the
        writer lock.
    repair : bool, default False
        With ``"a"``: repair a store a failed write (disk full) left short, after
        reading back every committed frame (``otfml info --repair``).

    Raises
    ------
    StoreError
        The file is missing (mode "r"), not an otfml store, of an unknown schema
        version, or already open by another writer.
    """

    def __init__(self, path: str | os.PathLike, mode: str = "r", repair: bool = False) -> None:
        if mode not in ("r", "a"):
            raise ValueError(f"mode={mode!r}; use 'r' (read) or 'a' (append)")
        self.path = os.fspath(path)
        self.mode = mode
        self._lock_fh = None
        self._f = None
        self._repair = repair and mode == "a"
        self._abandoned = None
        self._ds: dict = {}
        #: set when a write failed; further appends are refused until reopened
        self._failed: str | None = None
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
        self._check_not_truncated()
        try:
            return h5py.File(self.path, "r", libver="latest", swmr=True)
        except OSError as err:
            raise StoreError(
                f"{self.path!r} cannot be opened as an HDF5 otfml store ({err}); "
                "is it truncated or another kind of file?"
            ) from err

    def _create(self, h5py):
        try:
            f = h5py.File(self.path, "w", libver="latest")
        except OSError as err:
            raise StoreError(f"cannot create store {self.path!r} ({err})") from err
        f.attrs["format"] = _FORMAT
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["units"] = json.dumps(UNITS)
        f.attrs["created"] = time.time()
        f.create_dataset("frames", shape=(0,), maxshape=(None,), dtype=_FRAME_DTYPE,
                         chunks=(256,))
        f.create_dataset("atoms", shape=(0,), maxshape=(None,), dtype=_ATOM_DTYPE,
                         chunks=(4096,))
        f.create_dataset("committed", data=np.zeros(1, dtype="i8"))
        # fixed-length bytes: SWMR appends cannot write variable-length data
        f.create_dataset("fingerprints", shape=(0,), maxshape=(_MAX_FINGERPRINTS,),
                         dtype=f"S{_FINGERPRINT_BYTES}", chunks=(16,))
        f.flush()
        f.swmr_mode = True
        self._f = f
        self._bind()
        return f

    def _bind(self) -> None:
        self._ds = {name: self._f[name] for name in _DATASETS}

    def _open_append(self, h5py):
        if not os.access(self.path, os.W_OK):
            raise StoreError(
                f"store {self.path!r} is read-only for this user (permission denied); its "
                "frames can be read (otfml info/export, or a warm start from a copy). Fix the "
                "permissions or set store.path to a writable location")
        if self._repair:
            self._repair_after_failed_write(h5py)
        else:
            self._check_not_truncated()
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
        self._bind()
        return f

    def _check_schema(self) -> None:
        attrs = self._f.attrs
        if attrs.get("format") != _FORMAT:
            raise StoreError(f"{self.path!r} is an HDF5 file but not an otfml store")
        ver = int(attrs.get("schema_version", -1))
        if ver not in _READS:
            raise StoreError(
                f"store {self.path!r} has schema version {ver}; this otfml reads versions "
                f"{', '.join(map(str, _READS))}. Use the otfml release that wrote it to export the "
                "frames (otfml export) and import them into a new store"
            )

    def close(self) -> None:
        """Close the file and release the writer lock."""
        try:
            if self._f is not None:
                f, self._f = self._f, None
                f.close()
        finally:
            self._release_lock()
        self._ds = {}
        if self._abandoned is not None:
            (f, ds), self._abandoned = self._abandoned, None
            try:
                ds.clear()
                f.close()
            except (OSError, RuntimeError) as err:
                log.debug("closing the detached %s: %s", self.path, err)

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
            for name in _DATASETS:
                self._f[name].refresh()

    def __len__(self) -> int:
        return int(self._f["committed"][0])

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
        model_version: int = -1,
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
            Largest per-atom force-error estimate at the call, eV/Å (NaN if none).
        model_version : int
            The model version a parallel walker asked with (-1: none; not kept in a
            version 1 store).

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
        if self._failed:
            raise StoreError(f"store {self.path!r}: an earlier write failed ({self._failed}); "
                             "no more frames are written in this session. Free disk space, "
                             f"run `otfml info --repair {self.path}`, then rerun or resume")
        f = self._f
        n = len(self)
        # persistent handles: a dataset closed while a write fails stays a zombie in
        # HDF5 that crashes the interpreter at exit
        ds = self._ds
        start = ds["atoms"].shape[0]
        rows = np.zeros(n_at, dtype=_ATOM_DTYPE)
        rows["number"] = atoms.numbers
        rows["position"] = atoms.positions
        rows["force"] = forces
        frame = np.zeros(1, dtype=ds["frames"].dtype)  # a version 1 store's rows as they are
        try:
            fid = self._fingerprint_id(fingerprint)
            values = {"natoms": n_at, "offset": start, "energy": float(energy),
                      "charge": int(fingerprint["charge"]),
                      "multiplicity": int(fingerprint["multiplicity"]),
                      "cell": atoms.cell.array, "pbc": atoms.pbc, "step": int(step),
                      "walker": int(walker), "max_std": float(max_std), "time": time.time(),
                      "fingerprint": fid, "model_version": int(model_version)}
            for name in frame.dtype.names:
                frame[name] = values[name]
            ds["atoms"].resize((start + n_at,))
            ds["atoms"][start:] = rows
            ds["frames"].resize((n + 1,))
            ds["frames"][n] = frame[0]
            f.flush()
            ds["committed"][0] = n + 1  # the commit: the frame now exists
            f.flush()
        except StoreError:
            raise
        except (OSError, RuntimeError) as err:  # h5py reports failed flushes as RuntimeError
            self._failed = str(err)
            self._abandon()
            why = " ".join(str(err).split())
            raise StoreError(
                f"writing frame {n} to {self.path!r} failed ({why}); frames 0..{n - 1} "
                "are intact and are kept. Free disk space (or fix the permissions or quota), "
                f"run `otfml info --repair {self.path}`, then rerun or resume"
            ) from err
        return n

    def _fingerprint_id(self, fp: dict) -> int:
        key = fingerprint_key(fp)
        ds = self._ds["fingerprints"]
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
        try:
            row = self._f["frames"][i]
            start = int(row["offset"])
            at = self._f["atoms"][start: start + int(row["natoms"])]
            fp = json.loads(self._f["fingerprints"][int(row["fingerprint"])].decode())
        except (OSError, ValueError, IndexError) as err:
            raise StoreError(
                f"frame {i} of store {self.path!r} cannot be read ({type(err).__name__}: "
                f"{err}); the file is damaged. Frames before it may still be exported "
                "with `otfml export`"
            ) from err
        if len(at) != int(row["natoms"]):
            raise StoreError(f"frame {i} of store {self.path!r} is damaged: "
                             f"{len(at)} atom rows instead of {int(row['natoms'])}")
        atoms = Atoms(numbers=at["number"], positions=at["position"], cell=row["cell"],
                      pbc=row["pbc"])
        atoms.info["charge"] = int(row["charge"])
        atoms.info["multiplicity"] = int(row["multiplicity"])
        return Frame(atoms=atoms, energy=float(row["energy"]), forces=np.array(at["force"]),
                     fingerprint=fp, step=int(row["step"]), walker=int(row["walker"]),
                     max_std=float(row["max_std"]), time=float(row["time"]),
                     model_version=(int(row["model_version"]) if "model_version" in
                                    row.dtype.names else -1))

    def __iter__(self):
        for i in range(len(self)):
            yield self.frame(i)

    def summary(self) -> dict:
        """Counts, species and fingerprints of the store (for ``otfml info``)."""
        from ase.data import chemical_symbols

        n = len(self)
        fr = self._f["frames"][:n]
        n_atoms = int(fr[-1]["offset"] + fr[-1]["natoms"]) if n else 0
        numbers = self._f["atoms"]["number"][:n_atoms] if n_atoms else np.zeros(0, int)
        fp_ids = fr["fingerprint"]
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
            "energy_range_eV": [float(fr["energy"].min()), float(fr["energy"].max())]
            if n else None,
        }
