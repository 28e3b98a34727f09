"""Parameters, statuses and the column lists of the geometry tables (a contract with the join)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import NamedTuple

from ..errors import LlmscapeError

STATUS_OK = "ok"
RESOLVED = "resolved"  # the ``resolution`` column: every subject and letter class at least resolution_size()
#: classes below resolution: "below_subjects", "below_letters" or "below_both"
RESOLUTION_FACTOR = 2  # from the resolution study on the embedded model (docs/geometry.md)


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
    def from_config(cls, cfg: dict | None) -> "GeometryParams":
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



#: metrics that get an interval: columns ``{metric}_lo`` and ``{metric}_hi`` of the layer table
INTERVAL_METRICS = ("id_2nn", "id_gride", "log_density_mean", "n_clusters", "core_fraction", "ari_subjects",
                    "ari_letters", "overlap_subjects", "overlap_letters", "overlap_next_layer")


class IntervalMethod(NamedTuple):
    """How one metric's interval is made from its subsample values (llmscape.geometry.resample).

    transform: the scale the interval is made on, then mapped back: "none", "logit" (a share in [0, 1]),
    "fisher" (atanh of an ARI); an interval made there never leaves the metric's range. deflation: the
    scaled spread of the subsamples over-states the spread of a neighbour statistic (a subsample re-draws
    the neighbourhoods of the points it keeps); the interval's half-width is divided by this factor,
    measured by the coverage study (bench/coverage.py) at CALIBRATED_FRACTION. integer: a count, whose
    ends are rounded outwards. bounds: the metric's range; the ends are clipped to it."""

    transform: str = "none"
    deflation: float = 1.0
    integer: bool = False
    bounds: tuple = (-math.inf, math.inf)


#: the subsample share at which the deflation factors were measured; another boot_fraction gets none
#: (a wider, conservative interval) and a warning
CALIBRATED_FRACTION = 0.8
_ARI = (-0.5, 1.0)
_SHARE = (0.0, 1.0)
#: the interval method of every metric with an interval, from the coverage study (docs/geometry.md)
INTERVAL_METHODS = {
    "id_2nn": IntervalMethod(deflation=1.5, bounds=(0.0, math.inf)),
    "id_gride": IntervalMethod(deflation=1.2, bounds=(0.0, math.inf)),
    "log_density_mean": IntervalMethod(deflation=1.15),
    "n_clusters": IntervalMethod(deflation=1.6, integer=True, bounds=(1.0, math.inf)),
    "core_fraction": IntervalMethod(deflation=1.5, bounds=_SHARE),
    # ARIs on their own scale: on the atanh scale, near 1, one draw at 1 stretched the interval to 3x ideal
    "ari_subjects": IntervalMethod(deflation=1.35, bounds=_ARI),
    "ari_letters": IntervalMethod(deflation=1.6, bounds=_ARI),
    "overlap_subjects": IntervalMethod(transform="logit", bounds=_SHARE),
    "overlap_letters": IntervalMethod(transform="logit", deflation=1.5, bounds=_SHARE),
    "overlap_next_layer": IntervalMethod(transform="logit", bounds=_SHARE),
    "overlap": IntervalMethod(transform="logit", bounds=_SHARE),  # the pair overlaps (k-shot vs 0-shot, ...)
}


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

TABLE_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "status", "n_questions", "n_points",
                 "n_duplicates", "n_dropped_nonfinite", "maxk", "id_2nn", "id_gride", "id_gride_err", "id_scale_n1",
                 "density_k",
                 "log_density_mean", "z", "n_clusters", "n_adp_repaired", "core_fraction", "ari_subjects", "ari_letters",
                 "label_fraction", "overlap_subjects", "overlap_letters", "overlap_k", "overlap_next_layer",
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
