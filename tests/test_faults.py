"""Fault injection: reference failures provoked in the real MOPAC, hostile geometries,
disk full, read-only places, damaged files and bad structures. Each must give a clear
error, store nothing wrong, and leave the store intact (bit for bit).

Counts of what was injected go to the ``tally`` fixture (see conftest) and from a full
passing run into docs/reliability.md.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import yaml
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.io import write

from otfml.cli import main
from otfml.errors import (
    ConfigError,
    FingerprintMismatch,
    ReferenceFailed,
    StoreError,
    UnphysicalGeometry,
)
from otfml.learner import Learner
from otfml.policy import LearningPolicy
from otfml.reference import CalculatorReference, MopacReference
from otfml.store import Store

from .conftest import mopac

MOPAC_EXE = shutil.which("mopac") or "mopac"
REF_FAULTS = "reference (MOPAC) faults injected"
GEOMETRY = "hostile geometries refused before the reference"
STORE_FAULTS = "store faults injected (disk full, read-only, damaged files)"
BAD_INPUT = "bad structures and files tried"


def _snapshot(path):
    with Store(path) as st:
        return [(fr.atoms.numbers.copy(), fr.atoms.positions.copy(), fr.energy,
                 fr.forces.copy(), fr.fingerprint) for fr in st]


def assert_intact(path, before):
    """Same frames bit for bit, and the lock released (a writer can open it)."""
    with Store(path, "a"):
        pass
    after = _snapshot(path)
    assert len(after) == len(before)
    for a, b in zip(after, before):
        for x, y in zip(a, b):
            if isinstance(x, np.ndarray):
                np.testing.assert_array_equal(x, y)
            else:
                assert x == y


@pytest.fixture(scope="module")
def good_store(tmp_path_factory):
    """Three real MOPAC PM7 labels of ethanol in a store."""
    if not (os.environ.get("ASE_MOPAC_COMMAND") or shutil.which("mopac")):
        pytest.skip("MOPAC is not installed")
    d = tmp_path_factory.mktemp("good")
    path = str(d / "s.h5")
    learner = Learner(MopacReference(workdir=str(d)), store=path)
    for seed in range(3):
        a = molecule("CH3CH2OH")
        a.rattle(0.05, seed=seed)
        learner.request_reference = True
        assert learner.step(a).source == "reference"
    learner.close()
    return path


@pytest.fixture
def store(good_store, tmp_path):
    path = str(tmp_path / "s.h5")
    shutil.copy(good_store, path)
    return path, _snapshot(path)


def _wrapper(tmp_path, body):
    """A MOPAC command: a shell script around the real MOPAC that logs each call."""
    script = tmp_path / "mopac.sh"
    script.write_text(f"#!/bin/sh\necho call >> {tmp_path}/calls.log\n{body}\n")
    script.chmod(0o755)
    return f"{script} PREFIX.mop"


def _calls(tmp_path):
    log = tmp_path / "calls.log"
    return len(log.read_text().split()) if log.exists() else 0


def _hard_scf():
    a = molecule("CH3CH2OH")
    a.rattle(0.2, seed=3)  # MOPAC needs more than 3 SCF cycles here
    return a


RUN = f"{MOPAC_EXE} PREFIX.mop > /dev/null 2>&1"
REFERENCE_CASES = {
    # id: (MopacReference options, structure, exception, message pattern)
    "scf-unconverged": (dict(keywords="ITRY=3 SHIFT=0", scf_retries=()), _hard_scf,
                        ReferenceFailed, r"SCF did not converge \(UNABLE TO ACHIEVE"),
    "scf-job-continuing": (dict(keywords="ITRY=8", scf_retries=()), _hard_scf,
                           ReferenceFailed, r"JOB CONTINUING: MOPAC went on with an unconverged"),
    "scf-zero-iterations": (dict(keywords="ITRY=2", scf_retries=()), _hard_scf,
                            ReferenceFailed, r"ran no SCF calculation \(SCF CALCULATIONS = 0\)"),
    # MOPAC behind a 31.7 s sleep: a real run, however loaded the machine, cannot beat the
    # limit (with timeout 0.005 s and no sleep, a machine too busy to run the waiting
    # thread for 20 ms let MOPAC finish first, once in ~20 runs under load); the test
    # checks that the sleep, in the command's process group, was killed with it
    "timeout": (dict(command=f"sh -c 'sleep 31.7; {RUN}'", timeout=0.5), _hard_scf,
                ReferenceFailed, r"did not finish within reference.timeout_s = 0.5 s and was "
                                 r"killed"),
    "killed": (dict(command=f"sh -c '{MOPAC_EXE} PREFIX.mop >/dev/null 2>&1 & p=$!; "
                            "kill -9 $p; wait $p'"),
               _hard_scf, ReferenceFailed, r"killed by signal SIGKILL \(exit code 137\)"),
    "truncated-output": (dict(command=f"sh -c '{RUN}; head -c 1500 mopac.out > t; "
                                      "mv t mopac.out'"),
                         _hard_scf, ReferenceFailed, r"output could not be read .* truncated"),
    "garbage-output": (dict(command=f"sh -c '{RUN}; head -c 3000 /dev/urandom > mopac.out'"),
                       _hard_scf, ReferenceFailed, r"output could not be read"),
    "command-not-found": (dict(command="sh -c 'exec /nonexistent/mopac PREFIX.mop'"),
                          _hard_scf, ReferenceFailed, r"(?s)code 127 \(the shell could not run "
                          r"it: command not found\).*no mopac.out was written"),
    "other-method": (dict(method="PM6"), _hard_scf, FingerprintMismatch,
                     r"method: 'PM7' -> 'PM6'.*never mixed: use a new store"),
}


def _processes_running(cmdline_part: str) -> list[int]:
    """PIDs whose command line (NUL-separated, from /proc) contains ``cmdline_part``."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as fh:
                    if cmdline_part.encode() in fh.read():
                        pids.append(int(d))
            except OSError:  # gone meanwhile
                pass
    return pids


@mopac
@pytest.mark.parametrize("case", sorted(REFERENCE_CASES))
def test_reference_failure_is_clear_and_stores_nothing(store, tmp_path, case, tally):
    path, before = store
    options, build, exc, pattern = REFERENCE_CASES[case]
    ref = MopacReference(workdir=str(tmp_path / "work"), **options)
    learner = Learner(ref, store=path)  # warm start from the three good frames
    learner.request_reference = True
    with pytest.raises(exc, match=pattern) as err:
        learner.step(build())
    if exc is ReferenceFailed:
        assert "MOPAC failed for C2H6O (step 1; shortest distance" in str(err.value)
    assert learner.n_calls == 0 and learner.model.n_frames == 3
    if case == "timeout":  # the whole process group went, not only the shell
        assert _processes_running("sleep\x0031.7") == [], "the timed-out command's sleep survived"
    learner.close()
    assert_intact(path, before)
    tally(REF_FAULTS)


@mopac
@pytest.mark.parametrize("keywords", ["ITRY=3 SHIFT=0", "ITRY=8", "ITRY=2"])
def test_scf_failures_are_rescued_by_the_default_retries(tmp_path, keywords, tally):
    a = _hard_scf()
    good = MopacReference(workdir=str(tmp_path / "good")).compute(a)
    ref = MopacReference(keywords=keywords, workdir=str(tmp_path / "retry"))
    label = ref.compute(a)
    assert ref.n_rescued == 1
    assert abs(label.energy - good.energy) < 1e-3
    np.testing.assert_allclose(label.forces, good.forces, atol=1e-2)
    assert os.listdir(tmp_path / "retry") == []  # failed attempts cleaned up once rescued
    tally(REF_FAULTS)


def _flag_wrapper(tmp_path):
    """Real MOPAC, killed with SIGKILL while the file ``fail`` exists."""
    return _wrapper(tmp_path, f'if [ -e {tmp_path}/fail ]; then {MOPAC_EXE} "$1" '
                              '>/dev/null 2>&1 & p=$!; kill -9 $p; wait $p; exit $?; fi\n'
                              f'exec {MOPAC_EXE} "$1" >/dev/null 2>&1')


@mopac
def test_use_model_goes_on_through_failures_then_stops(store, tmp_path, tally):
    """on_reference_failure: use_model -- the step uses the prediction, nothing is stored;
    more than max_consecutive_failures in a row stops; a success resets the count."""
    path, before = store
    ref = MopacReference(command=_flag_wrapper(tmp_path), workdir=str(tmp_path / "w"))
    policy = LearningPolicy(on_reference_failure="use_model", max_consecutive_failures=2)
    learner = Learner(ref, store=path, policy=policy)
    a = molecule("CH3CH2OH")
    (tmp_path / "fail").touch()
    for k in (1, 2):
        learner.request_reference = True
        r = learner.step(a)
        assert (r.source, r.reason) == ("model", "reference failed")
        assert np.all(np.isfinite(r.forces)) and learner.failures_in_a_row == k
    assert len(_snapshot(path)) == len(before)  # read while the run goes on
    learner.request_reference = True
    with pytest.raises(ReferenceFailed, match="killed by signal SIGKILL"):
        learner.step(a)
    (tmp_path / "fail").unlink()
    learner.request_reference = True
    assert learner.step(a).source == "reference"
    assert learner.failures_in_a_row == 0 and learner.n_failures == 3
    learner.close()
    assert len(_snapshot(path)) == len(before) + 1
    assert _calls(tmp_path) == 4
    tally(REF_FAULTS, 3)


@mopac
def test_a_failed_call_leaves_the_model_as_it_was(store, tmp_path, tally):
    """The update is prepared while MOPAC runs (model.overlap_update, the default): its
    geometry's new sparse environments join the model before the labels come. When MOPAC
    fails, they leave again, so the model ends as one that never saw the failed call."""
    path, before = store
    shutil.copy(path, tmp_path / "twin.h5")
    ref = MopacReference(command=_flag_wrapper(tmp_path), workdir=str(tmp_path / "w"))
    learner = Learner(ref, store=path, policy=LearningPolicy(on_reference_failure="use_model"))
    twin = Learner(MopacReference(workdir=str(tmp_path / "t")), store=str(tmp_path / "twin.h5"))
    if not learner._overlap:
        pytest.skip("the overlap needs two CPUs")
    a = molecule("CH3CH2OH")
    a.rattle(0.15, seed=7)  # new environments
    M = learner.model.n_sparse
    (tmp_path / "fail").touch()
    learner.request_reference = True
    assert learner.step(a).reason == "reference failed"
    assert learner.model.n_sparse == M and learner.model.n_frames == 3
    (tmp_path / "fail").unlink()
    for lrn in (learner, twin):
        lrn.request_reference = True
        assert lrn.step(a).source == "reference"
    assert learner.model.n_sparse == twin.model.n_sparse > M
    b = molecule("CH3CH2OH")
    b.rattle(0.1, seed=8)
    p, q = learner.model.predict(b), twin.model.predict(b)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-8)
    np.testing.assert_allclose(p.novelty, q.novelty, atol=1e-8)
    learner.close()
    twin.close()
    assert len(_snapshot(path)) == len(before) + 1
    tally(REF_FAULTS)


@mopac
def test_stop_is_the_default_on_reference_failure(store, tmp_path, tally):
    path, before = store
    ref = MopacReference(command=_flag_wrapper(tmp_path), workdir=str(tmp_path / "w"))
    learner = Learner(ref, store=path)
    (tmp_path / "fail").touch()
    learner.request_reference = True
    with pytest.raises(ReferenceFailed, match="killed by signal"):
        learner.step(molecule("CH3CH2OH"))
    learner.close()
    assert_intact(path, before)
    tally(REF_FAULTS)


class _ShiftedEMT(EMT):
    """EMT whose energies jump by ``shift`` eV: a reference that 'succeeds' wrongly."""

    shift = 0.0

    def calculate(self, *args, **kwargs):
        super().calculate(*args, **kwargs)
        self.results["energy"] += self.shift


def _labelled(learner: Learner, n: int = 3) -> Learner:
    """``learner`` after reference labels of ``n`` rattled ethanol geometries."""
    for seed in range(n):
        b = molecule("CH3CH2OH")
        b.rattle(0.03, seed=seed)
        learner.request_reference = True
        learner.step(b)
    return learner


def test_implausible_label_is_refused_not_stored(tmp_path, tally):
    calc = _ShiftedEMT()
    path = str(tmp_path / "s.h5")
    policy = LearningPolicy(force_tolerance=0.05, allow_fragmentation=True)
    learner = _labelled(Learner(CalculatorReference(calc), store=path, policy=policy), 4)
    a = molecule("CH3CH2OH")
    before = _snapshot(path)
    calc.shift = 40.0  # 4.4 eV/atom: what a false 'success' of the reference looks like
    learner.request_reference = True
    with pytest.raises(ReferenceFailed, match=r"step 5: implausible reference label: .* "
                                              r"4\.\d+ eV/atom apart .*label_check = 1.0"):
        learner.step(a)
    learner.close()
    assert_intact(path, before)
    tally(REF_FAULTS)


def _collapsed():
    a = molecule("CH3CH2OH")
    a.positions[3] = a.positions[0] + [0.1, 0.0, 0.0]
    return a


def _fragment():
    a = molecule("CH3CH2OH")
    out = a.positions[8] - a.positions.mean(axis=0)
    a.positions[8] += 2.0 * out / np.linalg.norm(out)  # the H pulled 2 Å further out
    return a


def _exploded():
    a = molecule("CH3CH2OH")
    a.positions *= 3.0
    return a


GEOMETRY_CASES = {
    "collapsed": (_collapsed, UnphysicalGeometry,
                  r"step 1: atoms 0 \(C\) and 3 \(H\) are 0.100 Å apart"),
    "fragmented": (_fragment, UnphysicalGeometry,
                   r"step 1: the structure has fallen apart into 2 bonded fragments .* "
                   r"atoms \[8\] \(H\)"),
    "exploded": (_exploded, UnphysicalGeometry,
                 r"step 1: atoms 0 \(C, \d.\d\d Å\), .* have no neighbour within the model's "
                 r"cutoff of 3 Å"),
    "nan": (lambda: Atoms("H2O", positions=[[0, 0, 0], [0, 0, np.nan], [1, 0, 0]]),
            ConfigError, r"step 1: positions contain NaN"),
    "odd-electrons": (lambda: molecule("CH3CH2OH")[:-1], ConfigError,
                      r"C2H5O with charge 0 has an odd number of electrons \(25\); set the "
                      r"multiplicity"),
    "impossible-multiplicity": (lambda: _with(molecule("CH3CH2OH"), multiplicity=2),
                                ConfigError, r"26 electrons \(even\); multiplicity 2 is "
                                             r"impossible"),
    "impossible-charge": (lambda: _with(molecule("CH3CH2OH"), charge=40), ConfigError,
                          r"charge=40 removes more electrons than the structure has \(26\)"),
    "single-atom": (lambda: Atoms("O", positions=[[0, 0, 0]]), ConfigError,
                    r"1 atom\(s\) has no local environments"),
    "periodic": (lambda: _periodic(), ConfigError, r"periodic cell given to the molecular MOPAC"),
}


def _with(a, **info):
    a.info.update(info)
    return a


def _periodic():
    a = molecule("CH3CH2OH")
    a.cell = [10, 10, 10]
    a.pbc = True
    return a


@mopac
@pytest.mark.parametrize("case", sorted(GEOMETRY_CASES))
def test_hostile_geometry_never_reaches_mopac(store, tmp_path, case, tally):
    path, before = store
    build, exc, pattern = GEOMETRY_CASES[case]
    ref = MopacReference(command=_wrapper(tmp_path, f'exec {MOPAC_EXE} "$1" >/dev/null 2>&1'),
                         workdir=str(tmp_path / "w"))
    learner = Learner(ref, store=path)
    learner.request_reference = True
    with pytest.raises(exc, match=pattern):
        learner.step(build())
    learner.close()
    assert _calls(tmp_path) == 0
    assert_intact(path, before)
    tally(GEOMETRY if exc is UnphysicalGeometry else BAD_INPUT)


@mopac
def test_fragmentation_is_allowed_when_asked(store, tmp_path):
    path, before = store
    learner = Learner(MopacReference(workdir=str(tmp_path)), store=path,
                      policy=LearningPolicy(allow_fragmentation=True))
    learner.request_reference = True
    assert learner.step(_fragment()).source == "reference"
    learner.close()
    assert len(_snapshot(path)) == len(before) + 1


def _config(tmp_path, structure, **extra):
    cfg = {"system": {"structure": structure},
           "driver": {"type": "md", "steps": 30, "temperature_K": 500},
           "output": {"directory": str(tmp_path / "out")}}
    for key, value in extra.items():
        section, name = key.split(".")
        cfg.setdefault(section, {})[name] = value
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@mopac
def test_temperature_blow_up_stops_the_run_and_keeps_the_store(tmp_path, capsys, tally):
    cfg = _config(tmp_path, "CH3CH2OH", **{"driver.max_temperature_K": 300.0})
    assert main(["run", cfg]) == 2
    err = capsys.readouterr().err
    assert "MD step 0: the temperature is" in err
    assert "above driver.max_temperature_K = 300 K (thermostat at 500 K)" in err
    assert "Every labelled frame is in the store" in err
    with Store(str(tmp_path / "out" / "otfml.h5"), "a") as st:
        assert len(st) >= 1 and np.isfinite(st.frame(-1).energy)
    tally(GEOMETRY)


def _xyz(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p.name


BAD_STRUCTURES = {
    "empty-file": ("empty.xyz", "", r"ASE could not read"),
    "single-atom": ("one.xyz", "1\n\nO 0 0 0\n", r"has 1 atom\(s\); otfml needs at least 2"),
    "overlapping": ("ov.xyz", "3\n\nO 0 0 0\nH 0 0 0.05\nH 0.9 0 0\n",
                    r"atoms 0 \(O\) and 1 \(H\) are 0.050 Å apart"),
    "unknown-element": ("xx.xyz", "2\n\nXx 0 0 0\nH 0 0 1\n", r"ASE could not read .*Xx"),
    "nan": ("nan.xyz", "2\n\nH 0 0 0\nH 0 0 nan\n", r"NaN/inf coordinates"),
    "too-many-atoms": ("big.xyz", "", r"has 1000 atoms, more than system.max_atoms = 500"),
    "periodic": ("pbc.extxyz", "", r"is periodic .* the MOPAC reference is molecular"),
    "odd-electrons": ("rad.xyz", "4\n\nC 0 0 0\nH 0 0 1.08\nH 1.02 0 -0.36\nH -0.51 0.88 -0.36\n",
                      r"odd number of electrons \(9\); set the multiplicity .*"
                      r"system.multiplicity = None"),
}


@pytest.mark.parametrize("case", sorted(BAD_STRUCTURES))
def test_bad_structure_is_a_clear_config_error(tmp_path, capsys, case, tally):
    name, text, pattern = BAD_STRUCTURES[case]
    extra = {}
    if case == "too-many-atoms":
        rng = np.random.default_rng(0)
        grid = np.stack(np.meshgrid(*[np.arange(10) * 1.5] * 3), -1).reshape(-1, 3)
        write(tmp_path / name, Atoms("H1000", positions=grid + rng.normal(0, 0.01, grid.shape)))
        extra["system.max_atoms"] = 500
    elif case == "periodic":
        a = molecule("CH3CH2OH", vacuum=4.0)
        a.pbc = True
        write(tmp_path / name, a)
    else:
        _xyz(tmp_path, name, text)
    cfg = _config(tmp_path, name, **extra)
    assert main(["check", cfg]) == 2
    err = capsys.readouterr().err
    assert err.startswith("otfml: error: system.structure = ")
    assert re.search(pattern, err), err
    tally(BAD_INPUT)


DISK_FULL = """
import os, resource, signal, sys
import numpy as np
from ase.build import molecule
from otfml.errors import StoreError
from otfml.store import Store
path = sys.argv[1]
fp = {"code": "X", "version": "1", "method": "m", "keywords": "", "charge": 0,
      "multiplicity": 1}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes fail with EFBIG, as on a full disk
st = Store(path, "a")
k = len(st)
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + int(sys.argv[2]),
                                           resource.RLIM_INFINITY))
try:
    while True:
        a = molecule("CH3CH2OH"); a.positions += 0.001 * k
        st.append(a, float(k), np.full((9, 3), float(k)), fp, step=k)
        k += 1
except StoreError as err:
    print(k); print(err)
# the limit also applies to the in-memory file otfml detaches HDF5 to; lift it as
# freeing disk space would
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
try:
    st.append(a, 0.0, np.zeros((9, 3)), fp)
except StoreError as err:
    print(err)
st.close()
"""


@pytest.mark.parametrize("room", [300_000, 1_000_000])
def test_disk_full_keeps_every_committed_frame(tmp_path, room, tally):
    path = str(tmp_path / "s.h5")
    script = tmp_path / "full.py"
    script.write_text(DISK_FULL)
    with Store(path, "a"):
        pass
    out = subprocess.run([sys.executable, str(script), path, str(room)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]  # no crash of the writer either
    lines = out.stdout.splitlines()
    n = int(lines[0])
    assert f"writing frame {n} to {path!r} failed" in lines[1]
    assert "Free disk space" in lines[1] and f"frames 0..{n - 1} are intact" in lines[1]
    assert f"otfml info --repair {path}" in lines[1]
    assert "an earlier write failed" in lines[2]
    with pytest.raises(StoreError, match="write failed on a full disk"):
        Store(path)  # a reader is told what happened and what to do
    assert main(["info", path, "--repair"]) == 0
    with Store(path) as st:
        assert len(st) == n
        for k in range(n):
            fr = st.frame(k)
            assert fr.energy == float(k)
            np.testing.assert_array_equal(fr.forces, np.full((9, 3), float(k)))
    with Store(path, "a") as st:  # and appends go on after space was freed
        st.append(molecule("H2O"), 1.0, np.zeros((3, 3)), {"code": "X", "version": "1",
                  "method": "m", "keywords": "", "charge": 0, "multiplicity": 1})
        assert len(st) == n + 1
    tally(STORE_FAULTS)


READ_ONLY = """
import os, sys
from otfml.errors import StoreError
from otfml.store import Store, _h5py
_h5py()  # imported as root: nobody cannot read /root, where Python may live
os.setgid(65534); os.setuid(65534)  # nobody
for path, mode in ((sys.argv[1], "a"), (sys.argv[2], "a"), (sys.argv[2], "r")):
    try:
        with Store(path, mode) as st:
            print("ok", len(st))
    except StoreError as err:
        print("error", err)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a check as another user")
def test_read_only_directory_and_store_are_clear_errors(good_store, tally):
    d = tempfile.mkdtemp(prefix="otfml-ro-")  # a directory nobody cannot write to
    try:
        os.chmod(d, 0o755)
        shutil.copy(good_store, os.path.join(d, "s.h5"))
        os.chmod(os.path.join(d, "s.h5"), 0o644)
        writable = os.path.join(d, "open")
        os.mkdir(writable)
        os.chmod(writable, 0o777)
        shutil.copy(good_store, os.path.join(writable, "s.h5"))
        os.chmod(os.path.join(writable, "s.h5"), 0o444)
        before = _snapshot(os.path.join(d, "s.h5"))
        out = subprocess.run([sys.executable, "-c", READ_ONLY, os.path.join(d, "new.h5"),
                              os.path.join(writable, "s.h5")],
                             capture_output=True, text=True, timeout=60, cwd="/")
        lines = out.stdout.splitlines()
        assert out.returncode == 0, out.stderr[-2000:]
        assert lines[0].startswith("error cannot create the lock file")
        assert "is the directory writable?" in lines[0]
        assert lines[1].startswith("error store") and "is read-only for this user" in lines[1]
        assert lines[2] == "ok 3"  # reading a read-only store works
        assert_intact(os.path.join(writable, "s.h5"), before)
        assert not os.path.exists(os.path.join(d, "new.h5"))
    finally:
        for root, dirs, _ in os.walk(d):
            for x in dirs:
                os.chmod(os.path.join(root, x), stat.S_IRWXU)
        shutil.rmtree(d)
    tally(STORE_FAULTS, 2)


def _damaged(tmp_path, good_store, how):
    data = open(good_store, "rb").read()
    p = tmp_path / "d.h5"
    if how.startswith("cut-"):
        p.write_bytes(data[: int(len(data) * float(how[4:]))])
    elif how == "empty":
        p.write_bytes(b"")
    elif how == "zeros":
        p.write_bytes(b"\0" * 4096)
    elif how == "json":
        p.write_text(json.dumps({"frames": []}))
    return str(p)


@mopac
@pytest.mark.parametrize("how", ["cut-0.01", "cut-0.3", "cut-0.7", "cut-0.99", "zeros",
                                 "json"])
@pytest.mark.parametrize("mode", ["r", "a"])
def test_damaged_store_is_a_clear_store_error(tmp_path, good_store, how, mode, tally):
    path = _damaged(tmp_path, good_store, how)
    with pytest.raises(StoreError, match=r"truncated|cannot be opened|not an otfml store"):
        with Store(path, mode) as st:
            [st.frame(k) for k in range(len(st))]
    with pytest.raises(StoreError):  # a run on it also stops before doing anything
        Learner(CalculatorReference(EMT()), store=path)
    if how.startswith("cut-") and mode == "a":
        # --repair is for a write that failed on a full disk; on a truncated copy it
        # either reads every frame back bit for bit or leaves the file as it was
        data = open(path, "rb").read()
        try:
            Store(path, "a", repair=True).close()
        except StoreError as err:
            assert "cannot be repaired" in str(err)
            assert open(path, "rb").read() == data
        else:
            assert_intact(path, _snapshot(good_store))
    tally(BAD_INPUT)


def test_damaged_or_foreign_model_file_is_a_clear_error(tmp_path, capsys, tally):
    from otfml.training import train_from_frames

    frames = []
    for seed in range(3):
        a = molecule("CH3CH2OH")
        a.rattle(0.05, seed=seed)
        a.calc = EMT()
        frames.append(_frame(a))
    model = train_from_frames(frames)
    good = tmp_path / "m.npz"
    model.save(str(good))
    data = good.read_bytes()
    cases = {"cut": data[: len(data) // 2], "zeros": b"\0" * 1000, "text": b"hello",
             "other-npz": None, "missing": None}
    for name, content in cases.items():
        p = tmp_path / f"{name}.npz"
        if name == "other-npz":
            np.savez(p, x=np.arange(3))
        elif content is not None:
            p.write_bytes(content)
        assert main(["info", str(p)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("otfml: error: ")
        assert ("not an otfml model file" in err or "does not exist" in err), err
        assert "otfml train" in err
        tally(BAD_INPUT)


def _frame(a):
    from types import SimpleNamespace

    return SimpleNamespace(atoms=a.copy(), energy=a.get_potential_energy(),
                           forces=a.get_forces(), fingerprint={"charge": 0})


def test_a_label_near_the_last_one_is_plausible_however_far_the_young_model_is(tmp_path):
    """The label check refuses a reference energy far from the model's prediction only where
    it is far from the last label too: a young model may mispredict by eV per atom where the
    reference's own energies are steady; a false SCF is far from both."""
    from types import SimpleNamespace

    from otfml.reference.base import Label

    learner = _labelled(Learner(CalculatorReference(_ShiftedEMT()), store=str(tmp_path / "s.h5")))
    a = molecule("CH3CH2OH")
    last = learner.last_label_per_atom * len(a)
    off = SimpleNamespace(energy=last - 30.0)  # a prediction 3.3 eV/atom off
    learner._check_label(Label(last + 0.5, np.zeros((9, 3)), {}, 0.0), off, a, 4)
    with pytest.raises(ReferenceFailed, match="implausible reference label"):
        learner._check_label(Label(last - 30.0 + 40.0, np.zeros((9, 3)), {}, 0.0), off, a, 5)
    learner.close()
