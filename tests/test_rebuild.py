"""Rebuilding a model from a store keeps one reference fingerprint, whoever rebuilds it;
elements the model cannot describe are refused before the reference is called."""

import os

import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from ase.calculators.calculator import Calculator, all_changes
from ase.calculators.emt import EMT
from ase.io import write

from otfml import OTFCalculator
from otfml.cli import main
from otfml.errors import ConfigError
from otfml.evaluate import load_model
from otfml.learner import Learner
from otfml.reference import CalculatorReference
from otfml.store import Store

OLD = {"code": "emt", "version": "1", "method": "EMT", "charge": 0, "multiplicity": 1}
NEW = {**OLD, "method": "EMT-other"}


def _labelled(n, seed):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = molecule("CH3CH2OH")
        a.positions += rng.normal(0.0, 0.05, a.positions.shape)
        a.calc = EMT()
        out.append((a, a.get_potential_energy(), a.get_forces()))
    return out


@pytest.fixture
def mixed_store(tmp_path):
    """A store with 5 frames of one fingerprint, then 3 of another."""
    path = str(tmp_path / "mixed.h5")
    with Store(path, "a") as st:
        for fp, frames in ((OLD, _labelled(5, 0)), (NEW, _labelled(3, 1))):
            for a, e, f in frames:
                st.append(a, e, f, fp)
    return path


def test_train_evaluate_and_warm_start_agree_on_one_fingerprint(mixed_store, tmp_path, capsys,
                                                               caplog):
    with caplog.at_level("WARNING", logger="otfml"):
        model = load_model(mixed_store)  # what `otfml evaluate STORE` trains
    assert model.n_frames == 3 and model.extra["frames_left_out"] == 5
    assert "5 frames of other reference fingerprints" in caplog.text

    out = str(tmp_path / "m.npz")
    assert main(["train", mixed_store, "-o", out]) == 0
    printed = capsys.readouterr().out
    assert "trained on 3 frames" in printed and "5 frames of other reference" in printed

    learner = Learner(CalculatorReference(EMT()), store=mixed_store)
    assert learner.n_warm == 3 and learner.model.n_frames == 3
    assert learner.fingerprint["method"] == "EMT-other"
    a = _labelled(1, 2)[0][0]
    # the same frames make the same model, up to where the hyperparameter fit stopped
    np.testing.assert_allclose(learner.model.predict(a).forces, model.predict(a).forces,
                               rtol=1e-4, atol=1e-4)
    learner.close()
    with Store(mixed_store) as st:
        assert len(st) == 8  # nothing was dropped from the store


class _Counting(Calculator):
    implemented_properties = ["energy", "forces"]

    def __init__(self):
        super().__init__()
        self.calls = 0

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        self.calls += 1
        self.results = {"energy": 0.0, "forces": np.zeros((len(self.atoms), 3))}


@pytest.mark.parametrize("numbers", [[0, 0], [1, 0, 8], [1, 200]])
def test_a_dummy_or_unknown_element_is_named_before_the_reference(tmp_path, numbers):
    path = str(tmp_path / "s.h5")
    with Store(path, "a") as st:
        for a, e, f in _labelled(2, 3):
            st.append(a, e, f, OLD)
    before = os.path.getsize(path)
    ref = _Counting()
    atoms = Atoms(numbers=numbers, positions=np.arange(3 * len(numbers)).reshape(-1, 3) * 0.5)
    atoms.calc = OTFCalculator(ref, store=str(tmp_path / "new.h5"))
    with pytest.raises(ConfigError, match=r"no chemical element .*Remove dummy atoms"):
        atoms.get_potential_energy()
    assert ref.calls == 0
    assert not os.path.exists(tmp_path / "new.h5") or len(Store(str(tmp_path / "new.h5"))) == 0
    assert os.path.getsize(path) == before


def test_otfml_check_names_a_dummy_atom(tmp_path, capsys):
    xyz = tmp_path / "x.xyz"
    write(str(xyz), Atoms("OH2X", positions=[[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0],
                                            [0, 0, 1.0]]))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"system:\n  structure: {xyz}\n")
    assert main(["check", str(cfg)]) != 0
    err = capsys.readouterr().err
    assert "no chemical element (X" in err and "atom(s) 3" in err


def test_train_says_how_many_frames_the_model_took_out(mixed_store, tmp_path, capsys,
                                                       monkeypatch):
    """Frames beyond model.max_frames leave the model (the store keeps them): `otfml train`
    says how many, so that "trained on N frames" is not read as all that was stored."""
    import otfml.training

    monkeypatch.setitem(otfml.training.MODEL_DEFAULTS, "max_frames", 2)
    assert main(["train", mixed_store, "-o", str(tmp_path / "m.npz")]) == 0
    printed = capsys.readouterr().out
    assert "trained on 2 frames (1 more taken out under model.max_frames" in printed
