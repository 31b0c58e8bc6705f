"""The learning loop. Loop logic with a cheap analytic reference (ASE's EMT);
everything a user runs for real with the real MOPAC."""

import os

import numpy as np
import pytest
from ase import units
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.mopac import MOPAC
from ase.cluster import Icosahedron
from ase.md.langevin import Langevin
from ase.optimize import BFGS

from otfml import EnergyCompensation, OTFCalculator
from otfml.drivers import thermalize
from otfml.errors import ConfigError, FingerprintMismatch
from otfml.learner import HyperparameterSchedule, Learner
from otfml.policy import LearningPolicy
from otfml.store import Store

from .conftest import mopac


def _md(atoms, steps, seed=0, T=300):
    rng = np.random.default_rng(seed)
    thermalize(atoms, T, rng, zero_drift=False)
    dyn = Langevin(atoms, 0.5 * units.fs, temperature_K=T, friction=0.02, rng=rng, fixcm=False)
    sources = []
    dyn.attach(lambda: sources.append(atoms.calc.results["source"]), interval=1)
    dyn.run(steps)
    return sources


def test_reference_steps_return_reference_values_exactly(ethanol, tmp_path):
    calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"),
                         policy=LearningPolicy(call_step_result="reference"))
    ethanol.calc = calc
    e = ethanol.get_potential_energy()
    f = ethanol.get_forces()
    assert calc.results["source"] == "reference"
    ref = ethanol.copy()
    ref.calc = EMT()
    assert e == ref.get_potential_energy()
    np.testing.assert_array_equal(f, ref.get_forces())
    assert calc.results["forces_std"].max() == 0.0
    calc.close()


def test_loop_calls_store_and_trusts(tmp_path):
    a = molecule("CH3CH2OH")
    # EMT is a crude surface for a molecule (an H drifts off): a loose tolerance and allowed
    # fragmentation keep this about the loop
    a.calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"),
                           policy=LearningPolicy(force_tolerance=1.0, allow_fragmentation=True))
    sources = _md(a, 150)
    L = a.calc.learner
    assert sources.count("reference") == L.n_calls
    assert L.n_calls < 0.6 * len(sources)  # the model takes over
    # the hyperparameter fits are timed apart too: at least one at each of the first 5 calls
    fits = L.timings["hyperparameters"]
    assert len(fits) >= min(L.n_calls, 5) and sum(fits) < sum(L.timings["update"])
    assert sources[:2] == ["reference", "reference"]  # initial_calls
    # the model's own energy is kept on every step it could predict, also before an update
    assert L.history[0]["model_energy"] is None  # no model yet
    for h in L.history[2:]:
        if h["source"] == "model":
            assert h["model_energy"] == h["energy"]
        else:
            assert np.isfinite(h["model_energy"]) and h["model_energy"] != h["energy"]
    # a trusted step: model values with a positive uncertainty below the tolerance
    a.positions += 1e-4
    a.get_forces()
    if a.calc.results["source"] == "model":
        assert 0 < a.calc.results["forces_std"].max() <= 1.0
        assert a.calc.results["energy_std"] > 0
    a.calc.close()
    with Store(tmp_path / "s.h5") as st:
        assert len(st) == L.n_calls
        called = [h["step"] for h in L.history if h["called"]]
        assert [fr.step for fr in st] == called


def test_call_steps_can_return_the_updated_model(tmp_path):
    """call_step_result: updated_model -- the label is stored and learned as always, and the
    step returns what the model predicts there after learning it."""
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"),
                           policy=LearningPolicy(force_tolerance=1.0, allow_fragmentation=True,
                                                 call_step_result="updated_model"))
    returned = []

    def check():
        r = a.calc.results
        if r["source"] == "updated_model":  # the model has already learned this label
            p = L.predict(a)
            assert r["energy"] == p.energy and np.array_equal(r["forces"], p.forces)
            assert r["forces_std"].min() > 0 and r["energy_std"] > 0
        returned.append((r["source"], r["energy"], r["forces"].copy()))

    L = a.calc.learner
    rng = np.random.default_rng(0)
    thermalize(a, 300, rng, zero_drift=False)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=300, friction=0.02, rng=rng, fixcm=False)
    dyn.attach(check, interval=1)
    dyn.run(100)
    sources = [s for s, _, _ in returned]
    assert set(sources) == {"model", "updated_model"} and "reference" not in sources
    assert [h["called"] for h in L.history] == [h["source"] == "updated_model"
                                                for h in L.history]
    assert sum(h["called"] for h in L.history) == L.n_calls >= 3
    a.calc.close()
    with Store(tmp_path / "s.h5") as st:  # the store holds EMT's labels, not the model's
        called = [h for h in L.history if h["called"]]
        assert [fr.step for fr in st] == [h["step"] for h in called]
        for fr, h in zip(st, called):
            ref = fr.atoms.copy()
            ref.calc = EMT()
            assert fr.energy == ref.get_potential_energy() and fr.energy != h["energy"]


def test_a_requested_call_returns_the_reference_values():
    """request_reference (e.g. confirming an optimized geometry) returns the reference's
    values even where call steps return the updated model."""
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=100.0,
                                                        call_step_result="updated_model"))
    for _ in range(4):
        a.positions += 0.01
        a.get_forces()
    assert a.calc.results["source"] == "model"
    a.calc.learner.request_reference = True
    a.positions += 0.01
    f = a.get_forces()
    assert a.calc.results["source"] == "reference"
    ref = a.copy()
    ref.calc = EMT()
    np.testing.assert_array_equal(f, ref.get_forces())


def test_hyperparameter_fits_grow_rarer_while_they_settle():
    sched = HyperparameterSchedule(first=5, every=50)
    h = np.array([1.0, 0.01, 0.05])
    fits = []
    for n in range(1, 4001):
        if sched.due(n):
            fits.append(n)
            # fits move the hyperparameters by 30 % until call 300, by 2 % from then on,
            # except one jump at call 2000
            sched.fitted(n, h, h * (1.3 if n < 300 or 2000 <= n < 2050 else 1.02))
    assert fits[:5] == [1, 2, 3, 4, 5] and {8, 16, 32, 64, 128, 256, 512, 1024, 2048} <= set(fits)
    others = [n for n in fits if n > 5 and n & (n - 1)]
    early = [n for n in others if n < 300]
    assert early and max(np.diff([n for n in fits if 5 <= n < 300])) <= 50  # unsettled: every 50
    gaps = np.diff([n for n in fits if 300 <= n < 2000])
    assert gaps.max() == 400 and len(gaps) < 12  # settled: the interval doubles up to 8 x 50
    after_jump = [n for n in fits if n > 2000]
    assert after_jump[0] - 2000 <= 50  # a fit that moved them brings the interval back to 50


def test_uncertainties_are_computed_when_read_without_a_new_step():
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=100.0, initial_calls=1))
    calc, L = a.calc, a.calc.learner
    for _ in range(5):  # the initial call(s), then the model
        a.positions += 1e-3
        a.get_forces()
        if calc.results["source"] == "model":
            break
    assert calc.results["source"] == "model"
    steps = L.n_steps
    assert "energy_std" in calc.results and "local_std" in calc.results
    pred = calc.model.predict(a)
    assert a.calc.get_property("energy_std", a) == pytest.approx(pred.energy_std, rel=1e-9)
    np.testing.assert_allclose(calc.results["local_std"], pred.local_std, rtol=1e-9)
    assert calc.results.copy()["energy_std"] == calc.results["energy_std"] > 0
    assert L.n_steps == steps  # reading them did not run another step


def test_policy_knobs_budget_interval_forced(tmp_path):
    a = molecule("CH3CH2OH")
    # always uncertain, 5 calls; then the model is trusted. Geometries near the start rather
    # than MD: MD on a model of 5 EMT frames may fly apart, which is not what this tests
    pol = LearningPolicy(force_tolerance=1e-6, max_calls=5, allow_fragmentation=True)
    a.calc = OTFCalculator(EMT(), policy=pol)
    start, sources = a.positions.copy(), []
    for k in range(30):
        a.positions = start + np.random.default_rng(k).normal(0, 0.02, start.shape)
        a.get_forces()
        sources.append(a.calc.results["source"])
    assert sources.count("reference") == 5 and sources[5:] == ["model"] * (len(sources) - 5)

    b = molecule("CH3CH2OH")
    b.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=1e-6,
                                                        min_steps_between_calls=4,
                                                        allow_fragmentation=True))
    src = _md(b, 30)
    calls = [i for i, s in enumerate(src) if s != "model"]
    gaps = np.diff(calls[2:])  # after the initial calls
    assert len(gaps) and gaps.min() >= 5

    c = molecule("CH3CH2OH")
    c.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=100.0,
                                                        force_call_every=10,
                                                        allow_fragmentation=True))
    src = _md(c, 40)
    assert len(src) - src.count("model") >= 4  # 2 initial + one per 10 model steps


def test_warm_start_calibrates_with_one_call_then_trusts(tmp_path):
    """A warm-started model is fitted but its uncertainty is not calibrated yet: one call
    measures its error (no initial_calls needed), then the calibrated estimate decides."""

    def policy():
        return LearningPolicy(force_tolerance=0.3, allow_fragmentation=True)  # EMT H drifts

    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"), policy=policy())
    _md(a, 60)
    n = a.calc.learner.n_calls
    a.calc.close()
    b = molecule("CH3CH2OH")
    b.calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"), policy=policy())
    assert b.calc.learner.n_warm == n and b.calc.model.is_fitted
    b.get_forces()
    assert b.calc.learner.history[-1]["reason"] == "calibrating"
    assert b.calc.learner.policy.scale != b.calc.learner.policy.initial_scale
    b.rattle(0.001, seed=1)
    b.get_forces()  # decided with the calibrated estimate now
    assert b.calc.learner.history[-1]["reason"] in ("trusted", "uncertain")
    # the warm start fitted the hyperparameters on the n stored frames: its first labels
    # are not "the first few" of the schedule, which counts the frames the model holds
    assert not b.calc.learner.timings["hyperparameters"]
    assert b.calc.learner.hyperparameter_schedule.next == n + 50
    b.calc.close()


def test_collapsed_geometry_is_refused_before_the_reference(tmp_path):
    from otfml.errors import ReferenceFailed

    a = molecule("CH3CH2OH")
    a.positions[3] = a.positions[0] + [0.3, 0.0, 0.0]
    calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"))
    with pytest.raises(ReferenceFailed, match=r"step 1: atoms 0 \(C\) and 3 \(H\) are 0.300 Å"):
        calc.get_forces(a)
    calc.close()
    with Store(tmp_path / "s.h5") as st:
        assert len(st) == 0


def test_misspelled_option_is_an_error():
    with pytest.raises(TypeError, match="force_tolerence"):
        OTFCalculator(EMT(), force_tolerence=0.1)


def test_bad_structures_are_clear_errors():
    from ase import Atoms

    calc = OTFCalculator(EMT())
    with pytest.raises(ConfigError, match="at least 2 atoms"):
        calc.get_potential_energy(Atoms("H", positions=[[0, 0, 0]]))
    a = molecule("H2O")
    a.positions[0, 0] = np.nan
    with pytest.raises(ConfigError, match="NaN"):
        OTFCalculator(EMT()).get_potential_energy(a)


@mopac
def test_otf_md_with_mopac_stays_physical_and_stores_every_call(tmp_path):
    """The README example, shortened: real MOPAC PM7, Langevin at 500 K."""
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(reference=MOPAC(method="PM7"), store=str(tmp_path / "e.h5"))
    rng = np.random.default_rng(0)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng, fixcm=False)
    comp = EnergyCompensation(a, min_frames=0)  # from the first update: 400 steps are short
    dyn.attach(comp, interval=1)
    temps, srcs = [], []
    dyn.attach(lambda: (temps.append(a.get_temperature()),
                        srcs.append(a.calc.results["source"])), interval=1)
    dyn.run(400)
    L = a.calc.learner
    assert 0 < L.n_calls < 400 and srcs.count("model") > 100
    assert max(temps) < 1500  # no blow-up from a symmetric start
    assert comp.total != 0.0 and comp.pending == 0.0  # updates were compensated, in full
    a.calc.close()
    with Store(tmp_path / "e.h5") as st:
        assert len(st) == L.n_calls
        fr = st.frame(0)
        assert fr.fingerprint["code"] == "MOPAC" and fr.fingerprint["version"]
        # the stored label is MOPAC's for that geometry
        chk = fr.atoms.copy()
        chk.calc = MOPAC(method="PM7", label=str(tmp_path / "chk" / "m"))
        assert chk.get_potential_energy() == pytest.approx(fr.energy, abs=1e-6)


@mopac
def test_otf_md_with_mopac_on_the_updated_model_stays_physical(tmp_path):
    """call_step_result: updated_model with the real MOPAC: the run stays near the thermostat,
    stores MOPAC's labels, and the forces it returns at the calls are close to them."""
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(reference=MOPAC(method="PM7"), store=str(tmp_path / "e.h5"),
                           policy=LearningPolicy(call_step_result="updated_model"))
    rng = np.random.default_rng(0)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng, fixcm=False)
    dyn.attach(EnergyCompensation(a, min_frames=0), interval=1)
    temps, used = [], {}

    def record():
        temps.append(a.get_temperature())
        if a.calc.results["source"] == "updated_model":
            used[a.calc.learner.n_steps] = a.calc.results["forces"].copy()

    dyn.attach(record, interval=1)
    dyn.run(400)
    L = a.calc.learner
    assert len(used) == L.n_calls and 0 < L.n_calls < 200
    assert max(temps) < 1500 and np.mean(temps[200:]) < 900
    a.calc.close()
    with Store(tmp_path / "e.h5") as st:
        assert sorted(used) == [fr.step for fr in st]
        err = [np.abs(used[fr.step] - fr.forces).mean() for fr in st]
        # the model was trained on that label: well within the tolerance of 0.2 eV/Å
        assert np.median(err) < 0.1, err
        assert all(fr.fingerprint["code"] == "MOPAC" for fr in st)


@mopac
def test_bfgs_optimization_with_mopac(tmp_path):
    a = molecule("CH3CH2OH")
    a.rattle(0.1, seed=4)
    a.calc = OTFCalculator(reference=MOPAC(method="PM7"), store=str(tmp_path / "o.h5"),
                           force_tolerance=0.1)
    BFGS(a, logfile=None).run(fmax=0.05, steps=200)
    a.calc.learner.request_reference = True
    a.calc.reset()
    assert np.linalg.norm(a.get_forces(), axis=1).max() < 0.15
    assert a.calc.results["source"] == "reference"


@mopac
def test_changed_charge_is_never_mixed_into_a_store(tmp_path):
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(reference=MOPAC(method="PM7"), store=str(tmp_path / "e.h5"))
    a.get_forces()
    a.calc.close()
    b = molecule("CH3CH2OH")
    b.calc = OTFCalculator(reference=MOPAC(method="PM6"), store=str(tmp_path / "e.h5"))
    b.calc.learner.request_reference = True
    with pytest.raises(FingerprintMismatch, match="method: 'PM7' -> 'PM6'"):
        b.get_forces()
    b.calc.close()
    with Store(tmp_path / "e.h5") as st:
        assert len(st) == 1


@mopac
def test_one_store_and_model_for_two_molecules_of_the_same_elements(tmp_path):
    """Ethanol, then methanol on the same store (real MOPAC): the warm-started model
    calibrates on methanol, learns it, and predicts both on independent MOPAC MD."""
    store = str(tmp_path / "s.h5")
    calls = {}
    for name in ("CH3CH2OH", "CH3OH"):
        a = molecule(name)
        a.calc = OTFCalculator(reference=MOPAC(method="PM7"), store=store)
        _md(a, 400)
        calls[name] = a.calc.learner.n_calls
        model = a.calc.model
        a.calc.close()
    assert calls["CH3OH"] >= 1  # methanol is new to the ethanol model: it calibrates on MOPAC
    for name in ("CH3CH2OH", "CH3OH"):
        b = molecule(name)
        b.calc = MOPAC(method="PM7", label=str(tmp_path / "m"))
        rng = np.random.default_rng(7)
        thermalize(b, 500, rng, zero_drift=False)
        dyn = Langevin(b, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng, fixcm=False)
        errors = []

        def check(b=b, errors=errors):
            errors.append(np.abs(model.predict(b).forces - b.get_forces()).mean())

        dyn.attach(check, interval=25)
        dyn.run(200)
        assert np.mean(errors) < 0.08, (name, np.mean(errors))


def test_calculator_recomputes_exactly_when_the_structure_changes():
    """The fast path of check_state (positions) keeps ASE's semantics for everything else."""
    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(allow_fragmentation=True))
    learner = a.calc.learner
    a.get_potential_energy()
    a.get_forces()
    assert learner.n_steps == 1  # nothing changed: cached
    a.positions[0, 0] += 1e-3
    a.get_forces()
    assert learner.n_steps == 2
    a.set_initial_charges([0.0] * (len(a) - 2) + [1.0, -1.0])  # same positions, new charges
    a.get_forces()
    assert learner.n_steps == 3
    assert a.calc.check_state(a) == []
    a.get_potential_energy()
    assert learner.n_steps == 3


def test_blas_limit_applies_inside_and_restores_after():
    from threadpoolctl import threadpool_info, threadpool_limits

    from otfml.learner import _BlasLimit

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    with threadpool_limits(limits=2, user_api="blas"):  # 2 outside, whatever the machine
        before = blas_threads()
        assert before and set(before) == {2}
        limit = _BlasLimit(1)
        for _ in range(2):  # reusable
            with limit:
                assert set(blas_threads()) == {1}
            assert blas_threads() == before
        with limit:  # nested: the outermost context sets and restores
            with limit:
                assert set(blas_threads()) == {1}
            assert set(blas_threads()) == {1}
        assert blas_threads() == before
        with _BlasLimit(None):
            assert blas_threads() == before


def test_the_model_holds_at_most_max_frames_and_the_store_keeps_all(tmp_path):
    """model.max_frames bounds what the model holds during a run and after a warm start;
    the store is the source of truth and keeps every labelled frame."""

    def calc():
        return OTFCalculator(EMT(), store=str(tmp_path / "s.h5"),
                             policy=LearningPolicy(force_tolerance=100.0, force_call_every=2,
                                                   allow_fragmentation=True),
                             model_settings={"max_frames": 4})

    a = molecule("CH3CH2OH")
    a.calc = calc()
    _md(a, 30)
    learner = a.calc.learner
    held = [h["frames"] for h in learner.history]
    assert learner.n_calls > 10 and max(held) <= 4
    assert learner.model.n_frames + learner.model.n_dropped == learner.n_calls
    last = learner.history[-1]  # counted before the step
    assert last["labelled"] == learner.n_calls - last["called"]
    a.calc.close()
    with Store(str(tmp_path / "s.h5")) as st:
        assert len(st) == learner.n_calls
        stored = [fr.energy for fr in st]
    # evict_frames "thin" (the default) keeps the run's first frame and a sample of the rest
    held = [fr.energy for fr in learner.model.frames]
    assert held[0] == stored[0] and held[-1] == stored[-1]
    assert all(e in stored for e in held)
    b = molecule("CH3CH2OH")
    b.calc = calc()
    assert b.calc.learner.n_warm == learner.n_calls
    assert b.calc.model.n_frames <= 4 and b.calc.model.is_fitted
    b.calc.close()


def test_learner_predict_runs_under_the_blas_limit_outside_step():
    """Observers (EnergyCompensation) predict between steps: one BLAS thread there too."""
    from threadpoolctl import threadpool_info, threadpool_limits

    a = Icosahedron("Cu", 2)
    a.rattle(0.05, seed=2)
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(initial_calls=2), multiplicity=2)
    for _ in range(3):
        a.positions += 0.01
        a.get_forces()
    learner = a.calc.learner
    seen = []
    model_predict = learner.model.predict

    def spy(atoms, env=None):
        seen.append({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"})
        return model_predict(atoms, env)

    learner.model.predict = spy
    with threadpool_limits(limits=2, user_api="blas"):
        p = learner.predict(a)
    assert seen == [{1}]
    assert p.energy == pytest.approx(model_predict(a).energy, abs=1e-12)
    np.testing.assert_allclose(p.forces, model_predict(a).forces, atol=1e-12)


def test_floor_calibration_in_the_loop_estimates_floor_plus_novelty():
    """calibration "floor": the loop fits it at its calls, and every trusted step's
    forces_std is sqrt(floor^2 + (scale novelty)^2) of that step's novelty."""
    a = Icosahedron("Cu", 2)
    a.rattle(0.05, seed=3)
    # hyperparameters fitted at once (hyperparameter_lag 0): the run whose calls' errors
    # need a floor as well as the scale
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=0.3, calibration="floor"),
                           multiplicity=2, model_settings={"hyperparameter_lag": 0})
    sources = _md(a, 150)
    L = a.calc.learner
    assert "model" in sources and L.n_calls >= 3
    pol = L.policy
    assert pol.floor > 0 and pol.scale > 0
    for _ in range(5):  # a trusted step (a call just before refits the calibration)
        a.positions += 1e-4
        a.get_forces()
        if a.calc.results["source"] == "model":
            break
    assert a.calc.results["source"] == "model"
    u = L.model.predict(a).novelty
    np.testing.assert_allclose(a.calc.results["forces_std"],
                               np.hypot(pol.floor, pol.scale * u), rtol=1e-9)
    assert L.policy.model_calibration()["force_std_floor"] == pytest.approx(pol.floor)


@mopac
@pytest.mark.parametrize("calibration", ["floor", "element_floor"])
def test_floor_calibration_with_mopac_fits_the_observed_errors(tmp_path, calibration):
    """calibration "floor" on real MOPAC PM7 (ethanol, Langevin at 500 K): the floor and
    factor are the NNLS fit of the squared errors the calls observed, and trusted steps use it;
    with "element_floor" the same fit per element (H, C, O) on that element's atoms."""
    from scipy.optimize import nnls

    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(reference=MOPAC(method="PM7"),
                           policy=LearningPolicy(calibration=calibration))
    rng = np.random.default_rng(1)
    thermalize(a, 500, rng)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng, fixcm=False)
    temps, stds = [], []
    z = a.numbers

    def watch():
        temps.append(a.get_temperature())
        if a.calc.results["source"] == "model":
            pol = a.calc.learner.policy  # the calibration in force at this step
            floors = np.array([pol.element_floors.get(int(k), pol.floor) for k in z])
            scales = np.array([pol.element_scales.get(int(k), pol.scale) for k in z])
            stds.append((a.calc.learner.model.predict(a).novelty, a.calc.results["forces_std"],
                         floors, scales))

    dyn.attach(watch, interval=1)
    dyn.run(300)
    L = a.calc.learner
    pol = L.policy
    assert 2 < L.n_calls < 300 and stds
    assert max(temps) < 1500
    # the fit over what the calls observed (model vs MOPAC per atom, before each update)
    u = np.concatenate([p[0] for p in pol._pairs])
    e = np.concatenate([p[1] for p in pol._pairs])

    def fit(sel):
        (f2, s2), _ = nnls(np.column_stack([np.ones_like(u[sel]), u[sel] ** 2]), e[sel] ** 2)
        return np.sqrt(f2), np.sqrt(s2)

    f, s = fit(slice(None))
    assert pol.floor == pytest.approx(f, abs=1e-12)
    assert pol.scale == pytest.approx(s)
    if calibration == "element_floor":
        zs = np.concatenate([p[2] for p in pol._pairs])
        assert sorted(pol.element_floors) == [1, 6, 8]
        for k in (1, 6, 8):
            fk, sk = fit(zs == k)
            assert pol.element_floors[k] == pytest.approx(fk, abs=1e-12)
            if sk > 0:
                assert pol.element_scales[k] == pytest.approx(sk)
        assert set(pol.model_calibration()["force_std_element_floors"]) == {"1", "6", "8"}
    else:
        assert pol.element_floors == {}
    # a floor was in force at trusted steps (the last fit may put it at 0)
    assert any(floors.max() > 0 for _, _, floors, _ in stds)
    for novelty, forces_std, floors, scales in stds:
        np.testing.assert_allclose(forces_std, np.hypot(floors, scales * novelty), rtol=1e-9)
    a.calc.close()


@pytest.mark.parametrize("admission", [0.5, None])
def test_a_call_admits_the_environments_that_caused_it(admission):
    """learning.sparse_admission: at a call, the environments with more than half the novelty
    at which the estimate reaches the tolerance join the sparse set even below
    model.sparse_tolerance (here a coarse 0.1; never below a quarter of it), so the geometry
    that called is left with less novelty than that.  With None, environments between the two
    thresholds keep the novelty that made them call."""
    a = Icosahedron("Cu", 2)
    a.rattle(0.05, seed=3)
    a.calc = OTFCalculator(EMT(), multiplicity=2,
                           policy=LearningPolicy(force_tolerance=0.3, calibration="floor",
                                                 decide_on="estimate",
                                                 sparse_admission=admission),
                           model_settings={"sparse_tolerance": 0.1})
    L = a.calc.learner
    ratios = []  # at each call: novelty left after the update / the admission bound
    # the model's sigma and the calibration before the step (what the admission used: it is
    # fixed when the call is decided, as the update is prepared while the reference runs)
    sigma, u_tol = [None], [None]

    def watch():
        if a.calc.results["source"] == "reference" and u_tol[0] and sigma[0]:
            bound = np.clip(0.5 * u_tol[0] / sigma[0], 0.1 / 4, 0.1)  # normalized kernel units
            left = L.model.predict(a).novelty.max() / L.model.hyp.sigma
            ratios.append(left / bound)
        sigma[0] = L.model.hyp.sigma if L.model.is_fitted else None
        u_tol[0] = L.policy.novelty_at_tolerance(a.numbers)

    rng = np.random.default_rng(0)
    thermalize(a, 300, rng, zero_drift=False)
    dyn = Langevin(a, 0.5 * units.fs, temperature_K=300, friction=0.02, rng=rng, fixcm=False)
    dyn.attach(watch, interval=1)
    dyn.run(150)
    assert len(ratios) >= 3
    if admission:
        assert max(ratios) <= 1 + 1e-9
    else:
        assert max(ratios) > 1.5


@mopac
def test_updates_prepared_during_mopac_calls_change_nothing_but_time(tmp_path):
    """model.overlap_update (the default): while MOPAC runs, the update's geometry-only part
    (new sparse environments and their rows) is prepared on another thread. The run is the
    same as with one after the other: same calls, energies and forces."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("the overlap needs two CPUs")
    def run(overlap):
        a = molecule("CH3CH2OH")
        a.calc = OTFCalculator(reference=MOPAC(method="PM7", label=str(tmp_path / f"{overlap}/m")),
                               model_settings={"overlap_update": overlap})
        L = a.calc.learner
        rng = np.random.default_rng(1)
        dyn = Langevin(a, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng, fixcm=False)
        steps = []
        dyn.attach(lambda: steps.append((a.calc.results["source"], a.get_potential_energy(),
                                         a.get_forces().copy())), interval=1)
        dyn.run(200)
        assert L._overlap is overlap and (L._pool is not None) is overlap
        a.calc.close()
        return steps, L.model.n_sparse, L.n_calls

    runs = [run(True), run(False)]
    (s1, m1, c1), (s2, m2, c2) = runs
    assert c1 == c2 and m1 == m2 and 5 < c1 < 150
    assert [s for s, _, _ in s1] == [s for s, _, _ in s2]
    np.testing.assert_allclose([e for _, e, _ in s1], [e for _, e, _ in s2], atol=1e-9)
    np.testing.assert_allclose(np.array([f for _, _, f in s1]), np.array([f for _, _, f in s2]),
                               atol=1e-8)


def test_the_waiting_thread_runs_the_tasks_it_claims_until_the_update_is_prepared():
    """learner._Helper: tasks the update thread offers are run by whichever thread claims
    them first; serve() returns once the update thread closes the helper."""
    import threading

    from otfml.learner import _Helper

    helper = _Helper()
    where = {}

    def work():
        tasks = [helper.spawn(lambda k=k: (where.setdefault(k, threading.get_ident()), k)[1])
                 for k in range(20)]
        result = [t.join() for t in tasks]
        helper.close()
        return result

    out = {}
    worker = threading.Thread(target=lambda: out.setdefault("r", work()))
    worker.start()
    helper.serve()
    worker.join()
    assert out["r"] == list(range(20)) and sorted(where) == list(range(20))


def test_an_in_process_reference_keeps_its_blas_threads():
    """otfml limits BLAS threads for its own algebra only: an in-process reference (an ASE
    calculator that is not file-based, so no overlap) computes with the threads it had,
    and the updates after it run under the limit."""
    from threadpoolctl import threadpool_info, threadpool_limits

    from otfml.learner import Learner
    from otfml.reference import CalculatorReference

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen = []

    class Watching(EMT):
        def calculate(self, *args, **kwargs):
            seen.append(blas_threads())
            super().calculate(*args, **kwargs)

    with threadpool_limits(limits=2, user_api="blas"):
        learner = Learner(CalculatorReference(Watching()), model_settings={"blas_threads": 1})
        assert not learner._overlap
        a = molecule("H2O")
        in_update = []
        for k in range(3):
            a.rattle(0.02, seed=k)
            learner.request_reference = True
            learner.step(a)
            if k == 0:  # the model exists now: watch the updates of the next two calls
                add = learner.model.add_prepared

                def watched(*args, add=add, **kwargs):
                    in_update.append(blas_threads())
                    return add(*args, **kwargs)

                learner.model.add_prepared = watched
        assert len(seen) == 3 and all(s == {2} for s in seen)
        assert len(in_update) == 2 and all(s == {1} for s in in_update)
        assert blas_threads() == {2}


def test_predictions_shared_between_threads_leave_a_run_as_it_was(monkeypatch):
    """model.predict_threads changes only rounding: the same calls and the same trajectory."""
    import otfml.gp as gp_module

    # small enough work to be split (otfml keeps a 13-atom cluster on one thread)
    monkeypatch.setattr(gp_module._threads, "_MIN_SPLIT_WORK", 0.0)
    monkeypatch.setattr(gp_module._kernels, "_MIN_SPLIT_ATOMS", 2)
    runs = []
    for threads in (1, 2):
        a = Icosahedron("Cu", 2)
        a.rattle(0.05, seed=3)
        a.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=0.3),
                               model_settings={"predict_threads": threads}, multiplicity=2)
        sources = _md(a, 80, seed=1)
        assert a.calc.learner.model.threads == threads
        runs.append((sources, a.get_potential_energy(), a.positions.copy()))
    assert "model" in runs[0][0] and runs[0][0] == runs[1][0]
    # rounding grows along the trajectory (4e-7 eV after 80 steps here); a wrong split would
    # be off by the atoms' whole local energies
    assert runs[1][1] == pytest.approx(runs[0][1], abs=1e-5)
    np.testing.assert_allclose(runs[1][2], runs[0][2], atol=1e-5)
    with pytest.raises(ConfigError, match="predict_threads"):
        OTFCalculator(EMT(), model_settings={"predict_threads": 0})


def _cluster_run(settings, steps=120):
    a = Icosahedron("Cu", 2)
    a.rattle(0.05, seed=3)
    # the whole estimate decides: a rule that calls often, so fits come in a short run
    a.calc = OTFCalculator(EMT(), policy=LearningPolicy(force_tolerance=0.3, calibration="atom",
                                                        decide_on="estimate"),
                           model_settings=settings, multiplicity=2)
    sources = _md(a, steps, seed=1)
    L = a.calc.learner
    called = [h["step"] for h in L.history if h["called"]]
    return a, L, sources, called


def test_fits_on_another_thread_take_effect_a_fixed_number_of_calls_later(monkeypatch):
    """With model.hyperparameter_lag the run does not depend on how long a fit takes: the
    same run with fits slowed down makes the same calls along the same trajectory; each fit
    after the first hyperparameter_first calls changed the hyperparameters exactly lag calls
    after it started, and the run's end applied the last one."""
    import time

    from otfml.gp import SparseGP

    settings = {"hyperparameter_lag": 3, "hyperparameter_first": 2, "hyperparameter_every": 5}
    a1, L1, s1, c1 = _cluster_run(settings)
    fit = SparseGP.hyperparameter_fit

    def slow(self, *args, **kwargs):
        run = fit(self, *args, **kwargs)
        return lambda: (time.sleep(0.05), run())[1]

    monkeypatch.setattr(SparseGP, "hyperparameter_fit", slow)
    events = []

    def watch(name):
        real = getattr(Learner, name)

        def watched(self):
            events.append((name, self.n_calls))
            return real(self)
        monkeypatch.setattr(Learner, name, watched)

    watch("_start_fit")
    watch("_apply_fit")
    a2, L2, s2, c2 = _cluster_run(settings)
    assert len(c1) >= 10 and "model" in s1
    assert c1 == c2 and s1 == s2
    np.testing.assert_allclose(a2.positions, a1.positions, atol=1e-12)
    starts = [n for e, n in events if e == "_start_fit"]
    applied = [n for e, n in events if e == "_apply_fit"]
    assert len(starts) >= 2 and starts[0] > 2  # the first two fits ran at once
    assert applied == [n + 3 for n in starts[:len(applied)]]
    assert len(starts) - len(applied) in (0, 1)
    assert min(L2.timings["fits_apart"]) >= 0.05
    a2.calc.close()  # applies a fit still running
    assert L2._fit is None and L2._fit_pool is None
    assert [e for e, _ in events].count("_apply_fit") == len(starts)


def test_a_failing_fit_on_another_thread_leaves_the_run_going(monkeypatch, caplog):
    """A fit that raises on its thread is reported when it would take effect; the run goes
    on with the hyperparameters it had."""
    from otfml.gp import SparseGP

    def broken(self, *args, **kwargs):
        def run():
            raise np.linalg.LinAlgError("injected")
        return run

    settings = {"hyperparameter_lag": 2, "hyperparameter_first": 1, "hyperparameter_every": 3}
    a, L, sources, called = _cluster_run(settings, steps=20)
    L.finish_hyperparameter_fit()
    before = L.model.hyp
    monkeypatch.setattr(SparseGP, "hyperparameter_fit", broken)
    L.request_reference = True
    n = L.n_calls
    more = _md(a, 60, seed=2)
    assert len(more) >= 60 and L.n_calls > n + 6
    assert "hyperparameter fit started at label" in caplog.text
    assert L.model.hyp == before
    with pytest.raises(ConfigError, match="hyperparameter_lag"):
        OTFCalculator(EMT(), model_settings={"hyperparameter_lag": -1})


@pytest.mark.parametrize("key, value, says", [
    ("max_sparse_per_species", 0, "must be >= 1"),
    ("sparse_tolerance", "0.01", "is a str"),
    ("evict_frames", "random", "choose one of"),
    ("overlap_update", 1, "is a int"),
    ("blas_threads", 1.5, "is a float"),
])
def test_python_model_settings_get_the_workflow_files_checks(tmp_path, key, value, says):
    """A bad model setting from Python is refused as in a workflow file, naming the key, the
    value and what it must be, before the store is opened (nothing is written)."""
    path = tmp_path / "s.h5"
    with pytest.raises(ConfigError, match=f"model.{key} = .*{says}"):
        OTFCalculator(EMT(), store=str(path), model_settings={key: value})
    assert not path.exists()


def test_numpy_numbers_are_fine_model_settings():
    calc = OTFCalculator(EMT(), model_settings={"max_sparse_per_species": np.int64(300),
                                                "sparse_tolerance": np.float32(0.01),
                                                "evict_frames": "OLDEST"})
    s = calc.learner.settings
    assert s["max_sparse_per_species"] == 300 and type(s["max_sparse_per_species"]) is int
    assert s["sparse_tolerance"] == pytest.approx(0.01) and s["evict_frames"] == "oldest"
