"""The screened Coulomb term a model can learn on top of (model.coulomb_charges)."""

import numpy as np
import pytest
from ase import Atoms, units
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.mopac import MOPAC
from ase.md.langevin import Langevin

from otfml import OTFCalculator
from otfml.baseline import COULOMB_CONSTANT, ScreenedCoulomb
from otfml.descriptor import Descriptor
from otfml.errors import ConfigError
from otfml.gp import SparseGP
from otfml.store import Store
from otfml.training import check_model_settings, train_from_frames

from .conftest import mopac, numeric_force

TIP3P = {"O": -0.834, "H": 0.417}


def _dimer(seed=0):
    a = molecule("H2O")
    b = molecule("H2O")
    b.rotate(70, "z")
    b.positions += [2.9, 0.4, 0.2]
    a += b
    a.rattle(0.05, seed=seed)
    return a


def test_forces_are_the_negative_gradient_and_energies_add_up():
    a = _dimer()
    c = ScreenedCoulomb(TIP3P, width=1.5)
    e, f = c.energies_forces(a)
    num = np.array([[numeric_force(lambda x: c.energies_forces(x)[0].sum(), a, i, k)
                     for k in range(3)] for i in range(len(a))])
    np.testing.assert_allclose(f, num, atol=1e-8)
    np.testing.assert_allclose(f.sum(axis=0), 0.0, atol=1e-12)  # no net force
    # far apart, two point charges: k q1 q2 / r (erf(r / w) is 1)
    pair = Atoms("OH", positions=[[0, 0, 0], [0, 0, 20.0]])
    assert c.energies_forces(pair)[0].sum() == pytest.approx(
        COULOMB_CONSTANT * -0.834 * 0.417 / 20.0, rel=1e-12)


def _twins():
    """A model with the term and one without it given the labels less the term."""
    frames = []
    for seed in range(4):
        a = _dimer(seed)
        a.calc = EMT()
        frames.append((a, a.get_potential_energy(), a.get_forces()))
    c = ScreenedCoulomb(TIP3P, width=1.5, species=[1, 8])
    with_term = SparseGP(Descriptor([1, 8]), sparse_tolerance=0.02, baseline=c)
    plain = SparseGP(Descriptor([1, 8]), sparse_tolerance=0.02)
    for a, e, f in frames:
        ce, cf = c.energies_forces(a)
        with_term.add_frame(a, e, f)
        plain.add_frame(a, e - ce.sum(), f - cf)
    return with_term, plain


def test_a_model_with_the_term_is_the_model_of_the_labels_less_it():
    """Training on the labels with the term equals training on the labels less the term and
    adding it to the predictions."""
    with_term, plain = _twins()
    x = _dimer(9)
    p, q = with_term.predict(x), plain.predict(x)
    ce, cf = with_term.baseline.energies_forces(x)
    assert abs(ce.sum()) > 0.01  # the term is not negligible here
    assert p.energy == pytest.approx(q.energy + ce.sum(), abs=1e-9)
    np.testing.assert_allclose(p.forces, q.forces + cf, atol=1e-9)
    np.testing.assert_allclose(p.local_energies, q.local_energies + ce, atol=1e-9)
    np.testing.assert_allclose(p.novelty, q.novelty)  # the term is certain


def test_the_term_is_saved_with_the_model(tmp_path):
    model, _ = _twins()
    model.save(str(tmp_path / "m.npz"))
    back = SparseGP.load(str(tmp_path / "m.npz"))
    assert back.baseline.to_dict() == model.baseline.to_dict()
    x = _dimer(9)
    np.testing.assert_allclose(back.predict(x).forces, model.predict(x).forces, atol=1e-12)


@pytest.mark.parametrize("charges, width, match", [
    ({"Xx": 0.4}, 1.5, "'Xx' is not an element"),
    ({"O": "minus"}, 1.5, "the charge of O is 'minus'"),
    ({"O": -0.8, "H": 0.4}, 0.0, "coulomb_width"),
    ([0.4, -0.8], 1.5, "coulomb_charges"),
])
def test_bad_charges_are_refused_by_name(charges, width, match):
    with pytest.raises(ConfigError, match=match):
        check_model_settings({"coulomb_charges": charges, "coulomb_width": width})


def test_an_element_without_a_charge_or_a_periodic_cell_is_refused():
    frames = []
    a = molecule("CH3OH")
    a.calc = EMT()
    frames.append(type("F", (), {"atoms": a, "energy": a.get_potential_energy(),
                                  "forces": a.get_forces()})())
    with pytest.raises(ConfigError, match="no charge for C; give one"):
        train_from_frames(frames, {"coulomb_charges": TIP3P})
    c = ScreenedCoulomb(TIP3P)
    w = _dimer()
    w.cell = [10, 10, 10]
    w.pbc = True
    with pytest.raises(ConfigError, match="periodic"):
        c.energies_forces(w)


@mopac
def test_otf_md_with_the_term_and_mopac_stores_mopac_labels(tmp_path):
    """Two waters with real MOPAC PM7 and TIP3P charges under the model: the run stays
    physical, and the store keeps MOPAC's own labels (not the labels less the term)."""
    a = _dimer()
    a.calc = OTFCalculator(reference=MOPAC(method="PM7"), store=str(tmp_path / "w.h5"),
                           model_settings={"coulomb_charges": TIP3P})
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=300, friction=0.01,
                   rng=np.random.default_rng(0), fixcm=False)
    temps = []
    dyn.attach(lambda: temps.append(a.get_temperature()), interval=1)
    dyn.run(150)
    L = a.calc.learner
    assert 0 < L.n_calls < 150 and max(temps) < 1500
    assert L.model.baseline is not None
    a.calc.close()
    with Store(tmp_path / "w.h5") as st:
        fr = st.frame(len(st) - 1)
    chk = fr.atoms.copy()
    chk.calc = MOPAC(method="PM7", label=str(tmp_path / "chk" / "m"))
    assert chk.get_potential_energy() == pytest.approx(fr.energy, abs=1e-6)
    np.testing.assert_allclose(chk.get_forces(), fr.forces, atol=1e-4)
