"""Replication: the geometry of one extraction repeated on disjoint sets of subjects, and which findings
hold in every set.

Why
---
A statement about a model ("without shots there are no subject clusters", "shots raise the subject
ARI") rests on one sample of questions: these subjects, these questions. Its intervals say how much the
value would move with other questions of the same subjects, not with other subjects. Repeating the
analysis on disjoint subject sets (``geometry.replication.sets``; same model, prompts and recipe) tells
a finding of the model, which holds in every set, from a finding of the sample, which holds in some.

How
---
:func:`write_subset` writes the rows of an extraction whose subject is in one set as an extraction file
of its own (the same datasets and attributes, fresh checksums, marked complete), so the geometry job
runs on it exactly as on a whole extraction, intervals included; every shot count of a set holds the
same questions in the same order, so their subsamples pair (:mod:`llmscape.geometry.paired`).
:func:`compute_findings` evaluates a fixed list of findings (:data:`FINDINGS`) on each set's tables:
each gives a value with its interval, the layer it was read at, and whether the finding's statement
holds in that set (or a category, for the layer group of the ID peak). :func:`summarise` adds the
verdict of each finding over the sets:

* ``replicates``: it holds in every set (a category: every set gives the same one);
* ``specific to A, ...``: it holds in some sets only (those named); ``differs between sets`` for a category;
* ``holds in no set``; ``undetermined`` where a set has no interval (a degenerate table);
* ``one set: ...`` when a single set is given (nothing to replicate across; the command line allows it).

and whether the sets' values differ: per pair of sets, the difference of the two values with the
interval of a difference of independent estimates from each one's own interval (MOVER: Zou and Donner
2008, Statistics in Medicine 27: 1693-1702), ``values`` "differ" where some pair's interval excludes 0.
Disjoint subject sets are independent samples, so no pairing is possible between them.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import paired
from .params import STATUS_OK, GeometryError

#: an ARI below this is "no clustering worth naming" (the letter finding's threshold, on the upper ends)
SMALL_ARI = 0.05
REPLICATES, NO_SET, UNDETERMINED, DIFFERS = "replicates", "holds in no set", "undetermined", "differs between sets"
#: findings whose result is a category (the same in every set, or not), not a statement that holds or not
CATEGORY_FINDINGS = ("id_peak",)
COLUMNS = ["model", "variant", "finding", "shots", "ref_shots", "statement", "set", "n_subjects", "value", "lo", "hi",
           "layer", "category", "holds", "detail", "n_sets", "n_hold", "verdict", "values", "between_pair",
           "between_diff", "between_lo", "between_hi"]


class ReplicationError(GeometryError):
    """A replication set that cannot be cut from its extraction (a subject the extraction lacks)."""


# --- the configuration ---------------------------------------------------------------------------------


def replication_shots(replication: dict, extracted) -> list[int]:
    """The shot counts a replication runs: geometry.replication.shots, or (null) the smallest and the
    largest of the variant's extracted shot counts."""
    s = replication.get("shots")
    return sorted({min(extracted), max(extracted)}) if s is None else sorted({int(k) for k in s})


# --- the subset of an extraction -----------------------------------------------------------------------


def _create_like(out, name: str, ds, data: np.ndarray) -> None:
    """``data`` as dataset ``name`` of ``out``, with the dtype, chunking and checksums of ``ds``."""
    import h5py

    kw = {}
    if ds.chunks is not None and data.ndim and data.shape[0]:
        kw = dict(chunks=(min(ds.chunks[0], data.shape[0]), *ds.chunks[1:]), fletcher32=ds.fletcher32)
    if h5py.check_string_dtype(ds.dtype) is not None:
        out.create_dataset(name, data=data.astype(object), dtype=h5py.string_dtype("utf-8"), **kw)
    else:
        out.create_dataset(name, data=data, dtype=ds.dtype, **kw)


def _copy_rows(src, out, rows: np.ndarray, src_path) -> None:
    """Every dataset of the extraction ``src`` into ``out``, keeping only the questions ``rows``: hidden
    (layer, question, feature) layer by layer, chunked per layer with fletcher32 as extraction writes
    it; the per-question datasets (first axis = questions) row by row; the per-layer ones whole."""
    from .files import read_layer

    hidden = src["hidden"]
    n_layers, n, d = hidden.shape
    m = rows.size
    out.create_dataset("hidden", shape=(n_layers, m, d), dtype=hidden.dtype, chunks=(1, min(m, 256), d),
                       fletcher32=True)
    for layer in range(n_layers):
        out["hidden"][layer] = read_layer(hidden, layer, src_path)[rows]
    for name, ds in src.items():
        if name == "hidden":
            continue
        data = ds.asstr()[()] if ds.dtype.kind == "O" else ds[()]
        per_question = name != "layer_name" and np.ndim(data) >= 1 and np.shape(data)[0] == n
        _create_like(out, name, ds, np.asarray(data)[rows] if per_question else np.asarray(data))


def write_subset(src_h5, dest_h5, subjects, *, set_name: str, model: str | None = None, variant: str | None = None,
                 shots: int | None = None) -> int:
    """Write the questions of ``subjects`` of the extraction ``src_h5`` as the extraction ``dest_h5``
    (written beside it under a temporary name, renamed when complete). The source is checked as every
    reader checks it (checksums, completion, the model, variant and shots its path names); the subset
    keeps the source's attributes, adds ``replication_set``, ``replication_subjects`` (JSON) and
    ``replication_source`` and gets its own checksums. Returns the number of questions kept."""
    import h5py

    from ..integrity import seal
    from ..io import atomic_path
    from .files import open_checked

    subjects = [str(s) for s in subjects]
    with open_checked(src_h5, ("hidden", "question_id", "subject", "answer"), model=model, variant=variant,
                      shots=shots) as src:
        names = np.asarray(src["subject"].asstr()[()], dtype=str)
        missing = sorted(set(subjects) - set(names))
        if missing:
            raise ReplicationError(
                f"geometry.replication.sets.{set_name}: {src_h5} holds no question of {missing} (it holds "
                f"{', '.join(sorted(set(names)))}). Fix: name subjects of data.subjects in the set, or run a set "
                "outside them as a config of its own (docs/geometry.md, \"Replication\").")
        rows = np.flatnonzero(np.isin(names, subjects))
        with atomic_path(dest_h5, suffix=".partial") as tmp:
            with h5py.File(tmp, "w") as out:
                _copy_rows(src, out, rows, src_h5)
                out.attrs.update({k: v for k, v in src.attrs.items() if k != "complete"})
                out.attrs.update(replication_set=str(set_name), replication_subjects=json.dumps(sorted(subjects)),
                                 replication_source=str(src_h5))
                seal(out)
                out.attrs["complete"] = True  # last, as extraction marks a finished file
    return int(rows.size)


# --- the findings, per set -----------------------------------------------------------------------------


@dataclass
class SetGeometry:
    """One set's geometry at one shot count: its extraction's tables (paired.Extraction) and the sizes
    of its subjects (for the chance level of the subject overlap)."""

    name: str
    extraction: paired.Extraction
    subject_sizes: np.ndarray

    @property
    def table(self) -> pd.DataFrame:
        return self.extraction.table


def read_set(table_path, boot_path, knn_path, *, set_name: str, variant: str, shots: int) -> SetGeometry:
    """The files of one set's geometry job (layer table, subsample values, neighbour lists)."""
    e = paired.read_extraction(table_path, boot_path, knn_path, variant=variant, shots=shots)
    from ..io import read_npz  # a damaged archive is named with the command that rebuilds it

    _, sizes = np.unique(read_npz(knn_path, keys=("subject",))["subject"], return_counts=True)
    return SetGeometry(set_name, e, sizes)


def overlap_chance(sizes) -> float:
    """Expected class-balanced label overlap when neighbours ignore the labels: a neighbour of a point
    of class c shares its class with probability (n_c - 1) / (n - 1), and the overlap averages the
    classes with equal weight (DADApy's return_label_overlap with weights 1 / n_c)."""
    s = np.asarray(sizes, dtype=np.float64)
    n = s.sum()
    return float(np.mean((s - 1) / (n - 1))) if n > 1 else math.nan


def _ok(table: pd.DataFrame, metric: str) -> pd.DataFrame:
    t = table[(table["status"] == STATUS_OK) & np.isfinite(table[metric].to_numpy(dtype=float))]
    return t.sort_values("layer")


def _at(row, metric: str, scale: float = 1.0) -> dict:
    return dict(value=float(row[metric]) / scale, lo=float(row[f"{metric}_lo"]) / scale,
                hi=float(row[f"{metric}_hi"]) / scale, layer=int(row["layer"]))


def _interval_known(r: dict) -> bool:
    return all(math.isfinite(r[k]) for k in ("value", "lo", "hi"))


def finding_subject_ari_peak(g: SetGeometry) -> dict:
    """The largest subject ARI over layers, with that layer's interval; holds: the interval lies above 0."""
    t = _ok(g.table, "ari_subjects")
    if t.empty:
        return dict(value=math.nan, lo=math.nan, hi=math.nan, layer=-1, holds=None, detail="no usable layer")
    r = _at(t.loc[t["ari_subjects"].idxmax()], "ari_subjects")
    return dict(r, holds=r["lo"] > 0 if _interval_known(r) else None, detail=f"peak at layer {r['layer']}")


def finding_letter_ari(g: SetGeometry) -> dict:
    """The largest letter ARI over layers, with its interval; holds: every layer's upper end is below
    SMALL_ARI."""
    t = _ok(g.table, "ari_letters")
    if t.empty:
        return dict(value=math.nan, lo=math.nan, hi=math.nan, layer=-1, holds=None, detail="no usable layer")
    r = _at(t.loc[t["ari_letters"].idxmax()], "ari_letters")
    his = t["ari_letters_hi"].to_numpy(dtype=float)
    top = t.iloc[int(np.nanargmax(his))] if np.isfinite(his).any() else None
    holds = bool(np.nanmax(his) < SMALL_ARI) if top is not None else None
    detail = f"largest at layer {r['layer']}" + (f"; largest upper end {np.nanmax(his):.3f} at layer "
                                                 f"{int(top['layer'])}" if top is not None else "")
    return dict(r, holds=holds, detail=detail)


def finding_subject_overlap(g: SetGeometry) -> dict:
    """The class-balanced subject overlap over its chance level, at the layer where it is smallest, with
    its interval; holds: every layer's lower end is above chance."""
    chance = overlap_chance(g.subject_sizes)
    t = _ok(g.table, "overlap_subjects")
    if t.empty or not math.isfinite(chance):
        return dict(value=math.nan, lo=math.nan, hi=math.nan, layer=-1, holds=None, detail="no usable layer")
    r = _at(t.loc[t["overlap_subjects"].idxmin()], "overlap_subjects", scale=chance)
    lows = t["overlap_subjects_lo"].to_numpy(dtype=float)
    holds = bool(np.all(lows > chance)) if np.isfinite(lows).all() else None
    return dict(r, holds=holds, detail=f"ratio to chance ({chance:.3f}); smallest at layer {r['layer']}")


def finding_id_peak(g: SetGeometry) -> dict:
    """The largest Gride ID over layers, with its interval, and the third of the layers it lies in."""
    from .resolution import layer_group

    t = _ok(g.table, "id_gride")
    if t.empty:
        return dict(value=math.nan, lo=math.nan, hi=math.nan, layer=-1, category="", detail="no usable layer")
    r = _at(t.loc[t["id_gride"].idxmax()], "id_gride")
    group = layer_group(r["layer"], int(g.table["layer"].max()) + 1)
    return dict(r, category=group, detail=f"peak at layer {r['layer']} ({group} third)")


def layer_mean_difference(this: SetGeometry, ref: SetGeometry, metric: str) -> tuple[float, float, float, int]:
    """(mean over layers of the paired difference this - ref of ``metric``, its interval, layers used):
    the layers where both sides have a value; the interval from the same mean in every subsample, which
    keeps the same questions on both sides (paired.difference_interval)."""
    paired.check_pairing(this.extraction, ref.extraction)
    a, b = _ok(this.table, metric).set_index("layer"), _ok(ref.table, metric).set_index("layer")
    layers = a.index.intersection(b.index)
    if layers.empty:
        return math.nan, math.nan, math.nan, 0
    diff = float((a.loc[layers, metric] - b.loc[layers, metric]).mean())
    pivot = [e.boot[e.boot["layer"].isin(layers)].pivot(index="draw", columns="layer", values=metric)
             for e in (this.extraction, ref.extraction)]
    draw_diffs = (pivot[0] - pivot[1]).mean(axis=1, skipna=False)
    fraction, confidence = float(this.table["boot_fraction"].iloc[0]), float(this.table["confidence"].iloc[0])
    lo, hi, _ = paired.difference_interval(diff, draw_diffs.to_numpy(dtype=float), fraction, confidence, metric)
    return diff, lo, hi, int(layers.size)


def finding_shot_change(this: SetGeometry, ref: SetGeometry, metric: str, sign: int) -> dict:
    """The paired change of ``metric`` from ref's shots to this one's, averaged over layers, with its
    interval; holds: the interval lies on the side ``sign`` (+1 above 0, -1 below). The detail names
    the layers where the per-layer paired interval excludes 0 (paired.compute_pair_differences)."""
    diff, lo, hi, n = layer_mean_difference(this, ref, metric)
    per_layer = paired.compute_pair_differences(this.extraction, ref.extraction, "shots")
    s = paired.summarise_differences(per_layer[per_layer["metric"] == metric]).iloc[0]
    holds = (lo > 0 if sign > 0 else hi < 0) if math.isfinite(lo) and math.isfinite(hi) else None
    higher, lower = (f"at layers {x}" if x else "at no layer" for x in (s["layers_higher"], s["layers_lower"]))
    detail = f"mean over {n} layers; per layer higher {higher}, lower {lower}"
    return dict(value=diff, lo=lo, hi=hi, layer=-1, holds=holds, detail=detail)


#: findings of one shot count: (name, statement with {k}, function of the set's geometry)
FINDINGS = (
    ("subject_ari_peak", "{k}-shot: density peaks match the subjects beyond chance at some layer (the largest "
                         "subject ARI, its interval above 0)", finding_subject_ari_peak),
    ("letter_ari", "{k}-shot: answer letters do not cluster (letter ARI upper ends below " + f"{SMALL_ARI:g} at "
                   "every layer)", finding_letter_ari),
    ("subject_overlap", "{k}-shot: neighbours share the subject more than chance at every layer (class-balanced "
                        "overlap / chance, the smallest over layers, interval above 1)", finding_subject_overlap),
    ("id_peak", "{k}-shot: the Gride ID peaks in the same third of the layers in every set", finding_id_peak),
)
#: findings of k shots against 0: (name, statement, metric, sign the statement claims)
SHOT_FINDINGS = (
    ("subject_ari_gain", "{k} shots raise the subject ARI over 0 shots (paired difference, mean over layers, "
                         "above 0)", "ari_subjects", 1),
    ("subject_overlap_gain", "{k} shots raise the class-balanced subject overlap over 0 shots (paired difference, "
                             "mean over layers, above 0)", "overlap_subjects", 1),
    ("id_drop", "{k} shots lower the Gride ID below 0 shots (paired difference, mean over layers, below 0)",
     "id_gride", -1),
)


def compute_findings(sets: dict, *, model: str = "", variant: str = "base") -> pd.DataFrame:
    """One row per (finding, set): value, interval, layer, whether it holds (or its category), detail.
    sets: {(set name, shots): SetGeometry}; a set with 0 shots and k > 0 also gets the k-vs-0 findings."""
    rows = []
    names = list(dict.fromkeys(s for s, _ in sets))
    shots = sorted({int(k) for _, k in sets})
    for k in shots:
        for name, statement, fn in FINDINGS:
            for s in names:
                g = sets[(s, k)]
                rows.append(dict(_base(model, variant, name, k, -1, statement.format(k=k), s, g), **fn(g)))
    for k in (k for k in shots if k > 0 and 0 in shots):
        for name, statement, metric, sign in SHOT_FINDINGS:
            for s in names:
                g, ref = sets[(s, k)], sets[(s, 0)]
                rows.append(dict(_base(model, variant, name, k, 0, statement.format(k=k), s, g),
                                 **finding_shot_change(g, ref, metric, sign)))
    out = pd.DataFrame(rows)
    out["category"] = out["category"].fillna("") if "category" in out else ""
    out["holds"] = [_flag(h) for h in out["holds"]] if "holds" in out else None
    out["holds"] = out["holds"].astype("boolean")  # True, False or missing (a category, no interval)
    return out


def _flag(h) -> bool | None:
    return None if h is None or pd.isna(h) else bool(h)


def _base(model, variant, finding, k, ref_k, statement, set_name, g: SetGeometry) -> dict:
    return dict(model=model, variant=variant, finding=finding, shots=int(k), ref_shots=int(ref_k),
                statement=statement, set=set_name, n_subjects=int(len(g.subject_sizes)))


# --- the verdict over the sets -------------------------------------------------------------------------


def mover_difference(a: dict, b: dict) -> tuple[float, float, float]:
    """a - b of two independent estimates with intervals (value, lo, hi), and the interval of the
    difference by MOVER (Zou and Donner 2008): each side's distance to its own interval end, combined
    in quadrature, on the side of the difference each end bounds."""
    d = a["value"] - b["value"]
    lo = d - math.sqrt((a["value"] - a["lo"]) ** 2 + (b["hi"] - b["value"]) ** 2)
    hi = d + math.sqrt((a["hi"] - a["value"]) ** 2 + (b["value"] - b["lo"]) ** 2)
    return d, lo, hi


def return_verdict(holds: list, categories: list | None = None, names: list | None = None) -> str:
    """The verdict of one finding over the sets (module docstring): from each set's ``holds`` (True,
    False or None), or, for a category finding, from each set's category."""
    names = names or [str(i) for i in range(len(holds))]
    if len(holds) == 1:  # nothing to replicate across: say only what the one set shows
        one = categories[0] if categories is not None else {True: "holds", False: "does not hold"}.get(holds[0])
        return f"one set: {one}" if one else UNDETERMINED
    if categories is not None:
        if any(not c for c in categories):
            return UNDETERMINED
        return REPLICATES if len(set(categories)) == 1 else DIFFERS
    if any(h is None for h in holds):
        return UNDETERMINED
    if all(holds):
        return REPLICATES
    held = [n for n, h in zip(names, holds, strict=True) if h]
    return f"specific to {', '.join(held)}" if held else NO_SET


def _between(g: pd.DataFrame) -> dict:
    """The pair of sets whose values differ most, its MOVER interval, and whether any pair differs."""
    rows = [r for r in g.to_dict("records") if _interval_known(r)]
    pairs = [(a, b, *mover_difference(a, b)) for a, b in itertools.combinations(rows, 2)]
    if not pairs:
        return dict(values=UNDETERMINED, between_pair="", between_diff=math.nan, between_lo=math.nan,
                    between_hi=math.nan)
    a, b, d, lo, hi = max(pairs, key=lambda p: abs(p[2]))
    differ = any(p[3] > 0 or p[4] < 0 for p in pairs)
    return dict(values="differ" if differ else "agree", between_pair=f"{a['set']} - {b['set']}", between_diff=d,
                between_lo=lo, between_hi=hi)


def summarise(findings: pd.DataFrame) -> pd.DataFrame:
    """The findings with, per finding, the number of sets, the sets where it holds, the verdict and
    the comparison of the sets' values (columns :data:`COLUMNS`)."""
    parts = []
    for _, g in findings.groupby(["finding", "shots", "ref_shots"], sort=False):
        g = g.copy()
        names, holds = list(g["set"]), [_flag(h) for h in g["holds"]]
        if g["finding"].iloc[0] in CATEGORY_FINDINGS:
            categories = [str(c) for c in g["category"]]
            g["verdict"] = return_verdict(holds, categories, names)
            g["n_hold"] = max(categories.count(c) for c in categories)  # sets sharing the commonest
        else:
            g["verdict"] = return_verdict(holds, None, names)
            g["n_hold"] = sum(h is True for h in holds)
        g["n_sets"] = len(g)
        for k, v in _between(g).items():
            g[k] = v
        parts.append(g)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=COLUMNS)
    return out.reindex(columns=COLUMNS)


# --- the figure ----------------------------------------------------------------------------------------


def plot_replication(sets: dict, dest, *, title: str = "") -> None:
    """Subject ARI per layer, one panel per shot count, one line (with its interval band) per set; and,
    per shot count k > 0 with 0 shots also run, a panel of the paired difference k - 0 per set."""
    from .plots import _axes, _save

    names = list(dict.fromkeys(s for s, _ in sets))
    shots = sorted({int(k) for _, k in sets})
    gains = [k for k in shots if k > 0 and 0 in shots]
    fig, axes = _axes(len(shots) + len(gains), width=4.2)
    for ax, k in zip(axes, shots, strict=False):  # the first panels
        for i, s in enumerate(names):
            t = sets[(s, k)].table.sort_values("layer")
            ax.plot(t["layer"], t["ari_subjects"], "-o", ms=2.5, color=f"C{i}", label=f"set {s}")
            ax.fill_between(t["layer"], t["ari_subjects_lo"], t["ari_subjects_hi"], color=f"C{i}", alpha=0.15, lw=0)
        ax.set(title=f"{k}-shot", xlabel="layer", ylabel="subject ARI", ylim=(-0.1, 1.05))
    for ax, k in zip(axes[len(shots):], gains, strict=True):
        for i, s in enumerate(names):
            d = paired.compute_pair_differences(sets[(s, k)].extraction, sets[(s, 0)].extraction, "shots")
            d = d[d["metric"] == "ari_subjects"].sort_values("layer")
            ax.plot(d["layer"], d["diff"], "-o", ms=2.5, color=f"C{i}", label=f"set {s}")
            ax.fill_between(d["layer"], d["diff_lo"], d["diff_hi"], color=f"C{i}", alpha=0.15, lw=0)
        ax.axhline(0, color="0.5", lw=0.8)
        ax.set(title=f"{k}-shot minus 0-shot (paired)", xlabel="layer", ylabel="subject ARI difference")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.text(0.5, 0.005, "bands: intervals from the subsamples of each set (paired: the same subsamples at both "
             "shot counts)", ha="center", va="bottom", fontsize=7, color="0.3")
    _save(fig, dest, title)


def paired_tables(sets: dict) -> pd.DataFrame:
    """The per-layer paired differences k - 0 of every metric, per set (column ``set``)."""
    shots = sorted({int(k) for _, k in sets})
    parts = []
    for s in dict.fromkeys(s for s, _ in sets):
        for k in (k for k in shots if k > 0 and 0 in shots):
            d = paired.compute_pair_differences(sets[(s, k)].extraction, sets[(s, 0)].extraction, "shots")
            parts.append(d.assign(set=s))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=[*paired.DIFF_COLUMNS, "set"])


# --- sets from separate runs ---------------------------------------------------------------------------


def main(argv=None) -> int:
    """``python -m llmscape.geometry.replicate NAME=DIR ... --out findings.csv``: the findings and their
    verdict over sets whose geometry lies in separate folders (DIR/{k}shot.parquet, _boot.parquet and
    _knn.npz, as the geometry rules write them): a set of subjects outside a run's extraction, analysed
    by a run of its own, beside the replication sets of the main run (docs/geometry.md, "Replication")."""
    import argparse

    from ..io import atomic_path

    ap = argparse.ArgumentParser(prog="python -m llmscape.geometry.replicate", description=main.__doc__)
    ap.add_argument("sets", nargs="+", metavar="NAME=DIR", help="a set's name and its geometry folder")
    ap.add_argument("--shots", type=int, nargs="+", default=[0, 5], help="shot counts to read (default 0 5)")
    ap.add_argument("--variant", default="base")
    ap.add_argument("--model", default="")
    ap.add_argument("--out", required=True, help="the findings table (CSV)")
    a = ap.parse_args(argv)
    sets = {}
    for item in a.sets:
        name, sep, folder = item.partition("=")
        if not (sep and name and folder):
            ap.error(f"{item!r}: give each set as NAME=DIR")
        for k in a.shots:
            stem = Path(folder) / f"{k}shot"
            files = [Path(f"{stem}.parquet"), Path(f"{stem}_boot.parquet"), Path(f"{stem}_knn.npz")]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                ap.error(f"set {name}: {missing[0]} does not exist. Fix: run the geometry of {k} shots in that "
                         f"folder's run first (docs/geometry.md, \"Replication\"), or leave {k} out of --shots")
            sets[(name, k)] = read_set(*files, set_name=name, variant=a.variant, shots=k)
    findings = summarise(compute_findings(sets, model=a.model, variant=a.variant))
    with atomic_path(a.out, suffix=".tmp.csv") as tmp:
        findings.to_csv(tmp, index=False, float_format="%.6g")
    cols = ["finding", "shots", "set", "value", "lo", "hi", "holds", "category", "verdict", "values"]
    print(findings[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
