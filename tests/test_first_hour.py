"""What a new user meets in the first hour: the commands' output, their errors, the report.
One short real-MOPAC run serves every test of this module."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from ase.build import molecule
from ase.io import write

from otfml.cli import main

from .conftest import mopac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 60-step MOPAC run of ethanol: (config file, run directory, printed lines)."""
    if not (os.environ.get("ASE_MOPAC_COMMAND") or shutil.which("mopac")):
        pytest.skip("MOPAC is not installed")
    d = tmp_path_factory.mktemp("first_hour")
    wf = d / "md.yaml"
    shutil.copy(os.path.join(ROOT, "workflows", "md_langevin.yaml"), wf)
    out = subprocess.run([sys.executable, "-m", "otfml.cli", "run", str(wf), "--set",
                          "driver.steps=60", "--set", f"output.directory={d / 'run'}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return wf, d / "run", out.stdout


@mopac
def test_a_run_ends_with_a_summary_a_person_reads(finished_run):
    _, run, printed = finished_run
    assert "{" not in printed  # no raw JSON
    first = printed.splitlines()[0]
    assert re.match(r"C2H6O: 60 MD steps, 61 energy/force evaluations, \d+ reference calls "
                    r"\(\d+\.\d %\), \d+\.\d s$", first)
    assert f"outputs in {run}" in printed and "report.html" in printed
    floors = re.search(r"force-error floor \(eV/Å\): H ([0-9.]+), C ([0-9.]+), O ([0-9.]+)",
                       printed)
    assert floors and all(0 <= float(v) < 1 for v in floors.groups())
    summary = json.loads((run / "summary.json").read_text())
    rows = (run / "steps.csv").read_text().splitlines()[1:]
    assert summary["steps"] == len(rows) == 61 and summary["md_steps"] == 60
    assert summary["reference_calls"] == sum(r.split(",")[6] == "reference" for r in rows)


@mopac
def test_info_takes_a_run_directory_and_names_elements(finished_run, capsys):
    _, run, _ = finished_run
    assert main(["info", str(run)]) == 0
    text = capsys.readouterr().out
    assert "frames:" in text and "'H'" in text and "force_error_floor_eV_A" in text
    assert main(["info", str(run / "model.npz")]) == 0
    assert "['H', 'C', 'O']" in capsys.readouterr().out
    os.makedirs(run.parent / "empty", exist_ok=True)
    assert main(["info", str(run.parent / "empty")]) == 2
    assert "without a store" in capsys.readouterr().err


@mopac
def test_evaluate_names_an_element_the_model_lacks_before_training(finished_run, capsys,
                                                                   tmp_path):
    _, run, _ = finished_run
    a = molecule("CH3CONH2")
    from ase.calculators.singlepoint import SinglePointCalculator

    a.calc = SinglePointCalculator(a, energy=0.0, forces=a.positions * 0)
    write(str(tmp_path / "test.extxyz"), a)
    for model in (run / "otfml.h5", run / "model.npz"):
        assert main(["evaluate", str(model), str(tmp_path / "test.extxyz")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "['N']" in err and "['H', 'C', 'O']" in err


@mopac
def test_report_rounds_and_shows_the_thermostat(finished_run, capsys):
    _, run, _ = finished_run
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    # at most 4 significant digits: no 1.2345678 nor 0.00012345678
    assert not re.search(r"[1-9]\d*\.\d{5,}|0\.0*[1-9]\d{5,}", page), "unrounded numbers"
    assert "{'" not in page and '{"' not in page, "raw dicts in the report"
    assert (run / "plots" / "energy_temperature.png").exists()


def test_check_refuses_what_run_refuses(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("reference:\n  method: PM8\n")
    assert main(["check", str(cfg)]) == 2
    assert "PM8" in capsys.readouterr().err


def test_version_and_a_closed_pipe():
    out = subprocess.run([sys.executable, "-m", "otfml.cli", "--version"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("otfml ")
    piped = subprocess.run(f"{sys.executable} -m otfml.cli check --keys | head -n 1",
                           shell=True, capture_output=True, text=True, timeout=60)
    assert piped.stdout.startswith("| key |") and "Error" not in piped.stderr
