"""EnergyCompensation: the energy shift of each update leaves the kinetic energy."""

import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron
from ase.md.velocitydistribution import Stationary
from ase.md.verlet import VelocityVerlet

from otfml import OTFCalculator
from otfml.compensation import EnergyCompensation
from otfml.policy import LearningPolicy
from otfml.run import thermalize


@pytest.fixture
def cluster():
    a = Icosahedron("Cu", 2)
    a.rattle(0.05, seed=1)
    thermalize(a, 300, np.random.default_rng(0), zero_drift=False)
    Stationary(a)
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=0.5), multiplicity=2)
    return a


def _step(a, dx=0.01):
    a.positions += dx * np.random.default_rng(len(a.calc.learner.history)).normal(size=(len(a), 3))
    a.get_forces()


def test_the_update_shift_is_taken_from_the_kinetic_energy(cluster):
    a = cluster
    comp = EnergyCompensation(a, min_frames=0)
    for _ in range(3):  # a model exists from the second step on
        _step(a)
        comp()
    a.calc.learner.request_reference = True
    _step(a)
    last = a.calc.learner.history[-1]
    assert last["source"] == "reference" and last["model_energy"] is not None
    shift = a.calc.model.predict(a).energy - last["model_energy"]
    assert shift != 0.0
    ke = a.get_kinetic_energy()
    total = comp.total
    comp()
    assert a.get_kinetic_energy() == pytest.approx(ke - shift, abs=1e-10)
    assert comp.total - total == pytest.approx(shift, abs=1e-12)
    assert comp.shifts[-1] == (last["step"], pytest.approx(shift, abs=1e-12))
    p = a.get_momenta()
    comp()  # the same step again: nothing more
    np.testing.assert_array_equal(a.get_momenta(), p)
    # a model step leaves the momenta alone
    a.calc.learner.policy.force_tolerance = 1e6
    _step(a, 1e-4)
    assert a.calc.learner.history[-1]["source"] == "model"
    comp()
    np.testing.assert_array_equal(a.get_momenta(), p)
    a.calc.close()


def test_a_large_shift_is_spread_over_steps_within_the_cap(cluster):
    a = cluster
    comp = EnergyCompensation(a, max_fraction=0.01, min_frames=0)
    for _ in range(4):
        a.calc.learner.request_reference = True
        _step(a)
        ke = a.get_kinetic_energy()
        comp()
        assert abs(ke - a.get_kinetic_energy()) <= 0.01 * ke + 1e-12
    shifts = comp.total + comp.pending
    assert comp.pending != 0.0
    for _ in range(200):
        comp()  # no new update: the pending part is taken step by step
    assert comp.pending == pytest.approx(0.0, abs=1e-12)
    assert comp.total == pytest.approx(shifts, abs=1e-12)
    a.calc.close()


def test_nve_with_compensation_runs_and_keeps_the_momentum(cluster):
    a = cluster
    dyn = VelocityVerlet(a, 1.0 * units.fs)
    comp = EnergyCompensation(a, min_frames=0)
    dyn.attach(comp, interval=1)
    dyn.run(30)
    assert a.calc.learner.n_calls >= 2
    np.testing.assert_allclose(a.get_momenta().sum(axis=0), 0.0, atol=1e-10)
    a.calc.close()


def test_a_young_model_is_not_compensated(cluster):
    a = cluster
    comp = EnergyCompensation(a, min_frames=5)
    for _ in range(8):
        a.calc.learner.request_reference = True
        _step(a)
        before = a.get_kinetic_energy()
        comp()
        young = a.calc.learner.history[-1]["frames"] < 5
        assert (a.get_kinetic_energy() == before) == young
    # the shifts of young updates are measured all the same
    updates = [h["step"] for h in a.calc.learner.history
               if h["called"] and h["model_energy"] is not None]
    assert [step for step, _shift in comp.shifts] == updates
    assert comp.total == pytest.approx(sum(sh for step, sh in comp.shifts
                                           if a.calc.learner.history[step - 1]["frames"] >= 5),
                                       abs=1e-12)
    a.calc.close()


def test_bad_settings_are_refused(cluster):
    with pytest.raises(ValueError, match="max_fraction"):
        EnergyCompensation(cluster, max_fraction=1.5)
    with pytest.raises(ValueError, match="min_frames"):
        EnergyCompensation(cluster, min_frames=-1)
