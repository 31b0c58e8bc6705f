"""One source of settings: constructors, the learner and the YAML schema agree on every default."""

import numpy as np

from otfml import Descriptor, LearningPolicy, SparseGP
from otfml.settings import SCHEMA, defaults
from otfml.training import MODEL_DEFAULTS


def test_python_constructors_take_the_schema_defaults():
    model = defaults("model")
    d = Descriptor([1, 6, 8])
    for key in ("cutoff", "n_max", "l_max", "r_min", "radial_scaling", "radial_power",
                "centre_weight"):
        assert getattr(d, key) == model[key], key
    gp = SparseGP(d)
    assert (gp.max_sparse_per_species, gp.sparse_tolerance, gp.prune, gp.max_frames,
            gp.evict) == tuple(model[k] for k in ("max_sparse_per_species", "sparse_tolerance",
                                                  "prune_sparse", "max_frames", "evict_frames"))
    policy = LearningPolicy()
    for key, value in defaults("learning").items():
        assert getattr(policy, key) == value, key
    assert MODEL_DEFAULTS == model


def test_defaults_are_copies():
    """A default list handed out (reference.scf_retries) cannot change the schema's."""
    got = defaults("reference")["scf_retries"]
    got.append("X")
    assert SCHEMA["reference"]["scf_retries"].default == ["PULAY", "CAMP SHIFT=20"]


def test_a_descriptor_file_without_newer_settings_loads_with_them_off():
    d = Descriptor.from_dict({"species": [1], "cutoff": 3.0, "n_max": 5, "l_max": 3,
                              "r_min": 0.8, "radial_power": 4.0})
    assert d.centre_weight == 0.0 and d.radial_scaling is None
    assert np.isfinite(d.n_features)
