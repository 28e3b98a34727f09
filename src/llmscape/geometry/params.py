"""Parameters, statuses and the column lists of the geometry tables (a contract with the join)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

from ..errors import LlmscapeError

STATUS_OK = "ok"
RESOLVED = "resolved"  # the ``resolution`` column: every subject and letter class at least resolution_size()
#: classes below resolution: "below_subjects", "below_letters" or "below_both"
RESOLUTION_FACTOR = 2  # x max(density_k, 2 id_scale), from bench/resolution_study.py (docs/geometry.md)


class GeometryError(LlmscapeError, RuntimeError):
    """The whole input is unusable (missing datasets, misaligned pairs, no usable layer)."""


@dataclass
class GeometryParams:
    maxk: int = 1000  # neighbours for ID / density / ADP (the paper: 1000)
    id_range_max: int = 100  # Gride scales up to this neighbour rank (the paper: 100 -> 6 scales)
    id_scale: int = 16  # n1 of the headline Gride scale (16, 32)
    density_k: int = 16
    z: float = 1.6
    label_fraction: float = 0.3
    overlap_k: int = 30
    device: str = "auto"
    precision: str = "float32"
    block_rows: int = 2048  # smaller blocks: more of the symmetric products skipped (bench/)
    refine_tol: float = 1e-4
    # uncertainty: n_boot subsamples of boot_fraction of every subject (0: no intervals), see resample.py
    n_boot: int = 100
    boot_fraction: float = 0.8
    confidence: float = 0.95
    seed: int = 0
    max_nonfinite_fraction: float = 0.01  # a layer with more NaN/inf rows is marked non_finite, fewer are dropped

    @classmethod
    def from_config(cls, cfg: dict | None) -> GeometryParams:
        cfg = dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown geometry parameters: {sorted(unknown)}")
        return cls(**cfg)

    def __post_init__(self):
        if self.n_boot < 0:
            raise ValueError(f"geometry.n_boot={self.n_boot}: the number of subsamples cannot be negative. "
                             "Fix: 0 (no intervals) or more, 100 or so for 95% intervals.")
        if not 0 < self.boot_fraction < 1:
            raise ValueError(f"geometry.boot_fraction={self.boot_fraction}: the share of each subject a "
                             "subsample keeps must lie in (0, 1). Fix: 0.8 keeps four fifths.")
        if not 0 < self.confidence < 1:
            raise ValueError(f"geometry.confidence={self.confidence} must lie in (0, 1). Fix: 0.95 for 95% "
                             "intervals.")

    def min_points(self) -> int:
        """Fewest distinct points a layer needs: the headline Gride scale and the density k must fit."""
        return max(2 * self.id_scale, self.density_k, 2) + 1

    def resolution_size(self) -> int:
        """Smallest class (subject, letter) that ADP and the headline Gride scale can resolve as a
        density peak: RESOLUTION_FACTOR x max(density_k, n2 = 2 id_scale), 64 with the paper's k = 16 and
        scale (16, 32). See :mod:`llmscape.geometry.resolution` for where the factor comes from."""
        return RESOLUTION_FACTOR * max(self.density_k, 2 * self.id_scale)


class IntervalMethod(NamedTuple):
    """How one metric's interval is made from its subsample values (llmscape.geometry.resample).

    transform: the scale the interval is made on, then mapped back: "none", "logit" (a share in [0, 1]),
    "fisher" (atanh of an ARI); an interval made there never leaves the metric's range. deflation: the
    scaled spread of the subsamples over-states the spread of a neighbour statistic (a subsample re-draws
    the neighbourhoods of the points it keeps); the interval's half-width is divided by this factor
    (below 1: widened), chosen by the coverage study (bench/coverage.py) at CALIBRATED_FRACTION on some
    replicates and checked on others. integer: a count, whose
    ends are rounded to integers, ``rounding`` "outward" (the smallest integer interval around the
    continuous one) or "nearest" (each end to its nearest integer, never past the estimate). bounds: the
    metric's range; the ends are clipped to it. spread: the draws' spread on the interval's scale, "sd"
    (standard deviation) or "iqr" (interquartile range / 1.349, robust to a few far draws)."""

    transform: str = "none"
    deflation: float = 1.0
    integer: bool = False
    bounds: tuple = (-math.inf, math.inf)
    rounding: str = "outward"
    spread: str = "sd"


#: where a metric is computed, and so which table holds it
GRAPH = "graph"  # on a layer's neighbour graph, and on each subsample's graph read from it
NEXT_LAYER = "next_layer"  # from the neighbour lists of a layer and of the next one, once every layer is done
PAIR = "pair"  # from the saved neighbour lists of two extractions (the pair-overlap table)


@dataclass(frozen=True)
class Metric:
    """One geometry metric, declared once: the lists of metrics, the layer table's columns, the ranges
    the intervals are clipped to and the join's geometry columns are all read from :data:`METRICS`.

    name: its column. source: GRAPH, NEXT_LAYER or PAIR (above). bounds: its range (an interval's
    ends are clipped to it). integer: a count (an interval's ends are integers). interval: it
    gets ``{name}_lo`` and ``{name}_hi`` from the subsamples, made on the ``transform`` scale from the
    draws' ``spread``, with the half-width divided by ``deflation`` and a count's ends rounded by
    ``rounding`` (:class:`IntervalMethod`). before, after: the columns of the
    settings it was computed with (or of its bookkeeping), written next to it in the layer table."""

    name: str
    description: str
    source: str = GRAPH
    bounds: tuple = (-math.inf, math.inf)
    integer: bool = False
    interval: bool = True
    transform: str = "none"
    deflation: float = 1.0
    rounding: str = "outward"
    spread: str = "sd"
    before: tuple = ()
    after: tuple = ()

    def __post_init__(self):
        if self.source not in (GRAPH, NEXT_LAYER, PAIR) or self.transform not in ("none", "logit", "fisher"):
            raise ValueError(f"metric {self.name!r}: source {self.source!r} must be one of {GRAPH!r}, "
                             f"{NEXT_LAYER!r}, {PAIR!r} and transform {self.transform!r} one of 'none', 'logit', "
                             "'fisher'")
        if self.rounding not in ("outward", "nearest") or self.spread not in ("sd", "iqr"):
            raise ValueError(f"metric {self.name!r}: rounding {self.rounding!r} must be 'outward' or 'nearest' and "
                             f"spread {self.spread!r} 'sd' or 'iqr'")

    @property
    def method(self) -> IntervalMethod:
        """The interval method :mod:`resample` applies to this metric."""
        return IntervalMethod(self.transform, self.deflation, self.integer, self.bounds, self.rounding, self.spread)


_ID = (0.0, math.inf)
_ARI = (-0.5, 1.0)
_SHARE = (0.0, 1.0)
#: every geometry metric, in the order of the tables' columns; the interval methods (transform,
#: deflation) come from the coverage study (docs/geometry.md)
METRICS = (
    Metric("id_2nn", "2NN intrinsic dimension (DADApy, linear fit on 90% of the ratios)", bounds=_ID,
           deflation=1.5, before=("maxk",)),
    Metric("id_gride", "Gride intrinsic dimension at the headline scale (id_scale_n1, 2 id_scale_n1)",
           bounds=_ID, deflation=1.2),
    Metric("id_gride_err", "DADApy's error of id_gride", bounds=_ID, interval=False, after=("id_scale_n1",)),
    Metric("log_density_mean", "mean kNN log density (k = density_k) at the headline ID", deflation=1.15,
           before=("density_k",)),
    Metric("n_clusters", "ADP clusters (merging parameter z, halo off)", bounds=(1.0, math.inf), integer=True,
           deflation=2.4, before=("z",), after=("n_adp_repaired",)),
    Metric("core_fraction", "share of points outside the halo (ADP with the halo on)", bounds=_SHARE,
           deflation=1.7),
    # ARIs on their own scale: on the atanh scale, near 1, one draw at 1 stretched the interval to 3x ideal
    Metric("ari_subjects", "ARI of the ADP assignment (halo off) with the subjects", bounds=_ARI, deflation=1.6),
    Metric("ari_letters", "ARI of the ADP assignment (halo off) with the answer letters", bounds=_ARI,
           deflation=1.9),
    # the IQR of the draws: near 0.99 a few draws far out on the logit scale inflated their sd
    Metric("overlap_subjects", "class-balanced label overlap of the subjects (class fraction label_fraction)",
           bounds=_SHARE, transform="logit", deflation=1.1, spread="iqr", before=("label_fraction",)),
    Metric("overlap_letters", "class-balanced label overlap of the answer letters", bounds=_SHARE,
           transform="logit", deflation=1.5),
    # the data overlaps on their own scale, 1 / 0.9 times the jackknife width (the logit interval covered 0.91)
    Metric("overlap_next_layer", "data overlap (k = overlap_k) of layer l with layer l + 1 (NaN for the last)",
           source=NEXT_LAYER, bounds=_SHARE, deflation=0.9, before=("overlap_k",)),
    Metric("overlap", "data overlap (k) of one extraction with a reference, layer by layer", source=PAIR,
           bounds=_SHARE, deflation=0.9),
)


def metric_names(*sources: str, interval: bool | None = None) -> tuple[str, ...]:
    """Names of the metrics computed at ``sources``, in METRICS' order; ``interval``: only those with
    (True) or without (False) an interval, None for all."""
    return tuple(m.name for m in METRICS if m.source in sources and interval in (None, m.interval))


#: the metrics of one neighbour graph (a layer's, a subsample's)
POINT_METRICS = metric_names(GRAPH)
#: metrics of the layer table that get an interval: columns ``{metric}_lo`` and ``{metric}_hi``
INTERVAL_METRICS = metric_names(GRAPH, NEXT_LAYER, interval=True)
def describe_metrics() -> str:
    """The metric table in words (the end of the package docstring): each metric's column, the table
    that holds it, its range, its interval's method, and what it is."""
    import textwrap

    table = {GRAPH: "layer table", NEXT_LAYER: "layer table", PAIR: "overlap table"}
    scale = {"none": "its own", "logit": "the logit", "fisher": "the atanh"}
    lines = ["", "Metrics (params.METRICS)", "------------------------"]
    for m in METRICS:
        lo, hi = m.bounds
        span = ("any value" if (lo, hi) == (-math.inf, math.inf) else f">= {lo:g}" if hi == math.inf
                else f"in [{lo:g}, {hi:g}]")
        how = (f"interval on {scale[m.transform]} scale" + (", from the draws' IQR" if m.spread == "iqr" else "")
               + (f", deflation {m.deflation:g}" if m.deflation != 1 else "")
               + (f", ends rounded {'outwards' if m.rounding == 'outward' else 'to the nearest integer'}"
                  if m.integer else "") if m.interval else "no interval")
        lines += textwrap.wrap(f"``{m.name}`` ({table[m.source]}; {span}{', a count' if m.integer else ''}; {how}): "
                               f"{m.description}", width=104, subsequent_indent="    ")
    return "\n".join(lines) + "\n"


#: the subsample share at which the deflation factors were chosen; another boot_fraction gets none (the
#: plain jackknife interval: wider for most metrics, a tenth narrower for the data overlaps) and a warning
CALIBRATED_FRACTION = 0.8
#: the interval method of every metric with an interval, the pair overlaps' included
INTERVAL_METHODS = {m.name: m.method for m in METRICS if m.interval}


def min_n_boot(confidence: float) -> int:
    """Fewest subsamples whose spread gives an interval at ``confidence``: the interval is the estimate
    +- t x (scaled sd of the draws), with Student's t on n_boot - 1 degrees of freedom for the draws'
    own noise; below this number that t exceeds the normal quantile by more than 10%, so the interval
    would mostly measure how few draws there are (15 at 95%, 12 at 90%, 22 at 99%)."""
    from scipy import stats

    z = stats.norm.ppf((1 + confidence) / 2)
    n = 2
    while stats.t.ppf((1 + confidence) / 2, n - 1) > 1.1 * z:
        n += 1
    return n


def n_boot_problem(n_boot: int, confidence: float) -> str:
    """The error line for an ``n_boot`` between 1 and min_n_boot(confidence) - 1 (too few subsamples for
    intervals at this confidence), "" otherwise (0 turns the intervals off)."""
    need = min_n_boot(confidence)
    if 0 < int(n_boot) < need:
        return (f"  geometry.n_boot = {n_boot}: intervals at geometry.confidence = {confidence} need at least "
                f"{need} subsamples (the interval is t x the scaled sd of the subsamples; with fewer, Student's t "
                f"on n_boot - 1 degrees of freedom is more than 10% above the normal quantile). Fix: "
                f"geometry.n_boot: {need} or more (100 as the shipped configs), or 0 for no intervals.")
    return ""


#: the layer table's metric columns: each metric of the layer (GRAPH, NEXT_LAYER) with its settings
METRIC_COLUMNS = [c for m in METRICS if m.source in (GRAPH, NEXT_LAYER) for c in (*m.before, m.name, *m.after)]
TABLE_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "status", "n_questions", "n_points",
                 "n_duplicates", "n_dropped_nonfinite", *METRIC_COLUMNS,
                 "seconds_graph", "seconds_metrics", "seconds_boot", "device",
                 # resolution: the classes of the points analysed against the neighbourhood scales
                 "subject_size_min", "subject_size_median", "letter_size_min", "letter_size_median",
                 "resolution_size", "resolution",
                 # uncertainty: how the intervals were made, then one (lo, hi) pair per metric
                 "n_boot", "boot_fraction", "confidence",
                 *(f"{m}_{end}" for m in INTERVAL_METRICS for end in ("lo", "hi"))]
GRIDE_COLUMNS = ["model", "variant", "shots", "layer", "n1", "n2", "id", "err"]
BOOT_COLUMNS = ["model", "variant", "shots", "layer", "draw", "n_points", *INTERVAL_METRICS]
OVERLAP_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "comparison", "ref_variant", "ref_shots",
                   "k", "n_points", "overlap", "overlap_lo", "overlap_hi", "n_boot"]
