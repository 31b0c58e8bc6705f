"""The MOPAC reference, with the real MOPAC."""

import os
import shutil

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.mopac import MOPAC

from otfml.errors import ConfigError, ReferenceFailed
from otfml.reference import MopacReference, make_reference

from .conftest import mopac


@mopac
def test_labels_equal_plain_ase_mopac(ethanol, tmp_path):
    ref = MopacReference(method="PM7", workdir=str(tmp_path))
    lab = ref.compute(ethanol, 0, 1)
    a = ethanol.copy()
    a.calc = MOPAC(method="PM7", label=str(tmp_path / "plain" / "m"))
    assert lab.energy == pytest.approx(a.get_potential_energy(), abs=1e-8)
    np.testing.assert_allclose(lab.forces, a.get_forces(), atol=1e-8)
    fp = lab.fingerprint
    assert fp["code"] == "MOPAC" and fp["method"] == "PM7" and fp["version"].startswith("22")
    assert fp["charge"] == 0 and fp["multiplicity"] == 1
    assert os.listdir(tmp_path) == ["plain"]  # the per-call directory was removed


@mopac
def test_wraps_ase_mopac_instance():
    ref = make_reference(MOPAC(method="PM6", task="1SCF GRADIENTS NOMM"))
    assert isinstance(ref, MopacReference)
    assert ref.method == "PM6" and ref.keywords == "NOMM"


@mopac
def test_doublet_radical_and_cation():
    ch3 = molecule("CH3")
    lab = MopacReference().compute(ch3, charge=0, multiplicity=2)
    assert lab.fingerprint["multiplicity"] == 2 and np.isfinite(lab.energy)
    nh4 = molecule("NH3")
    nh4.append("H")
    nh4.positions[-1] = [0.0, 0.0, -1.0]
    lab = MopacReference().compute(nh4, charge=1, multiplicity=1)
    assert lab.fingerprint["charge"] == 1


def test_impossible_multiplicity_is_refused_before_running():
    with pytest.raises(ConfigError, match="9 electrons.*odd.*multiplicity 1 is impossible"):
        MopacReference(command="false PREFIX").compute(molecule("OH"), 0, 1)


@mopac
def test_failing_run_names_step_distance_and_output(tmp_path, ethanol):
    """Two atoms on top of each other: MOPAC aborts; the error explains and keeps the dir."""
    bad = ethanol.copy()
    bad.positions[1] = bad.positions[0] + [0.05, 0.0, 0.0]
    bad.info["otfml_step"] = 17
    with pytest.raises(ReferenceFailed) as err:
        MopacReference(workdir=str(tmp_path)).compute(bad, 0, 1)
    msg = str(err.value)
    assert "step 17" in msg and "0.050 Å between atoms 0 and 1" in msg
    assert "working directory kept in" in msg
    assert len(os.listdir(tmp_path)) == 1


@mopac
def test_scf_failure_is_named_and_nothing_is_returned(tmp_path):
    """Real MOPAC with too few SCF iterations allowed: the failure says SCF, not a parse error."""
    a = molecule("CH3CH2OH")
    a.rattle(0.2, seed=3)
    ref = MopacReference(keywords="ITRY=3 SHIFT=0", workdir=str(tmp_path / "a"), scf_retries=())
    with pytest.raises(ReferenceFailed, match="SCF did not converge") as err:
        ref.compute(a, 0, 1)
    assert "UNABLE TO ACHIEVE SELF-CONSISTENCE" in str(err.value)


def test_scf_failure_is_rescued_by_a_retry_with_other_keywords(tmp_path):
    """The default retries replace the bad SCF keywords and give the converged energy."""
    a = molecule("CH3CH2OH")
    a.rattle(0.2, seed=3)
    good = MopacReference(workdir=str(tmp_path / "good")).compute(a, 0, 1)
    ref = MopacReference(keywords="ITRY=3 SHIFT=0", workdir=str(tmp_path / "retry"))
    rescued = ref.compute(a, 0, 1)
    assert ref.n_rescued == 1
    assert abs(rescued.energy - good.energy) < 1e-3
    np.testing.assert_allclose(rescued.forces, good.forces, atol=1e-2)


def test_missing_binary_says_how_to_fix(monkeypatch):
    monkeypatch.delenv("ASE_MOPAC_COMMAND", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match="ASE_MOPAC_COMMAND"):
        MopacReference()


def test_broken_command_is_a_reference_failure(tmp_path, ethanol):
    ref = MopacReference(command="sh -c 'echo no such input; exit 3'", workdir=str(tmp_path))
    with pytest.raises(ReferenceFailed, match=r"(?s)exited with code 3.*no mopac.out was "
                                              r"written.*printed: no such input"):
        ref.compute(ethanol, 0, 1)


@pytest.mark.parametrize("given", ["argument", "environment"])
def test_a_missing_mopac_program_is_named_before_anything_runs(monkeypatch, given):
    command = "/opt/nope/mopac PREFIX.mop"
    if given == "environment":
        monkeypatch.setenv("ASE_MOPAC_COMMAND", command)
        kwargs, where = {}, "ASE_MOPAC_COMMAND"
    else:
        kwargs, where = {"command": command}, "reference.command"
    with pytest.raises(ConfigError, match=rf"'/opt/nope/mopac' is not an executable file.*{where}"):
        MopacReference(**kwargs)


def test_bad_method_and_charge_keywords_are_config_errors():
    with pytest.raises(ConfigError, match="PM8"):
        MopacReference(method="PM8", command="true PREFIX")
    with pytest.raises(ConfigError, match="system.charge"):
        MopacReference(keywords="CHARGE=1", command="true PREFIX")


@pytest.mark.parametrize("pidfd", [True, False])
def test_reference_wait_gives_the_exit_code_or_none_at_the_timeout(monkeypatch, pidfd):
    """The MOPAC command is awaited on a pidfd (woken at the exit, not by polling); without
    one (not Linux, old kernels) Python's own wait is used. Both give the exit code, or None
    when the command outlives the timeout (the caller then kills it)."""
    import subprocess

    from otfml.reference.mopac import _wait

    if not pidfd:
        monkeypatch.delattr("os.pidfd_open", raising=False)
    assert _wait(subprocess.Popen(["sh", "-c", "exit 3"]), 10.0) == 3
    assert _wait(subprocess.Popen(["true"]), None) == 0
    slow = subprocess.Popen(["sleep", "10"])
    try:
        assert _wait(slow, 0.05) is None
    finally:
        slow.kill()
        slow.wait()


def test_a_failed_first_call_is_the_reference_error_with_the_update_overlapped(tmp_path, ethanol):
    """On a cold start the model's update is prepared while the reference runs; a reference
    that fails then is reported as itself, and nothing is stored."""
    from otfml.gp import available_cpus
    from otfml.learner import Learner
    from otfml.store import Store

    if available_cpus() < 2:
        pytest.skip("the update overlaps the reference call only with two CPUs")
    ref = MopacReference(command="sh -c 'exit 3'", workdir=str(tmp_path / "work"))
    learner = Learner(ref, store=str(tmp_path / "s.h5"), model_settings={"overlap_update": True})
    with pytest.raises(ReferenceFailed, match="exited with code 3"):
        learner.step(ethanol)
    learner.close()
    with Store(str(tmp_path / "s.h5")) as st:
        assert len(st) == 0


@mopac
def test_a_user_given_mopac_command_is_quiet(tmp_path, ethanol, capfd, monkeypatch):
    """A command without output redirection (ASE_MOPAC_COMMAND as users write it) prints
    nothing at a call: MOPAC's banner goes to the call's command.log."""
    monkeypatch.setenv("ASE_MOPAC_COMMAND", f"{shutil.which('mopac')} PREFIX.mop")
    ref = MopacReference(workdir=str(tmp_path))
    label = ref.compute(ethanol, 0, 1)
    out, err = capfd.readouterr()
    assert np.isfinite(label.energy) and out == "" and err == ""
