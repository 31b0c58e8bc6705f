"""Reference calculators: MOPAC (through ASE's calculator) or any ASE calculator.

A reference turns a structure into a labelled frame (energy in eV, forces in
eV/Å) and describes itself with a *fingerprint* (code, version, method,
keywords, charge, multiplicity) that is stored with every frame, so labels of
different origin are never mixed in one model.
"""

from __future__ import annotations

from ase.calculators.calculator import Calculator

from ..errors import ConfigError
from .ase_calculator import CalculatorReference
from .base import Label, Reference
from .mopac import MopacReference

__all__ = ["Reference", "MopacReference", "CalculatorReference", "Label", "make_reference"]


def make_reference(ref) -> Reference:
    """A :class:`Reference` from a Reference, an ASE MOPAC calculator or any ASE calculator."""
    if isinstance(ref, Reference):
        return ref
    from ase.calculators.mopac import MOPAC

    if isinstance(ref, MOPAC):
        return MopacReference.from_calculator(ref)
    if isinstance(ref, Calculator) or hasattr(ref, "get_potential_energy"):
        return CalculatorReference(ref)
    raise ConfigError(
        f"reference={ref!r} is not an ASE calculator; pass e.g. MOPAC(method='PM7')")
