"""The trainable sparse GP: its state, and the parts (mixins) that update it."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import numpy as np
from ase import Atoms
from ase.data import chemical_symbols

from ..baseline import ScreenedCoulomb
from ..descriptor import Descriptor, Environments
from ..prior import ForceFieldPrior
from ..settings import EVICTIONS, default
from ._buffers import _Grow, _GrowByColumns, _Spare
from ._factor import _Factor
from ._frames import _Frames
from ._memory import _Memory
from ._persist import _Persistence
from ._rows import _Rows
from ._sparse import _SparseSet
from ._threads import Lanes, _Task
from ._types import (
    DEFAULT_BOUNDS,
    Hyperparameters,
    Prediction,
    _Frame,
    environments_of,
    term_sigmas,
)
from .likelihood import _Likelihood
from .posterior import Posterior

__all__ = ["SparseGP"]


class SparseGP(_Rows, _SparseSet, _Frames, _Memory, _Likelihood, _Factor, _Persistence):
    """Sparse GP force field on power-spectrum descriptors.

    Parameters
    ----------
    descriptor : Descriptor
        Descriptor settings (its species are the model's species).
    hyperparameters : Hyperparameters, optional
        Starting hyperparameters.
    bounds : tuple of 3 (low, high) pairs, optional
        Bounds of sigma (eV), sigma_e (eV) and sigma_f (eV/Å) in the fit.
    max_sparse_per_species : int, default 600
        Cap on the sparse environments of one species.
    sparse_tolerance : float, default 0.005
        An environment joins the sparse set when the part of it the sparse
        set cannot represent, ``sqrt(1 - k^T K_mm^-1 k)`` in normalized kernel
        units (0: fully represented, 1: new), exceeds this value.
    cache_bytes : int, default 2 GiB
        Memory for the descriptor gradients of training frames, which new
        sparse environments need; frames beyond it are recomputed on demand.
    prune : bool, default True
        When a species' sparse set is full and a new frame brings environments
        it cannot represent, swap out the most redundant ones (those the rest
        of the set represents best, and better than the newcomers): as many as
        the newcomers need, and at least ``max_sparse_per_species // 20`` at a
        time.  False: the set stays as it is once full.
    max_frames : int or None, default 1000
        Most labelled frames the model holds.  When a frame would exceed it,
        a tenth of them is taken out of the model (their contributions are
        subtracted from the accumulators; the store keeps them), so memory
        and the update time stay bounded in long runs.  None: no limit.
    memory_gb : float or None, default 1.0
        Memory for the model's arrays, GB. At the first frame, ``max_frames`` (and
        ``cache_bytes``) are lowered so that frames like it fit (:meth:`memory_estimate`).
        None: no budget.
    evict : {"thin", "oldest"}, default "thin"
        Which frames leave under ``max_frames``: every other one of the
        oldest fifth ("thin"), so that the model keeps an ever sparser sample
        of the whole run (the first frame stays), or the oldest tenth, so that
        it keeps only the latest stretch.
    cache_dtype : numpy dtype, default float32
        Precision of the cached descriptor gradients (see :meth:`_geometry`);
        float64 makes rows computed along different paths (cached or not,
        one frame or all) agree to rounding, as the tests of the algebra need.
    threads : int, optional
        Threads that share each prediction's work, species by species (atoms of a
        species split between them where that balances it). None: two where this
        process may use two CPUs, else one. A runtime setting, not saved.
    baseline : otfml.baseline.ScreenedCoulomb or otfml.prior.ForceFieldPrior, optional
        A fixed term (long-range electrostatics, or a force field): the model learns
        the labels less it and predicts with it added (saved with the model).
    long_descriptor : Descriptor, optional
        Descriptor of a second, longer-range term: a GP of its own (its own sparse set,
        capped per species as the first, and signal variance ``sigma_long``) whose local
        energies add to the first term's; the hyperparameters of both are fitted
        together. Same species as ``descriptor``.
    long_max_sparse : int, default 200
        Cap on the longer-range term's sparse environments of one species.

    The defaults are those of :data:`otfml.settings.SCHEMA` (``model.*``).
    """

    def __init__(
        self,
        descriptor: Descriptor,
        hyperparameters: Hyperparameters | None = None,
        bounds=DEFAULT_BOUNDS,
        max_sparse_per_species: int = default("model", "max_sparse_per_species"),
        sparse_tolerance: float = default("model", "sparse_tolerance"),
        cache_bytes: int = 2 * 1024**3,
        prune: bool = default("model", "prune_sparse"),
        max_frames: int | None = default("model", "max_frames"),
        evict: str = default("model", "evict_frames"),
        memory_gb: float | None = default("model", "memory_gb"),
        cache_dtype=np.float32,
        threads: int | None = None,
        baseline: ScreenedCoulomb | ForceFieldPrior | None = None,
        long_descriptor: Descriptor | None = None,
        long_max_sparse: int = default("model", "long_max_sparse_per_species"),
    ) -> None:
        if threads is not None and threads < 1:
            raise ValueError(f"threads = {threads}: give at least 1, or None for automatic")
        if max_frames is not None and max_frames < 1:
            raise ValueError(f"max_frames = {max_frames}: give at least 1, or None for no limit")
        if evict not in EVICTIONS:
            raise ValueError(f"evict = {evict!r}: give one of {', '.join(EVICTIONS)}")
        if long_descriptor is not None and long_descriptor.species != descriptor.species:
            raise ValueError(f"the longer-range term's species {long_descriptor.species} differ "
                             f"from the model's {descriptor.species}")
        self.descriptor = descriptor
        #: the descriptors of the model's terms: the many-body one, then the longer-range one
        self.terms: tuple[Descriptor, ...] = (descriptor,) + (
            () if long_descriptor is None else (long_descriptor,))
        #: a fixed term the model learns on top of (labels minus it; predictions plus it)
        self.baseline = baseline
        hyp = hyperparameters or Hyperparameters()
        if len(self.terms) > 1 and hyp.sigma_long is None:
            hyp = Hyperparameters(hyp.sigma, hyp.sigma_e, hyp.sigma_f, sigma_long=hyp.sigma)
        elif len(self.terms) == 1:
            hyp.sigma_long = None
        self.hyp = hyp
        bounds = tuple(tuple(map(float, b)) for b in bounds)
        if len(self.terms) > 1 and len(bounds) == 3:  # the second term's sigma as the first's
            bounds = bounds + (bounds[0],)
        self.bounds = bounds[:2 + len(self.terms)]
        self.max_sparse_per_species = int(max_sparse_per_species)
        self.long_max_sparse = int(long_max_sparse)
        self.sparse_tolerance = float(sparse_tolerance)
        self.cache_bytes = int(cache_bytes)
        self.prune = bool(prune)
        self.max_frames = None if max_frames is None else int(max_frames)
        self.evict = evict
        if memory_gb is not None and not memory_gb > 0:
            raise ValueError(f"memory_gb = {memory_gb}: give a positive size, or None")
        self.memory_gb = None if memory_gb is None else float(memory_gb)
        self.cache_dtype = np.dtype(cache_dtype)
        #: frames taken out of the model so far (see ``max_frames`` and ``evict``)
        self.n_dropped = 0
        #: sparse environments swapped out so far, per channel (term * species + species index)
        self.n_pruned: dict[int, int] = {}
        self._cache_bytes = 0
        self._reserved = False  # rows reserved for max_frames frames (see _reserve)
        self._memory_checked = False  # _reserve and _report_memory ran (first frame)
        S = len(descriptor.species)
        # the sparse columns: channel t * S + s of term t and species s; a column's
        # normalized descriptor sits in its term's features of Z, zero elsewhere, so that
        # K_mm is block diagonal over channels
        widths = np.cumsum([0] + [d.n_features for d in self.terms])
        self._slices = [slice(int(a), int(b)) for a, b in zip(widths[:-1], widths[1:])]
        self.n_channels = S * len(self.terms)
        M_max = self.max_sparse()  # buffer columns are reserved once
        self.Z = np.zeros((0, int(widths[-1])))  # normalized sparse descriptors (M, F)
        self.zs = np.zeros(0, dtype=np.int64)  # channel of each column
        self.frames: list[_Frame] = []
        self.e0 = np.zeros(S)
        self._trainable = True
        self._reset_accumulators(0)
        self._square: dict[str, np.ndarray] = {}  # buffers of the growing M x M matrices
        self._spare: dict[str, _Spare] = {}  # arrays to use again (:class:`_Spare`)
        # inverse of the Cholesky factor L of K_mm + jitter (maintained incrementally)
        self._Linv = np.zeros((0, 0))
        self._AFw = np.zeros((0, 0))  # L^-1 A_F L^-T
        # whitened energy rows L^-1 r_f / sqrt(N_f), one row per frame
        self._EwT = _Grow(0, max_cols=M_max)
        self._AEw = np.zeros((0, 0))  # their sum of outer products (kept, not re-formed)
        self._beta = np.zeros(0)
        self._LB = np.zeros((0, 0))  # Cholesky factor of B = I + s2 (AEw/se^2 + AFw/sf^2)
        # what changed B since _LB was factored, for a low-rank update instead of a new
        # factorization (see _updated_factor); None: factor B afresh at the next solve
        self._lb_state: dict | None = None
        self._blocks: dict = {}
        # each species' block of L^-1 and its rows of Z, for the L^-1 they were cut from
        self._species_cache: tuple[weakref.ref, dict] | None = None
        # rows of the design matrix of every frame (normalized kernel units)
        self._RF = _GrowByColumns(M_max)  # force rows, (sum 3N, M)
        self._RE = _Grow(0, max_cols=M_max)  # energy rows, (frames, M)
        self._n_atoms = 0
        # descriptor gradients of the cached frames, per centre species (see _geometry)
        self._geo: dict[int, dict[str, _Grow]] = {}
        self._fitted = False
        self._full_warned: set[int] = set()  # species whose full sparse set was reported
        #: free-form metadata saved with the model (e.g. the force-error calibration)
        self.extra: dict = {}
        #: threads that share a prediction's work (None: two where this process may use
        #: two CPUs, else one); not saved with the model
        self._lanes = Lanes(threads)
        #: the posterior of the last solve (None before the first)
        self.posterior: Posterior | None = None

    # ------------------------------------------------------------------
    # bookkeeping
    # ------------------------------------------------------------------
    @property
    def n_sparse(self) -> int:
        """Total number M of sparse environments."""
        return len(self.zs)

    @property
    def n_frames(self) -> int:
        """Number of labelled frames the model was trained on."""
        return self._n_e

    def sparse_counts(self) -> dict[str, int]:
        """Sparse environments per element symbol (the longer-range term's as
        ``"O (6 Å)"``)."""
        return {self._element(c): int(np.sum(self.zs == c)) for c in range(self.n_channels)}

    def _element(self, c: int) -> str:
        """Chemical symbol of channel ``c`` (with the cutoff, for the longer-range term)."""
        t, s = divmod(c, len(self.descriptor.species))
        el = chemical_symbols[self.descriptor.species[s]]
        return el if t == 0 else f"{el} ({self.terms[t].cutoff:g} Å)"

    def _cap(self, c: int) -> int:
        """Most sparse environments channel ``c`` holds."""
        return self.max_sparse_per_species if self._channel_term(c) == 0 else self.long_max_sparse

    def max_sparse(self) -> int:
        """Most sparse environments the model holds (every channel full)."""
        return sum(self._cap(c) for c in range(self.n_channels))

    def _channel_term(self, c: int) -> int:
        """The model term of channel ``c``."""
        return c // len(self.descriptor.species)

    def _column_sigmas(self, theta: np.ndarray | None = None) -> np.ndarray:
        """Each sparse column's signal standard deviation (its term's), eV, (M,)."""
        sig = term_sigmas(self.hyp.as_array() if theta is None else theta)
        return sig[self._column_terms()]

    def environments(self, atoms: Atoms) -> Environments:
        """The descriptors of ``atoms`` for every term of the model."""
        return environments_of(self.terms, atoms)

    def _cols(self, s: int) -> np.ndarray:
        return np.flatnonzero(self.zs == s)

    def _kernel(self, cols: np.ndarray) -> np.ndarray:
        """Normalized K_mm of sparse columns ``cols`` (zero between species), (n, n).

        Formed when needed (a rebuild, tests) rather than kept: K_mm is read nowhere else.
        """
        Zc = self.Z[cols]
        K = (Zc @ Zc.T) ** 2
        K[self.zs[cols][:, None] != self.zs[cols][None, :]] = 0.0
        return K

    def _species_block(self, s: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Columns of channel ``s``, its block of ``L^-1`` (M_s, M_s) and its rows of ``Z``
        (its term's features).

        Contiguous copies, kept until ``L^-1`` is replaced (every change to the sparse set
        replaces it): selecting a frame's new environments, pruning and the next solve
        each want it.
        """
        cache = self._species_cache
        if cache is None or cache[0]() is not self._Linv:
            cache = (weakref.ref(self._Linv), {})
            self._species_cache = cache
        if s not in cache[1]:
            cols = self._cols(s)
            cache[1][s] = (cols, self._Linv[np.ix_(cols, cols)],
                           np.ascontiguousarray(self._term_Z(cols, s)))
        return cache[1][s]

    def _species_blocks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each channel's columns and block of ``L^-1`` (:meth:`_species_block`), by index."""
        return [self._species_block(s)[:2] for s in range(self.n_channels)]

    def _reset_accumulators(self, M: int) -> None:
        S = len(self.descriptor.species)
        self.c_E = np.zeros(M)
        self.C_E = np.zeros((M, S))
        self.b_F = np.zeros(M)
        self._EE = 0.0  # sum E^2/N
        self._En = np.zeros(S)  # sum E n/N
        self._nn = np.zeros((S, S))  # sum n n^T / N
        self._ff = 0.0
        self._n_e = 0
        self._n_f = 0
        self._logN = 0.0



    @property
    def threads(self) -> int | None:
        """Threads that share each prediction's work (None: automatic); not saved."""
        return self._lanes.threads

    @threads.setter
    def threads(self, value: int | None) -> None:
        self._lanes.threads = value

    def _spawn_here(self) -> Callable[[Callable], _Task] | None:
        """``spawn`` for work of an update on the calling thread while nothing else runs
        (:meth:`prepare_frame` without a reference running, :meth:`add_prepared`,
        :meth:`solve`): the prediction's other threads take it; None on one thread."""
        return self._lanes.spawn_here()

    @property
    def is_fitted(self) -> bool:
        """True once the model has data to predict from."""
        return self._fitted

    def predict(self, atoms: Atoms, env: Environments | None = None) -> Prediction:
        """Energy, forces and uncertainties of ``atoms`` from the posterior of the last
        solve (:meth:`Posterior.predict`; ``env``: its descriptors, if already computed)."""
        if not self._fitted:
            raise RuntimeError("the model has no training data yet; add a labelled frame first")
        return self.posterior.predict(atoms, env)
