"""Strict YAML configuration of an ``otfml run``.

Workflow files are checked against :data:`otfml.settings.SCHEMA`, the one
source of every key, its type, range and default. Errors name the key with its
path, the value, what is allowed and, for a misspelled key, the closest valid one.
"""

from __future__ import annotations

import difflib
import os

import yaml

from .errors import ConfigError
from .settings import SCHEMA, STAGE_SECTIONS, Field, _type_name, keys_markdown

__all__ = ["load_config", "validate", "SCHEMA", "STAGE_SECTIONS", "keys_markdown",
           "apply_overrides", "index_of", "check_value"]


def _unknown(key: str, valid, path: str, source: str) -> ConfigError:
    near = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f" Did you mean {near[0]!r}?" if near else ""
    return ConfigError(f"{source}: unknown key {path!r}.{hint} Valid keys here: "
                       f"{', '.join(sorted(valid))}")


def check_value(path: str, value, field: Field, source: str):
    if value is None:
        if field.nullable or field.default is None:
            return None
        raise ConfigError(f"{source}: {path} is empty (null); give a {_type_name(field.type)}, "
                          f"e.g. {field.default!r}")
    ok = isinstance(value, field.type) and not (isinstance(value, bool) and bool not in field.type)
    if not ok:
        raise ConfigError(f"{source}: {path} = {value!r} is a {type(value).__name__}; "
                          f"it must be a {_type_name(field.type)} ({field.doc})")
    if isinstance(value, list) and not all(
            isinstance(v, field.items) and not isinstance(v, bool) for v in value):
        raise ConfigError(f"{source}: {path} = {value!r}; every item must be a "
                          f"{_type_name(field.items)} ({field.doc})")
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
    return {key: check_value(f"{path}.{key}", given[key], field, source) if key in given
            else base.get(key, check_value(f"{path}.{key}", field.default, field, source))
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


#: keys whose values are paths; given with ``--set``, a relative one is taken relative to the
#: directory the command runs in (system.structure: where such a file exists)
PATH_KEYS = ("system.structure", "store.warm_start", "output.directory")


def _from_cwd(dotted: str, value, cwd: str | None):
    if cwd is None or dotted not in PATH_KEYS or not isinstance(value, str) or not value:
        return value
    if os.path.isabs(value) or value.lower().startswith("smiles:"):
        return value
    path = os.path.join(cwd, value)
    if dotted == "system.structure" and not os.path.exists(path):
        return value  # a molecule name, or a file next to the config file
    return os.path.abspath(path)


def apply_overrides(raw: dict, overrides: list[str], cwd: str | None = None) -> dict:
    """Apply ``section.key=value`` overrides (values parsed as YAML) to a raw config.

    With ``cwd``, a relative path given for one of :data:`PATH_KEYS` is made absolute
    from ``cwd`` (the command line's directory), not from the config file's.
    """
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
        sec[key] = _from_cwd(dotted, value, cwd)
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
    cfg = validate(apply_overrides(raw, overrides or [], cwd=os.getcwd()), source=path)
    cfg["_base"] = os.path.dirname(os.path.abspath(path))
    return cfg
