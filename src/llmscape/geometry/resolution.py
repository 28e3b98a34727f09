"""Resolution: how many points per subject the density-peak recipe needs, and the study that says so.

The rule
--------
ADP finds a class as a density peak only when the class fills the neighbourhoods the recipe looks
at: the k = ``density_k`` neighbours of the density estimate and the n2 = 2 ``id_scale`` neighbours of
the headline Gride scale; call the larger s = max(density_k, n2). With fewer points, a point's
neighbourhood reaches into other subjects, the subject's peak merges with its neighbours, and the
numbers describe the sample size instead of the representation. A layer is ``resolved`` when its
smallest subject and its smallest answer-letter class each hold at least

    RESOLUTION_FACTOR x s = 2 x max(density_k, 2 id_scale) points   (= 64 for the paper's k = 16, scale (16, 32)).

The criterion and the evidence
------------------------------
A value at n points per class is at its large-sample value when the subject ARI is within 0.1 of it
(a difference: the ARI is bounded) and the Gride ID within 10% of it (a ratio): ``TOLERANCE``; a size
resolves a metric when a sample of that size meets this with probability at least ``PROBABILITY``
(0.9). ``bench/resolution_study.py`` measures it (docs/geometry.md, "Resolution", has the tables):

* synthetic classes of known size (16 Gaussian classes, four separations, k = 16 with the scale
  (16, 32) and k = 8 with (8, 16), 40 independent samples each): in units of s the two scales agree.
  Below s almost nothing is resolved, however separated: at 0.5 s the ARI of classes whose large-sample
  ARI is 1 is 0.16-0.18 of it. Above s the size needed grows as the classes come closer: 1-1.25 s for
  the most separated, 1.75 s for the next (large-sample ARI 0.997), 3-4 s for classes that touch
  (0.96), more than 4 s for overlapping ones (0.55);
* the embedded model (SmolLM2-135M-Instruct, 5 shots, 16 subjects x 100 questions, 30 subsamples
  within subjects per size): in layers 20-30, where the whole extraction separates the subjects (ARI
  0.99), the group's ARI at 2 s = 64 questions per subject is 0.95 of the whole's (5-95% of the draws
  0.93-0.97) and within 0.1 of it in 30 draws of 30 (95% Wilson interval 0.89-1); at 1.75 s in 23 of
  30, at 1.5 s in 2. The earlier layers' ARI (0.23 and 0.49) still rises at 100 questions: it depends
  on the subset size.

So the factor 2 is the smallest on the studied grid that resolves the subjects the model separates and
synthetic classes as separated; it is a floor, not a guarantee: weaker structure needs more points, and
the rule cannot tell how much (the study of each run, below, can). The Gride ID at a fixed neighbour
rank does not meet the criterion at the rule's size: on Gaussian classes it rises with n at every size
(0.73-0.78 of its 6 s value at 2 s, within 10% only from 4 s, the same at both scales), between 0.75
and 1 s it measures the spacing between classes instead (0.14-0.16 of its value for separated
classes), and in the model's layers 20-30 it is 0.82 of the whole's at 2 s. Compare IDs only between
extractions of the same questions. Below the rule a layer keeps its numbers and is marked; the figures
draw it with open markers.

The study of one extraction
---------------------------
``compute_resolution_study`` takes one extraction and computes the geometry of every layer at
several numbers of questions per subject (``sizes``, each ``draws`` times, plus the whole
extraction), reading each subsample's neighbour graph from the layer's complete graph where it fits
in memory (``return_subgraph``), else computing it afresh. The table has one row per (layer, size,
draw); ``summarise_study`` averages it per layer group (the first, middle and last third of the
layers by depth) for the figure and the report, with the range over the draws and the share of draws
within the criterion's tolerance of the whole extraction.
"""

from __future__ import annotations

import logging
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from .files import read_labels, read_layer
from .metrics import (
    POINT_METRICS,
    _draw_metrics,
    compute_layer_graph,
    compute_layer_metrics,
    draw_points,
    return_class_sizes,
    return_resolution,
)
from .params import GeometryError, GeometryParams

log = logging.getLogger("llmscape.geometry")

STUDY_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "group", "per_subject", "whole", "draw",
                 "n_points", "subject_size_min", "resolution_size", "resolution", *POINT_METRICS]
SUMMARY_METRICS = ("ari_subjects", "n_clusters", "id_gride", "ari_letters", "overlap_subjects")
GROUPS = ("early", "middle", "late")
#: The rule's criterion: at n points per class a value is at its large-sample value when within this of it,
#: the subject ARI within 0.1 (a difference on the ARI's own bounded scale), the Gride ID within 10% (a
#: ratio); a size resolves a metric when that holds with probability at least PROBABILITY
TOLERANCE = {"ari_subjects": ("difference", 0.1), "id_gride": ("ratio", 0.1)}
PROBABILITY = 0.9
#: complete graphs (every other point a neighbour) up to this many float64 + int64 values are kept
COMPLETE_GRAPH_VALUES = 40_000_000


def layer_group(layer: int, n_layers: int) -> str:
    """early / middle / late: the first, middle and last third of the layers 0..n_layers - 1 by depth."""
    depth = layer / max(1, n_layers - 1)
    return GROUPS[min(2, int(depth * 3))]


def stratified_sample(strata: np.ndarray, size: int, seed: list[int]) -> np.ndarray:
    """Sorted row indices: ``size`` rows of every stratum, without replacement."""
    rng = np.random.default_rng(seed)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    return np.sort(np.concatenate([rng.choice(g, size=size, replace=False) for g in groups]))


def check_sizes(sizes, smallest: int, where: str = "the extraction") -> None:
    """Every study size must fit the smallest subject; the error names the key and the fix."""
    big = [int(s) for s in sizes if int(s) > smallest]
    if big:
        raise GeometryError(f"geometry.resolution_study.sizes asks for {big} questions per subject, but the smallest "
                            f"subject of {where} has {smallest}. Fix: sizes of at most {smallest}, or more "
                            "questions per subject (data.per_subject)")


def compute_resolution_study(h5_path: str | Path, params: GeometryParams, sizes, draws: int, *, seed: int = 0,
                             model: str = "", variant: str = "", shots: int | None = None,
                             layers: list[int] | None = None):
    """The study of the module docstring on one extraction: a DataFrame with STUDY_COLUMNS."""
    import h5py
    import pandas as pd

    meta = read_labels(h5_path, model=model, variant=variant, shots=shots)  # the path's names, checked
    n_layers, n = meta["shape"][0], meta["shape"][1]
    sub, let = meta["subject"], meta["answer"]
    smallest, _ = return_class_sizes(sub)
    check_sizes(sizes, smallest, where=str(h5_path))
    shots = int(meta["attrs"].get("shots", -1)) if shots is None else int(shots)
    p = replace(params, n_boot=0)
    plan = [(int(size), d, stratified_sample(sub, int(size), [seed, int(size), d]))
            for size in sorted(set(int(s) for s in sizes)) for d in range(int(draws))]
    layers = list(range(n_layers)) if layers is None else list(layers)
    complete = n * n <= COMPLETE_GRAPH_VALUES
    log.info("resolution study of %s: %d layers, sizes %s per subject x %d draws + the whole extraction "
             "(%d questions, smallest subject %d); subsample graphs %s", h5_path, len(layers),
             sorted(set(int(s) for s in sizes)), draws, n, smallest,
             "read from each layer's complete graph" if complete else "computed afresh (large layers)")
    rows = []
    with h5py.File(h5_path, "r") as f:
        for layer in layers:
            X = read_layer(f["hidden"], layer, h5_path)
            X = X.astype(np.float32) if X.dtype == np.float16 else X
            name = f"layer {layer} ({meta['layer_name'][layer]})"
            key = dict(model=model, variant=variant, shots=shots, layer=int(layer),
                       layer_name=meta["layer_name"][layer], group=layer_group(layer, n_layers))
            state = compute_layer_graph(X, sub, let, p, name=name, complete=complete)
            whole = compute_layer_metrics(state, p).row
            rows.append(dict(**key, per_subject=smallest, whole=True, draw=0, n_points=whole["n_points"],
                             subject_size_min=whole["subject_size_min"], resolution_size=p.resolution_size(),
                             resolution=whole["resolution"], **{m: whole[m] for m in POINT_METRICS}))
            for size, d, members in plan:
                values, n_points, s_min, l_min = _study_point(X, state, members, sub, let, p, complete, name)
                rows.append(dict(**key, per_subject=size, whole=False, draw=d, n_points=n_points,
                                 subject_size_min=s_min, resolution_size=p.resolution_size(),
                                 resolution=return_resolution(s_min, l_min, p), **values))
            log.info("%s: subject ARI (first draw) by questions per subject: %s", name,
                     ", ".join(f"{r['per_subject']}{' (all)' if r['whole'] else ''}: {r['ari_subjects']:.2f}"
                               for r in rows[-len(plan) - 1:] if r["draw"] == 0))
    return pd.DataFrame(rows, columns=STUDY_COLUMNS)


def _study_point(X, state, rows, sub, let, p, complete, name) -> tuple[dict, int, int, int]:
    """Metrics of the subsample of question ``rows``, its number of distinct points and its smallest
    subject and letter class (distinct points): read from the layer's complete graph, else computed on
    X[rows] afresh (the same points: duplicates once, see metrics.draw_points)."""
    if complete and state.graph is not None:
        u = draw_points(state, rows)
        s_min, l_min = return_class_sizes(state.subjects[u])[0], return_class_sizes(state.letters[u])[0]
        try:
            return _draw_metrics(state, u, p), int(u.size), s_min, l_min
        except Exception as e:  # one failed subsample is NaN, like a failed layer
            log.warning("%s: subsample of %d points failed (%s: %s)", name, u.size, type(e).__name__, e)
            return dict.fromkeys(POINT_METRICS, math.nan), int(u.size), s_min, l_min
    # degenerate layers (NaN again) and layers too large for a complete graph: the plain path, without
    # its per-layer resolution warning (the study reports resolution in its table)
    row = compute_layer_metrics(compute_layer_graph(X[rows], sub[rows], let[rows], p, name=f"{name}, subsample"),
                                p).row
    return ({m: row[m] for m in POINT_METRICS}, int(row["n_points"]) or int(rows.size), row["subject_size_min"],
            row["letter_size_min"])


def within_tolerance(metric: str, values, reference) -> np.ndarray:
    """Whether each value is within the criterion's TOLERANCE of ``reference`` (its large-sample value):
    the ARI's difference at most 0.1, an ID's ratio within 10% of 1. NaN values are not within."""
    kind, tol = TOLERANCE[metric]
    v, ref = np.asarray(values, dtype=float), np.asarray(reference, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        gap = np.abs(v - ref) if kind == "difference" else np.abs(v / ref - 1.0)
    return np.nan_to_num(gap, nan=np.inf) <= tol


def summarise_study(study):
    """Per (group, per_subject, whole): the mean over layers and draws of SUMMARY_METRICS; the smallest
    and largest per-draw group mean (``{metric}_min``, ``{metric}_max``: the range over the draws, not an
    interval); and for the criterion's metrics ``{metric}_within``, the share of draws whose group mean
    is within TOLERANCE of the whole extraction's (NaN on the whole extraction's row). Layers without
    usable geometry are left out."""
    import pandas as pd

    d = study[np.isfinite(study["ari_subjects"])]
    per_draw = d.groupby(["group", "per_subject", "whole", "draw"])[list(SUMMARY_METRICS)].mean()
    out = per_draw.groupby(level=["group", "per_subject", "whole"]).agg(["mean", "min", "max"])
    out.columns = [m if s == "mean" else f"{m}_{s}" for m, s in out.columns]
    out = out.reset_index()
    per_draw = per_draw.reset_index()
    whole = per_draw[per_draw["whole"]].set_index("group")
    sub = per_draw[~per_draw["whole"]].copy()
    for metric in TOLERANCE:
        sub[metric] = within_tolerance(metric, sub[metric], sub["group"].map(whole[metric]))
    share = sub.groupby(["group", "per_subject", "whole"])[list(TOLERANCE)].mean().add_suffix("_within")
    out = out.merge(share.reset_index(), on=["group", "per_subject", "whole"], how="left")
    out["group"] = pd.Categorical(out["group"], GROUPS, ordered=True)
    out = out.sort_values(["group", "whole", "per_subject"]).reset_index(drop=True)
    out["group"] = out["group"].astype(str)
    out["layers"] = out["group"].map(d.groupby("group")["layer"].nunique())
    return out
