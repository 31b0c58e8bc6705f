"""Exceptions raised by otfml.

Every message says what was wrong, what is allowed and how to fix it.
"""

from __future__ import annotations

from ase.calculators.calculator import CalculationFailed

__all__ = ["OTFMLError", "ConfigError", "StoreError", "ReferenceFailed", "FingerprintMismatch",
           "UnphysicalGeometry", "UnstableRun", "IsolatedAtoms"]


class OTFMLError(Exception):
    """Base class of otfml's own errors."""


class ConfigError(OTFMLError, ValueError):
    """A configuration value (YAML or constructor option) is invalid."""


class StoreError(OTFMLError, OSError):
    """The HDF5 store cannot be opened, read or appended to."""


class ReferenceFailed(OTFMLError, CalculationFailed):
    """The reference calculation (e.g. MOPAC) failed; nothing was stored."""


class FingerprintMismatch(StoreError):
    """Frames of a different reference fingerprint would be mixed."""


class UnphysicalGeometry(ReferenceFailed):
    """A geometry collapsed or fell apart; it was not sent to the reference."""


class UnstableRun(OTFMLError):
    """The simulation left physical ground (e.g. a temperature blow-up) and was stopped."""


class IsolatedAtoms(OTFMLError, ValueError):
    """An atom has no neighbour within the descriptor cutoff, so it has no environment."""
