"""What keeps a store whole: one writer (a lock), commits that survive kill -9, and repair
after a failed write (disk full)."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import struct

import numpy as np

from .errors import StoreError

log = logging.getLogger(__name__)

_DATASETS = ("frames", "atoms", "fingerprints", "committed")
_SUPERBLOCK_V2_BYTES = 48  # signature, versions, 4 addresses, checksum


class _CrashSafety:
    """The part of :class:`otfml.store.Store` that guards the file: the writer lock,
    truncation checks, recovery after a dead writer and repair after a failed write."""

    def _recorded_eof(self) -> tuple[int, int]:
        """File size and the end-of-file HDF5's superblock records (0 if unknown)."""
        with open(self.path, "rb") as fh:
            head = fh.read(_SUPERBLOCK_V2_BYTES)
            size = os.fstat(fh.fileno()).st_size
        if len(head) < _SUPERBLOCK_V2_BYTES or head[:8] != b"\x89HDF\r\n\x1a\n":
            return size, 0  # not HDF5: h5py names the problem
        if head[8] not in (2, 3) or head[9] != 8:
            return size, 0  # superblock layout otfml does not write
        return size, struct.unpack_from("<Q", head, 28)[0]

    def _check_not_truncated(self) -> None:
        """Refuse a file shorter than the end-of-file its HDF5 superblock records.

        HDF5 skips this check for SWMR readers, so a truncated copy would read as
        zeros. A live writer never leaves the file shorter than the recorded end;
        a write that failed (disk full) does: ``repair=True`` mends that.
        """
        size, eof = self._recorded_eof()
        if size < eof:
            raise StoreError(
                f"store {self.path!r} is truncated: the file has {size} bytes but HDF5 "
                f"recorded {eof}. Either it was cut short while being copied (copy it again "
                "from the original) or a write failed on a full disk: then free space and "
                f"run `otfml info --repair {self.path}`, which keeps every committed frame"
            )

    def _repair_after_failed_write(self, h5py) -> None:
        """Extend a file a failed write (disk full) left shorter than HDF5 recorded.

        The committed frames were flushed before the failure; the missing tail only
        held the interrupted frame, which is dropped on opening. Every committed
        frame is read back before the repair is accepted; otherwise the file is
        cut back to its size and the store refused (e.g. a truncated copy).
        """
        size, eof = self._recorded_eof()
        if size >= eof:
            return
        try:
            os.truncate(self.path, eof)
        except OSError as err:
            raise StoreError(
                f"store {self.path!r} is {eof - size} bytes short after a failed write "
                f"and cannot be extended ({err}); free disk space and retry") from err
        try:
            try:  # not SWMR: its readers retry bad metadata for minutes instead of failing
                f = h5py.File(self.path, "r", libver="latest")
            except OSError as err:
                if "already open for write" not in str(err):
                    raise
                f = h5py.File(self.path, "r", libver="latest", swmr=True)  # writer died
            with f:
                self._f = f
                self._check_schema()
                n = self._check_committed()
        except Exception as err:
            os.truncate(self.path, size)
            raise StoreError(
                f"store {self.path!r} is truncated ({size} of {eof} bytes) and its "
                f"committed frames are not all in the part that is left ({err}); it cannot "
                "be repaired. Copy it again from the original, or use a backup") from err
        finally:
            self._f = None
        log.warning("store %s: repaired after a failed write (disk full?): %d bytes "
                    "restored, all %d committed frames read back", self.path, eof - size, n)

    def _check_committed(self) -> int:
        """Read back every committed frame; raise if any is inconsistent."""
        # every chunk, committed or not, so that HDF5 checks all metadata checksums
        data = {name: self._f[name][:] for name in _DATASETS}
        n = int(data["committed"][0])
        fr = data["frames"][:n]
        ends = np.cumsum(fr["natoms"])
        ok = (n <= len(data["frames"]) and np.all(fr["natoms"] > 0)
              and np.array_equal(fr["offset"], ends - fr["natoms"])
              and (not n or ends[-1] <= len(data["atoms"])))
        if ok and n:
            at = data["atoms"][: int(ends[-1])]
            ok = bool(np.all((at["number"] > 0) & (at["number"] < 119))
                      and np.all(np.isfinite(at["position"])) and np.all(np.isfinite(at["force"]))
                      and np.all(np.isfinite(fr["energy"]))
                      and np.all(fr["fingerprint"] < len(data["fingerprints"])))
            for b in data["fingerprints"]:
                json.loads(b.decode())
        if not ok:
            raise StoreError("the frame table is inconsistent")
        return n

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

    def _recover(self, h5py) -> None:
        tmp = self.path + ".recover.tmp"
        with h5py.File(self.path, "r", libver="latest", swmr=True) as src, \
                h5py.File(tmp, "w", libver="latest") as dst:
            for key, val in src.attrs.items():
                dst.attrs[key] = val
            for name in _DATASETS:
                if name in src:
                    src.copy(name, dst)
        os.replace(tmp, self.path)
        log.warning("store %s was left open by a writer that died; recovered all "
                    "committed frames", self.path)

    def _truncate_uncommitted(self) -> None:
        """Drop rows of a frame whose append was interrupted before its commit."""
        n = len(self)
        fr = self._f["frames"]
        if fr.shape[0] != n:
            fr.resize((n,))
        n_atoms = int(fr[n - 1]["offset"] + fr[n - 1]["natoms"]) if n else 0
        if self._f["atoms"].shape[0] != n_atoms:
            self._f["atoms"].resize((n_atoms,))

    def _abandon(self) -> None:
        """Detach from the file after a failed write, leaving it as the failure left it.

        HDF5 retries its failed writes when the file is closed (and can crash at exit
        doing so). Its descriptor is pointed at an in-memory scratch file instead, so
        nothing touches the store any more and the lock can be released;
        ``repair=True`` mends the file later.
        """
        f, self._f = self._f, None
        try:
            fd = f.id.get_vfd_handle()
            scratch = os.memfd_create("otfml-abandoned-store")
            os.dup2(scratch, fd)
            os.close(scratch)
            # closed by close(), writing only to the scratch file
            self._abandoned, self._ds = (f, self._ds), {}
        except (OSError, RuntimeError, ValueError) as err:
            log.debug("detaching %s after a failed write: %s", self.path, err)
        self._release_lock()

