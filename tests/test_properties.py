"""Property-based tests (hypothesis) of the model over random valid molecules:
rotation/translation/permutation invariance and forces = -dE/dx."""

import functools

import numpy as np
from ase import Atoms
from ase.build import molecule
from ase.calculators.emt import EMT
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy.spatial.transform import Rotation

from otfml.store import Frame
from otfml.training import train_from_frames

from .conftest import numeric_force

SPECIES = [1, 6, 8]


@functools.lru_cache(maxsize=1)
def _model():
    """A model of C/H/O fitted on EMT-labelled distorted ethanol and water."""
    frames = []
    for k, name in enumerate(["CH3CH2OH", "H2O", "CH3CH2OH", "CH3OH"]):
        a = molecule(name)
        a.rattle(0.1, seed=k)
        a.calc = EMT()
        frames.append(Frame(atoms=a.copy(), energy=a.get_potential_energy(),
                            forces=a.get_forces(), fingerprint={}, step=k, walker=0,
                            max_std=0.0, time=0.0))
    return train_from_frames(frames)


@st.composite
def molecules(draw):
    """2-8 atoms of H, C, O in a 3.5 Å box, no pair closer than 0.9 Å, none isolated."""
    n = draw(st.integers(2, 8))
    numbers = draw(st.lists(st.sampled_from(SPECIES), min_size=n, max_size=n))
    coords = draw(st.lists(st.floats(0.0, 3.5, allow_nan=False), min_size=3 * n,
                           max_size=3 * n))
    atoms = Atoms(numbers=numbers, positions=np.reshape(coords, (n, 3)))
    d = atoms.get_all_distances()
    np.fill_diagonal(d, np.inf)
    assume(d.min() > 0.9 and d.min(axis=1).max() < 2.7)
    return atoms


@settings(max_examples=40, deadline=None)
@given(atoms=molecules(), seed=st.integers(0, 2**32 - 1))
def test_invariant_under_rotation_translation_permutation(atoms, seed):
    model = _model()
    rng = np.random.default_rng(seed)
    rot = Rotation.random(random_state=seed).as_matrix()
    perm = rng.permutation(len(atoms))
    moved = Atoms(numbers=atoms.numbers[perm],
                  positions=atoms.positions[perm] @ rot.T + rng.normal(0, 5, 3))
    p, q = model.predict(atoms), model.predict(moved)
    assert abs(p.energy - q.energy) < 1e-8 * max(1.0, abs(p.energy))
    np.testing.assert_allclose(q.forces, p.forces[perm] @ rot.T, atol=1e-8)
    np.testing.assert_allclose(q.local_std, p.local_std[perm], atol=1e-8)


@settings(max_examples=25, deadline=None)
@given(atoms=molecules(), seed=st.integers(0, 2**32 - 1))
def test_forces_are_the_negative_energy_gradient(atoms, seed):
    model = _model()
    rng = np.random.default_rng(seed)
    forces = model.predict(atoms).forces
    for i, c in zip(rng.integers(len(atoms), size=3), rng.integers(3, size=3)):
        numeric = numeric_force(lambda x: model.predict(x).energy, atoms, i, c)
        assert abs(numeric - forces[i, c]) < 1e-5 + 1e-4 * abs(forces[i, c])
