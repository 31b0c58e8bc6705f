import numpy as np
import pytest

from otfml.errors import ConfigError
from otfml.policy import LearningPolicy


def test_per_atom_calibration_is_least_squares_through_origin():
    pol = LearningPolicy(force_tolerance=0.2, calibration="atom")
    u = np.array([0.01, 0.02, 0.04])
    e = 3.0 * u  # errors exactly proportional to the novelty
    pol.observe(u, e)
    assert pol.scale == pytest.approx(3.0)
    np.testing.assert_allclose(pol.force_std(u), e)
    # median over calls: an outlier call does not move it
    pol.observe(u, 100 * u)
    pol.observe(u, 3.0 * u)
    assert pol.scale == pytest.approx(3.0)


def test_element_calibration_fits_each_element_on_its_own_atoms():
    pol = LearningPolicy(force_tolerance=0.2, calibration="element")
    numbers = np.array([6, 6, 1, 1, 1])
    u = np.array([0.01, 0.02, 0.01, 0.02, 0.03])
    e = u * np.array([30.0, 30.0, 5.0, 5.0, 5.0])  # carbon errs 6x more per unit novelty
    pol.observe(u, e, numbers)
    assert pol.element_scales == {6: pytest.approx(30.0), 1: pytest.approx(5.0)}
    np.testing.assert_allclose(pol.force_std(u, numbers), e)
    # an element never seen at a call falls back to the fit over all atoms
    assert pol.scale == pytest.approx(np.sqrt((e @ e) / (u @ u)))
    np.testing.assert_allclose(pol.force_std(np.array([0.01]), np.array([8])), 0.01 * pol.scale)
    # the decision uses the element's factor: 0.009 of carbon is 0.27 eV/Å, of hydrogen 0.045
    assert pol.decide(9, 3, 1, np.array([0.009, 0.001]), numbers=np.array([6, 1])).call
    assert not pol.decide(9, 3, 1, np.array([0.001, 0.009]), numbers=np.array([6, 1])).call
    cal = pol.model_calibration()
    assert cal["force_std_element_scales"] == {"6": pytest.approx(30.0), "1": pytest.approx(5.0)}
    # a later stage takes the calibration over
    nxt = LearningPolicy(calibration="element").inherit(pol)
    assert nxt.element_scales == pol.element_scales
    # "atom" keeps one factor for all
    one = LearningPolicy(calibration="atom")
    one.observe(u, e, numbers)
    assert one.element_scales == {} and "force_std_element_scales" not in one.model_calibration()
    np.testing.assert_allclose(one.force_std(u, numbers), one.scale * u)


def test_novelty_at_which_the_estimate_reaches_the_tolerance():
    pol = LearningPolicy(force_tolerance=0.2, calibration="atom")
    assert pol.novelty_at_tolerance() is None  # nothing observed: no calibration yet
    pol.observe(np.array([0.01, 0.02]), np.array([0.04, 0.08]))  # 4 /Å
    assert pol.novelty_at_tolerance() == pytest.approx(0.05)
    assert pol.force_std(np.array([0.05])) == pytest.approx(0.2)
    # per element: the element with the largest factor reaches it first
    el = LearningPolicy(force_tolerance=0.2, calibration="element")
    el.observe(np.array([0.01, 0.01]), np.array([0.3, 0.05]), np.array([6, 1]))  # C 30, H 5
    assert el.novelty_at_tolerance(np.array([6, 1, 1])) == pytest.approx(0.2 / 30)
    assert el.novelty_at_tolerance(np.array([1, 1])) == pytest.approx(0.2 / 5)
    # floor: hypot(0.1, 4 u) = 0.2 at u = sqrt(0.03) / 4; a floor at the tolerance: none
    fl = LearningPolicy(force_tolerance=0.2, calibration="floor")
    rng = np.random.default_rng(0)
    u = rng.uniform(0.0, 0.05, 21)
    fl.observe(u, np.sqrt(0.1**2 + (4.0 * u) ** 2))
    assert fl.novelty_at_tolerance() == pytest.approx(np.sqrt(0.2**2 - 0.1**2) / 4.0)
    assert fl.force_std(np.array([fl.novelty_at_tolerance()])) == pytest.approx(0.2)
    high = LearningPolicy(force_tolerance=0.2, calibration="floor")
    high.observe(u, np.full(21, 0.25))
    assert high.floor >= 0.2 and high.novelty_at_tolerance() is None


def test_max_calibration():
    pol = LearningPolicy(calibration="max")
    pol.observe(np.array([0.01, 0.05]), np.array([0.5, 0.1]))
    assert pol.scale == pytest.approx(0.5 / 0.05)


def test_floor_calibration_separates_the_error_the_novelty_does_not_see():
    pol = LearningPolicy(force_tolerance=0.2, calibration="floor", initial_calls=1,
                         decide_on="estimate")
    rng = np.random.default_rng(0)
    for _ in range(20):  # errors with a floor of 0.1 eV/Å plus 4/Å times the novelty
        u = rng.uniform(0.0, 0.05, 21)
        pol.observe(u, np.sqrt(0.1**2 + (4.0 * u) ** 2))
    assert pol.floor == pytest.approx(0.1, rel=1e-6)
    assert pol.scale == pytest.approx(4.0, rel=1e-6)
    u = np.array([0.0, 0.02, 0.05])
    np.testing.assert_allclose(pol.force_std(u), np.hypot(0.1, 4.0 * u))
    # through the origin the floor became part of the factor (about 5.3/Å): an atom of
    # novelty 0.04 is estimated at 0.21 eV/Å and calls; with the floor, hypot(0.1, 0.16)
    through_origin = LearningPolicy(force_tolerance=0.2, calibration="atom", initial_calls=1)
    through_origin.inherit(pol)
    assert through_origin.scale > 5.0
    assert through_origin.decide(9, 3, 1, np.array([0.001, 0.04])).call
    assert not pol.decide(9, 3, 1, np.array([0.001, 0.04])).call
    assert pol.decide(9, 3, 1, np.array([0.001, 0.05])).call  # hypot(0.1, 0.2) = 0.224
    # saved with the model and taken over by a later stage
    assert pol.model_calibration()["force_std_floor"] == pytest.approx(0.1)
    nxt = LearningPolicy(calibration="floor").inherit(pol)
    assert (nxt.floor, nxt.scale) == (pytest.approx(0.1), pytest.approx(4.0))
    assert "force_std_floor" not in through_origin.model_calibration()


def test_element_floor_calibration_fits_each_element_its_own_floor(caplog):
    """Water-like: O errs by 0.3 eV/Å whatever its novelty, H by 0.1; one floor for both
    would rank a novel H above every O."""
    from otfml.calibration import calibrated

    pol = LearningPolicy(force_tolerance=0.25, calibration="element_floor", initial_calls=1,
                         decide_on="estimate",
                         calibration_window=5)
    rng = np.random.default_rng(0)
    z = np.array([8, 1, 1] * 7)
    true = {8: (0.3, 10.0), 1: (0.1, 4.0)}
    for _ in range(5):
        u = rng.uniform(0.0, 0.05, len(z))
        f = np.array([true[k][0] for k in z])
        s = np.array([true[k][1] for k in z])
        pol.observe(u, np.hypot(f, s * u), z)
    assert pol.element_floors == {8: pytest.approx(0.3), 1: pytest.approx(0.1)}
    assert pol.element_scales == {8: pytest.approx(10.0), 1: pytest.approx(4.0)}
    u = np.array([0.0, 0.0, 0.04])
    np.testing.assert_allclose(pol.force_std(u, np.array([8, 1, 1])),
                               [0.3, 0.1, np.hypot(0.1, 0.16)])
    assert pol.decide(9, 3, 1, np.zeros(3), numbers=np.array([8, 1, 1])).call  # O's floor
    assert not pol.decide(9, 3, 1, np.array([0.0, 0.04]), numbers=np.array([1, 1])).call
    # only H's novelty can reach the tolerance: O's floor is above it
    assert pol.novelty_at_tolerance(np.array([8, 1])) == pytest.approx(
        np.sqrt(0.25**2 - 0.1**2) / 4.0)
    # saved with the model (string keys, as in JSON) and used so by `otfml evaluate`
    cal = pol.model_calibration()
    assert cal["force_std_element_floors"] == {"8": pytest.approx(0.3), "1": pytest.approx(0.1)}
    np.testing.assert_allclose(
        calibrated(u, cal["force_std_scale"], np.array([8, 1, 1]),
                   cal["force_std_element_scales"], cal["force_std_floor"],
                   cal["force_std_element_floors"]), pol.force_std(u, np.array([8, 1, 1])))
    nxt = LearningPolicy(calibration="element_floor").inherit(pol)
    assert nxt.element_floors == pol.element_floors
    # after a "floor" stage (its calls recorded without atomic numbers): one floor for all
    one = LearningPolicy(calibration="floor")
    one.observe(u, np.array([0.3, 0.1, 0.2]))
    later = LearningPolicy(calibration="element_floor").inherit(one)
    assert later.element_floors == {} and later.floor > 0
    np.testing.assert_allclose(later.force_std(u, np.array([8, 1, 1])), later.force_std(u))
    # the persisting floor above the tolerance is reported with the element
    with caplog.at_level("WARNING", logger="otfml.policy"):
        for _ in range(6):
            pol.observe(rng.uniform(0.0, 0.05, len(z)), np.where(z == 8, 0.3, 0.1), z)
            assert pol.element_floors[8] > 0.25  # refitted at each call
    assert any("floor of O" in r.getMessage() for r in caplog.records)


def test_a_floor_above_the_tolerance_is_reported_once_it_persists(caplog):
    pol = LearningPolicy(force_tolerance=0.05, calibration="floor", initial_calls=1,
                         decide_on="estimate",
                         calibration_window=3)
    u = np.linspace(0.0, 0.02, 10)

    def warned():
        return [r.getMessage() for r in caplog.records if "force-error floor" in r.getMessage()]

    with caplog.at_level("WARNING", logger="otfml.policy"):
        for k in range(8):
            pol.observe(u, np.hypot(0.1, 2.0 * u))
            assert pol.decide(9, 3, 1, np.zeros(10)).call  # the floor alone exceeds 0.05
            # the window fills at the 3rd call (k = 2); the floor is still high 3 calls later
            assert len(warned()) == (k >= 5)
        assert "force_tolerance = 0.05" in warned()[0] and "0.1 eV" in warned()[0]
        # a young model's high floor that falls below the tolerance is never reported
        caplog.clear()
        pol = LearningPolicy(force_tolerance=0.05, calibration="floor", initial_calls=1,
                         decide_on="estimate",
                             calibration_window=3)
        for err_floor in (0.1, 0.1, 0.1, 0.02, 0.02, 0.02, 0.02, 0.02):
            pol.observe(u, np.hypot(err_floor, 2.0 * u))
            pol.decide(9, 3, 1, np.zeros(10))
        assert pol.floor < 0.05 and warned() == []


def test_decide_thresholds_in_ev_per_angstrom():
    pol = LearningPolicy(force_tolerance=0.2, initial_calls=1, calibration="atom",
                         decide_on="estimate")
    pol.observe(np.array([0.1]), np.array([0.1]))  # scale 1 /Å
    assert pol.decide(5, 3, 1, np.array([0.05, 0.19])).call is False
    d = pol.decide(5, 3, 1, np.array([0.05, 0.21]))
    assert d.call and d.reason == "uncertain" and d.max_force_std == pytest.approx(0.21)
    assert pol.decide(1, 0, 0, None).reason == "no model"


def test_uncalibrated_model_calls_once_to_calibrate():
    pol = LearningPolicy(force_tolerance=0.2)  # e.g. after a warm start: no errors seen
    d = pol.decide(1, 0, 0, np.array([0.01, 0.02]), n_frames=40)
    assert d.call and d.reason == "calibrating"
    pol.observe(np.array([0.01, 0.02]), np.array([0.02, 0.04]))
    assert pol.decide(2, 1, 0, np.array([0.01, 0.02]), n_frames=41).reason == "trusted"
    assert pol.scale == pytest.approx(2.0)


def test_adaptive_tolerance_follows_errors_within_bounds():
    pol = LearningPolicy(force_tolerance=0.2, adaptive=True)
    for _ in range(10):
        pol.observe(np.array([0.1]), np.array([1.0]))
    assert pol.tolerance == pytest.approx(0.4)  # clipped at 2x
    for _ in range(60):
        pol.observe(np.array([0.1]), np.array([0.15]))
    assert pol.tolerance == pytest.approx(0.15)


@pytest.mark.parametrize("kw,text", [({"force_tolerance": 0}, "force_tolerance=0"),
                                     ({"max_calls": 0}, "max_calls=0"),
                                     ({"calibration": "mean"}, "calibration='mean'"),
                                     ({"call_step_result": "model"},
                                      "call_step_result='model'; use 'reference'"),
                                     ({"sparse_admission": 0}, "sparse_admission=0; give a "),
                                     ({"sparse_admission": 1.5}, "sparse_admission=1.5")])
def test_bad_settings_are_named(kw, text):
    with pytest.raises(ConfigError, match=text):
        LearningPolicy(**kw)


def test_the_learnable_part_decides_by_default():
    """By default (element_floor, decide_on learnable) an atom whose error the model keeps
    whatever it learns (its floor above the tolerance) does not call; novelty does."""
    pol = LearningPolicy(force_tolerance=0.2, initial_calls=1)
    assert (pol.calibration, pol.decide_on) == ("element_floor", "learnable")
    rng = np.random.default_rng(0)
    for _ in range(10):  # errors of 0.3 eV/Å whatever the novelty: a floor above tolerance
        u = rng.uniform(0.0, 0.02, 4)
        pol.observe(u, np.sqrt(0.3**2 + (5.0 * u) ** 2), numbers=np.array([8, 1, 1, 1]))
    numbers = np.array([8, 1, 1, 1])
    quiet = pol.decide(20, 10, 1, np.zeros(4), numbers=numbers)
    assert not quiet.call and quiet.max_force_std > 0.2  # the estimate keeps the floor
    assert pol.decide(21, 10, 1, np.array([0.1, 0, 0, 0]), numbers=numbers).call
    estimate = LearningPolicy(force_tolerance=0.2, initial_calls=1,
                              decide_on="estimate").inherit(pol)  # the same calibration
    assert estimate.decide(20, 10, 1, np.zeros(4), numbers=numbers).call
