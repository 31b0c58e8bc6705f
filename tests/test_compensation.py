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
from otfml.drivers import thermalize
from otfml.policy import LearningPolicy

from .conftest import mopac


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


def _observe(a, comp):
    """Run the observer; the kinetic energy it took (eV) and the learner's last step."""
    ke = a.get_kinetic_energy()
    comp()
    return ke - a.get_kinetic_energy(), a.calc.learner.history[-1]


def _energy_at(a, positions):
    x = a.copy()
    x.positions = positions
    return a.calc.model.predict(x).energy


def _here_and_before(a):
    """This step's positions, energy and forces (what the calculator returned)."""
    return a.positions.copy(), a.calc.results["energy"], a.calc.results["forces"].copy()


def test_each_change_of_surface_is_taken_from_the_kinetic_energy(cluster):
    """Calls returning the reference's values: a change of surface takes the mean of the
    two surfaces' difference at the step's ends, the reference's energy at the end it did
    not see extrapolated with its forces at the other; reference -> reference nothing."""
    a = cluster
    learner = a.calc.learner
    comp = EnergyCompensation(a)  # the default: from the first update
    while learner.n_calls < learner.policy.initial_calls:  # calls in a row: nothing
        _step(a)
        taken, last = _observe(a, comp)
        assert last["source"] == "reference" and taken == 0.0
    learner.policy.force_tolerance = 1e6  # model steps unless a call is requested
    x0, e0, f0 = _here_and_before(a)
    _step(a)
    taken, last = _observe(a, comp)  # onto the model that learned the labels
    assert last["source"] == "model"
    dx = a.positions - x0
    e_ref_here = e0 - np.vdot(f0, dx)  # the reference's energy here, from the call
    expected = 0.5 * ((last["energy"] - e_ref_here) + (_energy_at(a, x0) - e0))
    assert taken == pytest.approx(expected, abs=1e-10)
    p = a.get_momenta()
    _step(a, 1e-3)
    taken, last = _observe(a, comp)  # the same model: nothing
    assert last["source"] == "model"
    np.testing.assert_array_equal(a.get_momenta(), p)
    x0, e0, _ = _here_and_before(a)
    learner.request_reference = True
    _step(a)
    taken, last = _observe(a, comp)  # model -> reference
    assert last["source"] == "reference" and last["model_energy"] is not None
    x1, e1, f1 = _here_and_before(a)
    e_ref_before = e1 + np.vdot(f1, x1 - x0)  # the reference's energy at the step before
    expected = 0.5 * ((e1 - last["model_energy"]) + (e_ref_before - e0))
    assert taken == pytest.approx(expected, abs=1e-10)
    p = a.get_momenta()
    comp()  # the same step again: nothing more
    np.testing.assert_array_equal(a.get_momenta(), p)
    for _ in range(2):  # two calls in a row: the step between ran on the reference alone
        learner.request_reference = True
        _step(a)
        taken, last = _observe(a, comp)
    assert last["source"] == "reference" and taken == 0.0
    steps = [step for step, _ in comp.shifts]
    assert len(steps) == 2 and steps[-1] == last["step"] - 2
    assert comp.total == pytest.approx(sum(c for _, c in comp.shifts), abs=1e-12)
    a.calc.close()


def test_a_call_on_the_updated_model_takes_the_mean_change_of_the_step_ends(cluster):
    a = cluster
    a.calc.learner.policy.call_step_result = "updated_model"
    comp = EnergyCompensation(a)
    for _ in range(3):
        _step(a)
        comp()
    a.calc.learner.policy.force_tolerance = 1e6
    _step(a, 1e-3)
    taken, last = _observe(a, comp)
    assert last["source"] == "model"
    x_before, e_before = a.positions.copy(), last["energy"]
    a.calc.learner.policy.force_tolerance = 1e-9  # uncertain: a call
    _step(a, 1e-3)
    taken, last = _observe(a, comp)
    assert last["source"] == "updated_model"
    here = last["energy"] - last["model_energy"]
    there = _energy_at(a, x_before) - e_before
    assert taken == pytest.approx(0.5 * (here + there), abs=1e-10)
    a.calc.close()


def _nve_drift(a, min_frames: int, timestep_fs: float, steps: int) -> tuple[float, float]:
    """Velocity Verlet with ``EnergyCompensation(min_frames)`` attached: the largest move
    of ``K + U`` (U: the energy the step's forces came from) from its start, eV, and the
    sum of the sizes of the changes of surface the observer measured, eV."""
    comp = EnergyCompensation(a, min_frames=min_frames)
    dyn = VelocityVerlet(a, timestep_fs * units.fs)
    dyn.attach(comp, interval=1)
    total = []
    dyn.attach(lambda: total.append(a.get_kinetic_energy() + a.calc.results["energy"]),
               interval=1)
    dyn.run(steps)
    return (float(np.max(np.abs(np.array(total) - total[0]))),
            sum(abs(c) for _, c in comp.shifts))


@pytest.mark.parametrize("call_step_result", ["reference", "updated_model"])
def test_nve_keeps_the_kinetic_plus_the_used_surface_s_energy(call_step_result):
    """K + U (U: the surface that gave the step's forces) stays put through the updates."""
    runs = {}
    for min_frames in (0, 10**9):  # compensated, and never
        a = Icosahedron("Cu", 2)
        a.rattle(0.05, seed=1)
        thermalize(a, 300, np.random.default_rng(0), zero_drift=False)
        Stationary(a)
        # the whole estimate decides: a rule that calls often, so both surfaces alternate
        a.calc = OTFCalculator(EMT(), policy=LearningPolicy(
            force_tolerance=0.2, call_step_result=call_step_result, calibration="atom",
            decide_on="estimate"), multiplicity=2)
        runs[min_frames] = _nve_drift(a, min_frames, 1.0, 200)
        assert 20 < a.calc.learner.n_calls < 180  # both model steps and calls
        a.calc.close()
    (drift, changes), (drift_without, _) = runs[0], runs[10**9]
    assert changes > 0.05  # updates that would move K + U by this much
    assert drift < 0.1 * changes and drift < 0.2 * drift_without


@mopac
def test_nve_with_mopac_keeps_the_kinetic_plus_the_used_surface_s_energy(tmp_path):
    """The same with real MOPAC (ethanol, 300 steps): MOPAC's energy at the steps' other ends
    is extrapolated with its forces."""
    from ase.build import molecule
    from ase.calculators.mopac import MOPAC

    runs = {}
    for min_frames in (0, 10**9):  # compensated, and never
        a = molecule("CH3CH2OH")
        thermalize(a, 500, np.random.default_rng(0))
        a.calc = OTFCalculator(reference=MOPAC(method="PM7", label=str(tmp_path / "m" / "m")))
        runs[min_frames] = _nve_drift(a, min_frames, 0.5, 300)
        assert 20 < a.calc.learner.n_calls < 200
        a.calc.close()
    (drift, changes), (drift_without, _) = runs[0], runs[10**9]
    assert changes > 0.1
    assert drift < 0.15 * changes and drift < 0.2 * drift_without


def test_a_large_shift_is_spread_over_steps_within_the_cap(cluster):
    a = cluster
    comp = EnergyCompensation(a, max_fraction=0.01)
    a.calc.learner.policy.force_tolerance = 1e6
    for i in range(8):  # calls and model steps in turn
        a.calc.learner.request_reference = i % 2 == 0
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
    took = []
    for i in range(16):  # calls and model steps in turn
        a.calc.learner.request_reference = i % 2 == 0
        a.calc.learner.policy.force_tolerance = 1e6
        _step(a)
        taken, last = _observe(a, comp)
        took.append((last["step"], taken, last["frames"], last["source"]))
    # every change of surface is measured, a young model's too
    changed = [now[0] for before, now in zip(took, took[1:]) if now[3] != before[3]]
    assert len(changed) > 10 and [step for step, _ in comp.shifts] == changed
    young = {step for step, _, frames, _ in took if frames < 5}
    assert young and all(t == 0.0 for step, t, _, _ in took if step in young)
    assert comp.total == pytest.approx(sum(c for step, c in comp.shifts if step not in young),
                                       abs=1e-12)
    a.calc.close()


def test_steps_it_does_not_see_are_named_once(cluster, caplog):
    a = cluster
    comp = EnergyCompensation(a)
    dyn = VelocityVerlet(a, 1.0 * units.fs)
    dyn.attach(comp, interval=3)
    with caplog.at_level("WARNING", logger="otfml.compensation"):
        dyn.run(12)
    warned = [r for r in caplog.records if "interval=1" in r.getMessage()]
    assert len(warned) == 1 and "after step" in warned[0].getMessage()
    a.calc.close()


def test_bad_settings_are_refused(cluster):
    with pytest.raises(ValueError, match="max_fraction"):
        EnergyCompensation(cluster, max_fraction=1.5)
    with pytest.raises(ValueError, match="min_frames"):
        EnergyCompensation(cluster, min_frames=-1)
