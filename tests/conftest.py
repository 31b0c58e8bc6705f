"""Shared fixtures. Tests that involve the reference use the real MOPAC."""

import shutil

import numpy as np
import pytest
from ase.build import molecule


def _have_mopac() -> bool:
    import os

    return bool(os.environ.get("ASE_MOPAC_COMMAND") or shutil.which("mopac"))


mopac = pytest.mark.skipif(not _have_mopac(), reason="MOPAC is not installed")


@pytest.fixture
def ethanol():
    a = molecule("CH3CH2OH")
    a.rattle(0.03, seed=1)
    return a


@pytest.fixture(scope="session")
def mopac_frames(tmp_path_factory):
    """A short real MOPAC PM7 Langevin trajectory of ethanol (every 5th step labelled)."""
    from ase import units
    from ase.calculators.mopac import MOPAC
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.md.langevin import Langevin
    from ase.md.velocitydistribution import MaxwellBoltzmannDistribution

    if not _have_mopac():
        pytest.skip("MOPAC is not installed")
    d = tmp_path_factory.mktemp("mopac_traj")
    a = molecule("CH3CH2OH")
    a.calc = MOPAC(method="PM7", label=str(d / "m"))
    rng = np.random.default_rng(7)
    MaxwellBoltzmannDistribution(a, temperature_K=500, rng=rng)
    out = []

    def keep():
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=a.get_forces())
        out.append(b)

    dyn = Langevin(a, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng)
    dyn.attach(keep, interval=5)
    dyn.run(300)
    return out
