import numpy as np
import pytest
from ase import Atoms
from ase.build import molecule
from scipy.spatial.transform import Rotation
from scipy.special import eval_legendre

from otfml._descriptor_kernels import _solid_harmonics
from otfml.descriptor import Descriptor

from .conftest import numeric_force


def test_spherical_harmonics_addition_theorem():
    """sum_m Y_lm(a) Y_lm(b) = (2l+1)/(4 pi) P_l(a.b): orthonormal real harmonics."""
    d = Descriptor([1, 6], l_max=6)
    rng = np.random.default_rng(0)
    L = 49
    for _ in range(5):
        a, b = (v / np.linalg.norm(v) for v in rng.normal(size=(2, 3)))
        Ya, Yb, dY = np.empty(L), np.empty(L), np.empty((L, 3))
        _solid_harmonics(*a, 6, d._norm, Ya, dY)
        _solid_harmonics(*b, 6, d._norm, Yb, dY)
        for lv in range(7):
            s = slice(lv * lv, (lv + 1) ** 2)
            assert Ya[s] @ Yb[s] == pytest.approx((2 * lv + 1) / (4 * np.pi)
                                                  * eval_legendre(lv, a @ b), abs=1e-12)


def test_invariance_rotation_translation_permutation(ethanol):
    d = Descriptor([1, 6, 8])
    p = d.environments(ethanol).p
    b = ethanol.copy()
    R = Rotation.random(random_state=3).as_matrix()
    b.positions = b.positions @ R.T + [1.0, -2.0, 0.5]
    assert np.abs(d.environments(b).p - p).max() < 1e-12
    # swap two hydrogens: their descriptor rows swap, others unchanged
    h = [i for i, z in enumerate(ethanol.numbers) if z == 1][:2]
    perm = np.arange(len(ethanol))
    perm[h[0]], perm[h[1]] = h[1], h[0]
    c = ethanol[perm]
    assert np.abs(d.environments(c).p - p[perm]).max() < 1e-12


@pytest.mark.parametrize("pbc, r0, centre, inner", [
    (False, None, 0.0, None), (True, None, 0.0, None), (False, 1.5, 0.0, None),
    (False, None, 0.7, None), (True, 1.5, 0.7, None), (False, None, 0.7, 2.0),
    (True, None, 0.7, 2.0)])
def test_adjoint_and_full_gradient_match_finite_differences(ethanol, pbc, r0, centre, inner):
    """E = sum_i w_i . p_i: backprop forces and the dp/dr array agree with FD (1e-6),
    with and without a radial scaling, the centre's term and an inner cutoff."""
    a = ethanol.copy()
    if pbc:
        a.cell = [7.0, 7.5, 8.0]
        a.pbc = True
        a.center()
    d = Descriptor([1, 6, 8], cutoff=3.5, radial_scaling=r0, radial_power=3.0,
                   centre_weight=centre, inner_cutoff=inner)
    env = d.environments(a)
    W = np.random.default_rng(1).normal(size=env.p.shape)
    F = d.backprop(env, W)
    Ffd = np.array([[numeric_force(lambda x: (d.environments(x).p * W).sum(), a, i, c)
                     for c in range(3)] for i in range(len(a))])
    assert np.abs(F - Ffd).max() < 1e-6 * max(1.0, np.abs(F).max())
    G = d.gradient(env)
    F2 = np.zeros_like(F)
    for q, (i, j) in enumerate(zip(env.pi, env.pj)):
        g = G[q] @ W[i]
        F2[j] -= g
        F2[i] += g
    assert np.abs(F2 - F).max() < 1e-10


def test_radial_scaling_weighs_distant_neighbours_less():
    """With scaling, a neighbour at r contributes w(r) = 1 / (1 + (r/r0)^m) of its unscaled
    amplitude (p is quadratic in the neighbour density: w^2 for an atom's one neighbour)."""
    from ase import Atoms

    h2 = Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.7]])
    p0 = Descriptor([1], centre_weight=0.0).environments(h2).p[0]
    p1 = Descriptor([1], radial_scaling=2.0, radial_power=4,
                    centre_weight=0.0).environments(h2).p[0]
    w = 1.0 / (1.0 + (1.7 / 2.0) ** 4)
    assert p1 == pytest.approx(w**2 * p0, rel=1e-12)
    d = Descriptor([1], radial_scaling=2.0, radial_power=4)
    again = Descriptor.from_dict(d.to_dict())  # what a saved model is rebuilt from
    np.testing.assert_array_equal(again.environments(h2).p, d.environments(h2).p)
    with pytest.raises(ValueError, match="radial_scaling=-1"):
        Descriptor([1], radial_scaling=-1.0)


def test_centre_term_appends_the_radial_density_and_keeps_the_rest():
    """centre_weight w: the features without it, then sqrt(2) w c[a, l=0] for every neighbour
    channel a and w^2; the normalized descriptor then tells a denser environment apart."""
    from ase import Atoms

    from otfml.errors import IsolatedAtoms

    a = molecule("CH3CH2OH")
    plain = Descriptor([1, 6, 8], n_max=4, centre_weight=0.0)
    with_c = Descriptor([1, 6, 8], n_max=4, centre_weight=0.7)
    e0, e1 = plain.environments(a), with_c.environments(a)
    F0, K = plain.n_features, 3 * 4
    assert with_c.n_features == F0 + K + 1 == e1.p.shape[1]
    np.testing.assert_array_equal(e1.p[:, :F0], e0.p)
    np.testing.assert_allclose(e1.p[:, F0:F0 + K], np.sqrt(2) * 0.7 * e0.c[:, :, 0], rtol=1e-14)
    np.testing.assert_allclose(e1.p[:, -1], 0.49)
    again = Descriptor.from_dict(with_c.to_dict())
    np.testing.assert_array_equal(again.environments(a).p, e1.p)
    # an H with one H neighbour, and one with two in a line: one's descriptor is the other's
    # times 4 (twice the density, squared), the same after normalization without the centre
    one = Atoms("H2", positions=[[0, 0, 0], [0, 0, 1.2]])
    two = Atoms("H3", positions=[[0, 0, 0], [0, 0, 1.2], [0, 0, 1.2 + 1e-9]])
    for d, same in ((Descriptor([1], centre_weight=0.0), True),
                    (Descriptor([1], centre_weight=0.7), False)):
        p1, p2 = d.environments(one).p[0], d.environments(two).p[0]
        unit = [p / np.linalg.norm(p) for p in (p1, p2)]
        assert np.allclose(*unit, atol=1e-6) == same
    lonely = Atoms("H3", positions=[[0, 0, 0], [0, 0, 1.0], [0, 0, 9.0]])
    with pytest.raises(IsolatedAtoms, match="no neighbour"):
        with_c.environments(lonely)
    with pytest.raises(ValueError, match="centre_weight=-1"):
        Descriptor([1], centre_weight=-1.0)


def test_unknown_element_is_named():
    d = Descriptor([1, 6, 8])
    with pytest.raises(ValueError, match=r"\['N'\]"):
        d.environments(molecule("HCN"))


def test_smooth_at_cutoff():
    """A neighbour crossing the cutoff changes the descriptor continuously."""
    d = Descriptor([1], cutoff=3.0, centre_weight=0.0)  # a lone H has no descriptor with one
    from ase import Atoms

    ps = [d.environments(Atoms("H2", positions=[[0, 0, 0], [0, 0, r]])).p[0]
          for r in (2.999999, 3.000001)]
    assert np.abs(ps[0] - ps[1]).max() < 1e-9


def test_an_inner_cutoff_leaves_out_the_near_neighbours_smoothly(ethanol):
    """With inner_cutoff r_i, neighbours closer than r_i - 0.5 Å do not count (the bonded
    ones of ethanol), one moved across r_i - 0.5 Å changes nothing abruptly, and an atom
    with none in its shell keeps the centre's term alone."""
    d = Descriptor([1, 6, 8], cutoff=5.0, l_max=0, centre_weight=0.7, inner_cutoff=2.0)
    env = d.environments(ethanol)
    r = np.linalg.norm(env.D, axis=1)
    assert r.min() > 1.5 and len(env.pi) < len(Descriptor([1, 6, 8], cutoff=5.0).environments(
        ethanol).pi)
    h2 = molecule("H2")  # 0.74 Å apart: nothing in the shell
    p = Descriptor([1], cutoff=5.0, l_max=0, centre_weight=0.7, inner_cutoff=2.0
                   ).environments(h2).p
    assert np.count_nonzero(p) == 2 and np.allclose(p[:, -1], 0.49)
    x = [Descriptor([1], cutoff=5.0, l_max=0, centre_weight=0.7, inner_cutoff=2.0).environments(
        Atoms("H2", positions=[[0, 0, 0], [0, 0, d_]])).p[0] for d_ in (1.3, 1.499, 1.501)]
    assert np.array_equal(x[0], x[1])  # no weight inside the shell
    assert 0 < np.abs(x[2] - x[1]).max() < 1e-5  # and a weight that starts from zero
    with pytest.raises(ValueError, match="centre_weight > 0"):
        Descriptor([1], cutoff=5.0, centre_weight=0.0, inner_cutoff=2.0)
    with pytest.raises(ValueError, match="inner_cutoff=4.8"):
        Descriptor([1], cutoff=5.0, inner_cutoff=4.8)
