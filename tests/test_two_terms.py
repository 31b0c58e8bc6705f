"""The model with its second, longer-range term: the algebra of two jointly fitted GPs."""

import numpy as np
import pytest
from ase.build import molecule

import otfml.gp
from otfml.descriptor import Descriptor
from otfml.gp import SparseGP
from otfml.training import MODEL_DEFAULTS, model_from_settings

from .conftest import numeric_force
from .test_gp import _assert_forces_are_negative_energy_gradient, _emt_frames

SPECIES = [1, 6, 8]


def _two_terms(**kw) -> SparseGP:
    return SparseGP(Descriptor(SPECIES), sparse_tolerance=0.02, cache_dtype=np.float64,
                    long_descriptor=Descriptor(SPECIES, cutoff=5.0, n_max=6, l_max=0), **kw)


@pytest.fixture(scope="module")
def trained():
    gp = _two_terms()
    frames = _emt_frames(10, seed=5)
    for a, e, f in frames:
        gp.add_frame(a, e, f, solve=False)
    gp.fit_hyperparameters()
    return gp, frames


def test_each_term_has_its_own_sparse_set_and_signal_variance(trained):
    gp, _ = trained
    counts = gp.sparse_counts()
    assert set(counts) == {"H", "C", "O", "H (5 Å)", "C (5 Å)", "O (5 Å)"}
    assert all(n > 0 for n in counts.values())
    assert gp.hyp.sigma_long is not None and gp.hyp.sigma_long != gp.hyp.sigma
    # no kernel between the terms' columns: K_mm is block diagonal over channels
    K = gp._kernel(np.arange(gp.n_sparse))
    term = gp.zs // len(SPECIES)
    assert not np.any(K[term[:, None] != term[None, :]])


def test_forces_are_the_negative_gradient_of_both_terms(trained):
    gp, frames = trained
    _assert_forces_are_negative_energy_gradient(gp, frames[0][0])


def test_likelihood_gradient_in_all_four_hyperparameters(trained):
    gp, _ = trained
    theta = np.array([0.8, 0.01, 0.1, 0.4])
    _, g = gp.log_marginal_likelihood(theta, eval_gradient=True)
    h, x, lml = 1e-4, np.log(theta), gp.log_marginal_likelihood
    fd = [(lml(np.exp(x + h * e)) - lml(np.exp(x - h * e))) / (2 * h) for e in np.eye(4)]
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-3)


def test_uncertainties_match_the_dense_dtc_posterior_of_the_sum(trained):
    """local_std, energy_std and novelty against the DTC covariance of the summed kernel
    sigma^2 k + sigma_long^2 k_long, built densely."""
    gp, frames = trained
    a = frames[3][0].copy()
    a.positions += 0.03
    p = gp.predict(a)
    sig = gp.hyp.term_sigmas()
    S = len(SPECIES)
    term, zsp = gp.zs // S, gp.zs % S
    k_nn = np.zeros((len(a), len(a)))
    k_nm = np.zeros((len(a), gp.n_sparse))
    for t, env in enumerate((p.env, p.env.long)):
        ph = env.p / np.linalg.norm(env.p, axis=1)[:, None]
        Zt = gp.Z[:, gp._slices[t]]
        same = env.species[:, None] == env.species[None, :]
        k_nn += sig[t] ** 2 * np.where(same, (ph @ ph.T) ** 2, 0.0)
        mask = (env.species[:, None] == zsp[None, :]) & (term[None, :] == t)
        k_nm += sig[t] ** 2 * np.where(mask, (ph @ Zt.T) ** 2, 0.0)
    s = sig[term]
    Kmm = s[:, None] * (gp._kernel(np.arange(gp.n_sparse)) + 1e-8 * np.eye(gp.n_sparse)) * s
    B = gp._LB @ gp._LB.T
    Linv_s = gp._Linv / s[:, None]  # (S L)^-1
    Pinv = Linv_s.T @ np.linalg.solve(B, Linv_s)
    unexplained = k_nn - k_nm @ np.linalg.solve(Kmm, k_nm.T)
    cov = unexplained + k_nm @ Pinv @ k_nm.T
    np.testing.assert_allclose(p.local_std, np.sqrt(np.diag(cov)), rtol=1e-6, atol=1e-9)
    assert p.energy_std == pytest.approx(np.sqrt(cov.sum()), rel=1e-6)
    prior = np.sqrt(np.clip(np.diag(unexplained), 0, None))
    np.testing.assert_allclose(p.novelty, prior, rtol=1e-5, atol=1e-6)


def test_incremental_updates_equal_a_fresh_factorization(monkeypatch):
    """Frames and new columns of both terms update the factor of B; the result equals a
    model that factors afresh at every solve and one solved once at the end."""
    monkeypatch.setattr(otfml.gp._frames, "_UPDATE_RANK", 1.0)
    frames = _emt_frames(8, seed=6)
    inc, ref, batch = _two_terms(), _two_terms(), _two_terms()
    updated = 0
    for k, (a, e, f) in enumerate(frames[:7]):
        for gp in (inc, ref, batch):
            gp.add_frame(a, e, f, solve=False)
        if k == 2:
            for gp in (inc, ref):
                gp.fit_hyperparameters()
            batch.hyp = inc.hyp
            continue
        if k < 2:
            continue
        inc.solve()
        ref._lb_state = None
        ref.solve()
        updated += inc._lb_state["updates"] > 0
        np.testing.assert_allclose(inc._beta, ref._beta, rtol=1e-7, atol=1e-9)
    batch.solve()
    assert updated >= 3
    x = frames[7][0]
    p, q, r = inc.predict(x), ref.predict(x), batch.predict(x)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-8)
    np.testing.assert_allclose(p.forces, r.forces, atol=1e-8)
    np.testing.assert_allclose(p.local_std, q.local_std, rtol=1e-7)
    # the incrementally kept accumulators equal ones formed from the stored rows
    AF = inc._AFw.copy()
    inc.rebuild_accumulators()
    np.testing.assert_allclose(inc._AFw, AF, atol=1e-8 * np.abs(AF).max())


def test_dropping_frames_and_pruning_keep_the_model_consistent():
    """Frames taken out and environments swapped out of either term: the model equals one
    built from its remaining data (its accumulators re-formed from the stored rows)."""
    frames = _emt_frames(9, seed=7)
    gp = _two_terms(max_sparse_per_species=6, long_max_sparse=6)
    for a, e, f in frames:
        gp.add_frame(a, e, f, solve=False)
    assert sum(gp.n_pruned.values()) > 0
    assert any(c >= len(SPECIES) for c in gp.n_pruned)  # the longer-range term's too
    gp.drop_frames([0, 4])
    gp.solve()
    x = frames[2][0]
    p = gp.predict(x)
    gp.rebuild_accumulators()
    gp._lb_state = None
    gp.solve()
    q = gp.predict(x)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-7)


def test_save_load_round_trip_is_exact(trained, tmp_path):
    gp, frames = trained
    gp.save(str(tmp_path / "m.npz"))
    m = SparseGP.load(str(tmp_path / "m.npz"))
    assert m.terms[1].to_dict() == gp.terms[1].to_dict() and m.hyp == gp.hyp
    a = frames[1][0]
    p, q = gp.predict(a), m.predict(a)
    assert p.energy == q.energy
    np.testing.assert_array_equal(p.forces, q.forces)
    np.testing.assert_allclose(p.local_std, q.local_std, rtol=1e-10)


def test_environments_without_the_second_term_are_refused(trained):
    gp, frames = trained
    env = gp.descriptor.environments(frames[0][0])
    with pytest.raises(ValueError, match="SparseGP.environments"):
        gp.predict(frames[0][0], env)
    with pytest.raises(ValueError, match="longer-range term's species"):
        SparseGP(Descriptor([1, 8]), long_descriptor=Descriptor([1, 6, 8]))


def test_model_long_cutoff_adds_the_second_term_and_null_leaves_it_out():
    gp = model_from_settings([1, 8], {**MODEL_DEFAULTS, "long_cutoff": 6.0})
    assert len(gp.terms) == 2 and gp.terms[1].cutoff == 6.0
    assert gp.terms[1].l_max == MODEL_DEFAULTS["long_l_max"]
    one = model_from_settings([1, 8], dict(MODEL_DEFAULTS))  # the default: one term
    assert len(one.terms) == 1 and one.hyp.sigma_long is None
    w = molecule("H2O")
    assert gp.environments(w).long is not None


def test_a_shell_term_learns_where_some_atoms_have_nobody_in_the_shell():
    """A second term of the shell from 2.5 to 6 Å (long_inner_cutoff 3): a lone water has nobody
    there (centre term only), a dimer at 4 Å has; both train and predict, and the forces
    stay the exact gradient."""
    from ase.calculators.emt import EMT

    gp = model_from_settings([1, 8], {**MODEL_DEFAULTS, "long_cutoff": 6.0,
                                      "long_inner_cutoff": 3.0})
    assert gp.terms[1].inner_cutoff == 3.0
    rng = np.random.default_rng(0)
    for k in range(4):
        w = molecule("H2O")
        if k % 2:
            other = molecule("H2O")
            other.translate([4.0, 0.0, 0.0])
            w += other
        w.positions += rng.normal(scale=0.03, size=w.positions.shape)
        w.calc = EMT()
        gp.add_frame(w, w.get_potential_energy(), w.get_forces())
    assert len(gp.environments(molecule("H2O")).long.pi) == 0
    assert gp.sparse_counts()["O (6 Å)"] >= 1
    F = gp.predict(w).forces  # the dimer
    for i in (0, 3, 5):
        for c in range(3):
            fd = numeric_force(lambda x: gp.predict(x).energy, w, i, c)
            assert F[i, c] == pytest.approx(fd, abs=1e-6)
