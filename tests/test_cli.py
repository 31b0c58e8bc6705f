"""The otfml command, with the real MOPAC where it runs workflows."""

import json
import os
import shutil

import pytest
import yaml
from ase.io import write

from otfml.cli import main
from otfml.config import SCHEMA, keys_markdown, load_config

from .conftest import kill_when_written, mopac

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(tmp_path, cfg, name="c.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(cfg) if isinstance(cfg, dict) else cfg)
    return str(p)


BROKEN = [
    ({"driver": {"stpes": 10}}, ["driver.stpes", "Did you mean 'steps'"]),
    ({"drvier": {"steps": 10}}, ["drvier", "Did you mean 'driver'"]),
    ({"driver": {"steps": -5}}, ["driver.steps = -5", ">= 1"]),
    ({"driver": {"steps": "many"}}, ["driver.steps = 'many'", "integer"]),
    ({"learning": {"force_tolerance": 0}}, ["learning.force_tolerance = 0", "> 0"]),
    ({"reference": {"code": "gaussian"}}, ["reference.code = 'gaussian'", "mopac"]),
    ({"driver": {"type": "mdd"}}, ["driver.type = 'mdd'", "Did you mean 'md'"]),
    ({"system": {"structure": "nothere.xyz"}}, ["system.structure = 'nothere.xyz'",
                                                "neither an existing file"]),
    ({"learning": {"adaptive": "yes please"}}, ["learning.adaptive", "true/false"]),
    ({"learning": {"call_step_result": "model"}}, ["learning.call_step_result = 'model'",
                                                   "choose one of reference, updated_model"]),
    ({"learning": {"sparse_admission": 1.5}}, ["learning.sparse_admission = 1.5", "<= 1"]),
    ("driver: [1, 2", ["not valid YAML"]),
    ("- just\n- a list\n", ["top level must be a mapping"]),
]


@pytest.mark.parametrize("cfg,expected", BROKEN)
def test_broken_configs_name_the_problem(tmp_path, capsys, cfg, expected, tally):
    path = _write(tmp_path, cfg)
    assert main(["check", path]) == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err
    tally("broken configs tried")


def test_missing_config_file(capsys, tmp_path):
    assert main(["check", str(tmp_path / "nope.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_set_overrides_and_defaults(tmp_path):
    path = _write(tmp_path, {"driver": {"steps": 10}})
    cfg = load_config(path, ["driver.steps=7", "system.charge=1", "learning.max_calls=3"])
    assert cfg["driver"]["steps"] == 7 and cfg["system"]["charge"] == 1
    assert cfg["learning"]["max_calls"] == 3 and cfg["model"]["cutoff"] == 3.0


def test_key_reference_covers_every_key():
    table = keys_markdown()
    for section, fields in SCHEMA.items():
        for key in fields:
            assert f"`{section}.{key}`" in table
    page = open(os.path.join(ROOT, "docs", "configuration.md")).read()
    assert table in page, "docs/configuration.md is out of date: python docs/make_configuration.py"


def test_shipped_workflows_validate(capsys):
    # only the YAML files: the demo writes its run into workflows/runs/
    names = [n for n in os.listdir(os.path.join(ROOT, "workflows")) if n.endswith(".yaml")]
    assert len(names) >= 5
    for name in names:
        assert main(["check", os.path.join(ROOT, "workflows", name)]) == 0, name


@mopac
def test_run_info_evaluate_end_to_end(tmp_path, capsys, mopac_frames):
    wf = tmp_path / "md.yaml"
    shutil.copy(os.path.join(ROOT, "workflows", "md_langevin.yaml"), wf)
    assert main(["run", str(wf), "--set", "driver.steps=150", "--set",
                 "output.directory=run"]) == 0
    run = tmp_path / "run"
    for f in ("otfml.h5", "model.npz", "summary.json", "steps.csv", "trajectory.traj",
              "otfml.log"):
        assert (run / f).exists(), f
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 151 and 0 < summary["reference_calls"] <= 151
    lines = (run / "steps.csv").read_text().splitlines()
    assert len(lines) == 1 + 151 and lines[0].startswith("step,image,")
    capsys.readouterr()
    assert main(["info", str(run / "otfml.h5"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["frames"] == summary["reference_calls"]
    assert info["fingerprints"][0]["method"] == "PM7"
    assert info["model"]["frames"] == summary["reference_calls"]
    data = tmp_path / "test.extxyz"
    write(str(data), mopac_frames[::4])
    for model in (run / "model.npz", run / "otfml.h5"):
        assert main(["evaluate", str(model), str(data), "--json",
                     "--force-tolerance", "0.15"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["frames"] == len(mopac_frames[::4])
        assert 0 < res["force_mae_eV_A"] < 1.0 and res["force_rmse_eV_A"] >= res["force_mae_eV_A"]
        assert -1 <= res["spearman_atom"] <= 1


def test_export_and_train_from_a_store(tmp_path, capsys):
    """Frames written by a run come back bit for bit through extxyz and an ASE database."""
    import numpy as np
    from ase.build import molecule
    from ase.calculators.emt import EMT
    from ase.io import read

    from otfml import OTFCalculator
    from otfml.gp import SparseGP
    from otfml.store import Store

    store = tmp_path / "s.h5"
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), store=str(store))
    for _ in range(4):
        a.positions[0, 0] += 0.05
        a.calc.confirm(a)
    a.calc.close()
    for out in ("frames.extxyz", "frames.db"):
        assert main(["export", str(store), str(tmp_path / out)]) == 0
        images = read(str(tmp_path / out), ":")
        with Store(store) as st:
            assert len(images) == len(st) == 4
            for img, fr in zip(images, st):
                np.testing.assert_allclose(img.positions, fr.atoms.positions, atol=1e-8)
                np.testing.assert_allclose(img.get_forces(), fr.forces, atol=1e-8)
                assert img.get_potential_energy() == pytest.approx(fr.energy, abs=1e-8)
    assert main(["train", str(store), "-o", str(tmp_path / "m.npz")]) == 0
    m = SparseGP.load(str(tmp_path / "m.npz"))
    assert m.n_frames == 4 and m.n_sparse > 0
    assert main(["export", str(store), str(tmp_path / "x.unknownformat")]) == 2
    assert "cannot write" in capsys.readouterr().err


@mopac
def test_sigkill_then_resume_loses_no_frame(tmp_path, tally):
    """kill -9 an `otfml run` mid-run, then `--resume`: every labelled frame survives and the
    MD finishes with one step-log line per step."""
    import subprocess
    import sys

    import numpy as np

    from otfml.store import Store

    wf = tmp_path / "md.yaml"
    shutil.copy(os.path.join(ROOT, "workflows", "md_langevin.yaml"), wf)
    sets = ["--set", "driver.steps=1200", "--set", "output.directory=run"]
    p = subprocess.Popen([sys.executable, "-m", "otfml.cli", "run", str(wf), *sets],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    steps_csv = tmp_path / "run" / "steps.csv"
    kill_when_written(p, steps_csv, 300, 120)
    with Store(tmp_path / "run" / "otfml.h5") as st:
        before = [(fr.energy, fr.atoms.positions.copy()) for fr in st]
    assert len(before) > 2
    assert main(["run", str(wf), *sets, "--resume"]) == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert 0 < summary["resumed_from_md_step"] < 1200
    assert summary["warm_start_frames"] == len(before)
    with Store(tmp_path / "run" / "otfml.h5") as st:
        assert len(st) >= len(before)
        for (e, pos), fr in zip(before, st):
            assert fr.energy == e
            np.testing.assert_array_equal(fr.atoms.positions, pos)
    rows = steps_csv.read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1201))
    # the summary counts the whole run, as steps.csv does, not only the resumed part
    assert summary["steps"] == len(rows)
    assert summary["reference_calls"] == sum(r.split(",")[6] == "reference" for r in rows)
    tally("SIGKILLs of a running `otfml run`, resumed without losing a frame")


@mopac
def test_optimize_workflow_converges_on_the_reference(tmp_path):
    wf = tmp_path / "opt.yaml"
    shutil.copy(os.path.join(ROOT, "workflows", "optimize.yaml"), wf)
    xyz = tmp_path / "start.xyz"
    from ase.build import molecule

    a = molecule("CH3CH2OH")
    a.rattle(0.15, seed=2)
    write(str(xyz), a)
    assert main(["run", str(wf), "--set", f"system.structure={xyz}", "--set",
                 "output.directory=opt"]) == 0
    s = json.loads((tmp_path / "opt" / "summary.json").read_text())
    assert s["converged"] and s["final_fmax_eV_A"] <= 0.05
    rows = (tmp_path / "opt" / "steps.csv").read_text().splitlines()[1:]
    assert s["steps"] == len(rows)  # the confirming calls are steps of the log too
    assert s["reference_calls"] == sum(r.split(",")[6] == "reference" for r in rows)
    assert rows[-1].split(",")[6] == "reference"


def _digest(directory) -> dict:
    import hashlib

    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.iterdir()) if p.is_file() and p.suffix != ".lock"}


@mopac
def test_another_molecule_never_touches_a_finished_run(tmp_path, capsys):
    """The README's "other molecule" command pointed at a finished run's directory is refused
    before anything is written; in a directory of its own, warm-started from that run's
    store, the model grows the element the store lacks."""
    wf = tmp_path / "md.yaml"
    shutil.copy(os.path.join(ROOT, "workflows", "md_langevin.yaml"), wf)
    assert main(["run", str(wf), "--set", "driver.steps=40"]) == 0
    run = tmp_path / "runs" / "md_langevin"
    before = _digest(run)
    capsys.readouterr()
    other = ["--set", "system.structure=CH3CONH2", "--set", "driver.steps=30"]
    for flags in ([], ["--resume"], ["--restart"]):
        assert main(["run", str(wf), *other, *flags]) == 2
        err = capsys.readouterr().err
        assert "holds another run" in err and "C2H6O" in err and "C2H5NO" in err
        assert "--set output.directory=" in err
        assert _digest(run) == before
    store = run / "otfml.h5"
    assert main(["run", str(wf), *other, "--set", "output.directory=nma",
                 "--set", f"store.warm_start={store}"]) == 0
    s = json.loads((tmp_path / "nma" / "summary.json").read_text())
    assert s["warm_start_frames"] > 0 and s["steps"] > 0
    from otfml.gp import SparseGP

    assert 7 in SparseGP.load(str(tmp_path / "nma" / "model.npz")).descriptor.species
    assert _digest(run) == before


@mopac
def test_set_paths_are_relative_to_where_the_command_runs(tmp_path, monkeypatch):
    """A structure file and an output directory given with --set are found where the user
    typed them, not beside the config file; a config that fails leaves no run directory."""
    from ase.build import molecule

    (tmp_path / "wf").mkdir()
    wf = tmp_path / "wf" / "md.yaml"
    shutil.copy(os.path.join(ROOT, "workflows", "md_langevin.yaml"), wf)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    write("my.xyz", molecule("H2O"))
    assert main(["run", str(wf), "--set", "system.structure=my.xyz", "--set",
                 "output.directory=out", "--set", "driver.steps=10"]) == 0
    s = json.loads((work / "out" / "summary.json").read_text())
    assert s["structure"] == "H2O" and not (tmp_path / "wf" / "out").exists()
    assert main(["run", str(wf), "--set", "system.structure=nothere.xyz", "--set",
                 "output.directory=never"]) == 2
    assert not (work / "never").exists() and not (tmp_path / "wf" / "never").exists()
