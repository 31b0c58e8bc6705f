"""Walkers sharing one model and one store, run with the real ``mpirun`` (oversubscribed)."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from .conftest import mopac

HERE = os.path.dirname(os.path.abspath(__file__))
MPIRUN = shutil.which("mpirun") or os.path.join(os.path.dirname(sys.executable), "mpirun")

pytestmark = pytest.mark.skipif(not os.path.exists(MPIRUN),
                                reason="mpirun not installed (pip install -e .[mpi])")


def _mpirun(ranks: int, *args, timeout: float = 240) -> dict:
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "OMPI_MCA_rmaps_base_oversubscribe": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([MPIRUN, "--oversubscribe", "-n", str(ranks), sys.executable,
                          os.path.join(HERE, "mpi_walkers.py"), *map(str, args)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(os.path.join(args[0], "result.json")) as fh:
        return json.load(fh)


def _check_shared(res: dict, walkers: int) -> None:
    """Every label stored exactly once, and every version a walker used is the
    coordinator's, byte for byte."""
    s = res["summaries"]
    assert sorted(s) == [str(w) for w in range(walkers)]
    frames = [tuple(f[:2]) for f in res["frames"]]
    assert len(frames) == len(set(frames)) == sum(d["reference_calls"] for d in s.values())
    # each frame holds the model version its walker asked with (0: none yet)
    assert all(0 <= f[2] < res["versions"] for f in res["frames"])
    for w, d in s.items():
        assert sum(1 for f in frames if f[0] == int(w)) == d["reference_calls"]
        assert d["versions_used"] >= 1 or "error" in d  # one that stopped early may not
        for v, digest in d["checksums"].items():
            assert res["checksums"][v] == digest
        assert len(d["latency_s"]) == d["versions_used"]
    # one version per label, or fewer where labels that came together went into one
    assert 1 <= res["versions"] <= len(frames)


def test_two_walkers_share_one_model_and_store(tmp_path):
    res = _mpirun(3, tmp_path, 150, "emt")
    _check_shared(res, 2)
    # they learned from each other: the model steps are most of the steps
    s = res["summaries"]
    assert sum(d["reference_calls"] for d in s.values()) < 0.6 * sum(d["steps"] for d in s.values())
    rows = (tmp_path / "labels.csv").read_text().splitlines()
    assert rows[0].startswith("frame,walker,step,asked_version,version")
    assert len(rows) == 1 + len(res["frames"])


def test_a_walker_whose_reference_fails_leaves_and_the_others_go_on(tmp_path):
    res = _mpirun(3, tmp_path, 150, "emt", 1)
    s = res["summaries"]
    assert "injected failure" in s["1"]["error"] and s["1"]["reference_calls"] == 2
    assert "error" not in s["0"] and s["0"]["steps"] == 151  # 150 MD steps and the start
    _check_shared(res, 2)


@mopac
def test_walkers_with_mopac(tmp_path):
    res = _mpirun(3, tmp_path, 100, "mopac")
    _check_shared(res, 2)
    assert all(d["steps"] == 101 for d in res["summaries"].values())


@mopac
def test_warm_started_walkers_measure_the_models_errors_with_one_call_each(tmp_path):
    """A model warm-started from a store has no calibration: a walker's first call measures
    its errors, and a walker that would call again meanwhile waits for the version that
    measured them rather than calling "calibrating" again."""
    _mpirun(3, tmp_path, 20, "mopac")  # the store
    res = _mpirun(3, tmp_path, 20, "mopac")
    assert all("error" not in d for d in res["summaries"].values()), [
        d.get("error") for d in res["summaries"].values()]
    calibrating = [d["called_reasons"].count("calibrating") for d in res["summaries"].values()]
    assert max(calibrating) == 1, calibrating


WORKFLOW = """
system:
  structure: CH3CH2OH
driver:
  steps: {steps}
  log_interval: 10
walkers:
  temperature_K: [300, 500]
output:
  directory: run
"""


def _otfml_run(ranks: int, path, timeout: float = 240):
    env = {**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
           "PYTHONWARNINGS": "ignore"}
    otfml = os.path.join(os.path.dirname(sys.executable), "otfml")
    return subprocess.Popen([MPIRUN, "--oversubscribe", "-n", str(ranks), otfml, "run",
                             str(path)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)


@mopac
def test_a_workflow_s_walkers_under_mpirun_resume_after_sigkill(tmp_path):
    """`mpirun -n 3 otfml run wf.yaml` with two walkers (300 and 500 K): each writes its own
    directory, rank 0 the store, labels.csv, model and the summary of both. Killed with
    SIGKILL half-way, the same command resumes: the walkers continue from their
    checkpoints and no committed frame is lost."""
    from otfml.store import Store

    from .conftest import kill_when_written

    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(steps=400))
    proc = _otfml_run(3, wf)
    kill_when_written(proc, tmp_path / "run" / "walkers" / "w01" / "steps.csv", 20, 120)
    with Store(tmp_path / "run" / "otfml.h5") as st:
        before = len(st)
    assert before > 0
    proc = _otfml_run(3, wf)
    out = proc.communicate(timeout=240)[0]
    assert proc.returncode == 0, out[-3000:]
    assert "2 walkers" in out and "walker 1:" in out
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert sorted(summary["walkers"]) == ["0", "1"]
    with Store(tmp_path / "run" / "otfml.h5") as st:
        frames = [(st.frame(i).walker, st.frame(i).step) for i in range(len(st))]
    assert len(frames) >= before + summary["reference_calls"]  # before the kill, and after
    for w in ("w00", "w01"):
        steps = (tmp_path / "run" / "walkers" / w / "steps.csv").read_text().splitlines()
        assert int(steps[-1].split(",")[0]) == 400  # every walker reached its last step
    from otfml.plot import write_report

    page = open(write_report(str(tmp_path / "run"))).read()
    assert "Walker 0" in page and "Walker 1" in page and "walkers/w01/plots/calls.png" in page
    wrong = _otfml_run(2, wf)
    out = wrong.communicate(timeout=120)[0]
    assert wrong.returncode != 0 and "mpirun -n 3" in out


def test_walkers_without_mpirun_are_refused_with_the_command_to_use(tmp_path, capsys):
    from otfml.cli import main

    wf = tmp_path / "wf.yaml"
    wf.write_text(WORKFLOW.format(steps=10))
    assert main(["run", str(wf)]) == 2
    assert "mpirun -n 3 otfml run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main(["check", str(wf)]) == 0
    assert "2 walkers: run with mpirun -n 3" in capsys.readouterr().out
    bad = tmp_path / "bad.yaml"
    bad.write_text(WORKFLOW.format(steps=10).replace("[300, 500]", "[300, hot]"))
    for cmd in ("run", "check"):
        assert main([cmd, str(bad)]) == 2
        assert "walkers.temperature_K" in capsys.readouterr().err
    for listed in ("[CH3CH2OH, nosuch.xyz]", "[nosuch.xyz, CH3CH2OH]"):  # any walker's
        missing = tmp_path / "missing.yaml"
        missing.write_text(WORKFLOW.format(steps=10).replace(
            "walkers:\n", f"walkers:\n  structure: {listed}\n"))
        assert main(["check", str(missing)]) == 2
        assert "nosuch.xyz" in capsys.readouterr().err


class _OneMessage:
    """A stand-in for a walker's communicator holding one model version from rank 0."""

    def __init__(self, msg) -> None:
        self.msg = msg

    def Get_rank(self) -> int:
        return 1

    def Iprobe(self, source, tag) -> bool:
        return self.msg is not None

    def recv(self, source, tag):
        """The version's header; its parts follow (:meth:`Recv`), as rank 0 sends them."""
        msg, self.msg = self.msg, None
        self.parts = list(msg.data)
        return dataclasses.replace(msg, data=[memoryview(p).nbytes for p in msg.data])

    def Recv(self, buf, source, tag) -> None:
        buf[0][:] = self.parts.pop(0)

    def isend(self, msg, dest, tag):
        self.sent.append(msg)
        return _Sent()

    @property
    def sent(self) -> list:
        self.__dict__.setdefault("_sent", [])
        return self.__dict__["_sent"]


class _Sent:
    def Test(self) -> bool:
        return True

    def wait(self) -> None:
        pass


def test_a_walker_loads_a_version_only_if_its_bytes_match_the_checksum():
    """No mpirun needed: the check is the walker's own."""
    from ase.build import molecule
    from ase.calculators.emt import EMT

    from otfml.descriptor import Descriptor
    from otfml.gp import SparseGP
    from otfml.parallel.protocol import ModelVersion, model_parts
    from otfml.parallel.walker import WalkerLearner
    from otfml.policy import LearningPolicy
    from otfml.reference import make_reference

    gp = SparseGP(Descriptor([1, 6, 8]))
    a = molecule("CH3CH2OH")
    a.calc = EMT()
    gp.add_frame(a, a.get_potential_energy(), a.get_forces())
    data, digest = model_parts(gp)
    policy = LearningPolicy()
    good = ModelVersion(1, data, digest, policy, 0.0, 1)
    w = WalkerLearner(_OneMessage(good), make_reference(EMT()), species=[1, 6, 8])
    assert w.take_newest() and w.version == 1 and w.checksums == {1: digest}
    assert np.array_equal(w.model.predict(a).forces, gp.predict(a).forces)
    largest = max(range(len(data)), key=lambda i: memoryview(data[i]).nbytes)
    damaged = [bytearray(p) for p in data]
    damaged[largest][len(damaged[largest]) // 2] ^= 0xFF
    w = WalkerLearner(_OneMessage(ModelVersion(1, damaged, digest, policy, 0.0, 1)),
                      make_reference(EMT()), species=[1, 6, 8])
    with pytest.raises(RuntimeError, match="model version 1 reached walker 0 damaged"):
        w.take_newest()
    assert w.version == 0 and not w.checksums


class _Later(_OneMessage):
    """A communicator whose model version arrives at the ``after``-th probe."""

    def __init__(self, msg, after: int) -> None:
        super().__init__(msg)
        self.after = after

    def Iprobe(self, source, tag) -> bool:
        self.after -= 1
        return self.after < 0 and self.msg is not None


def test_a_walker_about_to_call_waits_for_the_version_that_learned_its_last_label(
        monkeypatch):
    """It takes the awaited version as soon as it comes; where waiting has not been paying,
    it waits only at every WAIT_EXPLORE-th chance, and never longer than a call costs; a
    calibrating walker waits whatever its estimates say, and they do not count it."""
    import time

    from ase.build import molecule
    from ase.calculators.emt import EMT

    import otfml.parallel.walker as walker_module
    from otfml.descriptor import Descriptor
    from otfml.gp import SparseGP
    from otfml.parallel.protocol import ModelVersion, model_parts
    from otfml.parallel.walker import WAIT_EXPLORE, WAIT_PRIOR, WalkerLearner
    from otfml.policy import LearningPolicy
    from otfml.reference import make_reference

    pytest.importorskip("mpi4py.MPI")  # started now, not within the timed waits
    gp = SparseGP(Descriptor([1, 6, 8]))
    a = molecule("CH3CH2OH")
    a.calc = EMT()
    gp.add_frame(a, a.get_potential_energy(), a.get_forces())
    data, digest = model_parts(gp)
    # version 2 took in this walker's (walker 0's) first label
    comm = _Later(ModelVersion(2, data, digest, LearningPolicy(), 0.0, 1, {0: 1}, 0.01),
                  after=3)
    w = WalkerLearner(comm, make_reference(EMT()), species=[1, 6, 8])
    w.version = 1
    assert not w._wait_for_own_label()  # nothing sent: nothing to wait for
    w.n_calls = 1
    w.timings["reference"].append(0.5)
    assert w._wait_for_own_label()
    assert w.version == 2 and w._taken_in == 1 and w.n_waits == 1
    assert 0.0 < w.wait_s < 0.5
    w._waited(paid=False)
    assert w.n_waits_paid == 0 and w._wait_pays < WAIT_PRIOR
    # a second label, whose version does not come: waiting has not paid, so the walker
    # passes up its chances, but for one in WAIT_EXPLORE, which waits what a call costs
    w.n_calls, w._wait_pays, w._wait_est = 2, 0.0, 0.1
    w.timings["reference"][:] = [0.02]
    for _ in range(WAIT_EXPLORE):
        assert not w._wait_for_own_label()
    t0 = time.perf_counter()
    assert w._wait_for_own_label()
    assert 0.02 + w._update_s <= time.perf_counter() - t0 < 0.5
    assert w.n_waits == 2 and w.version == 2
    estimates = (w._wait_est, w._wait_pays, w._passed)
    monkeypatch.setattr(walker_module, "CALIBRATION_WAIT_S", 0.05)
    t0 = time.perf_counter()
    assert not w._wait_for_own_label(calibrating=True)  # not a choice
    assert time.perf_counter() - t0 >= 0.05 and w.n_waits == 3
    assert (w._wait_est, w._wait_pays, w._passed) == estimates


def _split_ethanol():
    """Ethanol, and ethanol with its hydroxyl hydrogen 2.3 Å from the oxygen (two
    fragments, each atom with neighbours within the model's cutoff)."""
    from ase.build import molecule

    a = molecule("CH3CH2OH")
    b = a.copy()
    b.set_distance(2, 3, 2.3, fix=0)  # atom 3: the hydroxyl H
    return a, b


def test_a_walker_refuses_a_structure_that_fell_apart_before_its_call():
    """Fragments are counted against the walker's first structure, before its reference
    is called; nothing is sent to the coordinator."""
    from ase.calculators.emt import EMT

    from otfml.errors import UnphysicalGeometry
    from otfml.parallel.walker import WalkerLearner
    from otfml.reference import make_reference

    whole, split = _split_ethanol()
    comm = _OneMessage(None)
    w = WalkerLearner(comm, make_reference(EMT()), species=[1, 6, 8])
    w.request_reference = True
    w.step(whole)
    assert w.n_calls == 1 and len(comm.sent) == 1
    w.request_reference = True
    with pytest.raises(UnphysicalGeometry, match="fallen apart into 2 bonded fragments"):
        w.step(split)
    assert w.n_calls == 1 and len(comm.sent) == 1


def test_the_coordinator_stores_labels_of_walkers_whose_structures_differ(tmp_path):
    """Walkers may run different structures (one of two molecules, another of one): rank 0
    learns each label as it comes, without counting fragments against another walker's."""
    import time

    from ase.calculators.emt import EMT

    from otfml.parallel.coordinator import Coordinator
    from otfml.parallel.protocol import LabelMessage
    from otfml.reference import make_reference

    fingerprint = make_reference(EMT()).fingerprint(0, 1)
    c = Coordinator(None, {"store": str(tmp_path / "s.h5"), "species": [1, 6, 8]})
    for walker, atoms in enumerate(_split_ethanol()):
        atoms.calc = EMT()
        c._learn(LabelMessage(atoms.numbers, atoms.positions, atoms.cell.array, atoms.pbc, {},
                              atoms.get_potential_energy(), atoms.get_forces(), fingerprint,
                              0.01, walker, 1, 0, float("nan")), time.time())
    assert len(c.learner.store) == 2 and len(c.update_s) == 2
    c.close()
