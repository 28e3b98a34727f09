"""Config errors a person can act on: every schema violation as one line naming the key, the value and
the fix, raised before Snakemake builds the DAG (so before any job is submitted)."""

from __future__ import annotations

from pathlib import Path
from .errors import LlmscapeError


class ConfigError(LlmscapeError, ValueError):
    """The configuration does not fit the schema; the message lists every offending key."""


def _key(path) -> str:
    return ".".join(str(p) for p in path) or "(top level)"


def _fix(err) -> str:
    """What to write instead, from the schema keyword that failed."""
    kw, val = err.validator, err.validator_value
    if kw == "minimum":
        return f"use a value >= {val}"
    if kw == "exclusiveMinimum":
        return f"use a value > {val}"
    if kw == "maximum":
        return f"use a value <= {val}"
    if kw == "exclusiveMaximum":
        return f"use a value < {val}"
    if kw == "enum":
        return "use one of " + ", ".join(repr(v) for v in val)
    if kw == "type":
        return f"use a value of type {val if isinstance(val, str) else ' or '.join(val)}"
    if kw == "minItems":
        return f"give at least {val} item(s)"
    if kw == "additionalProperties":
        known = sorted(err.schema.get("properties", {}))
        return "remove or rename it; known keys here: " + ", ".join(known)
    if kw == "required":
        return "add the missing key"
    return f"see the schema's {kw!r} for this key"


def check_config(config: dict, schema_path: str | Path) -> None:
    """Raise :class:`ConfigError` listing every violation of the schema at ``schema_path`` (YAML)."""
    import jsonschema
    import yaml

    schema = yaml.safe_load(Path(schema_path).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    lines = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.absolute_path))):
        path = list(err.absolute_path)
        if err.validator == "additionalProperties":  # the unknown key is in the message, not the path
            unknown = sorted(set(err.instance) - set(err.schema.get("properties", {})))
            path = path + [", ".join(unknown)]
            value = "(unknown key)"
        else:
            value = repr(err.instance)
        desc = "" if err.validator == "additionalProperties" else str(err.schema.get("description", ""))
        desc = desc.strip().split(". ")[0].rstrip(".")
        line = f"  {_key(path)} = {value}: {err.message}. Fix: {_fix(err)}."
        if desc:
            line += f" ({desc}.)"
        lines.append(line)
    if lines:
        raise ConfigError("the configuration has {} error(s); every key is described in {}:\n{}".format(
            len(lines), Path(schema_path).name, "\n".join(lines)))
