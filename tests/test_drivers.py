"""The drivers: an optimization on the model confirmed by the real MOPAC."""

import numpy as np
import pytest
from ase.build import molecule
from ase.calculators.emt import EMT
from ase.calculators.mopac import MOPAC

from otfml import OTFCalculator
from otfml.drivers import relax
from otfml.errors import ConfigError

from .conftest import mopac


def _bfgs_calls(atoms, tmp_path) -> int:
    """Reference calls of ASE's BFGS on MOPAC directly from ``atoms`` to fmax 0.05 eV/Å."""
    from ase.optimize import BFGS

    b = atoms.copy()
    b.calc = MOPAC(method="PM7", label=str(tmp_path / "bfgs" / "m"))
    opt = BFGS(b, logfile=None)
    opt.run(fmax=0.05, steps=300)
    return opt.nsteps + 1


@mopac
@pytest.mark.parametrize("rattle, seed", [(0.15, 1), (0.35, 3)])
def test_surrogate_relax_converges_with_fewer_calls_than_bfgs_on_mopac(tmp_path, rattle, seed):
    """The default optimizer, from a start near and one far from the minimum: one reference
    call per step, converged where an independent MOPAC call agrees, in fewer calls than
    ASE's BFGS on MOPAC from the same start."""
    a = molecule("CH3CH2OH")
    a.rattle(rattle, seed=seed)
    bfgs = _bfgs_calls(a, tmp_path)
    a.calc = OTFCalculator(MOPAC(method="PM7", label=str(tmp_path / "ref" / "m")),
                           store=str(tmp_path / "s.h5"))
    r = relax(a, fmax=0.05, steps=300, logfile=None)
    calls = a.calc.learner.n_calls
    a.calc.close()
    assert r.converged and r.fmax <= 0.05
    assert calls == r.steps + 1 < bfgs  # the start and one call per step
    b = a.copy()
    b.calc = MOPAC(method="PM7", label=str(tmp_path / "check" / "m"))
    assert np.linalg.norm(b.get_forces(), axis=1).max() <= 0.05
    assert b.get_potential_energy() == pytest.approx(r.energy, abs=1e-6)


@mopac
def test_a_wrong_first_guess_is_caught_by_the_trust_radius(tmp_path):
    """From a start far from the minimum the model's first steps overshoot (a step that
    comes out higher than the best is not kept and the trust radius shrinks); the run
    still converges."""
    from otfml.surrogate_opt import SurrogateOpt

    a = molecule("CH3CH2OH")
    a.rattle(0.35, seed=3)
    a.calc = OTFCalculator(MOPAC(method="PM7", label=str(tmp_path / "ref" / "m")))
    opt = SurrogateOpt(a, logfile=None, trust=0.4)  # a first trust radius too bold
    trusts = []
    opt.attach(lambda: trusts.append(opt.trust))
    assert opt.run(fmax=0.05, steps=200)
    a.calc.close()
    assert opt.n_rejected >= 1 and min(trusts) < 0.4


def test_the_model_keeps_leading_below_the_handover_force_while_it_predicts_well(tmp_path):
    """Below ``handover`` the quasi-Newton phase begins only once the model mispredicted
    its last step's energy change (by more than a factor of 1.5)."""
    from ase.optimize import BFGS

    from otfml.surrogate_opt import SurrogateOpt

    def near_minimum(ratio):
        a = molecule("CH3CH2OH")
        a.calc = OTFCalculator(EMT(), store=str(tmp_path / f"{ratio}.h5"))
        BFGS(a, logfile=None).run(fmax=0.2, steps=200)  # learned on the way, below 0.3
        opt = SurrogateOpt(a, logfile=None)
        opt.learner.reference_only = True
        # the last step: the model predicted -10 meV, the reference fell by ratio x that
        opt.best = (a.positions.copy(), a.get_potential_energy() + 0.01 * ratio,
                    a.get_forces())
        opt.predicted, opt.fmax = -0.01, 0.05
        opt.step()
        a.calc.close()
        assert opt.ratio == pytest.approx(ratio)
        return opt

    assert not near_minimum(1.0).quasi_newton
    assert near_minimum(0.2).quasi_newton


def test_the_model_leads_again_after_qn_steps_quasi_newton_steps(tmp_path):
    """A quasi-Newton phase lasts ``qn_steps`` steps (the handover's included); the step
    after them is the model's, judged afresh, even where the reference's forces are below
    ``handover``."""
    from ase.optimize import BFGS

    from otfml.surrogate_opt import SurrogateOpt

    a = molecule("CH3CH2OH")
    a.calc = OTFCalculator(EMT(), store=str(tmp_path / "s.h5"))
    BFGS(a, logfile=None).run(fmax=0.2, steps=200)  # learned on the way, below 0.3
    opt = SurrogateOpt(a, logfile=None, qn_steps=2)
    opt.learner.reference_only = True
    opt.fmax = 0.05  # below handover, with no step predicted yet: quasi-Newton at once
    modes = []
    for _ in range(4):
        opt.step()
        modes.append(opt.quasi_newton)
    a.calc.close()
    assert modes[:2] == [True, True] and modes[2] is False
    with pytest.raises(ConfigError, match="qn_steps = 0"):
        SurrogateOpt(a, qn_steps=0)


@mopac
def test_conformers_share_the_model_and_later_ones_need_fewer_calls(tmp_path):
    """Three rattled copies of ethanol relaxed one after another with one calculator: the
    later ones start from a model that has learned the first, and need fewer calls."""
    calc = OTFCalculator(MOPAC(method="PM7", label=str(tmp_path / "ref" / "m")),
                         store=str(tmp_path / "s.h5"))
    calls = []
    for seed in (1, 2, 3):
        a = molecule("CH3CH2OH")
        a.rattle(0.15, seed=seed)
        a.calc = calc
        before = calc.learner.n_calls
        assert relax(a, fmax=0.05, steps=200, logfile=None).converged
        calls.append(calc.learner.n_calls - before)
    calc.close()
    assert max(calls[1:]) < calls[0]


@mopac
def test_relax_with_an_ase_optimizer_on_the_model(tmp_path):
    """optimizer="BFGS": ASE's BFGS on the model, the minimum confirmed by the reference."""
    a = molecule("CH3CH2OH")
    a.rattle(0.15, seed=1)
    a.calc = OTFCalculator(MOPAC(method="PM7", label=str(tmp_path / "ref" / "m")))
    r = relax(a, fmax=0.05, steps=300, optimizer="BFGS", logfile=None)
    a.calc.close()
    assert r.converged and r.checks >= 1


def test_relax_names_what_is_missing():
    a = molecule("H2O")
    a.calc = EMT()
    with pytest.raises(ConfigError, match="OTFCalculator"):
        relax(a)
    a.calc = OTFCalculator(EMT())
    with pytest.raises(ConfigError, match="optimizer = 'BFSG'.*BFGS"):
        relax(a, optimizer="BFSG")


def test_the_inner_minimization_walks_as_ases_bfgs_and_stops_at_the_trust_radius():
    """SurrogateOpt's minimization on the model's surface: ASE's BFGS, step for step (its
    Newton steps solved by Cholesky where the Hessian allows), cut at the trust radius."""
    from ase.cluster import Icosahedron
    from ase.optimize import BFGS

    from otfml.surrogate_opt import _bfgs_within

    start = Icosahedron("Cu", 2)
    start.rattle(0.1, seed=3)
    x = start.positions.copy()
    ours, ase_ = start.copy(), start.copy()
    for a in (ours, ase_):
        a.calc = EMT()
    H = _bfgs_within(ours, x, trust=10.0, fmax=0.01, maxstep=0.1, steps=40)
    BFGS(ase_, logfile=None, maxstep=0.1).run(fmax=0.01, steps=40)
    np.testing.assert_allclose(ours.positions, ase_.positions, atol=1e-9)
    assert not np.allclose(ours.positions, x, atol=0.01)  # it went somewhere
    # the next minimization starts from the Hessian this one ended with, as ASE's would
    # from that Hessian
    again, ase_ = start.copy(), start.copy()
    for a in (again, ase_):
        a.positions[0] += 0.05
        a.calc = EMT()
    _bfgs_within(again, again.positions.copy(), trust=10.0, fmax=0.01, maxstep=0.1,
                 steps=40, H=H)
    opt = BFGS(ase_, logfile=None, maxstep=0.1)
    opt.H0 = H.copy()
    opt.run(fmax=0.01, steps=40)
    np.testing.assert_allclose(again.positions, ase_.positions, atol=1e-9)
    assert not np.allclose(H, 70.0 * np.eye(len(H)))
    cut = start.copy()
    cut.calc = EMT()
    _bfgs_within(cut, x, trust=0.02, fmax=0.01, maxstep=0.1)
    assert np.linalg.norm(cut.positions - x, axis=1).max() == pytest.approx(0.02)
