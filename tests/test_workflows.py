"""Every shipped workflow runs (short versions) with the real MOPAC; multi-stage, resume,
warm start, SMILES input, progress lines, plots and the report."""

import json
import logging
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import yaml
from ase.build import molecule
from ase.io import read, write

from otfml.cli import main
from otfml.config import load_config
from otfml.drivers import read_steps
from otfml.system import build_structures

from .conftest import kill_when_written, mopac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = sorted(f for f in os.listdir(os.path.join(ROOT, "workflows")) if f.endswith(".yaml"))
SHORT = {  # a few dozen steps each: enough to exercise every stage
    "md_langevin.yaml": ["driver.steps=40"],
    "md_nve.yaml": ["driver.steps=40"],
    "anneal.yaml": ["driver.steps=60"],
    "optimize.yaml": ["driver.steps=100"],
    "multistage.yaml": ["driver.steps=40"],
    "water_cluster.yaml": ["driver.steps=40"],
}
ATOMS = {"water_cluster.yaml": 24}  # the others: ethanol


def _copy(tmp_path, name):
    dst = tmp_path / name
    shutil.copy(os.path.join(ROOT, "workflows", name), dst)
    for f in os.listdir(os.path.join(ROOT, "workflows")):  # the structures they name
        if f.endswith(".xyz"):
            shutil.copy(os.path.join(ROOT, "workflows", f), tmp_path / f)
    return str(dst)


def test_every_workflow_has_a_short_test_version():
    assert set(WORKFLOWS) == set(SHORT), "add the new workflow to SHORT"


@mopac
@pytest.mark.parametrize("name", WORKFLOWS)
def test_workflow_runs_as_shipped(tmp_path, name):
    wf = _copy(tmp_path, name)
    sets = [x for s in SHORT[name] for x in ("--set", s)]
    assert main(["run", wf, *sets, "--set", "output.directory=out"]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reference_calls"] >= 2 and summary["steps"] > summary["reference_calls"] / 2
    assert summary["fingerprint"]["code"] == "MOPAC"
    cfg = load_config(wf)
    dirs = [out] if len(cfg["stages"]) == 1 else sorted(p for p in out.iterdir() if p.is_dir())
    assert len(dirs) == len(cfg["stages"])
    for d, stage in zip(dirs, cfg["stages"]):
        steps = read_steps(str(d / "steps.csv"))
        assert len(steps["step"]) > 0
        assert set(steps["source"]) <= {"model", "updated_model", "reference"}
        final = read(str(d / "final.extxyz"), ":")
        assert final and all(len(a) == ATOMS.get(name, 9) for a in final)
        if stage["driver"]["type"] == "optimize":
            s = json.loads((d / "summary.json").read_text())
            assert s["converged"] and s["final_fmax_eV_A"] <= stage["driver"]["fmax"]
    assert json.loads((out / "run.json").read_text())["status"] == "done"


@mopac
def test_anneal_ramps_the_thermostat(tmp_path):
    wf = _copy(tmp_path, "anneal.yaml")
    assert main(["run", wf, "--set", "driver.steps=400", "--set", "driver.temperature_K=1200",
                 "--set", "driver.temperature_end_K=10", "--set", "driver.friction_per_fs=0.05",
                 "--set", "output.directory=out"]) == 0
    t = read_steps(str(tmp_path / "out" / "steps.csv"))["temperature_K"]
    assert t[:100].mean() > 3 * t[-100:].mean()


@mopac
def test_multistage_resumes_after_sigkill_in_a_later_stage(tmp_path, caplog, tally):
    """kill -9 in the second stage; re-running the same command (no flag) resumes: the first
    stage is not rerun, every frame survives, a changed setting is logged and applies."""
    from otfml.store import Store

    wf = _copy(tmp_path, "multistage.yaml")
    sets = ["--set", "driver.steps=600", "--set", "output.directory=out"]
    p = subprocess.Popen([sys.executable, "-m", "otfml.cli", "run", wf, *sets],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = tmp_path / "out" / "02-learn-600K" / "steps.csv"
    kill_when_written(p, second, 150, 180)
    state = json.loads((tmp_path / "out" / "run.json").read_text())
    assert state["status"] == "running" and state["stages_done"] == ["learn-300K"]
    first_csv = (tmp_path / "out" / "01-learn-300K" / "steps.csv").read_text()
    with Store(tmp_path / "out" / "otfml.h5") as st:
        before = [fr.energy for fr in st]
    with caplog.at_level(logging.INFO, logger="otfml"):
        assert main(["run", wf, *sets, "--set", "learning.max_calls=400"]) == 0
    log = caplog.text
    assert "resuming it" in log and "stage learn-300K finished before: skipped" in log
    assert "learning.max_calls: None -> 400" in log
    assert (tmp_path / "out" / "01-learn-300K" / "steps.csv").read_text() == first_csv
    rows = read_steps(str(second))["step"]
    assert list(rows) == list(range(601))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["learn-300K", "learn-600K",
                                                       "relax-lowest"]
    assert summary["stages"][1]["resumed_from_md_step"] > 0
    assert summary["stages"][2]["learning"]["max_calls"] == 400
    with Store(tmp_path / "out" / "otfml.h5") as st:
        after = [fr.energy for fr in st]
    assert after[:len(before)] == before
    tally("SIGKILLs of a running `otfml run`, resumed without losing a frame")


@mopac
def test_optimize_many_images_of_a_file(tmp_path):
    images = []
    for seed in range(3):
        a = molecule("CH3CH2OH")
        a.rattle(0.1, seed=seed)
        images.append(a)
    write(str(tmp_path / "many.extxyz"), images)
    wf = _copy(tmp_path, "optimize.yaml")
    assert main(["run", wf, "--set", "system.structure=many.extxyz", "--set",
                 "system.index=':'", "--set", "output.directory=out"]) == 0
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert [r["image"] for r in s["images"]] == [0, 1, 2]
    assert all(r["converged"] and r["fmax_eV_A"] <= 0.05 for r in s["images"])
    final = read(str(tmp_path / "out" / "final.extxyz"), ":")
    assert len(final) == 3
    # the three relaxed images are the same minimum
    assert np.ptp([r["energy_eV"] for r in s["images"]]) < 0.01


@mopac
def test_warm_start_from_another_runs_model(tmp_path, caplog):
    wf = _copy(tmp_path, "md_langevin.yaml")
    assert main(["run", wf, "--set", "driver.steps=150", "--set", "output.directory=a"]) == 0
    first = json.loads((tmp_path / "a" / "summary.json").read_text())
    with caplog.at_level(logging.INFO, logger="otfml"):
        assert main(["run", wf, "--set", "driver.steps=150", "--set", "output.directory=b",
                     "--set", "store.warm_start=a/model.npz", "--set", "driver.seed=5"]) == 0
    second = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert second["warm_start_frames"] == first["reference_calls"]
    assert f"copied {first['reference_calls']} frames" in caplog.text
    # what was learned is used: the warm-started run needs fewer calls
    assert second["reference_calls"] < first["reference_calls"]


def test_smiles_structure(tmp_path):
    pytest.importorskip("rdkit")
    cfg = load_config(_cfg_file(tmp_path, {"system": {"structure": "smiles:CCO"}}))
    (atoms,) = build_structures(cfg)
    assert atoms.get_chemical_formula() == "C2H6O"
    d = atoms.get_all_distances()
    np.fill_diagonal(d, 9)
    assert d.min() > 0.9
    bad = load_config(_cfg_file(tmp_path, {"system": {"structure": "smiles:C1CC("}}))
    with pytest.raises(Exception, match="cannot parse"):
        build_structures(bad)
    ion = load_config(_cfg_file(tmp_path, {"system": {"structure": "smiles:CC(=O)[O-]"}}))
    with pytest.raises(Exception, match="formal charge of -1 but system.charge = 0"):
        build_structures(ion)


def _cfg_file(tmp_path, cfg):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


STAGE_ERRORS = [
    ({"stages": []}, "non-empty list"),
    ({"stages": [{"name": "a", "drivr": {}}]}, "stages[0].drivr"),
    ({"stages": [{"name": "a", "driver": {"stpes": 3}}]}, "stages[0].driver.stpes"),
    ({"stages": [{"name": "a"}, {"name": "a"}]}, "used twice"),
    ({"stages": [{"name": "a", "driver": {"start": "previous"}}]}, "no previous stage"),
    ({"stages": [{"name": "a b"}]}, "stages[0].name = 'a b'"),
    ({"driver": {"ensemble": "nve", "temperature_end_K": 10}}, "needs the langevin"),
    ({"system": {"index": "1:x"}}, "system.index = '1:x'"),
    ({"store": {"warm_start": 3}}, "store.warm_start = 3"),
]


@pytest.mark.parametrize("cfg,text", STAGE_ERRORS)
def test_broken_stage_configs_name_the_problem(tmp_path, capsys, cfg, text):
    assert main(["check", _cfg_file(tmp_path, cfg)]) == 2
    assert text in capsys.readouterr().err


def test_md_of_many_images_is_refused(tmp_path, capsys):
    write(str(tmp_path / "two.extxyz"), [molecule("H2O"), molecule("H2O")])
    path = _cfg_file(tmp_path, {"system": {"structure": "two.extxyz", "index": ":"},
                                "reference": {"code": "lj"}, "output": {"directory": "o"}})
    assert main(["run", path]) == 2
    assert "MD starts from one structure, but 2 were selected" in capsys.readouterr().err


def test_progress_lines_without_a_terminal(tmp_path, caplog):
    """No terminal: a plain progress line every output.progress_every steps."""
    path = _cfg_file(tmp_path, {"system": {"structure": "H2O"}, "reference": {"code": "lj"},
                                "driver": {"steps": 30, "temperature_K": 50},
                                "output": {"directory": "o", "progress_every": 10}})
    with caplog.at_level(logging.INFO, logger="otfml.progress"):
        assert main(["run", path]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "otfml.progress"]
    assert [ln.split(",")[0] for ln in lines] == [f"run: step {n}/30" for n in (10, 20, 30)]
    assert all("calls" in ln and "ETA" in ln and "T_K" in ln for ln in lines)


def test_plot_and_report(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = _cfg_file(tmp_path, {"system": {"structure": "H2O"}, "reference": {"code": "lj"},
                                "driver": {"steps": 30, "temperature_K": 50},
                                "output": {"directory": "o"}})
    assert main(["run", path]) == 0
    run_dir = tmp_path / "o"
    write(str(tmp_path / "test.extxyz"), read(str(run_dir / "final.extxyz"), ":"))
    from ase.calculators.lj import LennardJones
    from ase.calculators.singlepoint import SinglePointCalculator

    frames = []
    for a in read(str(run_dir / "trajectory.traj"), ":"):
        a.calc = LennardJones(sigma=1.0, epsilon=0.01, rc=4.0)
        e, f = a.get_potential_energy(), a.get_forces()
        a.calc = SinglePointCalculator(a, energy=e, forces=f)
        frames.append(a)
    write(str(tmp_path / "test.extxyz"), frames)
    assert main(["evaluate", str(run_dir / "model.npz"), str(tmp_path / "test.extxyz"),
                 "--force-tolerance", "0.1", "-o", str(run_dir)]) == 0
    capsys.readouterr()
    assert main(["report", str(run_dir)]) == 0
    report = capsys.readouterr().out.strip()
    html = open(report).read()
    for png in ("calls.png", "uncertainty.png", "energy_temperature.png", "parity.png",
                "error_vs_uncertainty.png"):
        assert (run_dir / "plots" / png).stat().st_size > 5000, png
        assert f"plots/{png}" in html
    assert "reference_calls" in html and "force_mae_eV_A" in html
    assert main(["plot", str(tmp_path)]) == 2
    assert "holds no run" in capsys.readouterr().err
