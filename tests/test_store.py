import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from ase.build import molecule

from otfml.errors import StoreError
from otfml.store import Store

FP = {"code": "MOPAC", "version": "22.0.6", "method": "PM7", "keywords": "", "charge": 0,
      "multiplicity": 1}


def _frame(k):
    a = molecule("CH3CH2OH" if k % 2 == 0 else "H2O")
    rng = np.random.default_rng(k)
    a.positions += rng.normal(scale=0.05, size=a.positions.shape)
    return a, float(rng.normal()), rng.normal(size=(len(a), 3))


def test_round_trip_is_bit_exact(tmp_path):
    path = tmp_path / "s.h5"
    with Store(path, "a") as st:
        for k in range(5):
            a, e, f = _frame(k)
            assert st.append(a, e, f, FP, step=10 * k, max_std=0.1 * k) == k
    with Store(path) as st:
        assert len(st) == 5
        for k in range(5):
            a, e, f = _frame(k)
            fr = st.frame(k)
            np.testing.assert_array_equal(fr.atoms.positions, a.positions)
            np.testing.assert_array_equal(fr.atoms.numbers, a.numbers)
            np.testing.assert_array_equal(fr.forces, f)
            assert fr.energy == e and fr.step == 10 * k and fr.fingerprint == FP
        s = st.summary()
        assert s["frames"] == 5 and s["species"] == {"H": 22, "C": 6, "O": 5}
        assert s["units"]["forces"] == "eV/Angstrom" and s["schema_version"] == 2


def test_second_writer_is_refused_reader_allowed(tmp_path):
    path = tmp_path / "s.h5"
    with Store(path, "a") as st:
        st.append(*_frame(0), FP)
        with pytest.raises(StoreError, match="already open for writing"):
            Store(path, "a")
        # a reader in another process sees the frame while the writer is open
        out = subprocess.run(
            [sys.executable, "-c",
             f"from otfml.store import Store; print(len(Store({str(path)!r})))"],
            capture_output=True, text=True, check=True)
        assert out.stdout.strip() == "1"
        st.append(*_frame(1), FP)
    with Store(path, "a") as st:  # lock released on close
        assert len(st) == 2


WRITER = """
import sys, numpy as np
from ase.build import molecule
from otfml.store import Store
st = Store(sys.argv[1], "a")
fp = {"code": "X", "version": "1", "method": "m", "keywords": "", "charge": 0, "multiplicity": 1}
k = start = len(st)
while True:
    a = molecule("CH3CH2OH"); a.positions += 0.001 * k
    st.append(a, float(k), np.full((9, 3), float(k)), fp, step=k)
    k += 1
    if k == start + 5:
        print("ready", flush=True)
"""


KILLS = 12


def test_survives_sigkill_during_appends(tmp_path, tally):
    """kill -9 mid-append, repeatedly: the store opens and keeps every committed frame."""
    path = str(tmp_path / "s.h5")
    script = tmp_path / "w.py"
    script.write_text(WRITER)
    seen = 0
    for rep in range(KILLS):
        p = subprocess.Popen([sys.executable, str(script), path], stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(0.05 + 0.031 * rep)  # kill at varying points of the append cycle
        with Store(path) as reader:  # concurrent reader during heavy appends
            assert len(reader) >= seen
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
        with Store(path) as st:
            n = len(st)
            assert n > seen
            for k in range(n):  # every frame intact, bit for bit
                fr = st.frame(k)
                assert fr.energy == float(k)
                np.testing.assert_array_equal(fr.forces, np.full((9, 3), float(k)))
        seen = n
    with Store(path, "a") as st:  # a new writer recovers and appends after the kills
        assert len(st) == seen
        st.append(*_frame(0), FP)
        assert len(st) == seen + 1
    tally("SIGKILLs of a writer mid-append (reader open), store intact", KILLS)


def test_foreign_and_truncated_files_give_clear_errors(tmp_path):
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\x00" * 100)
    with pytest.raises(StoreError, match="cannot be opened"):
        Store(junk)
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = 1
    with pytest.raises(StoreError, match="not an otfml store"):
        Store(other)
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "missing.h5")


def test_other_schema_version_is_refused(tmp_path):
    path = tmp_path / "s.h5"
    with Store(path, "a") as st:
        st.append(*_frame(0), FP)
    with h5py.File(path, "r+", libver="latest") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(StoreError, match="schema version 99"):
        Store(path)


def test_a_version_1_store_is_read_and_appended_to_as_it_is(tmp_path):
    """Stores written before the model_version column (schema 1) keep their rows: frames
    read with model_version -1, and new frames are appended in the old layout."""
    path = tmp_path / "s.h5"
    with Store(path, "a") as st:
        st.append(*_frame(0), FP, model_version=7)
        assert st.frame(0).model_version == 7
    with h5py.File(path, "r+", libver="latest") as f:
        old = f["frames"][:]
        v1 = np.dtype([d for d in old.dtype.descr if d[0] != "model_version"])
        del f["frames"]
        f.create_dataset("frames", data=old[list(v1.names)].astype(v1), maxshape=(None,),
                         chunks=(256,))
        f.attrs["schema_version"] = 1
    with Store(path, "a") as st:
        st.append(*_frame(1), FP, model_version=3)
        assert len(st) == 2 and [fr.model_version for fr in st] == [-1, -1]
        np.testing.assert_array_equal(st.frame(1).forces, _frame(1)[2])


def test_nan_frame_refused_store_intact(tmp_path):
    path = tmp_path / "s.h5"
    with Store(path, "a") as st:
        st.append(*_frame(0), FP)
        a, e, f = _frame(2)
        with pytest.raises(StoreError, match="NaN"):
            st.append(a, float("nan"), f, FP)
        assert len(st) == 1
