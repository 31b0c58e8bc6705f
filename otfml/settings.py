"""Every setting of otfml, its type, range and default, in one place.

The YAML schema (:mod:`otfml.config` checks workflow files against it), the
defaults of the Python constructors (:class:`otfml.Descriptor`,
:class:`otfml.SparseGP`, :class:`otfml.LearningPolicy`, the learner's model
settings) and the key table in ``docs/configuration.md`` (``otfml check --keys``)
all come from :data:`SCHEMA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["SCHEMA", "STAGE_SECTIONS", "Field", "default", "defaults", "keys_markdown",
           "EVICTIONS", "CALIBRATIONS", "CALL_STEP_RESULTS"]

#: rules for the frames that leave a model under ``model.max_frames``
EVICTIONS = ("thin", "oldest")
#: how observed errors calibrate the force-error estimate (``learning.calibration``)
CALIBRATIONS = ("atom", "element", "max", "floor", "element_floor")
#: what a step that called the reference returns (``learning.call_step_result``)
CALL_STEP_RESULTS = ("reference", "updated_model")


@dataclass(frozen=True)
class Field:
    """One configuration key."""

    type: tuple
    default: Any
    doc: str
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    positive: bool = False
    nullable: bool = False
    #: the type(s) of a list's items
    items: tuple = (str,)


def _f(types, default, doc, **kw) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, doc, **kw)


NUM = (int, float)

SCHEMA: dict[str, dict[str, Field]] = {
    "system": {
        "structure": _f(str, "CH3CH2OH", "Structure: a file ASE reads (xyz, extxyz, pdb, mol, "
                        "cif, ...; relative to the config file), an ase.build.molecule name, "
                        "or 'smiles:CCO' (3D structure from RDKit)"),
        "index": _f((int, str), 0, "Image(s) of a multi-image file: an integer, or a slice "
                    "such as ':' or '0:10' (optimization runs every selected image; MD needs "
                    "one)"),
        "charge": _f(int, 0, "Total charge (e)"),
        "multiplicity": _f(int, None, "Spin multiplicity 2S+1; null: singlet for an even "
                           "electron count (odd counts must set it)", nullable=True, minimum=1),
        "max_atoms": _f(int, 1000, "Largest structure accepted (a guard against loading the "
                        "wrong file); raise it for bigger systems", minimum=2),
    },
    "reference": {
        "code": _f(str, "mopac", "Reference code", choices=("mopac", "emt", "lj")),
        "method": _f(str, "PM7", "MOPAC Hamiltonian (PM7, PM6, AM1, ...)"),
        "keywords": _f(str, "", "Extra MOPAC keywords, e.g. NOMM"),
        "command": _f(str, None, "MOPAC command with PREFIX, e.g. '/opt/mopac/mopac PREFIX.mop'; "
                      "null: $ASE_MOPAC_COMMAND or mopac on PATH", nullable=True),
        "timeout_s": _f(NUM, 600.0, "Wall-time limit of one MOPAC run, s (killed beyond it); "
                        "null: none", nullable=True, positive=True),
        "scf_retries": _f(list, ["PULAY", "CAMP SHIFT=20"], "After an SCF failure, retry with "
                          "each of these MOPAC keyword sets in turn (they replace ITRY/SHIFT/"
                          "PULAY/CAMP); []: no retry"),
    },
    "model": {
        "cutoff": _f(NUM, 3.0, "Descriptor cutoff radius, Å", positive=True),
        "n_max": _f(int, 5, "Radial functions", minimum=1),
        "l_max": _f(int, 3, "Largest angular momentum", minimum=0),
        "r_min": _f(NUM, 0.8, "Centre of the first radial Gaussian, Å", positive=True),
        "radial_scaling": _f(NUM, None, "r0 (Å) of a radial scaling 1 / (1 + (r/r0)^m) of "
                             "each neighbour's weight, so that near neighbours count more than "
                             "the many distant ones at longer cutoffs; null: none",
                             nullable=True, positive=True),
        "radial_power": _f(NUM, 4.0, "m of the radial scaling", positive=True),
        "centre_weight": _f(NUM, 0.7, "Weight of each atom's own term in its descriptor "
                            "(SOAP's central atom), so that the normalized kernel sees how dense "
                            "the neighbourhood is, not only its shape; 0: none", minimum=0),
        "long_cutoff": _f(NUM, None, "Cutoff (Å) of the model's second, longer-range term: "
                          "a GP of its own on a radial (l <= long_l_max) descriptor, whose "
                          "local energies add to the many-body term's, fitted jointly with "
                          "it (e.g. 6); null (the default): no second term",
                          nullable=True, positive=True),
        "long_inner_cutoff": _f(NUM, None, "Neighbours closer than this less 0.5 Å are left "
                                "out of the longer-range term, and its weight rises smoothly "
                                "to 1 at this plus 0.5 Å (a term of the shell beyond it, e.g. "
                                "`cutoff`); null: every neighbour counts",
                                nullable=True, positive=True),
        "long_n_max": _f(int, 8, "Radial functions of the longer-range term", minimum=1),
        "long_max_sparse_per_species": _f(int, 200, "Cap on the longer-range term's sparse "
                                          "environments per species", minimum=1),
        "long_l_max": _f(int, 0, "Largest angular momentum of the longer-range term (0: "
                         "radial only)", minimum=0),
        "max_sparse_per_species": _f(int, 600, "Cap on sparse environments per species",
                                     minimum=1),
        "sparse_tolerance": _f(NUM, 0.005, "Novelty (0-1) above which an environment of a "
                               "labelled frame joins the sparse set", positive=True),
        "prune_sparse": _f(bool, True, "When an element's sparse set is full, swap its most "
                           "redundant environments for new ones (false: keep the set as it is)"),
        "max_frames": _f(int, 1000, "Most labelled frames the model holds; beyond it a tenth "
                         "leave the model (the store keeps them; see evict_frames). Bounds memory "
                         "and update time; null: no limit", nullable=True, minimum=1),
        "memory_gb": _f(NUM, 1.0, "Memory for the model's arrays, GB: at the first labelled "
                        "frame the model lowers max_frames (and its gradient cache) so that "
                        "frames like it fit; null: max_frames alone decides",
                        nullable=True, positive=True),
        "evict_frames": _f(str, "thin", "Which frames leave under max_frames: every other one "
                           "of the oldest fifth (thin: the model keeps a sparser sample of the "
                           "whole run), or the oldest tenth (oldest: only the latest stretch)",
                           choices=EVICTIONS),
        "hyperparameter_first": _f(int, 5, "Refit hyperparameters at each of the first N "
                                   "labels the model holds (a warm start's frames count: "
                                   "it fits on them)", minimum=0),
        "blas_threads": _f(int, 1, "BLAS threads for otfml's own linear algebra (null: "
                           "leave BLAS as it is); MOPAC is not affected", nullable=True, minimum=1),
        "predict_threads": _f(int, None, "Threads that share each prediction's work, species "
                              "by species (null: 2 where this process may use 2 CPUs, else 1; "
                              "small molecules stay on one)", nullable=True, minimum=1),
        "coulomb_charges": _f(dict, None, "Charges (e) per element, e.g. {O: -0.834, H: 0.417}, "
                              "of a screened Coulomb term erf(r/w)/r the model learns on top of "
                              "(electrostatics beyond the cutoff, e.g. in clusters of polar "
                              "molecules; not for periodic cells); null: none", nullable=True),
        "coulomb_width": _f(NUM, 1.5, "Screening length w of model.coulomb_charges, Å",
                            positive=True),
        "prior": _f(str, None, "A force field the model learns on top of: mmff (MMFF94 "
                    "through RDKit; bonds perceived once per molecule, so for structures that "
                    "keep their bonds); null: none. Geometry optimization (SurrogateOpt) sets "
                    "mmff where it is null, coulomb_charges is null and "
                    "learning.allow_fragmentation is false", nullable=True,
                    choices=("mmff",)),
        "overlap_update": _f(bool, True, "While the reference runs in its own process (MOPAC), "
                             "prepare the model's update on a second CPU: the new sparse "
                             "environments and their rows need only the geometry (false: one "
                             "after the other; off by itself with one CPU)"),
        "hyperparameter_every": _f(int, 50, "...then at label counts that are powers of two "
                                   "and N labels after the last fit; the interval doubles (up "
                                   "to 8N) while fits move no hyperparameter by more than 10 %",
                                   minimum=1),
        "hyperparameter_lag": _f(int, 10, "Fits after the first hyperparameter_first run on "
                                 "another thread while the run goes on and take effect N "
                                 "reference calls later (the run waits there if the fit has not "
                                 "finished; the model at the end of a run has it); 0: the run "
                                 "waits for each fit", minimum=0),
    },
    "learning": {
        "force_tolerance": _f(NUM, 0.2, "Call the reference when the largest per-atom force "
                              "error estimate exceeds this, eV/Å", positive=True),
        "adaptive": _f(bool, False, "Let the tolerance follow the recent observed errors "
                       "(between 0.5x and 2x force_tolerance)"),
        "min_steps_between_calls": _f(int, 0, "Model steps required between two calls",
                                      minimum=0),
        "force_call_every": _f(int, None, "Call the reference every N steps regardless",
                               nullable=True, minimum=1),
        "max_calls": _f(int, None, "Budget of reference calls (null: unlimited)",
                        nullable=True, minimum=1),
        "initial_calls": _f(int, 2, "First steps that always call the reference", minimum=0),
        "calibration": _f(str, "element_floor", "How observed errors calibrate the force-error "
                          "estimate: least-squares over atoms, one factor for all or one per "
                          "element; largest error / largest novelty; or an error floor "
                          "plus a factor (floor), or one per element (element_floor: for "
                          "elements that err differently, e.g. O and H in water)",
                          choices=CALIBRATIONS),
        "decide_on": _f(str, "learnable", "What is compared with force_tolerance: the whole "
                        "calibrated estimate of an atom's force error (estimate), or only the "
                        "part another label can reduce, without the error floor the model keeps "
                        "whatever it learns (learnable; with the floor calibrations)",
                        choices=("estimate", "learnable")),
        "on_reference_failure": _f(str, "stop", "When the reference fails (after its SCF "
                                   "retries) or returns an implausible label: stop the run with "
                                   "the error, or use the model for that step and go on (the "
                                   "frame is not stored)", choices=("stop", "use_model")),
        "max_consecutive_failures": _f(int, 3, "With use_model: stop anyway after this many "
                                       "reference failures in a row", minimum=1),
        "label_check": _f(NUM, 1.0, "Refuse a reference energy further than this (eV/atom) "
                          "from the model's prediction as implausible (e.g. a false SCF "
                          "convergence); null: no check", nullable=True, positive=True),
        "allow_fragmentation": _f(bool, False, "Accept geometries with more bonded fragments "
                                  "than the starting one (dissociation); otherwise the run stops "
                                  "before the reference, naming the atoms that left"),
        "call_step_result": _f(str, "reference", "What a step that called the reference "
                               "returns: the reference's energy and forces, or the updated "
                               "model's prediction there (updated_model: MD stays on one surface)",
                               choices=CALL_STEP_RESULTS),
        "sparse_admission": _f(NUM, None, "At a call, environments whose novelty exceeds this "
                               "fraction (0-1] of the novelty at which the estimate reaches the "
                               "tolerance join the sparse set even below model.sparse_tolerance "
                               "(never below a quarter of it; while the species' set is below 80 % "
                               "of model.max_sparse_per_species), so a call lowers the uncertainty "
                               "that caused it; null: "
                               "model.sparse_tolerance alone",
                               nullable=True, positive=True, maximum=1),
    },
    "store": {
        "path": _f(str, "otfml.h5", "HDF5 store (relative to output.directory); existing "
                   "frames warm-start the model"),
        "warm_start": _f(str, None, "Start from another run's store (.h5) or saved model "
                         "(.npz, which names its store): its frames are copied into an empty "
                         "store and the model is rebuilt from them", nullable=True),
    },
    "driver": {
        "type": _f(str, "md", "What drives the steps", choices=("md", "optimize")),
        "ensemble": _f(str, "langevin", "MD ensemble", choices=("langevin", "nve")),
        "steps": _f(int, 2000, "MD steps, or the optimizer's maximum steps", minimum=1),
        "timestep_fs": _f(NUM, 0.5, "MD time step, fs", positive=True),
        "temperature_K": _f(NUM, 500.0, "Thermostat and initial velocity temperature, K",
                            minimum=0),
        "temperature_end_K": _f(NUM, None, "Langevin only: ramp the thermostat linearly from "
                                "temperature_K to this over the steps (annealing/heating)",
                                nullable=True, minimum=0),
        "friction_per_fs": _f(NUM, 0.002, "Langevin friction, 1/fs", positive=True),
        "compensate_updates": _f(bool, True, "MD: after each model update, take the energy "
                                 "the update added at that geometry out of the kinetic energy "
                                 "(otfml.compensation), so that learning does not heat the run"),
        "seed": _f(int, 0, "Random seed of velocities and thermostat"),
        "optimizer": _f(str, "surrogate", "surrogate: otfml's SurrogateOpt (one reference "
                        "call per step, steps chosen on the model); or an ASE optimizer on the "
                        "model, the minimum confirmed by the reference",
                        choices=("surrogate", "BFGS", "FIRE", "LBFGS")),
        "fmax": _f(NUM, 0.05, "Optimizer convergence: largest force, eV/Å", positive=True),
        "log_interval": _f(int, 10, "Write the trajectory (the restart checkpoint) every N "
                           "steps", minimum=1),
        "start": _f(str, "structure", "Where the driver starts: the system's structure(s), the "
                    "final geometry of the previous stage, or the `count` lowest-energy "
                    "labelled frames of the store", choices=("structure", "previous", "lowest")),
        "count": _f(int, 10, "How many frames start: lowest takes", minimum=1),
        "max_temperature_K": _f(NUM, None, "MD stops with a clear message above this "
                                "temperature (null: 5x the thermostat's highest target, at "
                                "least 2000 K)", nullable=True, positive=True),
    },
    "output": {
        "directory": _f(str, "otfml-run", "Run directory (relative to the config file)"),
        "progress_every": _f(int, 100, "Without a terminal (batch jobs), log a progress line "
                             "every N steps instead of the progress bar", minimum=1),
    },
    "walkers": {
        "structure": _f(list, None, "Under mpirun: one walker per structure (files or names "
                        "as system.structure), in the product with the other lists; null: "
                        "system.structure for all", nullable=True),
        "temperature_K": _f(list, None, "Under mpirun: one walker per temperature (every "
                            "stage's driver.temperature_K), in the product with the other "
                            "lists; null: the driver's", nullable=True, items=NUM),
        "seed": _f(list, None, "Under mpirun: one walker per seed (every stage's driver.seed), "
                   "in the product with the other lists; null: the driver's", nullable=True,
                   items=(int,)),
    },
}

#: sections a stage of a multi-stage workflow (``stages:``) may override
STAGE_SECTIONS = ("driver", "learning")


def default(section: str, key: str) -> Any:
    """The default of ``section.key`` (a copy where it is a list or dict)."""
    value = SCHEMA[section][key].default
    return type(value)(value) if isinstance(value, list | dict) else value


def defaults(section: str) -> dict[str, Any]:
    """Every key of ``section`` with its default."""
    return {key: default(section, key) for key in SCHEMA[section]}


def _type_name(types: tuple) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "true/false",
             list: "list"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def keys_markdown() -> str:
    """Markdown table of every key (generated from the schema, so it cannot drift)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, fields in SCHEMA.items():
        for key, f in fields.items():
            kind = (f"list of {_type_name(f.items)}s" if f.type == (list,) else
                    _type_name(f.type)) + (", choices: " + "/".join(f.choices) if f.choices
                                           else "")
            lines.append(f"| `{section}.{key}` | {kind} | `{f.default!r}` | {f.doc} |")
    lines.append("| `stages` | list | `None` | Multi-stage workflow: stages run in order and share "
                 "the system, reference, model, store and output directory (each stage writes "
                 "to its own sub-directory `NN-name`) |")
    lines.append("| `stages[].name` | string | `'stageN'` | Stage name (letters, digits, - "
                 "and _) |")
    for sec in STAGE_SECTIONS:
        lines.append(f"| `stages[].{sec}.*` | | top-level `{sec}` | Any `{sec}` key, for this "
                     "stage only |")
    return "\n".join(lines)
