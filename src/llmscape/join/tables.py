"""The joined tidy table: one row per (variant, shots, layer) of one model.

Columns of ``results/join/{model}/joined.parquet``
--------------------------------------------------
``model, variant, shots, layer``   key (layer = geometry layer, the index into the extraction's ``hidden``)
``n_layers``        geometry layers of the model (decoder blocks + 1); ``depth`` = layer / (n_layers - 1)
``block``           decoder block joined to this layer (``join.layer_match``; <NA> where none)
geometry            every column of :data:`columns.GEOMETRY_METRICS`, their intervals ({metric}_lo,
                    {metric}_hi) and layer_name, status, n_points, subject_size_min, resolution
spectra             ``{metric}|{module}|{stat}`` for every spectral metric, module in the seven decoder
                    module types and the groups attn, mlp, all, stat in mean, median over the block's
                    matrices of that type (a single matrix: mean = median = its value)
variant             ``method`` (base, srank-intervention or the fine-tuning method), ``lr, rank,
                    value_lr_ratio, seed, options`` (JSON), ``trainable_params, total_params,
                    trainable_share, ft_accuracy, ft_train_loss, ft_val_loss, ft_steps, ft_train_time_s,
                    ft_wall_time_s``, ``srank_group, srank_target`` (interventions)
accuracy            ``accuracy, accuracy_nospace`` of the extraction of (variant, shots)

Every join checks its row count; whatever is missing (a variant, a (variant, shots), a layer, a block,
a module) raises :class:`JoinError` naming it.
"""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pandas as pd

from ..io import read_json
from .columns import (
    ACCURACY_FIELDS,
    BASE_METHOD,
    DECODER_MODULES,
    FT_ACCURACY,
    FT_SCALARS,
    FT_SPEC_FIELDS,
    FT_TRAIN_LOSS,
    FT_VAL_LOSS,
    GEOMETRY_INFO,
    GEOMETRY_KEY,
    GEOMETRY_METRICS,
    MODULE_GROUPS,
    SPECTRA_KEY,
    SPECTRA_NON_METRIC,
    SRANK_GROUPS,
    SRANK_METHOD,
    STATS,
    JoinError,
    spec_col,
)

log = logging.getLogger("llmscape.join")

LAYER_MATCH = ("producer", "consumer")
_SRANK_RE = re.compile(r"srank-([a-z]+)-([0-9]+(?:\.[0-9]+)?)")


def _fmt_missing(items, limit: int = 12) -> str:
    items = sorted(items, key=str)
    s = ", ".join(str(i) for i in items[:limit])
    return s + (f" ... ({len(items)} in all)" if len(items) > limit else "")


# ---------------------------------------------------------------------------------------------------
# layer matching


def block_of_layer(layer: int, n_blocks: int, match: str = "producer") -> int | None:
    """Decoder block joined with geometry layer ``layer`` (0..n_blocks); None where there is none."""
    if match not in LAYER_MATCH:
        raise JoinError(f"join.layer_match={match!r}; choose one of {', '.join(LAYER_MATCH)}")
    if not 0 <= layer <= n_blocks:
        raise JoinError(f"geometry layer {layer} outside 0..{n_blocks} for a model with {n_blocks} decoder blocks")
    b = layer - 1 if match == "producer" else layer
    return b if 0 <= b < n_blocks else None


# ---------------------------------------------------------------------------------------------------
# inputs


def check_geometry(geom: pd.DataFrame, variants, shots, pairs=None) -> int:
    """Every (variant, shots) present, each with layers exactly 0..L for one common L; returns L + 1.
    ``pairs`` (variant, shots) replaces the product of ``variants`` and ``shots`` when variants are
    extracted at different shots (``extract.variant_shots``)."""
    missing_cols = [c for c in GEOMETRY_KEY if c not in geom.columns]
    if missing_cols:
        raise JoinError(f"geometry table lacks key column(s) {missing_cols}")
    absent = [c for c in GEOMETRY_METRICS if c not in geom.columns]
    if absent:
        raise JoinError(f"geometry table lacks metric column(s) {absent} (see llmscape.join.columns)")
    have = set(zip(geom["variant"], geom["shots"].astype(int), strict=True))
    want = {(v, int(k)) for v, k in pairs} if pairs is not None else {(v, int(k)) for v in variants for k in shots}
    if want - have:
        raise JoinError(f"geometry missing for (variant, shots): {_fmt_missing(want - have)}")
    if have - want:
        log.info("geometry rows of unrequested (variant, shots) ignored: %s", _fmt_missing(have - want))
    dup = geom.duplicated(list(GEOMETRY_KEY))
    if dup.any():
        dups = set(map(tuple, geom.loc[dup, list(GEOMETRY_KEY)].values))
        raise JoinError(f"geometry has duplicate rows for {_fmt_missing(dups)}")
    n_layers = int(geom["layer"].max()) + 1
    gaps = []
    for (v, k), g in geom.groupby(["variant", "shots"]):
        if (v, int(k)) not in want:
            continue
        lost = set(range(n_layers)) - set(g["layer"].astype(int))
        gaps += [f"{v}/{int(k)}shot layer {layer}" for layer in lost]
    if gaps:
        raise JoinError(f"geometry layers missing (every extraction has layers 0..{n_layers - 1}): "
                        f"{_fmt_missing(gaps)}")
    return n_layers


def spectral_metrics(spec: pd.DataFrame) -> list[str]:
    """Numeric metric columns of a spectra table (everything but the key and bookkeeping columns)."""
    return [c for c in spec.columns if c not in SPECTRA_KEY and c not in SPECTRA_NON_METRIC
            and pd.api.types.is_numeric_dtype(spec[c])]


def aggregate_spectra(spec: pd.DataFrame, variants, metrics=None, modules=DECODER_MODULES) -> pd.DataFrame:
    """Per (variant, block): mean and median of each metric per module type and module group.

    Checks that every requested variant has the same decoder blocks 0..B-1, each with every module type
    of ``modules`` that the model has (embedding rows, layer -1, are ignored here)."""
    missing_cols = [c for c in SPECTRA_KEY if c not in spec.columns]
    if missing_cols:
        raise JoinError(f"spectra table lacks key column(s) {missing_cols}")
    metrics = list(metrics) if metrics is not None else spectral_metrics(spec)
    absent = [m for m in metrics if m not in spec.columns]
    if absent:
        raise JoinError(f"spectra table lacks metric column(s) {absent}")
    absent_v = set(variants) - set(spec["variant"])
    if absent_v:
        raise JoinError(f"spectra missing for variant(s): {_fmt_missing(absent_v)}")
    dec = spec[(spec["layer"] >= 0) & spec["variant"].isin(list(variants))]
    mods = [m for m in modules if m in set(dec["module"])]
    if not mods:
        raise JoinError(f"spectra hold none of the decoder modules {list(modules)}")
    dup = dec.duplicated(["variant", "layer", "module"])
    if dup.any():
        raise JoinError("spectra have duplicate (variant, layer, module) rows: "
                        + _fmt_missing(set(map(tuple, dec.loc[dup, ["variant", "layer", "module"]].values))))
    n_blocks = int(dec["layer"].max()) + 1
    have = set(zip(dec["variant"], dec["layer"].astype(int), dec["module"], strict=True))
    want = {(v, b, m) for v in variants for b in range(n_blocks) for m in mods}
    if want - have:
        raise JoinError("spectra missing for (variant, block, module): " + _fmt_missing(want - have))
    dec = dec[dec["module"].isin(mods)]
    frames = []
    groups = {m: (m,) for m in mods}
    groups.update({g: tuple(m for m in ms if m in mods) for g, ms in MODULE_GROUPS.items()})
    for gname, members in groups.items():
        if not members:
            continue
        sub = dec[dec["module"].isin(members)]
        agg = sub.groupby(["variant", "layer"])[metrics].agg(list(STATS))
        agg.columns = [spec_col(m, gname, s) for m, s in agg.columns]
        frames.append(agg)
    out = pd.concat(frames, axis=1).reset_index().rename(columns={"layer": "block"})
    out["block"] = out["block"].astype(int)
    assert len(out) == len(variants) * n_blocks, (len(out), len(variants), n_blocks)
    return out


def read_accuracy(paths: dict) -> pd.DataFrame:
    """{(variant, shots): path of the extraction's accuracy JSON} -> (variant, shots, accuracy, ...)."""
    rows = []
    for (v, k), p in paths.items():
        d = read_json(p)
        rows.append(dict(variant=v, shots=int(k), **{f: float(d.get(f, math.nan)) for f in ACCURACY_FIELDS}))
    return pd.DataFrame(rows, columns=["variant", "shots", *ACCURACY_FIELDS])


def _last_loss(curve) -> float:
    return float(curve[-1]["loss"]) if curve else math.nan


def finetune_row(run: str, metrics: dict) -> dict:
    spec = metrics.get("spec") or {}
    acc = metrics.get(FT_ACCURACY[0])
    row = dict(variant=run, method=str(metrics.get("method") or spec.get("method")),
               **{f: spec.get(f) for f in FT_SPEC_FIELDS},
               options=json.dumps(spec.get("options") or {}, sort_keys=True),
               **{col: metrics.get(key) for col, key in FT_SCALARS.items()},
               ft_accuracy=acc.get(FT_ACCURACY[1]) if isinstance(acc, dict) else acc,
               ft_train_loss=_last_loss(metrics.get(FT_TRAIN_LOSS)),
               ft_val_loss=_last_loss(metrics.get(FT_VAL_LOSS)))
    return row


def variant_table(variants, finetune: dict | None = None, interventions: dict | None = None,
                  total_params: int | None = None) -> pd.DataFrame:
    """One row per variant: method, hyper-parameters, trainable parameters, fine-tuning outcome.

    ``finetune``: {run: metrics dict}; ``interventions``: {variant: intervention summary dict or {}}.
    base has method ``base`` and 0 trainable parameters; srank-* variants method ``srank-intervention``
    (0 trainable: nothing is trained) with their group and target. A variant with neither is an error."""
    finetune, interventions = finetune or {}, interventions or {}
    rows = []
    for v in variants:
        if v in finetune:
            rows.append(finetune_row(v, finetune[v]))
        elif v == "base":
            rows.append(dict(variant=v, method=BASE_METHOD, trainable_params=0))
        elif v in interventions or _SRANK_RE.fullmatch(v):
            m = _SRANK_RE.fullmatch(v)
            summ = interventions.get(v) or {}
            group = summ.get("group") or (m.group(1) if m else None)
            target = summ.get("target", float(m.group(2)) if m else math.nan)
            rows.append(dict(variant=v, method=SRANK_METHOD, trainable_params=0, srank_group=group,
                             srank_target=float(target)))
        else:
            raise JoinError(f"variant {v!r} is neither base, a fine-tuning run with a metrics.json, nor an "
                            "srank-<group>-<target> intervention; cannot say which method made it")
    cols = ["variant", "method", *FT_SPEC_FIELDS, "options", *FT_SCALARS, "ft_accuracy", "ft_train_loss",
            "ft_val_loss", "srank_group", "srank_target"]
    out = pd.DataFrame(rows).reindex(columns=cols)
    if total_params is not None:
        out["total_params"] = out["total_params"].fillna(total_params)
    for c in ("lr", "value_lr_ratio", "trainable_share", "ft_accuracy", "ft_train_loss", "ft_val_loss", "srank_target",
              "ft_train_time_s", "ft_wall_time_s"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype(float)
    for c in ("rank", "seed", "trainable_params", "total_params", "ft_steps"):
        out[c] = pd.to_numeric(out[c], errors="coerce").astype("Int64")
    out["options"] = out["options"].fillna("{}")
    return out


# ---------------------------------------------------------------------------------------------------
# the join


def _checked_merge(left: pd.DataFrame, right: pd.DataFrame, on, what: str, validate: str = "many_to_one"):
    """Left merge that must find a right row for every left row (else JoinError naming the keys)."""
    m = left.merge(right, on=on, how="left", validate=validate, indicator="_found")
    lost = m["_found"] != "both"
    if lost.any():
        keys = set(map(tuple, m.loc[lost, on].astype(str).values))
        raise JoinError(f"{what} missing for {tuple(on)} = {_fmt_missing(keys)}")
    if len(m) != len(left):
        raise JoinError(f"joining {what} changed the row count from {len(left)} to {len(m)}")
    return m.drop(columns="_found")


def join_model(geometry: pd.DataFrame, spectra: pd.DataFrame, variants_meta: pd.DataFrame,
               accuracy: pd.DataFrame, *, variants, shots, layer_match: str = "producer",
               spectral_metrics_=None, pairs=None) -> pd.DataFrame:
    """The joined table of one model (module docstring). Raises JoinError on any lost row."""
    variants, shots = list(variants), [int(k) for k in shots]
    if len(set(variants)) != len(variants):
        raise JoinError(f"duplicate variants requested: {variants}")
    pairs = ([(v, int(k)) for v, k in pairs] if pairs is not None else [(v, k) for v in variants for k in shots])
    n_layers = check_geometry(geometry, variants, shots, pairs)
    wanted = set(pairs)
    geom = geometry[[(v, int(k)) in wanted for v, k in zip(geometry["variant"], geometry["shots"], strict=True)]].copy()
    geom["shots"] = geom["shots"].astype(int)
    geom["layer"] = geom["layer"].astype(int)
    keep = list(GEOMETRY_KEY) + [c for c in GEOMETRY_INFO if c in geom.columns] + list(GEOMETRY_METRICS)
    geom = geom[keep].sort_values(["variant", "shots", "layer"]).reset_index(drop=True)
    n_rows = len(geom)
    assert n_rows == len(wanted) * n_layers

    spec = aggregate_spectra(spectra, variants, spectral_metrics_)
    n_blocks = int(spec["block"].max()) + 1
    if n_blocks != n_layers - 1:
        raise JoinError(f"geometry has {n_layers} layers (expected decoder blocks + 1 = {n_blocks + 1}); spectra "
                        f"have {n_blocks} decoder blocks: "
                        + (f"spectra missing block(s) {list(range(n_blocks, n_layers - 1))}" if n_blocks < n_layers - 1
                           else f"geometry missing layer(s) {list(range(n_layers, n_blocks + 1))}"))
    geom.insert(4, "n_layers", n_layers)
    geom.insert(5, "depth", geom["layer"] / (n_layers - 1))
    geom.insert(6, "block", pd.array([block_of_layer(layer, n_blocks, layer_match) for layer in geom["layer"]],
                                     dtype="Int64"))

    matched = geom[geom["block"].notna()].copy()
    unmatched = geom[geom["block"].isna()].copy()
    matched["block"] = matched["block"].astype(int)
    spec_cols = [c for c in spec.columns if c not in ("variant", "block")]
    matched = _checked_merge(matched, spec, ["variant", "block"], "spectra")
    out = pd.concat([matched, unmatched.reindex(columns=matched.columns)], ignore_index=True)
    out["block"] = out["block"].astype("Int64")

    missing_v = set(variants) - set(variants_meta["variant"])
    if missing_v:
        raise JoinError(f"variant metadata missing for {_fmt_missing(missing_v)}")
    out = _checked_merge(out, variants_meta, ["variant"], "variant metadata")
    acc = accuracy.copy()
    acc["shots"] = acc["shots"].astype(int)
    out = _checked_merge(out, acc, ["variant", "shots"], "extraction accuracy")
    if len(out) != n_rows:
        raise JoinError(f"the join changed the row count from {n_rows} to {len(out)}")
    out = out.sort_values(["variant", "shots", "layer"]).reset_index(drop=True)
    front = [c for c in out.columns if c not in spec_cols]
    log.info("joined %d rows: %d variants x %d shots x %d layers, %d spectral columns, layer_match=%s",
             len(out), len(variants), len(shots), n_layers, len(spec_cols), layer_match)
    return out[front + spec_cols]


def spectral_columns(joined: pd.DataFrame) -> list[str]:
    return [c for c in joined.columns if c.count("|") == 2]


def variants_summary(joined: pd.DataFrame) -> pd.DataFrame:
    """One row per (variant, shots) without the per-layer columns (for the report)."""
    cols = ["model", "variant", "shots", "method", *FT_SPEC_FIELDS, "trainable_params", "trainable_share",
            "accuracy", "accuracy_nospace", "ft_accuracy", "ft_train_loss", "ft_val_loss", "srank_group",
            "srank_target"]
    cols = [c for c in cols if c in joined.columns]
    return joined[cols].drop_duplicates(["variant", "shots"]).reset_index(drop=True)


def srank_modules(group: str) -> tuple[str, ...]:
    if group not in SRANK_GROUPS:
        raise JoinError(f"unknown stable-rank intervention group {group!r}")
    return SRANK_GROUPS[group]


def finite(x) -> np.ndarray:
    return np.isfinite(np.asarray(x, dtype=float))
