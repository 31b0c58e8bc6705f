"""Strict YAML configuration of an ``otfml run``.

The schema below is the single source of truth: validation, defaults and the
key reference in README (``otfml check --keys``) are all generated from it.
Errors name the key with its path, the value, what is allowed and, for a
misspelled key, the closest valid one.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any

import yaml

from .errors import ConfigError
from .gp import EVICTIONS
from .policy import CALIBRATIONS, CALL_STEP_RESULTS

__all__ = ["load_config", "validate", "SCHEMA", "STAGE_SECTIONS", "keys_markdown",
           "apply_overrides", "index_of"]


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


def _f(types, default, doc, **kw) -> Field:
    return Field(types if isinstance(types, tuple) else (types,), default, doc, **kw)


NUM = (int, float)

SCHEMA: dict[str, dict[str, Field]] = {
    "system": {
        "structure": _f(str, "CH3CH2OH", "Structure: a file ASE reads (xyz, extxyz, pdb, mol, "
                        "cif, ...; relative to the config file), an ase.build.molecule name, "
                        "or 'smiles:CCO' (3D structure from RDKit, the [smiles] extra)"),
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
        "max_sparse_per_species": _f(int, 600, "Cap on sparse environments per species",
                                     minimum=1),
        "sparse_tolerance": _f(NUM, 0.005, "Novelty (0-1) above which an environment of a "
                               "labelled frame joins the sparse set", positive=True),
        "prune_sparse": _f(bool, True, "When an element's sparse set is full, swap its most "
                           "redundant environments for new ones (false: keep the set as it is)"),
        "max_frames": _f(int, 1000, "Most labelled frames the model holds; beyond it a tenth "
                         "leave the model (the store keeps them; see evict_frames). Bounds memory "
                         "and update time; null: no limit", nullable=True, minimum=1),
        "evict_frames": _f(str, "thin", "Which frames leave under max_frames: every other one "
                           "of the oldest fifth (thin: the model keeps a sparser sample of the "
                           "whole run), or the oldest tenth (oldest: only the latest stretch)",
                           choices=EVICTIONS),
        "hyperparameter_first": _f(int, 5, "Refit hyperparameters at each of the first N "
                                   "reference calls", minimum=0),
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
        "overlap_update": _f(bool, True, "While the reference runs in its own process (MOPAC), "
                             "prepare the model's update on a second CPU: the new sparse "
                             "environments and their rows need only the geometry (false: one "
                             "after the other; off by itself with one CPU)"),
        "hyperparameter_every": _f(int, 50, "...then at calls that are powers of two and N "
                                   "calls after the last fit; the interval doubles (up to 8N) "
                                   "while fits move no hyperparameter by more than 10 %",
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
        "calibration": _f(str, "atom", "How observed errors calibrate the force-error "
                          "estimate: least-squares over atoms, one factor for all or one per "
                          "element; largest error / largest novelty; or an error floor "
                          "plus a factor (floor), or one per element (element_floor: for "
                          "elements that err differently, e.g. O and H in water)",
                          choices=CALIBRATIONS),
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
                               "that caused it (on aspirin it did not pay); null: "
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
        "optimizer": _f(str, "BFGS", "ASE optimizer", choices=("BFGS", "FIRE", "LBFGS")),
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
}

#: sections a stage of a multi-stage workflow (``stages:``) may override
STAGE_SECTIONS = ("driver", "learning")


def _type_name(types: tuple) -> str:
    names = {int: "integer", float: "number", str: "string", bool: "true/false",
             list: "list of strings"}
    return " or ".join(dict.fromkeys(names.get(t, t.__name__) for t in types))


def _unknown(key: str, valid, path: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"{source}: unknown key {path!r}.{hint} Valid keys here: "
                       f"{', '.join(sorted(valid))}")


def _check(path: str, value, field: Field, source: str):
    if value is None:
        if field.nullable or field.default is None:
            return None
        raise ConfigError(f"{source}: {path} is empty (null); give a {_type_name(field.type)}, "
                          f"e.g. {field.default!r}")
    ok = isinstance(value, field.type) and not (isinstance(value, bool) and bool not in field.type)
    if not ok:
        raise ConfigError(f"{source}: {path} = {value!r} is a {type(value).__name__}; "
                          f"it must be a {_type_name(field.type)} ({field.doc})")
    if isinstance(value, list) and not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{source}: {path} = {value!r}; every item must be a string "
                          f"({field.doc})")
    if field.choices is not None:
        match = [c for c in field.choices if str(c).lower() == str(value).lower()]
        if not match:
            near = difflib.get_close_matches(str(value), [str(c) for c in field.choices], n=1)
            hint = f" Did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"{source}: {path} = {value!r} is not allowed; choose one of "
                              f"{', '.join(map(str, field.choices))}.{hint}")
        value = match[0]
    if field.positive and not value > 0:
        raise ConfigError(f"{source}: {path} = {value!r} must be > 0 ({field.doc})")
    if field.minimum is not None and value < field.minimum:
        raise ConfigError(f"{source}: {path} = {value!r} must be >= {field.minimum} "
                          f"({field.doc})")
    if field.maximum is not None and value > field.maximum:
        raise ConfigError(f"{source}: {path} = {value!r} must be <= {field.maximum} "
                          f"({field.doc})")
    return value


def validate(raw: dict | None, source: str = "config") -> dict:
    """Check a configuration dict against :data:`SCHEMA` and fill in defaults.

    Raises
    ------
    ConfigError
        Naming the key path, the value and what is allowed.
    """
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"({', '.join(SCHEMA)}), not a {type(raw).__name__}")
    out: dict = {}
    for section in raw:
        if section not in SCHEMA and section != "stages":
            raise _unknown(str(section), [*SCHEMA, "stages"], str(section), source)
    for section in SCHEMA:
        out[section] = _section(raw, section, {}, section, source)
    index_of(out["system"]["index"], source)
    out["stages"] = _stages(raw.get("stages"), raw, source)
    return out


def _section(raw: dict, section: str, base: dict, path: str, source: str) -> dict:
    """Validate one section of ``raw`` with missing keys taken from ``base`` or defaults."""
    fields = SCHEMA[section]
    given = raw.get(section) or {}
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: {path} must be a mapping of keys "
                          f"({', '.join(fields)}), not {given!r}")
    for key in given:
        if key not in fields:
            raise _unknown(str(key), fields, f"{path}.{key}", source)
    return {key: _check(f"{path}.{key}", given[key], field, source) if key in given
            else base.get(key, _check(f"{path}.{key}", field.default, field, source))
            for key, field in fields.items()}


def _stages(stages, raw: dict, source: str) -> list[dict]:
    """The stages of a multi-stage workflow, each with complete driver and learning sections.

    A stage overrides the top-level ``driver`` and ``learning`` keys it names; all stages
    share the system, reference, model, store and output.  Without ``stages`` the
    top-level driver is the single stage.
    """
    if stages is None:
        stages = [{"name": "run"}]
        single = True
    else:
        single = False
        if not isinstance(stages, list) or not stages:
            raise ConfigError(f"{source}: stages must be a non-empty list of mappings, each "
                              "with a name and the driver/learning keys it changes")
    base = {sec: _section(raw, sec, {}, sec, source) for sec in STAGE_SECTIONS}
    out, names = [], set()
    for k, st in enumerate(stages):
        where = f"stages[{k}]"
        if not isinstance(st, dict):
            raise ConfigError(f"{source}: {where} must be a mapping (name, driver, learning), "
                              f"not {st!r}")
        for key in st:
            if key not in ("name", *STAGE_SECTIONS):
                raise _unknown(str(key), ["name", *STAGE_SECTIONS], f"{where}.{key}", source)
        name = st.get("name", f"stage{k + 1}")
        if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{source}: {where}.name = {name!r}; use letters, digits, - and _ "
                              "(it names the stage's output directory)")
        if name in names:
            raise ConfigError(f"{source}: {where}.name = {name!r} is used twice")
        names.add(name)
        stage = {"name": name, "single": single}
        for sec in STAGE_SECTIONS:
            stage[sec] = _section(st, sec, base[sec], f"{where}.{sec}", source)
        drv = stage["driver"]
        if drv["start"] == "previous" and k == 0:
            raise ConfigError(f"{source}: {where}.driver.start = 'previous' but there is no "
                              "previous stage; use 'structure' or 'lowest'")
        if drv["temperature_end_K"] is not None and drv["ensemble"] != "langevin":
            raise ConfigError(f"{source}: {'' if single else where + '.'}driver."
                              f"temperature_end_K is set but driver.ensemble = "
                              f"{drv['ensemble']!r}; a temperature ramp needs the langevin "
                              "thermostat")
        out.append(stage)
    return out


def index_of(index, source: str = "config") -> int | slice:
    """``system.index`` as an int or a slice ('0:10', ':', '::2')."""
    if isinstance(index, int):
        return index
    parts = str(index).split(":")
    try:
        if len(parts) == 1:
            return int(parts[0])
        if len(parts) > 3:
            raise ValueError
        return slice(*[int(p) if p.strip() else None for p in parts])
    except ValueError:
        raise ConfigError(f"{source}: system.index = {index!r} is neither an integer nor a "
                          "slice such as ':', '0:10' or '::2'") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config."""
    if not overrides:
        return raw
    if not isinstance(raw, dict | None):
        raise ConfigError(f"the config's top level must be a mapping of sections "
                          f"({', '.join(SCHEMA)}), not a {type(raw).__name__}")
    raw = dict(raw or {})
    for item in overrides or []:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, "
                              "e.g. --set driver.steps=5000")
        dotted, text = item.split("=", 1)
        section, key = dotted.split(".", 1)
        try:
            value = yaml.safe_load(text) if text != "" else None
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML ({err})") from err
        sec = dict(raw.get(section) or {})
        sec[key] = value
        raw[section] = sec
    return raw


def load_config(path: str, overrides: list[str] | None = None) -> dict:
    """Read, override and validate a YAML config; adds ``_base`` (its directory).

    Raises
    ------
    ConfigError
        The file is missing or not valid YAML, or a value is invalid.
    """
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        with open(path) as fh:
            raw = yaml.safe_load(fh)
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from err
    cfg = validate(apply_overrides(raw, overrides or []), source=path)
    cfg["_base"] = os.path.dirname(os.path.abspath(path))
    return cfg


def keys_markdown() -> str:
    """Markdown table of every key (generated from the schema, so it cannot drift)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for section, fields in SCHEMA.items():
        for key, f in fields.items():
            kind = _type_name(f.type) + (", choices: " + "/".join(f.choices) if f.choices else "")
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
