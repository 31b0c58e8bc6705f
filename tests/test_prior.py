"""The force field prior a model can learn on top of (model.prior: mmff, RDKit's MMFF94)."""

import logging

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.optimize import BFGS

from otfml import OTFCalculator
from otfml.descriptor import Descriptor
from otfml.errors import ConfigError
from otfml.gp import SparseGP
from otfml.policy import LearningPolicy
from otfml.prior import ForceFieldPrior
from otfml.surrogate_opt import SurrogateOpt
from otfml.training import check_model_settings, model_from_settings

from .conftest import numeric_force

pytest.importorskip("rdkit")


def test_forces_are_the_negative_gradient_and_energies_add_up():
    a = molecule("CH3CH2OH")
    a.rattle(0.05, seed=1)
    p = ForceFieldPrior()
    e, f = p.energies_forces(a)
    assert e.shape == (9,) and np.ptp(e) == 0.0  # MMFF's energy shared equally
    num = np.array([[numeric_force(lambda x: p.energies_forces(x)[0].sum(), a, i, k)
                     for k in range(3)] for i in range(len(a))])
    np.testing.assert_allclose(f, num, atol=1e-5)
    assert np.abs(f).max() > 0.1  # a rattled molecule is off MMFF's minimum


def test_bonds_are_perceived_once_and_saved():
    """The bonds of the first geometry stay (a stretched bond costs energy rather than
    breaking); to_dict / from_dict gives the same values without perceiving again."""
    a = molecule("CH3CH2OH")
    p = ForceFieldPrior()
    e0 = p.energies_forces(a)[0].sum()
    b = a.copy()
    b.positions[8] += 2.0 * (b.positions[8] - b.positions[2])  # O-H pulled to ~3 Å
    q = ForceFieldPrior.from_dict(p.to_dict())
    eb, fb = q.energies_forces(b)
    assert eb.sum() > e0 + 1.0  # the bond is still there, stretched
    np.testing.assert_array_equal(fb, p.energies_forces(b)[1])
    assert len(p.to_dict()["topologies"]) == 1


def test_a_rough_start_is_perceived_as_its_molecule_or_not_at_all():
    """Stretched bonds RDKit's own perception misses are found; a structure too distorted
    to read gets no prior rather than another molecule's."""
    from rdkit import Chem

    from otfml.prior import _perceive

    def smiles(atoms):
        block = _perceive(atoms, 0)
        return None if block is None else Chem.MolToSmiles(Chem.MolFromMolBlock(block))

    rough = molecule("CH3CH2OH")
    rough.rattle(0.15, seed=1)  # a C-C bond of 1.98 A
    assert smiles(rough) == "CCO"
    wrecked = molecule("C6H6")
    wrecked.rattle(0.35, seed=3)  # RDKit reads a carbanion and a carbocation into it
    assert smiles(wrecked) is None
    nitro = molecule("CH3NO2")  # charges on bonded atoms are the molecule's own
    assert smiles(nitro) == "C[N+](=O)[O-]"


def test_a_molecule_rdkit_cannot_type_gets_no_prior(caplog):
    """A radical given as neutral closed shell (no bond orders fit), and a periodic cell:
    zero energy and forces, with a warning naming the structure."""
    p = ForceFieldPrior()
    with caplog.at_level(logging.WARNING, logger="otfml.prior"):
        e, f = p.energies_forces(molecule("CH3"))
        c = molecule("CH3CH2OH")
        c.cell, c.pbc = [10, 10, 10], True
        ec, fc = p.energies_forces(c)
    assert e.sum() == 0.0 and not f.any() and ec.sum() == 0.0 and not fc.any()
    assert "no MMFF prior for CH3" in caplog.text and "periodic C2H6O" in caplog.text
    # the charge in atoms.info is what the bonds are perceived for: a cation types
    ion = molecule("CH3")
    ion.info["charge"] = 1
    assert p.energies_forces(ion)[1].any()


def test_a_model_with_the_prior_learns_the_labels_less_it(tmp_path):
    """Its predictions are the prior plus a GP of the labels less the prior, and the prior
    is saved with the model."""
    frames = []
    for seed in range(3):
        a = molecule("CH3CH2OH")
        a.rattle(0.05, seed=seed)
        a.calc = EMT()
        frames.append((a, a.get_potential_energy(), a.get_forces()))
    p = ForceFieldPrior()
    with_prior = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02, baseline=p)
    plain = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    for a, e, f in frames:
        pe, pf = p.energies_forces(a)
        with_prior.add_frame(a, e, f)
        plain.add_frame(a, e - pe.sum(), f - pf)
    t = molecule("CH3CH2OH")
    t.rattle(0.05, seed=9)
    got, want = with_prior.predict(t), plain.predict(t)
    pe, pf = p.energies_forces(t)
    assert got.energy == pytest.approx(want.energy + pe.sum(), abs=1e-9)
    np.testing.assert_allclose(got.forces, want.forces + pf, atol=1e-9)
    with_prior.save(tmp_path / "m.npz")
    loaded = SparseGP.load(tmp_path / "m.npz")
    assert isinstance(loaded.baseline, ForceFieldPrior)
    np.testing.assert_allclose(loaded.predict(t).forces, got.forces, atol=1e-9)


def test_a_model_takes_a_prior_in_place_as_if_it_had_it_from_the_start():
    """SparseGP.set_baseline: the same predictions as a model given the prior before its
    first frame (the sparse set does not depend on the labels), and back again."""
    p = ForceFieldPrior()
    first = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02, baseline=p)
    later = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    for seed in range(3):
        a = molecule("CH3CH2OH")
        a.rattle(0.05, seed=seed)
        a.calc = EMT()
        for gp in (first, later):
            gp.add_frame(a, a.get_potential_energy(), a.get_forces())
    t = molecule("CH3CH2OH")
    t.rattle(0.05, seed=9)
    before = later.predict(t)
    later.set_baseline(p)
    got, want = later.predict(t), first.predict(t)
    assert got.energy == pytest.approx(want.energy, abs=1e-8)
    np.testing.assert_allclose(got.forces, want.forces, atol=1e-8)
    later.set_baseline(None)
    np.testing.assert_allclose(later.predict(t).forces, before.forces, atol=1e-8)


def test_model_prior_setting_is_checked_by_name():
    with pytest.raises(ConfigError, match="model.prior"):
        check_model_settings({"prior": "uff"})
    s = check_model_settings({"prior": "mmff", "coulomb_charges": {"O": -0.8, "H": 0.4}})
    with pytest.raises(ConfigError, match="model.prior and model.coulomb_charges"):
        model_from_settings([1, 8], s)


def test_the_optimizer_puts_the_prior_under_the_calculators_model(tmp_path):
    """SurrogateOpt gives a model that learned frames without a prior the prior in place,
    at a start the model does not trust itself at; where it does (it has learned the
    region), the model stays as it is and the first trust radius is longer.
    ``prior=None`` leaves the model as it is."""
    a = molecule("CH3CH2OH")
    a.rattle(0.1, seed=2)
    a.calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"))
    BFGS(a, logfile=None).run(fmax=0.5, steps=5)  # frames learned without a prior
    learner = a.calc.learner
    n = learner.model.n_frames
    assert n > 0 and learner.model.baseline is None
    opt = SurrogateOpt(a, logfile=None)  # a start the model has learned
    assert learner.model.baseline is None and opt.trust == 0.3
    a.rattle(0.3, seed=5)  # one it has not
    SurrogateOpt(a, logfile=None, prior=None)
    assert learner.model.baseline is None
    opt = SurrogateOpt(a, logfile=None)
    assert isinstance(learner.model.baseline, ForceFieldPrior) and opt.trust == 0.1
    assert learner.model.n_frames == n and learner.settings["prior"] == "mmff"
    with pytest.raises(ConfigError, match="prior = 'uff'"):
        SurrogateOpt(a, logfile=None, prior="uff")
    a.calc.close()
    # where bonds may break, the prior (which keeps its bonds) is not put under the model
    b = molecule("CH3CH2OH")
    b.calc = OTFCalculator(EMT(), policy=LearningPolicy(allow_fragmentation=True))
    SurrogateOpt(b, logfile=None)
    assert b.calc.learner.settings["prior"] is None
