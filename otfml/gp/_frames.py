"""Adding labelled frames to a sparse GP, in two parts (geometry, then labels)."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterable

import numpy as np
from ase import Atoms

from ..descriptor import Environments
from ._buffers import _times_blocks
from ._memory import evict_count, held_after
from ._threads import _in_two, _Task
from ._types import PreparedFrame, _Frame, term_env

#: largest rank, as a fraction of M, of the changes to B that update its factor (SparseGP.solve)
_UPDATE_RANK = 0.125



class _Frames:
    """Adding labelled frames to a :class:`SparseGP`."""

    def add_frame(
        self,
        atoms: Atoms,
        energy: float,
        forces: np.ndarray,
        env: Environments | None = None,
        candidates: np.ndarray | None = None,
        max_new_sparse: int | None = None,
        solve: bool = True,
        sparse_tolerance: float | None = None,
    ) -> int:
        """Add one labelled structure and update the model incrementally.

        The same as :meth:`prepare_frame` followed by :meth:`add_prepared`.

        Parameters
        ----------
        atoms : ase.Atoms
            The structure.
        energy : float
            Reference energy, eV.
        forces : ndarray, shape (n_atoms, 3)
            Reference forces, eV/Å.
        env : Environments, optional
            Descriptors of ``atoms`` if already computed.
        candidates : array of int, optional
            Atoms that may join the sparse set (default: all).
        max_new_sparse : int, optional
            At most this many new sparse environments per species from this frame.
        solve : bool, default True
            Re-solve for the weights afterwards (set False when adding a batch).
        sparse_tolerance : float, optional
            A lower ``sparse_tolerance`` for this frame only (normalized kernel
            units), to admit the environments that made the learner call the
            reference (see ``LearningPolicy.sparse_admission``); it applies to
            the species whose sparse set is below :data:`ADMISSION_FILL` of
            ``max_sparse_per_species``.

        Returns
        -------
        int
            Number of environments added to the sparse set.
        """
        self._checked_labels(len(atoms), energy, forces)  # before anything changes
        prep = self.prepare_frame(atoms, env, candidates, max_new_sparse, sparse_tolerance)
        self.add_prepared(prep, energy, forces, solve=solve)
        return prep.n_new

    def add_frames(self, labelled: Iterable[tuple[Atoms, float, np.ndarray]]) -> int:
        """Add many labelled structures at once, e.g. those of a store; weights not solved.

        The model :meth:`add_frame` (``solve=False``) would build from them one by one,
        to rounding, at a fraction of its cost: the sparse set is chosen first, frame by
        frame from their environments (all that the choice looks at), and only the frames
        ``max_frames`` would leave in the model get rows, each against the final set once.
        A model that holds frames already takes them one by one.

        Parameters
        ----------
        labelled : iterable of (ase.Atoms, float, ndarray of shape (n_atoms, 3))
            Structures with their reference energy (eV) and forces (eV/Å), oldest first.

        Returns
        -------
        int
            Number of environments added to the sparse set.
        """
        labelled = list(labelled)
        for atoms, energy, forces in labelled:  # every frame's labels before anything changes
            self._checked_labels(len(atoms), energy, forces)
        if self.frames or not labelled:
            return sum(self.add_frame(a, e, f, solve=False) for a, e, f in labelled)
        n_new = 0
        for atoms, _, _ in labelled:
            new_Z, new_zs = self._select_sparse(self.environments(atoms), None, None)
            if len(new_zs):
                self._add_columns(new_Z, new_zs)  # no rows yet: no frame is held
                n_new += len(new_zs)
        none = np.zeros(0, dtype=np.int64)
        n_before = self.n_dropped
        self.add_frame(*labelled[0], candidates=none, solve=False)  # sets max_frames
        held = held_after(len(labelled), self.max_frames, self.evict)
        if held[0] != 0:
            self.drop_frames([0])
        for i in held:
            if i:  # the first is in already
                self.add_frame(*labelled[i], candidates=none, solve=False)
        self.n_dropped = n_before + len(labelled) - len(held)
        return n_new

    @staticmethod
    def _checked_labels(n_atoms: int, energy: float, forces: np.ndarray) -> np.ndarray:
        """``forces`` as an (n_atoms, 3) float array; ValueError for a wrong shape or NaN/inf."""
        forces = np.asarray(forces, dtype=float).reshape(-1, 3)
        if len(forces) != n_atoms:
            raise ValueError(f"forces have {len(forces)} rows for {n_atoms} atoms")
        if not np.isfinite(energy) or not np.all(np.isfinite(forces)):
            raise ValueError("reference energy/forces contain NaN or inf; frame refused")
        return forces

    def _state(self) -> tuple:
        """What must not change between :meth:`prepare_frame` and :meth:`add_prepared`."""
        return self.n_sparse, len(self.frames), id(self._Linv), self.n_dropped

    def prepare_frame(
        self,
        atoms: Atoms,
        env: Environments | None = None,
        candidates: np.ndarray | None = None,
        max_new_sparse: int | None = None,
        sparse_tolerance: float | None = None,
        spawn: Callable[[Callable], _Task] | None = None,
    ) -> PreparedFrame:
        """The part of adding a frame that needs only its geometry, not its labels.

        Frames beyond ``max_frames`` leave the model, the frame's new sparse
        environments join the set (their rows against every held frame are
        most of an update's cost) and the frame's own rows are formed.  Its
        labels and contributions to the accumulators come with
        :meth:`add_prepared`; nothing else may change the model in between.
        The learner runs this while the reference computes the labels.  Until
        then predictions are those of the last solve. Parameters as in
        :meth:`add_frame`, and ``spawn``: makes a :class:`_Task` of a function that
        another thread may run meanwhile (the learner's thread that waits for the
        reference, once it returns); default: the prediction's other thread where
        ``threads`` > 1 (:meth:`_spawn_here`), else run at ``join``. The results do not
        depend on which thread ran what.
        """
        if not self._trainable:
            raise RuntimeError(
                "this model was loaded from a model file and can only predict; "
                "rebuild it from its store (otfml.training.model_from_store) to train further"
            )
        if env is None:
            env = self.environments(atoms)
        else:  # ValueError where they lack a term (computed by one descriptor alone)
            term_env(env, len(self.terms) - 1)
        n_out = evict_count(len(self.frames), self.max_frames)
        if n_out:  # before the new columns, whose rows the dropped frames would no longer need
            self._evict(n_out)
        spawn = spawn or self._spawn_here() or _Task
        new_Z, new_zs = self._select_sparse(env, candidates, max_new_sparse, sparse_tolerance,
                                            spawn)
        # L^-1's species blocks before the new columns (cut out for the selection already)
        blocks = self._species_blocks()
        M0 = self.n_sparse
        basis = self._add_basis(new_Z, new_zs, blocks) if len(new_zs) else None
        own = spawn(functools.partial(self._frame_rows, env, M0, blocks))  # after the basis
        if basis is not None:
            self._add_column_data(basis, spawn)
        geom, row_e, rows_f, W, ew = own.join()
        # the force rows' buffer grows (a copy of every held frame's rows) here, not later
        self._RF.reserve(self._RF.n + 3 * len(atoms))
        base = _baseline_values(self.baseline, atoms)
        return PreparedFrame(env=env, n_new=len(new_zs), geom=geom, row_e=row_e,
                             rows_f=rows_f, W=W, ew=ew, state=self._state(), base=base,
                             atoms=Atoms(numbers=atoms.numbers, positions=atoms.positions,
                                         cell=atoms.cell, pbc=atoms.pbc,
                                         info=dict(atoms.info)))

    def _frame_rows(self, env: Environments, M0: int, blocks: list) -> tuple:
        """A frame's geometry, energy and force rows and their whitened forms.

        ``L^-1`` is block diagonal over species in its first ``M0`` columns, whose
        blocks (columns, ``L^-1`` block) ``blocks`` gives; the rows of the columns added
        since are read from ``L^-1`` itself: with S elements, about 1/S of the product
        with the whole of ``L^-1``.
        """
        geom = self._geometry(env)
        M = self.n_sparse
        row_e, rows_f = self._rows(env, np.arange(M), geom)
        rows = np.vstack([rows_f, row_e / math.sqrt(len(env.species))])  # (3N + 1, M)
        Wall = _times_blocks(blocks, rows.T, out=np.empty((M, len(rows))))
        if M > M0:
            Wall[M0:] = self._Linv[M0:] @ rows.T
        return geom, row_e, rows_f, Wall[:, :-1], np.ascontiguousarray(Wall[:, -1])

    def add_prepared(self, prep: PreparedFrame, energy: float, forces: np.ndarray,
                     solve: bool = True) -> None:
        """Add the labels of a frame :meth:`prepare_frame` prepared.

        Parameters
        ----------
        prep : PreparedFrame
            What :meth:`prepare_frame` returned; the model must not have changed since.
        energy : float
            Reference energy, eV.
        forces : ndarray, shape (n_atoms, 3)
            Reference forces, eV/Å.
        solve : bool, default True
            Re-solve for the weights afterwards.

        Labels with NaN/inf (ValueError) leave the model as if the frame had
        never been prepared (:meth:`discard_prepared`).
        """
        if prep.state != self._state():
            raise RuntimeError("the model changed between prepare_frame and add_prepared; "
                               "prepare the frame again")
        env = prep.env
        try:
            forces = self._checked_labels(len(env.numbers), energy, forces)
        except ValueError:
            self.discard_prepared(prep)
            raise
        prep.state = None  # used up
        if prep.base is not None:  # the model learns the labels less its baseline
            energy = energy - prep.base[0]
            forces = forces - prep.base[1]
        N = len(env.numbers)
        row_e, rows_f, W, ew, geom = prep.row_e, prep.rows_f, prep.W, prep.ew, prep.geom
        counts = np.bincount(env.species, minlength=len(self.descriptor.species)).astype(float)
        f = forces.ravel()

        def rank_update(i: int, j: int) -> None:  # rows i:j of the whitened accumulators
            self._AFw[i:j] += W[i:j] @ W.T
            self._AEw[i:j] += np.outer(ew[i:j], ew)

        _in_two(self._spawn_here(), rank_update, len(ew))
        st = self._lb_state
        if st is not None:  # kept for the factor's update until their rank would not pay
            st["rows"].append((W, ew))
            st["rank"] += W.shape[1] + 1
            if st["rank"] > _UPDATE_RANK * st["M"]:
                self._lb_state = None
        self._EwT.append(ew[None, :])
        self.c_E += row_e * energy / N
        self.C_E += np.outer(row_e, counts) / N
        self.b_F += rows_f.T @ f
        self._EE += energy * energy / N
        self._En += energy * counts / N
        self._nn += np.outer(counts, counts) / N
        self._ff += float(f @ f)
        self._n_e += 1
        self._n_f += len(f)
        self._logN += math.log(N)
        # frames beyond the cache budget are recomputed when new sparse columns need them
        cached = self._cache_bytes + geom["nbytes"] <= self.cache_bytes
        if cached:
            self._cache_bytes += geom["nbytes"]
            self._cache_geometry(geom, len(self.frames), self._n_atoms)
        self._RF.append(rows_f)
        self._RE.append(row_e[None, :])
        # the frame keeps its environments without the pair basis gradients (large for
        # big structures; recomputed from the pair vectors if the frame is not cached)
        kept = dataclasses.replace(env, dB=None, long=None if env.long is None else
                                   dataclasses.replace(env.long, dB=None))
        self.frames.append(_Frame(env.numbers.copy(), kept,
                                  float(energy), forces.copy(), counts, self._n_atoms, cached,
                                  geom["nbytes"] if cached else 0, prep.atoms))
        self._n_atoms += N
        if not self._memory_checked and self.max_frames is not None:  # once, at the first frame
            self._memory_checked = True
            self._fit_budget(geom)
            self._reserve(geom)
            self._report_memory(geom)
        if solve:
            self.solve()

    def set_baseline(self, baseline) -> None:
        """Learn the labels less ``baseline`` from now on (None: the labels themselves).

        The held frames' labels change by the old term less the new one, the label sums
        are formed again from the stored rows, and the weights solved: no kernel is
        computed again, and the hyperparameters stay (those of the old labels until the
        next fit).
        """
        if not self._trainable:
            raise RuntimeError("this model was loaded from a model file and can only "
                               "predict; rebuild it from its store to change its baseline")

        for fr in self.frames:
            e_old, f_old = _baseline_values(self.baseline, fr.atoms) or (0.0, 0.0)
            e_new, f_new = _baseline_values(baseline, fr.atoms) or (0.0, 0.0)
            fr.energy += e_old - e_new
            fr.forces = fr.forces + f_old - f_new
        self.baseline = baseline
        sums = self._label_sums(self._RE.view, self._RF.view, self._labels(self.frames))
        for name, value in sums.items():
            setattr(self, name, value)
        if self.frames:
            self.solve()

    def discard_prepared(self, prep: PreparedFrame) -> None:
        """Undo :meth:`prepare_frame` for a frame that gets no labels (the reference failed).

        Its new sparse environments leave the set again: without the frame's
        data they would make the model look certain where it has learnt
        nothing.  Frames taken out under ``max_frames`` and environments a full
        species swapped out stay out.  Nothing to do once the frame was added.
        """
        if prep.state is None:
            return
        if prep.state != self._state():
            raise RuntimeError("the model changed after prepare_frame; cannot discard")
        left = prep.n_new
        while left:  # the new columns are the last ones, grouped by species
            tail = np.arange(self.n_sparse - left, self.n_sparse)
            drop = tail[self.zs[tail] == self.zs[tail[0]]]
            self._remove_columns(int(self.zs[tail[0]]), drop)
            left -= len(drop)
        prep.state = None


def _baseline_values(baseline, atoms: Atoms) -> tuple[float, np.ndarray] | None:
    """A baseline's energy (eV) and forces (n_atoms, 3), eV/Å, at ``atoms``; None without
    one."""
    if baseline is None:
        return None
    atom_e, forces = baseline.energies_forces(atoms)
    return float(atom_e.sum()), forces
