"""Representation geometry per layer: intrinsic dimension, density peaks, ARIs and overlaps.

Definitions follow Doimo et al., "The representation landscape of few-shot learning and fine-tuning
in large language models" (NeurIPS 2024; docs/geometry.md): per layer, on the deduplicated last-token
vectors,

* intrinsic dimension by 2NN and by Gride at the scales (n1, 2 n1) = (1, 2), (2, 4), ...; the headline
  ID is the (16, 32) scale (``id_scale`` = 16), matching the density k = 16;
* kNN log density with k = 16 at the headline ID, Advanced Density Peaks (ADP) clustering with Z = 1.6
  and the halo off; the core-point fraction is the share ADP with the halo on would keep;
* adjusted Rand index of the ADP assignment against subjects and against answer letters;
* class-balanced label neighbourhood overlap (class fraction 0.3) for subjects and letters;
* data (neighbourhood) overlap with k = 30 between the same questions in two representations.

The k-nearest-neighbour graph of a layer is computed once (:func:`compute_neighbour_graph`: blocked,
symmetric; numpy with our own threads on CPU, torch on CUDA when present) and reused by everything
above; DADApy gets it as precomputed distances. DADApy's convention for
``Data(distances=(dist, ind), maxk=maxk)``: both arrays have maxk + 1 columns, column 0 is the point
itself at distance 0, the rest sorted by distance; ADP walks all ``maxk`` columns, so ``maxk``
changes the clustering and is passed explicitly.

The package, one job a module:

``params``    GeometryParams, statuses, the column lists of the output tables
``graph``     the neighbour-graph engine (blocked products, selection, float64 refinement, thread pools)
``metrics``   DADApy metrics, ARIs and overlaps on one layer's graph
``files``     reading extractions, writing and reading the saved neighbour lists
``resample``  the subsamples of the intervals, their graphs read from the layer's, the interval formula
``resolution`` the resolution rule and the resolution study
``pipeline``  every layer of one extraction (graphs pipelined with metrics), overlaps between extractions
``plots``     the per-variant figures and the resolution study's figure
``paired``    paired differences (same questions, same subsamples) and the paired accuracy test

Output tables (column names are a contract with the join stage; keep them stable)
--------------------------------------------------------------------------------
``{shots}shot.parquet``: one row per (model, variant, shots, layer)

    model, variant, shots, layer (int, index into ``hidden``), layer_name,
    status          "ok", or why the metrics are NaN: "non_finite", "constant", "too_few_points", "failed"
    n_questions, n_points, n_duplicates   rows in the extraction, distinct vectors analysed, identical rows
    n_dropped_nonfinite   rows with NaN or inf, left out (a layer with more than max_nonfinite_fraction is
                    non_finite instead)
    {metric}        every metric of the layer (params.METRICS whose source is "graph" or "next_layer"; the
                    table at the end names each with its range), next to the settings it was computed with:
    maxk            neighbours given to DADApy (min(config maxk, n_points - 1))
    id_scale_n1     n1 of the headline Gride scale (16)
    density_k, z, label_fraction, overlap_k   the density's k, ADP's merging parameter, the label
                    overlap's class fraction and the data overlap's k
    n_adp_repaired  ADP assignments (the layer's and its subsamples') that failed the check of
                    geometry.adp and were recomputed with DADApy's pure-Python ADP (0 normally)
    seconds_graph, seconds_metrics, seconds_boot, device
    subject_size_min, subject_size_median, letter_size_min, letter_size_median   classes of the points analysed
    resolution_size   2 x max(density_k, 2 id_scale): the smallest class the scales resolve
    resolution      "resolved", or "below_subjects", "below_letters", "below_both" (numbers kept, marked)
    n_boot, boot_fraction, confidence   subsamples used for the intervals (0: none), their share of every
                    subject, the coverage
    {metric}_lo, {metric}_hi   interval of every metric with one (INTERVAL_METRICS; NaN without subsamples)

``{shots}shot_boot.parquet``: one row per (layer, subsample): model, variant, shots, layer, draw,
    n_points and the value of every metric of INTERVAL_METRICS in that subsample

``{shots}shot_gride.parquet``: long table, one row per (layer, scale):
    model, variant, shots, layer, n1, n2, id, err

``{shots}shot_overlap.parquet`` (:func:`compute_pair_overlaps`): one row per (layer, comparison):
    model, variant, shots, layer, layer_name, comparison ("shots": against 0-shot of the same variant;
    "variant": against base at the same shots), ref_variant, ref_shots, k, n_points, overlap,
    overlap_lo, overlap_hi, n_boot (the same subsamples as the geometry jobs)

``{shots}shot_knn.npz``: question_id (n,), subject (n,) codes, layer, layer_name, knn (n_layers, n, K)
int32: each question's K nearest neighbours as row indices into question_id (K = overlap_k, or about
twice that with subsamples, so that each subsample's overlap_k nearest members can be read); -1 for rows
dropped as duplicates and for layers without a neighbour graph (non-finite, constant, too few points).
The pair overlaps and their intervals are computed from these files. ``draws_digest`` (a string): sha256
of the question ids each subsample kept, which the paired differences check (``paired``).

Paired differences (:mod:`paired`), per model: ``paired_differences.parquet``, one row per (comparison,
pair, layer, metric): model, variant, shots, comparison ("layer", "shots", "shots_step", "variant"),
ref_variant, ref_shots, layer, layer_name, ref_layer, metric, value, ref_value, diff (value - ref_value),
diff_lo, diff_hi, n_boot, draws_agree (share of draws with the sign of diff), boot_fraction, confidence,
verdict; ``paired_accuracy.csv``: accuracy against the reference on the same questions (exact McNemar,
paired bootstrap interval).

``resolution/{variant}_{shots}shot.parquet`` (:mod:`resolution`): one row per (layer, questions per
subject, subsample), columns ``resolution.STUDY_COLUMNS``.

A new metric is one entry of ``params.METRICS`` (and the code that computes it): its lists, the
layer table's columns, its interval's range and the join's geometry columns follow from there.
"""

from .files import read_knn, read_labels, write_knn
from .graph import blas_single_thread, compute_neighbour_graph, return_unique_rows
from .metrics import (
    LayerGraph,
    LayerResult,
    compute_layer_geometry,
    compute_layer_graph,
    compute_layer_metrics,
    return_ari,
    return_class_sizes,
    return_core_fraction,
    return_data_overlap,
    return_label_overlap_k,
    return_resolution,
)
from .params import (
    BOOT_COLUMNS,
    GRIDE_COLUMNS,
    INTERVAL_METRICS,
    METRICS,
    OVERLAP_COLUMNS,
    POINT_METRICS,
    RESOLUTION_FACTOR,
    RESOLVED,
    STATUS_OK,
    TABLE_COLUMNS,
    GeometryError,
    GeometryParams,
    Metric,
    describe_metrics,
)
from .pipeline import ExtractionGeometry, compute_geometry, compute_pair_overlaps
from .resample import draw_members, return_interval, return_member_knn, return_subgraph

if __doc__:  # the metric table, from its one declaration (None under python -OO)
    __doc__ += describe_metrics()

__all__ = [
    "BOOT_COLUMNS", "GRIDE_COLUMNS", "INTERVAL_METRICS", "METRICS", "OVERLAP_COLUMNS", "POINT_METRICS",
    "RESOLUTION_FACTOR", "RESOLVED", "STATUS_OK", "TABLE_COLUMNS", "ExtractionGeometry", "GeometryError",
    "GeometryParams", "LayerGraph", "LayerResult", "Metric", "blas_single_thread", "compute_geometry",
    "compute_layer_geometry", "compute_layer_graph", "compute_layer_metrics", "compute_neighbour_graph",
    "compute_pair_overlaps", "draw_members", "read_knn", "read_labels", "return_ari", "return_class_sizes",
    "return_core_fraction", "return_data_overlap", "return_interval", "return_label_overlap_k",
    "return_member_knn", "return_resolution", "return_subgraph", "return_unique_rows", "write_knn",
]
