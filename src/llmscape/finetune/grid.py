"""The sweep grid: config -> named runs, validated before any job exists.

``finetune.sweeps`` is a list; each entry names a method and lists values per axis (``lr``, ``rank``,
``value_lr_ratio``, ``seed``). An entry expands to the cartesian product of the axes its method reads
(an axis the method does not read is an error, so no two runs differ only in an ignored value). Per-method
options come from ``finetune.methods.<method>`` and may be overridden per entry (``options``), with an
optional ``tag`` to tell such entries apart in run names.

Run (= model variant) names: ``ft-<method>[-<tag>][-r<rank>]-lr<lr>[-vr<ratio>]-s<seed>``, e.g.
``ft-lora-r8-lr0.0001-s0``; they match the variant wildcard ``[A-Za-z0-9][A-Za-z0-9._=-]*``.
"""

from __future__ import annotations

import itertools
import re

from . import registry
from .common import Context, FinetuneError, RunSpec

AXES = ("lr", "rank", "value_lr_ratio", "seed")
AXIS_DEFAULTS = dict(lr=[1e-4], rank=[8], value_lr_ratio=[2.0], seed=[0])
RANGES = dict(lr=(0.0, 1.0), value_lr_ratio=(0.0, 1000.0))  # open below, closed above
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._=-]*")


def _fmt(x: float) -> str:
    return f"{float(x):g}"


def run_name(run: RunSpec, tag: str | None = None) -> str:
    parts = ["ft", run.method] + ([tag] if tag else [])
    if run.rank is not None:
        parts.append(f"r{run.rank}")
    parts.append(f"lr{_fmt(run.lr)}")
    if run.value_lr_ratio is not None:
        parts.append(f"vr{_fmt(run.value_lr_ratio)}")
    parts.append(f"s{run.seed}")
    return "-".join(parts)


def _as_list(v):
    return list(v) if isinstance(v, (list, tuple)) else [v]


def _check_value(axis: str, v, where: str):
    if axis in ("rank", "seed"):
        if isinstance(v, bool) or not isinstance(v, int) or v < (1 if axis == "rank" else 0):
            raise FinetuneError(f"{where}: {axis} value {v!r} is not an integer >= {1 if axis == 'rank' else 0}. "
                                f"Fix: change it in {where}.{axis}.")
        return int(v)
    try:
        x = float(v)
    except (TypeError, ValueError):
        raise FinetuneError(f"{where}: {axis} value {v!r} is not a number. Fix: change it in {where}.{axis}.") from None
    lo, hi = RANGES[axis]
    if not lo < x <= hi:
        raise FinetuneError(f"{where}: {axis} value {v!r} is outside its range ({lo}, {hi}]. "
                            f"Fix: change it in {where}.{axis}.")
    return x


def expand(ft: dict) -> dict[str, RunSpec]:
    """Runs by name, in config order. Raises FinetuneError on an unknown method, an axis the method does
    not read, an out-of-range value, an unknown option or a duplicate name."""
    runs: dict[str, RunSpec] = {}
    methods_cfg = ft.get("methods") or {}
    for key in methods_cfg:
        registry.get(key)
    for i, sweep in enumerate(ft.get("sweeps") or []):
        where = f"finetune.sweeps[{i}]"
        if "method" not in sweep:
            raise FinetuneError(f"{where}: no method. Fix: add `method: <one of {sorted(registry.METHODS)}>`.")
        m = registry.get(sweep["method"])
        unknown_keys = set(sweep) - {"method", "tag", "options", *AXES}
        if unknown_keys:
            raise FinetuneError(f"{where}: unknown key(s) {sorted(unknown_keys)}. Fix: use method, tag, options, "
                                f"{', '.join(AXES)}.")
        for axis in AXES:
            if axis in sweep and axis not in m.axes:
                raise FinetuneError(f"{where}: method {m.name!r} does not use {axis!r} (it reads {list(m.axes)}). "
                                    f"Fix: remove {axis} from {where}.")
        options = m.defaults
        for src, extra in ((f"finetune.methods.{m.name}", methods_cfg.get(m.name) or {}),
                           (f"{where}.options", sweep.get("options") or {})):
            m.check_options({**options, **extra}, src)  # unknown names and values out of range
            options.update(extra)
        tag = sweep.get("tag")
        if tag is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.]*", str(tag)):
            raise FinetuneError(f"{where}: tag {tag!r} must be letters, digits and dots. Fix: rename it.")
        values = {a: [_check_value(a, v, where) for v in _as_list(sweep.get(a, AXIS_DEFAULTS[a]))]
                  for a in AXES if a in m.axes}
        for a, vs in values.items():
            if not vs:
                raise FinetuneError(f"{where}: empty list for {a}. Fix: give at least one value.")
        axes = list(values)
        for combo in itertools.product(*(values[a] for a in axes)):
            kw = dict(zip(axes, combo, strict=True))
            run = RunSpec(method=m.name, lr=kw["lr"], seed=kw["seed"], rank=kw.get("rank"),
                          value_lr_ratio=kw.get("value_lr_ratio"), options=dict(options))
            name = run_name(run, tag)
            if not NAME_RE.fullmatch(name):
                raise FinetuneError(f"{where}: run name {name!r} is not path-safe.")
            if name in runs:
                raise FinetuneError(f"{where}: run {name!r} appears twice in the grid. Fix: remove the duplicate "
                                    "value or give one entry a distinct tag.")
            runs[name] = run
    return runs


def validate(runs: dict[str, RunSpec], shapes: dict | None, context=None, producible=None) -> None:
    """Checks that need the model's shapes (ranks vs matrices, target names) and the input files.

    ``context(run)``: the run's :class:`Context` (its method's declared input files; default: none).
    ``producible(path)``: a rule of the workflow writes ``path``, so its absence now is not an error (the
    DAG makes it first; default: nothing is)."""
    for name, run in runs.items():
        m = registry.get(run.method)
        ctx = context(run) if context is not None else Context()
        try:
            if m.check_inputs is not None:
                m.check_inputs(run, ctx, producible or (lambda path: False))
            if shapes is not None:
                m.targets(shapes, run, ctx)
        except FinetuneError as e:
            raise FinetuneError(f"run {name}: {e}") from None
