import functools

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT

import otfml.gp as gp_module
from otfml.descriptor import Descriptor
from otfml.gp import SparseGP

from .conftest import numeric_force

#: double-precision cache: models built along different paths agree to rounding, so the
#: tests of the incremental algebra can be tight (the default single-precision cache
#: leaves relative differences of about 1e-6 in the rows; see the test of it below)
ExactGP = functools.partial(SparseGP, cache_dtype=np.float64)


def _emt_frames(n, seed=0):
    """Cheap analytic labels (ASE's EMT) of rattled ethanol geometries."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = molecule("CH3CH2OH")
        a.positions += rng.normal(scale=0.08, size=a.positions.shape)
        a.calc = EMT()
        out.append((a, a.get_potential_energy(), a.get_forces()))
    return out


def _twins(frames) -> tuple[SparseGP, SparseGP]:
    """Two models given the same labelled frames the same way, one frame at a time."""
    models = (SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02),
              SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02))
    for a, e, f in frames:
        for gp in models:
            gp.add_frame(a, e, f)
    return models


@pytest.fixture(scope="module")
def trained():
    gp = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    frames = _emt_frames(12)
    for a, e, f in frames:
        gp.add_frame(a, e, f, solve=False)
    gp.fit_hyperparameters()
    return gp, frames


def _assert_forces_are_negative_energy_gradient(gp, atoms):
    """The model's forces on a few atoms near ``atoms`` against central differences of its
    energy (1e-6 eV/Å)."""
    a = atoms.copy()
    a.positions += 0.02
    F = gp.predict(a).forces
    for i in (0, 3, 8):
        for c in range(3):
            fd = numeric_force(lambda x: gp.predict(x).energy, a, i, c)
            assert F[i, c] == pytest.approx(fd, abs=1e-6)


def test_model_forces_are_negative_energy_gradient(trained):
    gp, frames = trained
    _assert_forces_are_negative_energy_gradient(gp, frames[0][0])


def test_with_the_centre_term_forces_are_still_the_negative_energy_gradient():
    """model.centre_weight (otfml's default 0.7) appends features; the model's forces stay
    exact and it fits what it was trained on."""
    gp = SparseGP(Descriptor([1, 6, 8], centre_weight=0.7), sparse_tolerance=0.02)
    frames = _emt_frames(6, seed=5)
    for a, e, f in frames:
        gp.add_frame(a, e, f, solve=False)
    gp.fit_hyperparameters()
    _assert_forces_are_negative_energy_gradient(gp, frames[0][0])
    at, e, f = frames[2]
    assert np.abs(gp.predict(at).forces - f).mean() < 0.15 * np.abs(f).mean()  # 0.07 here


def test_chunked_kernel_products_give_the_same_prediction(trained, monkeypatch):
    """A prediction reads each species' sparse descriptors in chunks (``_CHUNK_BYTES``);
    chunks of a few rows (several per species here) change nothing but rounding."""
    gp, frames = trained
    a = frames[0][0].copy()
    a.positions += 0.02
    whole = gp.predict(a)
    F = gp.descriptor.n_features
    monkeypatch.setattr(gp_module.posterior, "_CHUNK_BYTES", 16 * 8 * F)  # 16 rows per chunk
    assert max(len(b["cols"]) for b in gp._blocks.values()) > 2 * 16
    chunked = gp.predict(a)
    assert chunked.energy == pytest.approx(whole.energy, rel=1e-12, abs=1e-12)
    np.testing.assert_allclose(chunked.forces, whole.forces, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked.novelty, whole.novelty, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked.local_std, whole.local_std, rtol=1e-10, atol=1e-12)


def test_a_prediction_shared_between_threads_equals_one_on_one_thread(trained, monkeypatch):
    """With ``threads`` > 1 each thread takes whole species or parts of one; the results are
    those of one thread, to rounding, and a species' parts are put back together."""
    gp, frames = trained
    a = frames[1][0].copy()
    a.positions += 0.03
    gp.threads = 1
    one = gp.predict(a)
    monkeypatch.setattr(gp_module._threads, "_MIN_SPLIT_WORK", 0.0)
    monkeypatch.setattr(gp_module._kernels, "_MIN_SPLIT_ATOMS", 1)
    for n in (2, 3):
        gp.threads = n
        env = gp.descriptor.environments(a)
        lanes = gp_module._kernels._split_work(
            [(s, int(np.sum(env.species == s)), len(b["cols"]) * gp.descriptor.n_features)
             for s, b in gp._blocks.items()], n)
        assert sum(len(x) > 0 for x in lanes) > 1
        shared = gp.predict(a, env)
        assert shared.energy == pytest.approx(one.energy, rel=1e-12, abs=1e-10)
        np.testing.assert_allclose(shared.forces, one.forces, rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(shared.novelty, one.novelty, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(shared.local_std, one.local_std, rtol=1e-6, atol=1e-8)
        assert shared.energy_std == pytest.approx(one.energy_std, rel=1e-6)
    gp.threads = None
    with pytest.raises(ValueError, match="threads = 0"):
        SparseGP(gp.descriptor, threads=0)


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_work_is_split_into_whole_species_or_large_parts(lanes):
    work = [(0, 128, 5.0), (1, 64, 5.0), (2, 3, 1.0), (3, 20, 0.5)]
    out = gp_module._kernels._split_work(work, lanes)
    assert len(out) == lanes
    for s, n, _ in work:  # every atom once, in order
        parts = sorted((a, b) for x in out for t, a, b in x if t == s)
        assert parts[0][0] == 0 and parts[-1][1] == n
        assert all(p[1] == q[0] for p, q in zip(parts, parts[1:]))
        smallest = gp_module._kernels._MIN_SPLIT_ATOMS
        assert len(parts) == 1 or min(b - a for a, b in parts) >= smallest
    load = [sum(u * (gp_module._kernels._FIXED_ATOMS + b - a) for t, a, b in x
                for s, _, u in work if s == t) for x in out]
    total = sum(u * (gp_module._kernels._FIXED_ATOMS + n) for _, n, u in work)
    K = gp_module._kernels
    assert max(load) <= total / lanes + 5.0 * (K._FIXED_ATOMS + K._MIN_SPLIT_ATOMS)


def _held_bytes(gp: SparseGP) -> dict:
    """What the model's buffers and frames hold now, counted array by array."""
    def grown(b):
        return b.n * b.shape_reserved[1] * b.view.itemsize
    rows = sum(grown(b) for b in (gp._RF, gp._RE, gp._EwT))
    cache = sum(grown(b) for g in gp._geo.values() for b in g.values())
    frames = sum(sum(a.nbytes for a in (fr.env.p, fr.env.c, fr.env.pi, fr.env.pj, fr.env.D,
                                        fr.env.sj, fr.env.species, fr.env.numbers, fr.forces))
                 for fr in gp.frames)
    return {"rows": rows, "cache": cache, "frames": frames}


@pytest.mark.parametrize("cache_frames", [None, 4.5])
def test_the_memory_estimate_matches_what_the_frames_take(caplog, monkeypatch, cache_frames):
    """The first frame's estimate of the memory at ``n`` frames is what ``n`` such frames
    take (force rows, cached gradients within ``cache_bytes``, environments); beyond the
    machine's memory the log warns and names a ``max_frames`` that fits."""
    import otfml.gp as gp_module

    frames = _emt_frames(8, seed=3)
    gp = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02, max_frames=8)
    geom = gp._geometry(gp.descriptor.environments(frames[0][0]))
    if cache_frames is not None:
        gp.cache_bytes = int(cache_frames * geom["nbytes"])
    buffers = {}
    with caplog.at_level("INFO", logger="otfml.gp"):
        for k, (a, e, f) in enumerate(frames):
            gp.add_frame(a, e, f, solve=False)
            if k == 0:  # the rows of max_frames frames are reserved at the first
                buffers = {"RF": gp._RF._t._a, **{f"{s}{key}": b._a for s, g in gp._geo.items()
                                               for key, b in g.items()}}
    # ... and nothing was reallocated since: no copies of the rows as the buffers fill
    assert buffers["RF"] is gp._RF._t._a and len(buffers) > 1
    # the cached gradients' buffers are as wide as their columns (their rows are written
    # whole, so spare columns would be backed by memory)
    assert all(b._a.shape[1] == b.m for g in gp._geo.values() for b in g.values())
    if cache_frames is None:
        assert all(buffers[f"{s}{key}"] is b._a for s, g in gp._geo.items()
                   for key, b in g.items())
    est = gp.memory_estimate(geom, len(frames))
    held = _held_bytes(gp)
    for key in held:  # rattled copies of one molecule: the same pairs give the same sizes
        assert est[key] == pytest.approx(held[key], rel=0.05), key
    assert est["total"] > sum(held.values()) and est["peak"] == est["total"]
    assert caplog.text.count("8 frames of 9 atoms (model.max_frames) will take about") == 1
    assert "while the force rows' buffer grows" not in caplog.text
    assert "WARNING" not in caplog.text
    # said once, also where evictions bring the model back to one frame
    caplog.clear()
    one = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02, max_frames=1)
    with caplog.at_level("INFO", logger="otfml.gp"):
        for a, e, f in frames[:3]:
            one.add_frame(a, e, f, solve=False)
    assert one.n_frames == 1 and caplog.text.count("model memory:") == 1
    # a machine with less memory than the estimate: a warning with a cap that fits
    caplog.clear()
    phys = 0.5 * gp.memory_estimate(geom, 8)["peak"]
    monkeypatch.setattr(gp_module._memory, "_physical_memory", lambda: phys)
    small = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02, max_frames=8)
    with caplog.at_level("WARNING", logger="otfml.gp"):
        small.add_frame(*frames[0], solve=False)
    assert "more than 80 % of this machine's" in caplog.text
    fit = int(caplog.text.split("lower model.max_frames to about ")[1].split()[0])
    assert 1 <= fit < 8


def test_a_refused_reservation_leaves_the_buffers_growing(monkeypatch, caplog):
    """Where the OS refuses the address space for max_frames frames' rows (strict
    overcommit), the buffers grow as they fill, and the estimate's peak says so."""
    import otfml.gp as gp_module

    def refuse(self, n, m=None, exact=False, exact_cols=False):
        if exact or exact_cols:
            raise MemoryError("refused")
        return grow(self, n, m)

    grow = gp_module._buffers._Grow.reserve
    monkeypatch.setattr(gp_module._buffers._Grow, "reserve", refuse)
    frames = _emt_frames(3, seed=4)
    gp = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02, max_frames=50)
    with caplog.at_level("INFO", logger="otfml.gp"):
        for a, e, f in frames:
            gp.add_frame(a, e, f)
    assert gp._RF.n == 3 * 27 and gp.n_frames == 3 and gp.is_fitted
    assert "while the force rows' buffer grows" in caplog.text
    geom = gp._geometry(gp.descriptor.environments(frames[0][0]))
    est = gp.memory_estimate(geom, 50)
    assert est["peak"] == est["total"] + est["rows"]


def test_likelihood_gradient_matches_finite_differences(trained):
    gp, _ = trained
    theta = np.array([0.8, 0.01, 0.1])
    _, g = gp.log_marginal_likelihood(theta, eval_gradient=True)
    h = 1e-4
    x = np.log(theta)
    lml = gp.log_marginal_likelihood
    fd = [(lml(np.exp(x + h * e)) - lml(np.exp(x - h * e))) / (2 * h) for e in np.eye(3)]
    np.testing.assert_allclose(g, fd, rtol=1e-4, atol=1e-3)


def test_hyperparameters_stay_within_bounds():
    gp = SparseGP(Descriptor([1, 6, 8]), bounds=((0.5, 0.6), (0.01, 0.02), (0.3, 0.4)))
    for a, e, f in _emt_frames(4):
        gp.add_frame(a, e, f)
    h = gp.fit_hyperparameters()
    assert 0.5 <= h.sigma <= 0.6 and 0.01 <= h.sigma_e <= 0.02 and 0.3 <= h.sigma_f <= 0.4


def test_a_fit_started_at_the_optimum_stops_at_once(monkeypatch):
    """The fit stops when no gradient component (per log hyperparameter) exceeds _FIT_GTOL:
    a second fit on the same data evaluates the likelihood once or twice and keeps the values;
    the first, from the defaults, took several evaluations and got there."""
    from otfml import gp as gp_module

    gp = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    for a, e, f in _emt_frames(8, seed=2):
        gp.add_frame(a, e, f, solve=False)
    calls = []
    lml = gp_module.likelihood.log_likelihood
    monkeypatch.setattr(gp_module.likelihood, "log_likelihood",
                        lambda *a, **k: (calls.append(1), lml(*a, **k))[1])
    first = gp.fit_hyperparameters()
    n_first = len(calls)
    _, g = gp.log_marginal_likelihood(eval_gradient=True)
    assert n_first > 3 and np.abs(g).max() <= gp_module.likelihood._FIT_GTOL
    calls.clear()
    again = gp.fit_hyperparameters()
    assert len(calls) <= 2 and again == first


def test_fits_training_data_and_novelty_is_low_there(trained):
    gp, frames = trained
    a, e, f = frames[3]
    p = gp.predict(a)
    # the fitted force noise bounds how closely training forces are reproduced
    assert np.abs(p.forces - f).mean() < 2 * gp.hyp.sigma_f
    far = molecule("CH3CH2OH")
    far.positions *= 1.25  # stretched: environments unlike any training one
    assert gp.predict(far).novelty.max() > 3 * p.novelty.max()


def test_incremental_equals_batch():
    frames = _emt_frames(5, seed=3)
    inc = ExactGP(Descriptor([1, 6, 8]))
    for a, e, f in frames:
        inc.add_frame(a, e, f)  # solves after each frame
    batch = ExactGP(Descriptor([1, 6, 8]))
    for a, e, f in frames:
        batch.add_frame(a, e, f, solve=False)
    batch.solve()
    np.testing.assert_allclose(inc._RF.view, batch._RF.view, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(inc._AFw, batch._AFw, rtol=1e-8, atol=1e-8 * np.abs(inc._AFw).max())
    probe = _emt_frames(1, seed=9)[0][0]
    pi, pb = inc.predict(probe), batch.predict(probe)
    assert pi.energy == pytest.approx(pb.energy, abs=1e-9)
    np.testing.assert_allclose(pi.forces, pb.forces, atol=1e-8)
    # incrementally maintained factor, inverse and whitened accumulators equal fresh ones
    M = inc.n_sparse
    K = inc._kernel(np.arange(M)) + 1e-8 * np.eye(M)
    L = np.linalg.cholesky(K)
    np.testing.assert_allclose(inc._Linv @ L, np.eye(M), atol=1e-8)
    A_F = inc._RF.view.T @ inc._RF.view
    np.testing.assert_allclose(inc._AFw, inc._Linv @ A_F @ inc._Linv.T,
                               atol=1e-8 * np.abs(inc._AFw).max())
    R = np.array([inc.frame_rows(k)[0] / np.sqrt(len(fr.numbers))
                  for k, fr in enumerate(inc.frames)])
    Ew = inc._Linv @ R.T
    np.testing.assert_allclose(inc._EwT.view.T, Ew, atol=1e-8)
    np.testing.assert_allclose(inc._AEw, Ew @ Ew.T, atol=1e-8 * np.abs(inc._AEw).max())
    # force rows of an old frame against all columns equal freshly computed ones
    for k in (0, 2):
        e, rows = inc._rows(inc.frames[k].env, np.arange(inc.n_sparse))
        e_st, rows_st = inc.frame_rows(k)
        np.testing.assert_allclose(rows_st, rows, atol=1e-10)
        np.testing.assert_allclose(e_st, e, atol=1e-12)


def test_the_single_precision_cache_changes_rows_and_predictions_by_rounding_only():
    frames = _emt_frames(6, seed=4)
    single = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.05)
    double = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.05)
    for gp in (single, double):
        for a, e, f in frames:
            gp.add_frame(a, e, f)
    assert single._geo[0]["G"].view.dtype == np.float32
    assert single.n_sparse == double.n_sparse
    rows, exact = single._RF.view, double._RF.view
    assert 0 < np.abs(rows - exact).max() < 1e-5 * np.abs(exact).max()
    probe = _emt_frames(1, seed=8)[0][0]
    p, q = single.predict(probe), double.predict(probe)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-5 * np.abs(q.forces).max())
    assert p.energy == pytest.approx(q.energy, abs=1e-6 * len(probe))


def test_frames_beyond_the_cache_budget_give_the_same_model():
    frames = _emt_frames(4, seed=5)
    a = ExactGP(Descriptor([1, 6, 8]))
    b = ExactGP(Descriptor([1, 6, 8]), cache_bytes=0)  # nothing cached: recomputed
    for gp in (a, b):
        for at, e, f in frames:
            gp.add_frame(at, e, f)
    assert not any(fr.cached for fr in b.frames) and all(fr.cached for fr in a.frames)
    np.testing.assert_allclose(a._RF.view, b._RF.view, atol=1e-12)
    np.testing.assert_allclose(a._AFw, b._AFw, atol=1e-9)


@pytest.mark.parametrize("compact", [False, True])
def test_save_load_round_trip_is_exact(trained, tmp_path, compact):
    """Also compact (no C, the triangular factors' lower triangles: what MPI ranks send)."""
    gp, frames = trained
    gp.save(str(tmp_path / "m.npz"), extra={"force_std_scale": 3.0}, compact=compact)
    with np.load(str(tmp_path / "m.npz")) as data:
        assert ("LB_tril" in data.files) == compact and ("C" in data.files) != compact
        assert ("Linv_blocks" in data.files) == compact  # zero between the channels
    m = SparseGP.load(str(tmp_path / "m.npz"))
    a = frames[1][0]
    p, q = gp.predict(a), m.predict(a)
    assert p.energy == q.energy
    np.testing.assert_array_equal(p.forces, q.forces)
    np.testing.assert_array_equal(p.novelty, q.novelty)
    np.testing.assert_array_equal(p.local_std, q.local_std)
    np.testing.assert_array_equal(m.posterior.LB, gp.posterior.LB)
    np.testing.assert_array_equal(m.posterior._Linv, gp.posterior._Linv)
    assert m.extra == {"force_std_scale": 3.0}
    with pytest.raises(RuntimeError, match="model_from_store"):
        m.add_frame(a, frames[1][1], frames[1][2])


def test_packed_factors_keep_a_linv_that_is_not_block_diagonal():
    """Where L^-1 has a value between two channels, its whole lower triangle is kept."""
    from otfml.gp.posterior import pack_triangles, unpack_triangles

    rng = np.random.default_rng(0)
    zs = np.array([0, 1, 0, 1, 1])
    LB = np.tril(rng.normal(size=(5, 5)))
    block = np.tril(rng.normal(size=(5, 5))) * (zs[:, None] == zs[None, :])
    for Linv, kept in ((block, "Linv_blocks"), (block + np.eye(5, k=-1), "Linv_tril")):
        packed = pack_triangles({"zs": zs, "LB": LB, "Linv": Linv})
        assert kept in packed and "Linv" not in packed
        back = unpack_triangles(packed)
        np.testing.assert_array_equal(back["Linv"], Linv)
        np.testing.assert_array_equal(back["LB"], LB)


def test_load_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.npz"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not an otfml model"):
        SparseGP.load(str(bad))


def test_refuses_nan_labels(trained):
    gp = SparseGP(Descriptor([1, 6, 8]))
    a, e, f = _emt_frames(1)[0]
    with pytest.raises(ValueError, match="NaN"):
        gp.add_frame(a, float("nan"), f)
    assert gp.n_frames == 0


def test_uncertainties_match_the_dense_dtc_posterior(trained):
    """local_std, energy_std and novelty against the DTC covariance built densely."""
    gp, frames = trained
    a = frames[3][0].copy()
    a.positions += 0.03
    p = gp.predict(a)
    ph = p.env.p / np.linalg.norm(p.env.p, axis=1)[:, None]
    same = p.env.species[:, None] == p.env.species[None, :]
    k_nn = np.where(same, (ph @ ph.T) ** 2, 0.0)
    k_nm = np.where(p.env.species[:, None] == gp.zs[None, :], (ph @ gp.Z.T) ** 2, 0.0)
    Kmm = gp._kernel(np.arange(gp.n_sparse)) + 1e-8 * np.eye(gp.n_sparse)
    B = gp._LB @ gp._LB.T
    Sigma = gp._Linv.T @ np.linalg.solve(B, gp._Linv)  # L^-T B^-1 L^-1, normalized kernel
    cov = gp.hyp.sigma**2 * (k_nn - k_nm @ np.linalg.solve(Kmm, k_nm.T) + k_nm @ Sigma @ k_nm.T)
    np.testing.assert_allclose(p.local_std, np.sqrt(np.diag(cov)), rtol=1e-6, atol=1e-9)
    assert p.energy_std == pytest.approx(np.sqrt(cov.sum()), rel=1e-6)
    prior = k_nn - k_nm @ np.linalg.solve(Kmm, k_nm.T)
    np.testing.assert_allclose(p.novelty, gp.hyp.sigma * np.sqrt(np.clip(np.diag(prior), 0, 1)),
                               rtol=1e-5, atol=1e-7)


def test_pruning_swaps_redundant_environments_and_matches_a_fresh_build():
    cap = 4
    gp = ExactGP(Descriptor([1, 6, 8]), max_sparse_per_species=cap)
    frames = _emt_frames(10, seed=3)
    for a, e, f in frames:
        gp.add_frame(a, e, f, solve=False)
        assert max(gp.sparse_counts().values()) <= cap
    gp.solve()
    assert sum(gp.n_pruned.values()) > 0, "a full set met new environments: some must swap"
    # the same sparse set and frames, built from scratch without pruning
    ref = ExactGP(Descriptor([1, 6, 8]), hyperparameters=gp.hyp, prune=False)
    ref._add_columns(gp.Z.copy(), gp.zs.copy())
    for a, e, f in frames:
        ref.add_frame(a, e, f, candidates=np.zeros(0, dtype=int), solve=False)
    ref.solve()
    np.testing.assert_allclose(gp._Linv, ref._Linv, rtol=1e-7, atol=1e-7)
    np.testing.assert_allclose(gp._AFw, ref._AFw, rtol=1e-7, atol=1e-6 * np.abs(ref._AFw).max())
    np.testing.assert_allclose(gp._AEw, ref._AEw, rtol=1e-7, atol=1e-6 * np.abs(ref._AEw).max())
    np.testing.assert_allclose(gp._RF.view, ref._RF.view, atol=1e-12)
    assert gp.log_marginal_likelihood() == pytest.approx(ref.log_marginal_likelihood(), rel=1e-7)
    test = _emt_frames(2, seed=9)[1][0]
    p, q = gp.predict(test), ref.predict(test)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-7)
    np.testing.assert_allclose(p.local_std, q.local_std, atol=1e-7)
    np.testing.assert_allclose(p.novelty, q.novelty, atol=1e-7)
    # predict reads each species' L^-1 as row panels up to the diagonal block, whose
    # upper part is zero (L^-1 stays lower triangular as columns are added)
    for blk in gp._blocks.values():
        M = len(blk["cols"])
        Linv = gp._Linv[np.ix_(blk["cols"], blk["cols"])]
        assert not np.triu(Linv, 1).any()
        rebuilt = np.zeros((M, M))
        for c in range(len(blk["offsets"]) - 1):
            rows = gp_module._kernels._PANEL_ROWS
            i0, i1 = c * rows, min(M, (c + 1) * rows)
            rebuilt[i0:i1, :i1] = blk["panels"][blk["offsets"][c]:blk["offsets"][c + 1]].reshape(
                i1 - i0, i1)
        np.testing.assert_array_equal(rebuilt, Linv)


def test_pruning_never_trades_an_environment_for_a_less_novel_one():
    gp = SparseGP(Descriptor([1, 6, 8]), max_sparse_per_species=3)
    gp.add_frame(*_emt_frames(1, seed=4)[0], solve=False)
    before = gp.Z.copy()
    assert gp._prune_species(0, 2, threshold=0.0) == 0  # nothing is below zero variance
    np.testing.assert_array_equal(gp.Z, before)


@pytest.mark.parametrize("prune", [False, True])
def test_a_full_sparse_set_is_reported_once_per_species(caplog, prune):
    gp = SparseGP(Descriptor([1, 6, 8]), max_sparse_per_species=3, prune=prune)
    with caplog.at_level("WARNING", logger="otfml.gp"):
        for a, e, f in _emt_frames(30):
            gp.add_frame(a, e, f, solve=False)
    assert gp.sparse_counts() == {"H": 3, "C": 3, "O": 3}
    warned = sorted(r.getMessage().split()[4] for r in caplog.records
                    if "is full" in r.getMessage())
    if not prune:
        assert warned == ["C", "H", "O"]  # once each, not per frame
    else:  # pruning swapped some in; those it could not are reported once, not per frame
        assert sum(gp.n_pruned.values()) > 0
        assert warned and len(warned) == len(set(warned))
    assert "model.max_sparse_per_species" in caplog.records[0].getMessage()


def test_evaluate_refuses_an_empty_test_set(trained):
    from otfml.errors import ConfigError
    from otfml.evaluate import evaluate

    with pytest.raises(ConfigError, match="no labelled frames"):
        evaluate(trained[0], [])


@pytest.mark.parametrize("updated", [False, True])
def test_uncertainties_read_after_an_update_belong_to_the_prediction(updated, monkeypatch):
    """The uncertainties of a prediction are those of the solve it was made at, also
    where the next solve updates the factor of B instead of factoring it afresh."""
    import otfml.gp

    monkeypatch.setattr(otfml.gp._frames, "_UPDATE_RANK", 1.0 if updated else 0.0)
    gp = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    frames = _emt_frames(6, seed=5)
    for a, e, f in frames[:4]:
        gp.add_frame(a, e, f, solve=False)
    gp.solve()
    x = frames[5][0]
    early, late = gp.predict(x), gp.predict(x)
    std, e_std = early.local_std.copy(), early.energy_std  # read before the update
    gp.add_frame(*frames[4])  # new sparse columns and a new solve
    assert (gp._lb_state["updates"] > 0) == updated
    np.testing.assert_array_equal(late.local_std, std)  # read after it: same snapshot
    assert late.energy_std == e_std
    assert not np.allclose(gp.predict(x).local_std, std)  # the updated model differs


@pytest.mark.parametrize("cache_frames", [None, 0, 2.5])
@pytest.mark.parametrize("drop", ["oldest", "thin", "chosen"])
def test_dropping_frames_matches_a_model_built_without_them(cache_frames, drop):
    """Under max_frames (the oldest go, or every other old one) or by drop_frames."""
    frames = _emt_frames(13, seed=6)
    kw = {}
    if cache_frames is not None:  # all frames cached (default), none, or a few at a time
        probe = ExactGP(Descriptor([1, 6, 8]))
        one = probe._geometry(probe.descriptor.environments(frames[0][0]))["nbytes"]
        kw["cache_bytes"] = int(cache_frames * one)
    if drop == "chosen":
        gp = ExactGP(Descriptor([1, 6, 8]), max_frames=None, **kw)
    else:
        gp = ExactGP(Descriptor([1, 6, 8]), max_frames=5, evict=drop, **kw)
    for a, e, f in frames[:12]:
        gp.add_frame(a, e, f, solve=False)
    if drop == "chosen":
        gp.drop_frames([1, 3, 4, 5, 8, 10, 11])
    # one new frame per added one past the fifth leaves; "thin" takes the second oldest,
    # so the first frame stays and the others move on
    kept = {"oldest": [7, 8, 9, 10, 11], "thin": [0, 8, 9, 10, 11], "chosen": [0, 2, 6, 7, 9]}
    assert gp.n_frames == len(gp.frames) == 5 and gp.n_dropped == 7
    assert [fr.energy for fr in gp.frames] == [frames[k][1] for k in kept[drop]]
    if cache_frames == 2.5:
        assert 0 < sum(fr.cached for fr in gp.frames) < 5
    # the same sparse set and the 5 frames it kept, built from scratch
    ref = ExactGP(Descriptor([1, 6, 8]), hyperparameters=gp.hyp, max_frames=gp.max_frames,
                   evict=gp.evict, **kw)
    ref._add_columns(gp.Z.copy(), gp.zs.copy())
    for k in kept[drop]:
        ref.add_frame(*frames[k], candidates=np.zeros(0, dtype=int), solve=False)
    # a 13th frame (under max_frames, one more leaves both) brings new sparse environments,
    # whose rows against the kept frames come from the re-indexed geometry cache
    bigger = frames[12][0].copy()
    bigger.positions += np.random.default_rng(1).normal(scale=0.15, size=(len(bigger), 3))
    bigger.calc = EMT()
    label = (bigger.get_potential_energy(), bigger.get_forces())
    added = [m.add_frame(bigger, *label) for m in (gp, ref)]
    assert added[0] == added[1] > 0
    scale = np.abs(ref._AFw).max()
    np.testing.assert_allclose(gp._RF.view, ref._RF.view, atol=1e-12)
    np.testing.assert_allclose(gp._AFw, ref._AFw, atol=1e-9 * scale)
    np.testing.assert_allclose(gp._AEw, ref._AEw, atol=1e-9 * np.abs(ref._AEw).max())
    np.testing.assert_allclose(gp.b_F, ref.b_F, atol=1e-9 * np.abs(ref.b_F).max())
    np.testing.assert_allclose(gp.c_E, ref.c_E, atol=1e-9 * np.abs(ref.c_E).max())
    for name in ("_EE", "_En", "_nn", "_ff", "_logN", "_n_e", "_n_f"):
        np.testing.assert_allclose(getattr(gp, name), getattr(ref, name), rtol=1e-9)
    # the log-determinants amplify the rows' rounding (about 1e-8 of the likelihood here)
    assert gp.log_marginal_likelihood() == pytest.approx(ref.log_marginal_likelihood(), rel=3e-8)
    test = _emt_frames(1, seed=11)[0][0]
    p, q = gp.predict(test), ref.predict(test)
    # subtracting frames costs a few digits (forces up to ~100 eV/Å here)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-8 * np.abs(q.forces).max())
    np.testing.assert_allclose(p.local_std, q.local_std, atol=1e-8)


def test_max_frames_must_be_positive_and_evict_a_known_rule():
    with pytest.raises(ValueError, match="max_frames = 0"):
        SparseGP(Descriptor([1, 6, 8]), max_frames=0)
    with pytest.raises(ValueError, match="evict = 'newest': give one of thin, oldest"):
        SparseGP(Descriptor([1, 6, 8]), evict="newest")


def test_an_indefinite_system_is_rebuilt_from_the_stored_rows(caplog):
    """Rounding can make the incrementally updated system indefinite (seen on a long aspirin
    run with frames dropped): solve() then re-forms it from the stored rows."""
    frames = _emt_frames(8, seed=7)
    gp = SparseGP(Descriptor([1, 6, 8]), max_frames=5)
    for a, e, f in frames:
        gp.add_frame(a, e, f, solve=False)
    gp.solve()
    probe = _emt_frames(1, seed=12)[0][0]
    good = gp.predict(probe)
    keep = {k: getattr(gp, k).copy() for k in ("_AFw", "_AEw", "_Linv", "b_F", "c_E", "C_E")}
    keep["Ew"] = gp._EwT.view.copy()
    # what the rebuild forms equals what the updates and downdates maintained
    gp.rebuild_accumulators(chunk=7)
    for k, v in keep.items():
        now = gp._EwT.view if k == "Ew" else getattr(gp, k)
        np.testing.assert_allclose(now, v, atol=1e-7 * np.abs(v).max(), err_msg=k)
    # an indefinite force accumulator: solve() warns, rebuilds and gives the same model
    v = np.ones(gp.n_sparse)
    gp._AFw -= 1e6 * np.outer(v, v)
    with caplog.at_level("WARNING", logger="otfml.gp"):
        gp.solve()
    assert "re-forming them from the stored rows" in caplog.text
    again = gp.predict(probe)
    np.testing.assert_allclose(again.forces, good.forces, atol=1e-6 * np.abs(good.forces).max())
    assert again.energy == pytest.approx(good.energy, abs=1e-6)


def test_a_frame_can_be_given_its_own_sparse_tolerance():
    """add_frame(sparse_tolerance=...): lower for that frame only, the environments left
    out at the model's tolerance join, and afterwards none of the frame's is more novel."""
    frames = _emt_frames(4, seed=8)
    coarse, fine = (SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.2) for _ in range(2))
    for gp in (coarse, fine):
        for a, e, f in frames[:3]:
            gp.add_frame(a, e, f)
    a, e, f = frames[3]
    assert coarse.add_frame(a, e, f) < fine.add_frame(a, e, f, sparse_tolerance=0.01)
    sig = fine.hyp.sigma
    assert fine.predict(a).novelty.max() <= 0.01 * sig
    assert coarse.predict(a).novelty.max() > 0.01 * sig
    assert fine.sparse_tolerance == 0.2  # the model's own is unchanged


@pytest.mark.parametrize("drop", [[], [0], [8], [0, 1, 5], [2, 3, 4, 7, 8]])
def test_growable_array_keeps_columns_in_order(drop):
    from otfml.gp._buffers import _Grow

    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 9))
    g = _Grow(9, max_cols=12)
    g.append(x)
    keep = np.setdiff1d(np.arange(9), drop)
    g.keep_columns(keep)
    np.testing.assert_array_equal(g.view, x[:, keep])
    g.add_columns(np.ones((300, 2)))  # the buffer stays usable
    np.testing.assert_array_equal(g.view[:, :len(keep)], x[:, keep])


def test_an_array_stored_by_columns_equals_one_stored_by_rows():
    """The force rows' buffer (stored column by column, so that reserved columns take no
    memory) gives what a row-major one gives through the same appends and removals, and
    each of its columns is one contiguous run of memory."""
    from otfml.gp._buffers import _Grow, _GrowByColumns

    rng = np.random.default_rng(1)
    rows, cols = _Grow(0, max_cols=40), _GrowByColumns(40)
    steps = [("add_columns", 5), ("append", 30), ("append", 70), ("reserve", 500),
             ("add_columns", 3), ("keep_columns", [0, 2, 3, 6, 7]), ("append", 9),
             ("keep_rows", 0.6), ("add_columns", 30), ("drop_rows", 11), ("append", 100)]
    for op, arg in steps:
        if op == "add_columns":
            x = rng.normal(size=(rows.n, arg))
            rows.add_columns(x), cols.add_columns(x)
        elif op == "append":
            x = rng.normal(size=(arg, rows.m))
            rows.append(x), cols.append(x)
        elif op == "reserve":
            rows.reserve(arg, exact=True), cols.reserve(arg, exact=True)
            assert cols.shape_reserved[0] == arg
        elif op == "keep_columns":
            rows.keep_columns(np.array(arg)), cols.keep_columns(np.array(arg))
        elif op == "keep_rows":
            keep = rng.random(rows.n) < arg
            rows.keep_rows(keep), cols.keep_rows(keep)
        else:
            rows.drop_rows(arg), cols.drop_rows(arg)
        assert (cols.n, cols.m) == (rows.n, rows.m)
        assert cols.shape_reserved[0] == rows.shape_reserved[0]  # rows grow alike (fourfold)
        np.testing.assert_array_equal(cols.view, rows.view)
    assert cols.view.strides[0] == cols.view.itemsize  # down a column, element by element
    assert cols.shape_reserved[1] == 40  # columns reserved, in no row's way


def test_a_frames_own_sparse_tolerance_fills_a_set_only_to_the_admission_fill():
    """The lower tolerance stops at ADMISSION_FILL of the cap and never swaps out environments;
    beyond it the model's own tolerance (and pruning) decide."""
    from otfml.gp._sparse import ADMISSION_FILL

    frames = _emt_frames(6, seed=9)
    gp = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.9, max_sparse_per_species=5)
    gp.add_frame(*frames[0], sparse_tolerance=1e-4)
    assert gp.sparse_counts()["H"] == int(ADMISSION_FILL * 5)  # six H in the frame
    for a, e, f in frames[1:]:
        gp.add_frame(a, e, f, sparse_tolerance=1e-4)
    assert gp.sparse_counts()["H"] <= 5 and gp.n_pruned == {}  # nothing novel at 0.9


def test_the_updated_factor_equals_a_new_factorization(monkeypatch):
    """Solves after frames (and new sparse columns) were added update the factor of B
    (rank-k QR update and new rows) instead of factoring it again: same factor, same
    weights and predictions as a model that factors afresh at every solve. The update
    may leave negative entries on the factor's diagonal: its columns are compared with
    their signs made alike."""
    import otfml.gp

    def same_factor(a, b):
        np.testing.assert_allclose(a * np.sign(np.diag(a)), b * np.sign(np.diag(b)),
                                   rtol=1e-9, atol=1e-9)

    # ethanol's 28 rows per frame are a large rank for a small M: update whatever it costs
    monkeypatch.setattr(otfml.gp._frames, "_UPDATE_RANK", 1.0)
    frames = _emt_frames(14, seed=11)
    inc = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    ref = ExactGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    updated = 0
    for k, (a, e, f) in enumerate(frames[:13]):
        for gp in (inc, ref):
            gp.add_frame(a, e, f, solve=False)
        if k == 3:
            for gp in (inc, ref):
                gp.fit_hyperparameters()
            continue
        M_before = inc._lb_state["M"] if inc._lb_state else None
        inc.solve()
        ref._lb_state = None  # factor afresh
        ref.solve()
        if M_before is not None and inc._lb_state["updates"] > 0:
            updated += 1
        same_factor(inc._LB, ref._LB)
        np.testing.assert_allclose(inc._beta, ref._beta, rtol=1e-8, atol=1e-10)
        p, q = inc.predict(frames[13][0]), ref.predict(frames[13][0])
        np.testing.assert_allclose(p.local_std, q.local_std, rtol=1e-7)
        assert p.energy_std == pytest.approx(q.energy_std, rel=1e-7)
    assert updated >= 5 and inc.n_sparse > 60  # updates, with new columns
    M = inc.n_sparse
    ref._lb_state = None
    for gp in (inc, ref):  # a frame seen before: no new columns, the rank-k update alone
        gp.add_frame(*frames[0])
    assert ref._lb_state["updates"] == 0  # factored afresh
    assert inc.n_sparse == M and inc._lb_state["updates"] > 0
    same_factor(inc._LB, ref._LB)
    # frames added without solving: their rows are kept only while an update would pay
    monkeypatch.setattr(otfml.gp._frames, "_UPDATE_RANK", 40 / inc.n_sparse)  # at most 40 rows
    inc.add_frame(*frames[1], solve=False)
    assert inc._lb_state is not None and inc._lb_state["rank"] == 28  # 27 force rows, 1 energy
    for a, e, f in frames[2:6]:
        inc.add_frame(a, e, f, solve=False)
    assert inc._lb_state is None  # 56 rows > 40: a new factorization is due, nothing is kept
    inc.solve()
    ref._lb_state = None
    for a, e, f in frames[1:6]:
        ref.add_frame(a, e, f, solve=False)
    ref.solve()
    same_factor(inc._LB, ref._LB)
    x = frames[13][0]
    p, q = inc.predict(x), ref.predict(x)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-9)
    np.testing.assert_allclose(p.local_std, q.local_std, rtol=1e-8)


def test_a_prepared_frame_is_added_as_add_frame_adds_it_or_undone():
    """prepare_frame (geometry only: new sparse columns, the frame's rows) then add_prepared
    (labels) is add_frame; discard_prepared takes the new columns out again, so a frame whose
    reference failed leaves the model predicting as before; labels with NaN are refused and
    undone the same way; the model must not change between the two."""
    frames = _emt_frames(8, seed=5)
    one, two = _twins(frames[:4])
    x = frames[7][0]
    before = one.predict(x)
    M = one.n_sparse
    prep = one.prepare_frame(frames[4][0])
    assert prep.n_new > 0 and one.n_sparse == M + prep.n_new and one.n_frames == 4
    np.testing.assert_array_equal(one.predict(x).forces, before.forces)  # not solved yet
    one.discard_prepared(prep)
    assert one.n_sparse == M
    one.solve()
    after = one.predict(x)
    np.testing.assert_allclose(after.forces, before.forces, atol=1e-9)
    np.testing.assert_allclose(after.novelty, before.novelty, atol=1e-7)
    # NaN labels: refused, and the prepared columns leave
    prep = one.prepare_frame(frames[4][0])
    with pytest.raises(ValueError, match="NaN or inf"):
        one.add_prepared(prep, np.nan, frames[4][2])
    assert one.n_sparse == M and one.n_frames == 4
    # prepared and added equals add_frame
    for a, e, f in frames[4:7]:
        prep = one.prepare_frame(a)
        one.add_prepared(prep, e, f)
        assert two.add_frame(a, e, f) == prep.n_new
    p, q = one.predict(x), two.predict(x)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-9)
    np.testing.assert_allclose(p.local_std, q.local_std, rtol=1e-7)
    # nothing may change the model in between
    prep = one.prepare_frame(frames[7][0])
    one.add_frame(*frames[0])
    with pytest.raises(RuntimeError, match="changed between prepare_frame and add_prepared"):
        one.add_prepared(prep, frames[7][1], frames[7][2])


def test_parts_of_a_prepared_frame_run_on_other_threads_give_the_same_model():
    """prepare_frame hands the frame's own rows to ``spawn`` (the learner's thread that waited
    for the reference runs them once it is free), while it adds the new sparse columns' rows
    against the held frames. Run on another thread, they give the model add_frame gives."""
    import threading

    from otfml.gp._threads import _Task

    ran = []

    def spawn(fn):
        task = _Task(fn)

        def other():
            if task.claim():
                ran.append(threading.get_ident())
                task.run()

        threading.Thread(target=other).start()
        return task

    frames = _emt_frames(8, seed=6)
    one = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    two = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.02)
    for a, e, f in frames[:7]:
        one.add_prepared(one.prepare_frame(a, spawn=spawn), e, f)
        two.add_frame(a, e, f)
    assert ran and threading.get_ident() not in ran
    p, q = one.predict(frames[7][0]), two.predict(frames[7][0])
    np.testing.assert_allclose(p.forces, q.forces, rtol=0, atol=1e-12)
    np.testing.assert_allclose(p.local_std, q.local_std, rtol=1e-12)
    # a task's error reaches whoever joins it
    boom = _Task(lambda: 1 / 0)
    threading.Thread(target=lambda: boom.claim() and boom.run()).start()
    with pytest.raises(ZeroDivisionError):
        boom.join()


def test_thin_products_sum_in_double_and_match_blas():
    """The new sparse columns' rows use a one-pass loop for a few descriptors instead of
    BLAS: its sums are the double-precision products of the single-precision cache, and
    the pair products agree with the BLAS path to single precision."""
    from otfml.gp._kernels import _THIN, _pair_products, _thin_products

    rng = np.random.default_rng(3)
    G = rng.normal(size=(300, 40)).astype(np.float32)
    ph = rng.normal(size=(100, 40)).astype(np.float32)
    Z = rng.normal(size=(3, 40))
    exact = G.astype(np.float64) @ Z.T
    np.testing.assert_allclose(_thin_products(G, Z), exact, rtol=1e-12, atol=1e-12)
    T, d = _pair_products(G, ph, Z)  # thin path
    Zmany = np.vstack([Z] * (_THIN // 3 + 1))  # more than _THIN descriptors: BLAS
    Tb, db = _pair_products(G, ph, Zmany)
    np.testing.assert_allclose(T, Tb[:, :, :3], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(d, db[:, :3], rtol=1e-5, atol=1e-4)
    assert T.shape == (100, 3, 3) and T.dtype == np.float64


def test_a_fit_on_a_snapshot_ignores_later_frames_and_changes_nothing():
    """hyperparameter_fit copies what the likelihood needs: frames added before the fit runs
    (the learner's hyperparameter_lag) change neither its result nor does it change the model."""
    frames = _emt_frames(10, seed=4)
    ref, gp = _twins(frames[:6])
    expected = ref.hyperparameter_fit(copy=False)()
    fit = gp.hyperparameter_fit()
    for a, e, f in frames[6:]:
        gp.add_frame(a, e, f)
    before = gp.hyp
    got = fit()
    assert got is not None and got != before and gp.hyp == before
    np.testing.assert_allclose(got.as_array(), expected.as_array(), rtol=1e-10)


def test_updates_shared_between_threads_match_one_thread(monkeypatch):
    """With two threads an update's large products (the new columns' rows and their product
    with every held row, the frames' rank updates, the prediction's pieces of L^-1) are cut
    in two and shared: the model is that of one thread but for rounding."""
    from otfml import gp as gp_module

    monkeypatch.setattr(gp_module._threads, "_MIN_SHARED", 4)  # cut even this small model's work
    cut = []
    in_two = gp_module._threads._in_two
    for mod in (gp_module._buffers, gp_module._rows, gp_module._sparse, gp_module._frames):
        monkeypatch.setattr(mod, "_in_two",
                            lambda spawn, fn, n: (cut.append(spawn is not None and n >= 4),
                                                  in_two(spawn, fn, n))[1])
    frames = _emt_frames(10, seed=5)
    models = []
    for threads in (1, 2):
        gp = SparseGP(Descriptor([1, 6, 8]), sparse_tolerance=0.01, threads=threads)
        for a, e, f in frames[:8]:
            gp.add_frame(a, e, f)
        models.append(gp)
    assert any(cut)
    one, two = models
    assert one.n_sparse == two.n_sparse > 0
    np.testing.assert_allclose(two._AFw, one._AFw, rtol=1e-12, atol=1e-10)
    np.testing.assert_allclose(two._AEw, one._AEw, rtol=1e-12, atol=1e-12)
    for a, _, _f in frames[8:]:
        p1, p2 = one.predict(a), two.predict(a)
        assert p2.energy == pytest.approx(p1.energy, abs=1e-8)
        np.testing.assert_allclose(p2.forces, p1.forces, atol=1e-8)
        np.testing.assert_allclose(p2.local_std, p1.local_std, rtol=1e-8)


def test_in_two_cuts_a_range_and_keeps_the_order():
    from otfml.gp._threads import _MIN_SHARED, _in_two, _Task

    seen = []

    def fn(i, j):
        seen.append((i, j))
        return np.arange(i, j)

    n = 2 * _MIN_SHARED + 1
    parts = _in_two(_Task, fn, n)
    assert len(parts) == 2 and np.array_equal(np.concatenate(parts), np.arange(n))
    assert sorted(seen) == [(0, n // 2), (n // 2, n)]
    assert len(_in_two(None, fn, n)) == 1 and len(_in_two(_Task, fn, _MIN_SHARED - 1)) == 1


def test_spare_arrays_are_used_again_only_when_nothing_refers_to_them():
    from otfml.gp._buffers import _Spare

    spare = _Spare(keep=3)
    a = spare.square(10, room=0.5)  # made with room for 150 elements
    assert a.shape == (10, 10) and a.flags.c_contiguous
    b = spare.square(10)
    assert not np.shares_memory(a, b)  # a is alive: b is another array
    snapshot = b[:5].T  # a view keeps b's memory in use
    del b
    c = spare.square(8)
    assert not np.shares_memory(c, snapshot) and not np.shares_memory(c, a)
    del a  # nothing but the spares refers to the first array now: it serves again
    d = spare.square(11)
    assert d.base is spare._arrays[0] and not np.shares_memory(d, snapshot)
    e = spare.square(12)  # 144 elements: the first is taken, the others too small
    assert not np.shares_memory(e, d) and len(spare._arrays) == 3  # at most keep


def test_selection_functions_are_pure_and_agree_with_the_kernel():
    """The sparse-set decisions are pure functions of a set's factor and the candidates:
    conditioning on a set leaves the set's own members with no novelty, pivots stop at the
    tolerance, and redundancy picks the duplicate of a member first."""
    from otfml.gp.selection import conditioned, pivots, redundant

    rng = np.random.default_rng(3)
    Z = rng.normal(size=(5, 12))
    Z /= np.linalg.norm(Z, axis=1)[:, None]
    Z[4] = Z[1]  # a duplicate
    K = (Z[:4] @ Z[:4].T) ** 2 + 1e-8 * np.eye(4)
    Li = np.linalg.inv(np.linalg.cholesky(K))
    C = conditioned(Z, Z[:4], Li)
    np.testing.assert_allclose(np.diag(C)[:4], 0.0, atol=1e-6)
    assert np.diag(C)[4] == pytest.approx(0.0, abs=1e-6)
    before = (Z.copy(), Li.copy())
    chosen, values, _ = pivots(conditioned(Z, Z[:0], Li[:0, :0]), limit=10, tol=0.1)
    assert len(set(chosen)) == len(chosen) == 4 and not {1, 4} <= set(chosen)
    assert all(v > 0.01 for v in values)  # the duplicate adds nothing once its twin is in
    K5 = (Z @ Z.T) ** 2 + 1e-8 * np.eye(5)
    drop = redundant(np.linalg.inv(np.linalg.cholesky(K5)), n=2, threshold=0.5)
    assert drop[0] in (1, 4) and len(drop) >= 1
    np.testing.assert_array_equal(Z, before[0])
    np.testing.assert_array_equal(Li, before[1])


def test_a_memory_budget_lowers_the_frames_held(caplog):
    """model.memory_gb: at the first frame the model keeps only as many frames as fit."""
    frames = _emt_frames(3, seed=6)
    probe = SparseGP(Descriptor([1, 6, 8]), memory_gb=None)
    probe.add_frame(*frames[0], solve=False)
    geom = probe._geometry(probe.descriptor.environments(frames[0][0]))
    budget = probe.memory_estimate(geom, 200)["total"] / 1024.0**3
    with caplog.at_level("INFO", logger="otfml.gp"):
        gp = SparseGP(Descriptor([1, 6, 8]), memory_gb=budget)
        gp.add_frame(*frames[0], solve=False)
    assert 190 <= gp.max_frames <= 200 and "holds at most" in caplog.text
    assert gp.memory_estimate(geom, gp.max_frames)["total"] <= budget * 1024.0**3
    assert probe.max_frames == 1000  # no budget: max_frames alone
    with pytest.raises(ValueError, match="memory_gb"):
        SparseGP(Descriptor([1, 6, 8]), memory_gb=0.0)


@pytest.mark.parametrize("evict,cap", [("thin", None), ("oldest", 4), (None, 4)])
def test_frames_added_at_once_give_the_model_added_one_by_one(evict, cap):
    """add_frames (a rebuild from a store) against add_frame frame after frame: the same
    sparse set (swaps in a full set included), frames held under max_frames, and model."""
    frames = _emt_frames(13, seed=8)
    kw = {"max_sparse_per_species": cap} if cap else {}
    kw.update({"max_frames": 5, "evict": evict} if evict else {"max_frames": None})
    one, batch = ExactGP(Descriptor([1, 6, 8]), **kw), ExactGP(Descriptor([1, 6, 8]), **kw)
    added = sum(one.add_frame(a, e, f, solve=False) for a, e, f in frames)
    assert batch.add_frames(frames) == added
    assert [fr.energy for fr in batch.frames] == [fr.energy for fr in one.frames]
    assert batch.n_dropped == one.n_dropped == (8 if evict else 0)
    assert batch.n_pruned == one.n_pruned and (sum(one.n_pruned.values()) > 0) == bool(cap)
    np.testing.assert_array_equal(batch.Z, one.Z)
    np.testing.assert_allclose(batch._AFw, one._AFw, atol=1e-9 * np.abs(one._AFw).max())
    np.testing.assert_allclose(batch.b_F, one.b_F, atol=1e-9 * np.abs(one.b_F).max())
    for gp in (one, batch):
        gp.solve()
    test = _emt_frames(1, seed=12)[0][0]
    p, q = batch.predict(test), one.predict(test)
    np.testing.assert_allclose(p.forces, q.forces, atol=1e-8 * np.abs(q.forces).max())
    np.testing.assert_allclose(p.local_std, q.local_std, atol=1e-8)


def test_frames_added_at_once_are_refused_whole_for_one_bad_label():
    frames = _emt_frames(3, seed=2)
    a, e, f = frames[2]
    gp = SparseGP(Descriptor([1, 6, 8]))
    with pytest.raises(ValueError, match="NaN or inf"):
        gp.add_frames(frames[:2] + [(a, float("nan"), f)])
    assert gp.n_frames == 0 and gp.n_sparse == 0


def test_the_frames_held_after_eviction_follow_the_rule():
    assert gp_module._memory.held_after(12, 5, "oldest") == [7, 8, 9, 10, 11]
    assert gp_module._memory.held_after(12, 5, "thin") == [0, 8, 9, 10, 11]
    assert gp_module._memory.held_after(4, None, "thin") == [0, 1, 2, 3]


@pytest.mark.parametrize("threads", [False, True])
def test_pair_terms_taken_in_chunks_equal_those_taken_at_once(monkeypatch, threads):
    """The force rows' pair terms, taken a few hundred pairs at a time (each chunk cut in
    two as for a second thread), equal those of all pairs at once and of each pair alone."""
    from otfml.gp import _rows
    from otfml.gp._threads import _Task

    rng = np.random.default_rng(5)
    P, F, m, n_atoms = 1500, 12, 40, 60
    G = rng.normal(size=(3 * P, F)).astype(np.float32)
    ph = rng.normal(size=(P, F)).astype(np.float32)
    u, scale, Zc = rng.normal(size=(P, 3)), rng.uniform(0.5, 2, P), rng.normal(size=(m, F))
    pi, pj = rng.integers(0, n_atoms, P), rng.integers(0, n_atoms, P)
    inc = _rows._incidence(pi, pj, n_atoms)
    spawn = _Task if threads else None
    whole = _rows._pair_force_terms(G, ph, u, scale, inc, Zc, spawn)
    monkeypatch.setattr(_rows, "_PAIR_CHUNK_BYTES", 1)  # 256 pairs per chunk
    chunked = _rows._pair_force_terms(G, ph, u, scale, inc, Zc, spawn)
    # (the same products; float32 GEMM may block rows differently)
    np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6 * np.abs(whole).max())
    # against the terms written out pair by pair
    T = (G.astype(np.float64) @ Zc.T).reshape(P, 3, m)
    d = ph.astype(np.float64) @ Zc.T
    T = (T - d[:, None, :] * u[:, :, None]) * (scale[:, None] * d)[:, None, :]
    expect = np.zeros((n_atoms, 3, m))
    np.add.at(expect, pj, T)
    np.add.at(expect, pi, -T)
    np.testing.assert_allclose(whole, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())


def test_a_symmetric_matrix_is_made_from_its_lower_triangle_in_place():
    from otfml.gp.likelihood import _mirror_lower

    rng = np.random.default_rng(2)
    for M in (5, 256, 700):
        S = rng.normal(size=(M, M))
        S = S + S.T
        A = np.tril(S) + np.triu(rng.normal(size=(M, M)), 1)  # garbage above the diagonal
        assert _mirror_lower(A) is A
        np.testing.assert_array_equal(A, S)
