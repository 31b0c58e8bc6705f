"""How a :class:`otfml.learner.Learner` gets its model: from the store's frames (a warm
start), from the settings, rebuilt with elements it lacks, or given a force field prior."""

from __future__ import annotations

import logging
import time

from ase import Atoms
from ase.data import chemical_symbols

from .errors import ConfigError
from .structure import fragments
from .training import model_from_settings, one_fingerprint, train_from_frames

log = logging.getLogger("otfml.learner")  # the learner's messages, under its name


class _ModelSetup:
    """The model-building part of :class:`otfml.learner.Learner` (its attributes: ``model``,
    ``store``, ``settings``, ``charge``, ...)."""

    def _warm_start(self) -> None:
        """Rebuild the model from the frames in the store (:func:`one_fingerprint`)."""
        frames = one_fingerprint(list(self.store), f"store {self.store.path!r}")
        self.fingerprint = frames[-1].fingerprint
        self.last_label_per_atom = frames[-1].energy / len(frames[-1].atoms)
        # fragments are counted against the structure the store's run started from
        self._n_fragments = fragments(frames[0].atoms)[0]
        t0 = time.perf_counter()
        if self.model is None:
            self.model = train_from_frames(frames, self.settings, self._species,
                                           self._prior_charge)
        else:
            self.model.add_frames((fr.atoms, fr.energy, fr.forces) for fr in frames)
            self.model.fit_hyperparameters()
        self._species = list(self.model.descriptor.species)
        log.info("warm start: %d frames from %s, %d sparse environments, %.1f s",
                 len(frames), self.store.path, self.model.n_sparse, time.perf_counter() - t0)
        self.n_warm = len(frames)
        self.hyperparameter_schedule.start_at(self.n_warm)  # fitted on them just now

    def _ensure_model(self, atoms: Atoms) -> None:
        """A model that covers the elements of ``atoms`` (extended where it lacks one)."""
        if self.model is None:
            species = sorted(set(self._species) | {int(z) for z in atoms.numbers})
            self.model = model_from_settings(species, self.settings, self._prior_charge)
        else:
            new = {int(z) for z in atoms.numbers} - set(self.model.descriptor.species)
            if new:
                self._extend_species(new)
        self._species = list(self.model.descriptor.species)

    def _extend_species(self, new: set[int]) -> None:
        """Rebuild the model with elements it lacks, from the store's frames."""
        species = sorted(set(self.model.descriptor.species) | new)
        names = [chemical_symbols[z] for z in sorted(new)]
        if self.model.n_frames == 0:
            self.model = model_from_settings(species, self.settings, self._prior_charge)
            return
        if self.store is None or not len(self.store):
            raise ConfigError(
                f"element(s) {names} are new to the model, which has no store to be rebuilt "
                "from; give species= with every element the run will see (or a store) when "
                "creating the OTFCalculator")
        self.finish_hyperparameter_fit()
        t0 = time.perf_counter()
        frames = one_fingerprint(list(self.store), f"store {self.store.path!r}")
        self.model = train_from_frames(frames, self.settings, species, self._prior_charge)
        log.info("element(s) %s are new to the model: rebuilt it with them from the %d stored "
                 "frames (%.1f s)", names, len(frames), time.perf_counter() - t0)

    @property
    def _prior_charge(self) -> int:
        return int(self.charge or 0)

    def use_prior(self, kind: str = "mmff") -> bool:
        """Learn the reference less a force field (``model.prior``, :mod:`otfml.prior`) from
        now on, also in a model that has learned frames already
        (:meth:`otfml.gp.SparseGP.set_baseline`).

        Returns False, changing nothing, where the model has another term under it
        (``model.coulomb_charges``) or bonds may break (``learning.allow_fragmentation``:
        the prior keeps the bonds it perceived).
        """
        if self.settings["prior"] == kind:
            return True
        if self.settings["coulomb_charges"] is not None or self.policy.allow_fragmentation:
            return False
        self.settings = {**self.settings, "prior": kind}
        if self.model is not None:
            from .prior import ForceFieldPrior

            self.finish_hyperparameter_fit()
            with self.blas_limit:
                self.model.set_baseline(ForceFieldPrior(self._prior_charge))
                if self.model.n_frames:  # the labels it learns changed: fit to them
                    self.model.fit_hyperparameters()
                    self.hyperparameter_schedule.start_at(self.n_warm + self.n_calls)
        return True
