"""Any ASE calculator as the reference."""

from __future__ import annotations

import time

from ase import Atoms
from ase.calculators.calculator import Calculator

from ..errors import ReferenceFailed
from .base import Label, Reference

__all__ = ["CalculatorReference"]


class CalculatorReference(Reference):
    """Any ASE calculator as the reference.

    Parameters
    ----------
    calculator : ase.calculators.calculator.Calculator
        Computes ``energy`` and ``forces``.
    name : str, optional
        Name in the fingerprint (default: the calculator's class name).
    """

    def __init__(self, calculator: Calculator, name: str | None = None) -> None:
        self.calculator = calculator
        self.code = name or type(calculator).__name__

    @property
    def external_process(self) -> bool:
        """ASE's file-based calculators (ORCA, VASP, Gaussian, ...) run a program of their own."""
        from ase.calculators.calculator import FileIOCalculator
        from ase.calculators.genericfileio import GenericFileIOCalculator

        return isinstance(self.calculator, (FileIOCalculator, GenericFileIOCalculator))

    def fingerprint(self, charge: int, multiplicity: int) -> dict:
        params = getattr(self.calculator, "parameters", {}) or {}
        try:
            keywords = " ".join(f"{k}={params[k]}" for k in sorted(params))
        except TypeError:
            keywords = ""
        return {"code": self.code, "version": None, "method": type(self.calculator).__name__,
                "keywords": keywords, "charge": int(charge), "multiplicity": int(multiplicity)}

    def compute(self, atoms: Atoms, charge: int = 0, multiplicity: int = 1) -> Label:
        a = atoms.copy()
        a.calc = self.calculator
        t0 = time.perf_counter()
        try:
            energy = a.get_potential_energy()
            forces = a.get_forces()
        except Exception as err:
            raise ReferenceFailed(
                f"reference calculator {self.code} failed for {atoms.get_chemical_formula()} "
                f"(step {atoms.info.get('otfml_step', '?')}): {type(err).__name__}: {err}"
            ) from err
        energy, forces = self._checked(atoms, energy, forces)
        return Label(energy, forces, self.fingerprint(charge, multiplicity),
                     time.perf_counter() - t0)


