"""Shared fixtures. Tests that involve the reference use the real MOPAC."""

import os
import shutil

import numpy as np
import pytest
from ase.build import molecule


def _have_mopac() -> bool:
    import os

    return bool(os.environ.get("ASE_MOPAC_COMMAND") or shutil.which("mopac"))


def mopac(test):
    """Mark a test that runs the real MOPAC (``-m mopac`` / ``-m "not mopac"``); skipped
    where MOPAC is not installed."""
    return pytest.mark.mopac(pytest.mark.skipif(not _have_mopac(),
                                                reason="MOPAC is not installed")(test))


def kill_when_written(proc, path, lines: int, seconds: float) -> None:
    """SIGKILL ``proc`` once the file ``path`` has more than ``lines`` lines (or after
    ``seconds``), and reap it."""
    import signal
    import time

    deadline = time.time() + seconds
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > lines:
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def numeric_force(energy, atoms, i: int, c: int, h: float = 1e-5) -> float:
    """-dE/dr[i, c] by central differences of ``energy(atoms)`` (eV) with step ``h`` (Å)."""
    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[i, c] += h
    minus.positions[i, c] -= h
    return -(energy(plus) - energy(minus)) / (2 * h)


@pytest.fixture(autouse=True)
def _in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own directory: a command line's relative paths (``--set
    output.directory=out``) land there, as they would where a user typed them."""
    monkeypatch.chdir(tmp_path)


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

    from otfml.drivers import thermalize

    if not _have_mopac():
        pytest.skip("MOPAC is not installed")
    d = tmp_path_factory.mktemp("mopac_traj")
    a = molecule("CH3CH2OH")
    a.calc = MOPAC(method="PM7", label=str(d / "m"))
    rng = np.random.default_rng(7)
    thermalize(a, 500, rng, zero_drift=False)
    out = []

    def keep():
        b = a.copy()
        b.calc = SinglePointCalculator(b, energy=a.get_potential_energy(), forces=a.get_forces())
        out.append(b)

    dyn = Langevin(a, 0.5 * units.fs, temperature_K=500, friction=0.01, rng=rng, fixcm=False)
    dyn.attach(keep, interval=5)
    dyn.run(300)
    return out


# ----------------------------------------------------------------------
# Fault tally: tests that inject a fault or feed bad input count it here once they
# pass. The terminal summary prints the totals; with OTFML_FIGURES=PATH a passing run
# also writes them to PATH as JSON (docs/make_reliability.py puts them in the docs).
FIGURES: dict[str, int] = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    rep = (yield).get_result()
    if rep.when == "call":
        item.passed_call = rep.passed


@pytest.fixture
def tally(request):
    """``tally(category, n)`` counts faults/inputs; kept only if the test passes."""
    pending: dict[str, int] = {}

    def add(category: str, n: int = 1) -> None:
        pending[category] = pending.get(category, 0) + n

    yield add
    if getattr(request.node, "passed_call", False):
        for k, v in pending.items():
            FIGURES[k] = FIGURES.get(k, 0) + v


def figures_table() -> str:
    rows = ["| fault or input | count |", "|---|---|"]
    rows += [f"| {k} | {FIGURES[k]} |" for k in sorted(FIGURES)]
    return "\n".join(rows)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.write_sep("-", "faults injected and bad inputs tried (passed tests)")
        terminalreporter.write_line(figures_table())


def pytest_sessionfinish(session, exitstatus):
    """With OTFML_FIGURES set, a passing run writes the tally there (JSON)."""
    import json

    path = os.environ.get("OTFML_FIGURES")
    if path and exitstatus == 0 and FIGURES:
        with open(path, "w") as fh:
            json.dump(FIGURES, fh, indent=1, sort_keys=True)
