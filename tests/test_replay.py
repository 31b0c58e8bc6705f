"""benchmarks/replay.py: the learner along a fixed trajectory with cached labels."""

import os
import sys

import numpy as np
import pytest
from ase import units
from ase.calculators.emt import EMT
from ase.cluster import Icosahedron
from ase.md.langevin import Langevin

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
replay = pytest.importorskip("replay")


@pytest.fixture(scope="module")
def frames():
    """40 steps of EMT Langevin MD of a copper cluster, every step labelled (cheap labels)."""
    a = Icosahedron("Cu", 2)
    a.info["multiplicity"] = 2  # 13 copper atoms: an odd number of electrons
    a.calc = EMT()
    dyn = Langevin(a, 2 * units.fs, temperature_K=500, friction=0.01, fixcm=False,
                   rng=np.random.default_rng(0))
    out = []

    def keep():
        out.append((a.copy(), a.get_potential_energy(), a.get_forces().copy()))

    dyn.attach(keep, interval=1)
    dyn.run(39)
    return out


def test_the_lookup_returns_each_geometrys_own_label_and_refuses_others(frames):
    calc = replay.lookup_calculator(frames)
    for a, e, f in frames[::7]:
        b = a.copy()
        b.calc = calc
        assert b.get_potential_energy() == e
        np.testing.assert_array_equal(b.get_forces(), f)
    other = frames[0][0].copy()
    other.positions[0, 0] += 1e-9
    other.calc = calc
    with pytest.raises(KeyError):
        other.get_forces()


def test_calls_at_every_step_use_only_reference_forces(frames):
    from otfml.policy import LearningPolicy

    r = replay.replay(frames, LearningPolicy(force_tolerance=1e-12), {})
    assert r["calls"] == len(frames) and r["per_step"]["called"].all()
    assert r["used_forces_mae_eV_A"] == 0.0


def test_trusted_steps_carry_the_models_actual_error(frames):
    from otfml.policy import LearningPolicy

    r = replay.replay(frames, LearningPolicy(force_tolerance=1e3), {})
    called, mae = r["per_step"]["called"], r["per_step"]["mae"]
    last = int(np.flatnonzero(called).max())
    assert r["calls"] <= 4 and last < 10  # the initial and calibrating calls only
    assert np.all(mae[called] == 0.0) and np.all(mae[~called] > 0.0)
    # the model has not changed since its last call: its errors now are those it made
    model = r["model"]
    expect = [np.abs(model.predict(a).forces - f).mean() for a, _e, f in frames[last + 1:]]
    np.testing.assert_allclose(mae[last + 1:], expect, rtol=1e-10)
    assert r["used_forces_mae_eV_A"] == pytest.approx(mae.sum() / len(frames))
    assert r["trusted_steps_mae_eV_A"] == pytest.approx(mae[~called].mean())
