"""Metrics on a layer's neighbour graph: DADApy's intrinsic dimension, density and ADP clusters, ARIs
and neighbourhood overlaps."""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from typing import NamedTuple

import numpy as np

from .adp import checked_adp
from .graph import compute_neighbour_graph, cpu_threads, return_unique_rows, worker_pool
from .params import (
    GRAPH,
    INTERVAL_METRICS,
    POINT_METRICS,
    RESOLUTION_FACTOR,
    RESOLVED,
    STATUS_OK,
    GeometryParams,
    metric_names,
)
from .resample import boot_graph_k, keep_freed_memory, return_metric_interval, return_subgraph

log = logging.getLogger("llmscape.geometry")


def return_data_overlap(knn_a: np.ndarray, knn_b: np.ndarray, k: int | None = None) -> tuple[float, int]:
    """Mean fraction of shared k nearest neighbours of the same point in two representations.

    knn_a, knn_b: (N, >= k) neighbour lists in the same (original) index space, the point itself
    excluded, -1 marking rows without neighbours (dropped duplicates). Returns (overlap, rows used).
    """
    k = int(k or min(knn_a.shape[1], knn_b.shape[1]))
    if knn_a.shape[0] != knn_b.shape[0]:
        raise ValueError("the two neighbour lists have different numbers of rows")
    a, b = knn_a[:, :k], knn_b[:, :k]
    valid = (a >= 0).all(axis=1) & (b >= 0).all(axis=1)
    if not valid.any():
        return math.nan, 0
    both = np.sort(np.concatenate([a[valid], b[valid]], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)  # each list has distinct entries
    return float(np.mean(shared / k)), int(valid.sum())


def return_ari(labels_true: np.ndarray, labels_pred: np.ndarray) -> float:
    """Adjusted Rand index of two labelings (Hubert and Arabie 1985), in exact integer pair counts.

    With the pair counts tp (same class, same cluster), fp, fn, tn, ARI = 2 (tp tn - fn fp) /
    ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)), and 1 when no pair disagrees. The counts are Python
    integers and the formula is scikit-learn's, so the value equals ``adjusted_rand_score`` exactly
    (tested); this skips its input validation, a third of the metrics' time on 1,140-point layers.
    """
    _, a = np.unique(np.asarray(labels_true), return_inverse=True)
    _, b = np.unique(np.asarray(labels_pred), return_inverse=True)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings of shapes {a.shape} and {b.shape}; need two 1-d arrays of one length")
    n, nb = a.size, int(b.max(initial=-1)) + 1
    cont = np.bincount(a * nb + b, minlength=(int(a.max(initial=-1)) + 1) * nb).reshape(-1, nb).astype(np.int64)
    n_c, n_k = cont.sum(axis=1), cont.sum(axis=0)
    sum_sq = int((cont * cont).sum())
    tp = sum_sq - n
    fp = int((cont @ n_k).sum()) - sum_sq
    fn = int((cont.T @ n_c).sum()) - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def return_label_overlap_k(labels: np.ndarray, fraction: float) -> int:
    """Largest per-class neighbourhood max(1, int(fraction * n_class)) the label overlap needs."""
    _, counts = np.unique(labels, return_counts=True)
    return int(max(1, int(counts.max() * fraction)))


def return_core_fraction(data, z: float) -> float:
    """Share of points that ADP with ``halo=True`` keeps in a cluster, from the ``halo=False`` call
    just made on ``data`` (no second clustering). DADApy's halo rule: a point of cluster j is halo when
    its shifted log density Rho_c is below the highest saddle density of j, max_i Rho_bord[j, i]. DADApy
    shifts Rho_c = log_den - m + 1 (m = min(log_den - Z err)) and stores log_den_bord = Rho_bord + m - 1;
    the same two operations are applied to Rho_c here, so a point sitting exactly at its saddle (the
    saddle point itself) compares equal, as inside DADApy, and is not halo."""
    log_den_min = np.min(data.log_den - z * data.log_den_err)
    rho_c = data.log_den - log_den_min + 1
    level = np.asarray(data.log_den_bord).max(axis=1)
    labels = np.asarray(data.cluster_assignment)
    return float(np.mean(~(rho_c + log_den_min - 1 < level[labels])))


def _nan_row() -> dict:
    return dict.fromkeys(POINT_METRICS, math.nan)


class LayerResult(NamedTuple):
    """What one layer gives: ``row`` (the layer table's columns), ``gride`` (its Gride profile, rows of
    n1, n2, id, err), ``knn`` (each question's nearest neighbours, (n, K) row indices of X, -1 for
    dropped duplicates and degenerate layers; the first overlap_k are the layer's own lists, the rest
    serve the subsamples) and ``boot`` (one dict of metric values per subsample)."""

    row: dict
    gride: list
    knn: np.ndarray
    boot: list


def return_class_sizes(labels: np.ndarray) -> tuple[int, float]:
    """(smallest, median) class size of a labelling."""
    _, counts = np.unique(labels, return_counts=True)
    return int(counts.min()), float(np.median(counts))


def return_resolution(subject_min: int, letter_min: int, params: GeometryParams) -> str:
    """``resolved`` when every subject and every letter class has at least params.resolution_size()
    points, else which of them falls short (``below_subjects``, ``below_letters``, ``below_both``)."""
    need = params.resolution_size()
    below = [name for name, size in (("subjects", subject_min), ("letters", letter_min)) if size < need]
    if not below:
        return RESOLVED
    return "below_both" if len(below) == 2 else f"below_{below[0]}"


def resolution_advice(row: dict, params: GeometryParams) -> str:
    """The fix for a layer below resolution, in words."""
    need = params.resolution_size()
    return (f"smallest subject {row['subject_size_min']} and smallest letter class {row['letter_size_min']} "
            f"points, below the {need} that density_k={params.density_k} and the Gride scale "
            f"({params.id_scale}, {2 * params.id_scale}) resolve, so ARI, clusters and ID describe the sample "
            f"size, not the representation. Fix: more questions per subject (data.per_subject >= {need}, "
            f"fewer subjects if time is short), or smaller geometry.density_k and geometry.id_scale "
            f"(the rule: {RESOLUTION_FACTOR} x max(density_k, 2 id_scale) points per class)")


def compute_layer_geometry(X: np.ndarray, subjects: np.ndarray, letters: np.ndarray, params: GeometryParams,
                           *, name: str = "layer", draws: list[np.ndarray] | None = None) -> LayerResult:
    """All metrics of one layer. X (n, d); subjects, letters: integer codes (n,); draws: subsamples
    as sorted row indices of X (:func:`resample.draw_members`), None for none.

    Returns a :class:`LayerResult`. Degenerate layers give NaN metrics, a status and a logged warning
    naming the layer; a layer below resolution keeps its numbers, is marked and warned about.
    """
    result = compute_layer_metrics(compute_layer_graph(X, subjects, letters, params, name=name, draws=draws),
                                   params)
    if result.row["resolution"] != RESOLVED:
        log.warning("%s is below resolution: %s", name, resolution_advice(result.row, params))
    return result


@dataclass
class LayerGraph:
    """One layer between :func:`compute_layer_graph` and :func:`compute_layer_metrics`.

    name: the layer in messages. row: the layer table's columns so far. knn: each question's saved
    neighbour lists ((n, K) question rows, -1 for none). draws: the subsamples (sorted question rows).
    The rest is None (graph) or empty when the layer is degenerate (``row["status"]`` says why):
    graph: (dist, ind) over the distinct points, DADApy layout, graph_k columns after the point itself;
    maxk: DADApy's maxk; X, subjects, letters: the distinct points and their labels; keep: their
    question rows; inverse: each question row's distinct point (-1 for a row left out)."""

    name: str
    row: dict
    knn: np.ndarray
    draws: list = field(default_factory=list)
    graph: tuple | None = None
    maxk: int = 0
    graph_k: int = 0
    X: np.ndarray | None = None
    subjects: np.ndarray | None = None
    letters: np.ndarray | None = None
    keep: np.ndarray | None = None
    inverse: np.ndarray | None = None


def compute_layer_graph(X: np.ndarray, subjects: np.ndarray, letters: np.ndarray, params: GeometryParams,
                        *, name: str = "layer", draws: list[np.ndarray] | None = None,
                        complete: bool = False) -> LayerGraph:
    """First half of :func:`compute_layer_geometry`: checks, deduplication and the neighbour graph (the
    heavy, GIL-free part). Returns the :class:`LayerGraph` :func:`compute_layer_metrics` finishes.
    ``complete``: every other point in each neighbour list, so that any subsample's graph can be read
    from it."""
    n, p = X.shape[0], params
    draws = list(draws or [])
    save_k = p.overlap_k if not draws else max(p.overlap_k, boot_graph_k(p.overlap_k, p.boot_fraction, n))
    layer = LayerGraph(name, _first_row(n, subjects, letters, p), np.full((n, save_k), -1, dtype=np.int32), draws)
    finite = _finite_rows(X, layer, p)
    if finite is None:
        return layer
    X = np.asarray(X, dtype=np.float32 if X.dtype != np.float64 else np.float64)
    if not _distinct_points(X, finite, layer, p):
        return layer
    keep = layer.keep
    # every row kept (keep is sorted and unique, so all n of them in order): no copy of the layer
    layer.X = X if keep.shape[0] == n else X[keep]
    layer.subjects, layer.letters = subjects[keep], letters[keep]
    if keep.shape[0] < n:  # the classes of the points analysed (no duplicate, no non-finite row)
        layer.row.update(_class_columns(layer.subjects, layer.letters, p))
    layer.maxk, layer.graph_k = _graph_columns(layer, p, complete)
    layer.row["maxk"] = int(layer.maxk)
    t0 = time.perf_counter()
    dist, ind = compute_neighbour_graph(layer.X, layer.graph_k, device=p.device, precision=p.precision,
                                        block_rows=p.block_rows, refine_tol=p.refine_tol)
    layer.row["seconds_graph"] = time.perf_counter() - t0
    ok_knn = min(save_k, layer.graph_k)
    layer.knn[keep, :ok_knn] = keep[ind[:, 1:ok_knn + 1]].astype(np.int32)
    layer.graph = (dist, ind)
    return layer


def _class_columns(subjects: np.ndarray, letters: np.ndarray, p: GeometryParams) -> dict:
    """The layer table's class-size and resolution columns for these labels."""
    (s_min, s_med), (l_min, l_med) = return_class_sizes(subjects), return_class_sizes(letters)
    return dict(subject_size_min=s_min, subject_size_median=s_med, letter_size_min=l_min, letter_size_median=l_med,
                resolution=return_resolution(s_min, l_min, p))


def _first_row(n: int, subjects: np.ndarray, letters: np.ndarray, p: GeometryParams) -> dict:
    """The layer's row before any metric: the settings, NaN metrics, the classes of all n questions."""
    return dict(n_questions=n, n_points=0, n_duplicates=0, status=STATUS_OK, maxk=0,
                id_scale_n1=p.id_scale, density_k=p.density_k, z=p.z, label_fraction=p.label_fraction,
                overlap_k=p.overlap_k, seconds_graph=0.0, seconds_metrics=0.0, seconds_boot=0.0, **_nan_row(),
                **_class_columns(subjects, letters, p), resolution_size=p.resolution_size(), n_boot=0,
                boot_fraction=p.boot_fraction, n_dropped_nonfinite=0, n_adp_repaired=0, confidence=p.confidence)


def _finite_rows(X: np.ndarray, layer: LayerGraph, p: GeometryParams) -> np.ndarray | None:
    """The question rows without NaN or inf; None (status non_finite) when more than
    max_nonfinite_fraction of them hold some."""
    n, name = X.shape[0], layer.name
    finite = np.isfinite(X).all(axis=1)
    bad = int(n - finite.sum())
    layer.row["n_dropped_nonfinite"] = bad
    if bad and bad > p.max_nonfinite_fraction * n:
        log.warning("%s: %d of %d vectors hold NaN or inf, more than geometry.max_nonfinite_fraction = %g; "
                    "metrics set to NaN. Fix: look at the extraction (a corrupt file or an unstable model)",
                    name, bad, n, p.max_nonfinite_fraction)
        layer.row["status"] = "non_finite"
        return None
    if bad:
        log.warning("%s: dropped %d of %d vectors holding NaN or inf (rows %s); the others are analysed",
                    name, bad, n, np.flatnonzero(~finite)[:10].tolist())
    return np.flatnonzero(finite)


def _distinct_points(X: np.ndarray, rows: np.ndarray, layer: LayerGraph, p: GeometryParams) -> bool:
    """Deduplicate the analysed question ``rows`` (a non-finite row is left out like a duplicate):
    sets layer.keep and layer.inverse; False (status constant or too_few_points) when too few points
    are distinct for the neighbour scales."""
    n, name, row = X.shape[0], layer.name, layer.row
    keep_f, inverse_f = return_unique_rows(X[rows], return_inverse=True)
    layer.keep = rows[keep_f]
    layer.inverse = np.full(n, -1, dtype=np.int64)
    layer.inverse[rows] = inverse_f
    m = layer.keep.shape[0]
    row.update(n_points=int(m), n_duplicates=int(rows.size - m))
    if m < rows.size:
        log.info("%s: dropped %d identical vectors, %d distinct left", name, rows.size - m, m)
    if m == 1:
        log.warning("%s: all %d vectors are identical; metrics set to NaN", name, n)
        row["status"] = "constant"
        return False
    if m < p.min_points():
        log.warning("%s: only %d distinct vectors, fewer than the %d the neighbour scales need "
                    "(id_scale=%d, density_k=%d); metrics set to NaN", name, m, p.min_points(),
                    p.id_scale, p.density_k)
        row["status"] = "too_few_points"
        return False
    return True


def _graph_columns(layer: LayerGraph, p: GeometryParams, complete: bool) -> tuple[int, int]:
    """(maxk, graph_k): DADApy's neighbours and the graph's columns, enough for the label overlaps and
    for reading every subsample's graph and neighbour lists from this one (all with ``complete``)."""
    m = layer.keep.shape[0]
    maxk = min(p.maxk, m - 1)
    k_label = max(return_label_overlap_k(layer.subjects, p.label_fraction),
                  return_label_overlap_k(layer.letters, p.label_fraction))
    graph_k = min(m - 1, max(maxk, p.overlap_k, k_label))
    if layer.draws:
        k_draw = max(min(p.maxk, min(d.size for d in layer.draws) - 1), p.overlap_k, k_label)
        graph_k = max(graph_k, boot_graph_k(k_draw, p.boot_fraction, m))
    if complete:
        graph_k = m - 1
    return maxk, graph_k


def return_gride_profile(distances: np.ndarray, range_max: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gride's intrinsic dimension at the scales (n1, 2 n1), n1 = 1, 2, 4, ... up to 2 n1 <= range_max,
    from a DADApy-layout neighbour graph's distances (point itself in column 0): (ids, errors, n2s), the
    numbers of DADApy's ``return_id_scaling_gride(range_max, return_ranks=True)`` to about 1e-7 (tested),
    all scales solved together (:func:`return_gride_mle`) instead of one bisection per scale."""
    max_rank = min(distances.shape[0], range_max, distances.shape[1] - 1)
    ranks = 2 ** np.arange(int(math.log(max_rank, 2)) + 1)
    mus = distances[:, ranks[1:]] / distances[:, ranks[:-1]]
    ids, errs = return_gride_mle(mus, ranks[:-1])
    return ids, errs, ranks[1:]


def return_gride_mle(mus: np.ndarray, n1s) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood intrinsic dimension of Gride (Denti et al. 2022) for each column of ``mus``
    (n points x scales: the ratios r_2n1 / r_n1 of each point's neighbour distances, column j at scale
    n1s[j]), and its error from the Fisher information: (ids, errors).

    With n2 = 2 n1, a ratio mu has density d (mu^d - 1)^(n2 - n1 - 1) / (B(n2 - n1, n1) mu^(d (n2 - 1) + 1)),
    so the derivative of the log-likelihood in d is (N - 1) / d - sum [(n2 - 1) - (n2 - n1 - 1) /
    (1 - mu^-d)] log mu, increasing the other way round in d: its one root is found by Newton steps kept
    inside a bisection bracket. DADApy's choices are kept so that the two agree: its data filter
    (ratios of exactly 1 nudged up, ratios above 20 (q95 - q50) + q50 dropped), its N - 1, its floor of
    2e-7 on 1 - mu^-d, its search range [0.001, 1000] and its error formula on the unfiltered ratios."""
    mus = np.array(np.asarray(mus, dtype=np.float64).T, order="C")  # one row per scale
    mus[mus == 1] += 10 * np.finfo(np.float64).eps
    q95, q50 = np.percentile(mus, [95, 50], axis=1)
    keep = mus < (20 * (q95 - q50) + q50)[:, None]
    log_mu = np.where(keep, np.log(mus), 0.0)  # dropped ratios add nothing
    n1 = np.asarray(n1s, dtype=np.float64)[:, None]
    ids = _gride_root(log_mu, n1, keep.sum(axis=1) - 1.0)
    n2 = 2 * n1
    tail = mus ** -ids[:, None]  # DADApy's Fisher information, as it computes it
    one_m = np.maximum(1.0 - tail, 5 * np.finfo(np.float64).eps)
    info = mus.shape[1] / ids**2 + ((n2 - n1 - 1) * (np.log(mus) / one_m) ** 2 * tail).sum(axis=1)
    return ids, 1.0 / np.sqrt(info)


def _gride_root(log_mu: np.ndarray, n1: np.ndarray, n_minus_1: np.ndarray) -> np.ndarray:
    """The root in d of each row's negative log-likelihood derivative (:func:`return_gride_mle`), to
    1e-12 relative: Newton steps, a bisection step where Newton would leave the bracket. Each row's
    steps depend on that row alone, so a scale solved alone gives the same bits as in the profile."""
    lo, hi = np.full(len(log_mu), 1e-3), np.full(len(log_mu), 1e3)
    total = log_mu.sum(axis=1)
    d = np.clip(np.divide(n_minus_1, total, out=np.ones_like(total), where=total > 0), lo, hi)
    active = np.ones(len(d), dtype=bool)
    a, b = n1 - 1.0, 2.0 * n1 - 1.0  # n2 - n1 - 1 and n2 - 1
    for _ in range(200):
        rows = np.flatnonzero(active)
        lm, dr, m1 = log_mu[rows], d[rows], n_minus_1[rows]
        t = np.exp(-dr[:, None] * lm)  # mu^-d
        free = 1.0 - t >= 2e-7
        one_m = np.where(free, 1.0 - t, 2e-7)
        f = ((b[rows] - a[rows] / one_m) * lm).sum(axis=1) - m1 / dr
        slope = np.where(free, a[rows] * t * (lm / one_m) ** 2, 0.0).sum(axis=1) + m1 / dr**2
        hi[rows] = np.where(f > 0, d[rows], hi[rows])
        lo[rows] = np.where(f > 0, lo[rows], d[rows])
        new = d[rows] - f / slope
        out = ~((new >= lo[rows]) & (new <= hi[rows]))  # (also NaN)
        new[out] = 0.5 * (lo[rows] + hi[rows])[out]
        done = np.abs(new - d[rows]) <= 1e-12 * np.maximum(1.0, d[rows])
        d[rows] = new
        active[rows[done]] = False
        if not active.any():
            break
    return d


_DADAPY_QUIET = False


def _quiet_dadapy() -> None:
    """Silence DADApy's UserWarnings about precomputed distances, once for the process: a
    warnings.catch_warnings block per call is not thread-safe, and the subsamples run in threads."""
    global _DADAPY_QUIET
    if not _DADAPY_QUIET:
        warnings.filterwarnings("ignore", category=UserWarning, module=r"dadapy(\.|$)")
        _DADAPY_QUIET = True


def _graph_metrics(dist: np.ndarray, ind: np.ndarray, maxk: int, graph_k: int, subjects: np.ndarray,
                   letters: np.ndarray, p: GeometryParams, profile: bool = True) -> tuple[dict, list[dict]]:
    """Every DADApy metric on one neighbour graph (DADApy layout, graph_k >= maxk columns after the
    point itself): (values of POINT_METRICS, Gride profile up to id_range_max, by
    :func:`return_gride_profile`: DADApy's numbers to about 1e-7 at a quarter of its cost).
    ``profile=False`` (subsamples) fits the headline Gride scale alone: the same number as in the
    profile (tested), at a fifth of the cost."""
    from dadapy import Data

    out = {}
    gride: list[dict] = []
    n1 = p.id_scale
    if 2 * n1 > maxk:
        raise ValueError(f"the headline scale ({n1}, {2 * n1}) is outside the Gride range "
                         f"(id_range_max={p.id_range_max}, maxk={maxk})")
    _quiet_dadapy()
    data = Data(distances=(np.ascontiguousarray(dist[:, :maxk + 1]),
                           np.ascontiguousarray(ind[:, :maxk + 1])), maxk=maxk, verbose=False)
    out["id_2nn"] = float(data.compute_id_2NN()[0])
    if profile:
        ids, errs, n2s = return_gride_profile(data.distances, min(p.id_range_max, maxk))  # DADApy's, vectorised
        gride = [dict(n1=int(b // 2), n2=int(b), id=float(i), err=float(e))
                 for i, e, b in zip(ids, errs, n2s, strict=True)]
        head = [(g["id"], g["err"]) for g in gride if g["n1"] == n1]
        if not head:
            raise ValueError(f"the headline scale ({n1}, {2 * n1}) is outside the Gride range "
                             f"(id_range_max={p.id_range_max}, maxk={maxk})")
        out["id_gride"], out["id_gride_err"] = head[0]
    else:  # the headline scale alone: the same bits as in the profile (tested)
        ids, errs = return_gride_mle((data.distances[:, 2 * n1] / data.distances[:, n1])[:, None], [n1])
        out["id_gride"], out["id_gride_err"] = float(ids[0]), float(errs[0])
    data.set_id(out["id_gride"])
    log_den, _ = data.compute_density_kNN(k=p.density_k)
    out["log_density_mean"] = float(np.mean(log_den))
    assignment, out["n_adp_repaired"] = checked_adp(data, p.z)  # checked; a faulty one recomputed
    out["n_clusters"] = int(data.N_clusters)
    out["ari_subjects"] = return_ari(subjects, assignment)
    out["ari_letters"] = return_ari(letters, assignment)
    out["core_fraction"] = return_core_fraction(data, p.z)
    full = data if graph_k == maxk else Data(distances=(dist, ind), maxk=graph_k, verbose=False)
    out["overlap_subjects"] = float(full.return_label_overlap(subjects, class_fraction=p.label_fraction))
    out["overlap_letters"] = float(full.return_label_overlap(letters, class_fraction=p.label_fraction))
    return out, gride


def _draw_metrics(layer: LayerGraph, members: np.ndarray, p: GeometryParams) -> dict:
    """POINT_METRICS of one subsample (distinct-row positions ``members``), from the layer's graph."""
    dist, ind = layer.graph
    m = members.size
    if m < p.min_points():
        return _nan_row()
    sub, let = layer.subjects[members], layer.letters[members]
    maxk = min(p.maxk, m - 1)
    k = min(m - 1, max(maxk, p.overlap_k, return_label_overlap_k(sub, p.label_fraction),
                       return_label_overlap_k(let, p.label_fraction)))
    gd, gi = return_subgraph(layer.X, dist, ind, members, k)
    values, _ = _graph_metrics(gd, gi, maxk, k, sub, let, p, profile=False)
    return values


def draw_points(layer: LayerGraph, rows: np.ndarray) -> np.ndarray:
    """The distinct points (positions into the layer's deduplicated points) of a subsample of question
    rows: each row's own vector, duplicates counted once, as a fresh computation on X[rows] would
    keep them."""
    u = np.unique(layer.inverse[rows])
    return u[u >= 0]  # rows left out (non-finite) have no point


def _one_draw(layer: LayerGraph, p: GeometryParams, j: int) -> tuple[str, dict]:
    """(why it failed or "", the boot row) of subsample j of ``layer``."""
    members = draw_points(layer, layer.draws[j])
    try:
        values, err = _draw_metrics(layer, members, p), ""
    except Exception as e:  # one bad subsample costs one draw, never the layer
        values, err = _nan_row(), f"{type(e).__name__}: {e}"
    return err, dict(draw=j, n_points=int(members.size), n_adp_repaired=values.get("n_adp_repaired", 0),
                     **{k: values[k] for k in INTERVAL_METRICS if k in values})


def fill_intervals(row: dict, boot: list[dict], params: GeometryParams, metrics) -> None:
    """Set ``{metric}_lo`` / ``{metric}_hi`` of ``row`` from the subsamples' values, each metric by its
    own method (params.INTERVAL_METHODS, resample.return_metric_interval), within the metric's range."""
    used = 0
    for metric in metrics:
        lo, hi, k = return_metric_interval(metric, row.get(metric, math.nan),
                                           [b.get(metric, math.nan) for b in boot], params.boot_fraction,
                                           params.confidence)
        row[f"{metric}_lo"], row[f"{metric}_hi"] = lo, hi
        used = max(used, k)
    row["n_boot"] = max(int(row.get("n_boot") or 0), used)


def compute_layer_metrics(layer: LayerGraph, params: GeometryParams) -> LayerResult:
    """Second half of :func:`compute_layer_geometry`: every DADApy metric on the layer's graph, then on
    each subsample's graph read from it (intervals of every metric but overlap_next_layer, which
    needs the next layer: see pipeline.py)."""
    row, knn, name, p = layer.row, layer.knn, layer.name, params
    gride: list[dict] = []
    boot: list[dict] = []
    for metric in INTERVAL_METRICS:
        row.setdefault(f"{metric}_lo", math.nan)
        row.setdefault(f"{metric}_hi", math.nan)
    if layer.graph is None:
        return LayerResult(row, gride, knn, boot)
    t1 = time.perf_counter()
    try:
        values, gride = _graph_metrics(*layer.graph, layer.maxk, layer.graph_k, layer.subjects, layer.letters, p)
        row.update(values)
    except Exception as e:  # a failure in one layer must not lose the other layers
        log.warning("%s: geometry failed (%s: %s); metrics set to NaN", name, type(e).__name__, e,
                    exc_info=True)
        row.update(_nan_row())
        row["status"] = "failed"
    row["seconds_metrics"] = time.perf_counter() - t1
    if layer.draws and row["status"] == STATUS_OK:
        boot = _subsample_metrics(layer, p)
    return LayerResult(row, gride, knn, boot)


def _subsample_metrics(layer: LayerGraph, p: GeometryParams) -> list[dict]:
    """The boot rows of every subsample of ``layer`` (metrics on graphs read from the layer's), and
    the intervals of the graph's metrics from them in layer.row."""
    row = layer.row
    t2 = time.perf_counter()
    keep_freed_memory()
    # draws are independent: the gathers release the GIL, DADApy mostly holds it (1.4x on 2 threads)
    done = list(worker_pool(cpu_threads(), "boot").map(partial(_one_draw, layer, p), range(len(layer.draws))))
    boot = [b for _, b in done]
    row["n_adp_repaired"] += sum(b.pop("n_adp_repaired") for b in boot)  # the subsamples' ADP repairs too
    errors = [e for e, _ in done if e]
    if errors:
        log.warning("%s: %d of %d subsamples failed (the first: %s); the intervals use the others", layer.name,
                    len(errors), len(layer.draws), errors[0])
    fill_intervals(row, boot, p, metric_names(GRAPH, interval=True))  # NEXT_LAYER ones: pipeline.py
    row["seconds_boot"] = time.perf_counter() - t2
    return boot
