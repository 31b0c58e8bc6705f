"""otfml: on-the-fly active learning of potential energy surfaces for ASE.

A sparse Gaussian-process model predicts energy, forces and their
uncertainty; where it is unsure, a reference (MOPAC by default) labels the
geometry, the frame is appended to an HDF5 store and the model is updated.
"""

from .calculator import OTFCalculator
from .compensation import EnergyCompensation
from .descriptor import Descriptor
from .errors import ConfigError, FingerprintMismatch, OTFMLError, ReferenceFailed, StoreError
from .gp import SparseGP
from .learner import Learner
from .policy import LearningPolicy
from .reference import CalculatorReference, MopacReference
from .store import Store

__all__ = [
    "OTFCalculator", "EnergyCompensation", "Descriptor", "SparseGP", "Learner", "LearningPolicy",
    "Store",
    "MopacReference", "CalculatorReference",
    "OTFMLError", "ConfigError", "StoreError", "ReferenceFailed", "FingerprintMismatch",
]
__version__ = "0.1.0"
