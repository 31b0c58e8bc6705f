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


@mopac
def test_relax_ends_where_an_independent_mopac_call_agrees(tmp_path):
    a = molecule("CH3CH2OH")
    a.rattle(0.15, seed=1)
    a.calc = OTFCalculator(MOPAC(method="PM7", label=str(tmp_path / "ref" / "m")),
                           store=str(tmp_path / "s.h5"))
    r = relax(a, fmax=0.05, steps=300, logfile=None)
    calls = a.calc.learner.n_calls
    a.calc.close()
    assert r.converged and r.fmax <= 0.05 and r.checks >= 1
    assert calls < r.steps  # the optimizer ran on the model between reference calls
    b = a.copy()
    b.calc = MOPAC(method="PM7", label=str(tmp_path / "check" / "m"))
    assert np.linalg.norm(b.get_forces(), axis=1).max() <= 0.05
    assert b.get_potential_energy() == pytest.approx(r.energy, abs=1e-6)


def test_relax_names_what_is_missing():
    a = molecule("H2O")
    a.calc = EMT()
    with pytest.raises(ConfigError, match="OTFCalculator"):
        relax(a)
    a.calc = OTFCalculator(EMT())
    with pytest.raises(ConfigError, match="optimizer = 'BFSG'.*BFGS"):
        relax(a, optimizer="BFSG")
