"""Uncertainty of the geometry metrics: subsamples within subjects, read from the full neighbour graph.

Why subsamples, not the classical bootstrap
-------------------------------------------
Every metric here is built on nearest neighbours. A bootstrap draw (with replacement) repeats
questions, and a repeated point is its own nearest neighbour at distance 0: the 2NN and Gride ratios
become infinite and the kNN density diverges. So a draw here keeps ``boot_fraction`` (f) of the
questions of every subject, without replacement (``draw_members``), and recomputes every metric on it.

From the draws to an interval (``return_metric_interval``; the method of each metric is in
``params.INTERVAL_METHODS``). The delete-d jackknife (Shao and Wu 1989, Ann. Statist. 17: 1176-1197):
a draw keeps r = f n of n points and deletes d = n - r; for a smooth statistic the variance of the
full-sample estimate is (r / d) times the variance of the draws, so the draws' sd is scaled by
c = sqrt(f / (1 - f)) (2 for f = 0.8). The interval is

    theta +- t_(n_boot - 1) x c / deflation x spread(draws)     on the metric's own scale, or on
    the logit scale (the label overlaps), then mapped back,

centred on the full-sample value theta, with Student's t for the draws' own noise; the spread is the
draws' sd, or for the label overlap of subjects their interquartile range / 1.349 (near 0.99 a few
draws far out on the logit scale inflated the sd); counts (ADP clusters) get their ends rounded
outwards to integers (rounding each end to its nearest integer was tried: it covered less for the
same width), and every end is clipped to the metric's range.

Why a deflation: the metrics are neighbour statistics. A subsample does not only leave points out, it
also gives the points it keeps new neighbourhoods (their neighbours that were left out are replaced by
farther ones), so the draws vary more than a smooth statistic's would, and the scaled spread
over-states the sampling spread of the full-sample value. The coverage study (bench/coverage.py,
docs/geometry.md) chose the method of each metric at f = 0.8 on one set of replicates and checked it
on another (about 1.2 for Gride and the density, 1.5-2 for 2NN, ADP, the ARIs and the letter
statistics, 0.9 - a slight widening - for the data overlaps). At another boot_fraction the factor is
not applied (the plain jackknife interval). Why the logit scale for the label overlaps: a share near
0 or 1 has a skewed, bounded sampling distribution; an interval made symmetric on the logit scale is
asymmetric on the metric's and never leaves (0, 1) (Efron and Tibshirani 1993, An Introduction to the
Bootstrap, ch. 12-14, on intervals made on a transformed scale); the data overlaps, away from the
bounds here, covered better on their own scale. The ARI stays on its own scale: on the atanh scale
one draw at ARI 1 stretched the interval near separation to 3.3x the ideal width (study). The sd of
the draws, unlike their quantiles, does not collapse onto the estimate when many draws tie at a bound.

Centring on the full-sample value, not on the draws, matters here: the draws have fewer points per
subject, and several metrics move with the sample size (the Gride ID at a fixed neighbour rank, the
ARI near the resolution limit, the log density), so the draws are shifted; only their spread is used.
``return_interval`` (the earlier scaled-quantile interval) is kept for callers that want it.

Reusing the graph
-----------------
The k nearest neighbours of a point within a subsample are the first k members of the subsample
in its neighbour list over the whole sample. ``return_subgraph`` reads them from the full graph,
which the layer computes with enough columns (``boot_graph_k``) that a row rarely lacks them; a row
that does is recomputed exactly against the members. The result is the subsample's own graph, as a
new distance computation would give it (tested), at the cost of a gather instead of a product.
"""

from __future__ import annotations

import ctypes
import math
import sys

import numpy as np

_HEAP_KEPT = False


def keep_freed_memory() -> None:
    """Ask glibc to serve the subsamples' temporary arrays (10-20 MB each, several per draw) from its
    heap and to keep freed memory, instead of mapping fresh pages for each and unmapping them after:
    the page faults were 40% of the time of :func:`return_subgraph` (bench/). Once per process; a
    no-op elsewhere than glibc Linux. Peak memory is unchanged, the process just holds it until exit."""
    global _HEAP_KEPT
    if _HEAP_KEPT or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD: blocks below 256 MB from the heap
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: return freed heap to the OS above 1 GB only
    except (OSError, AttributeError):
        pass
    _HEAP_KEPT = True


def draw_members(strata: np.ndarray, n_draws: int, fraction: float, seed: int) -> list[np.ndarray]:
    """Sorted row indices of ``n_draws`` subsamples: round(fraction x n_s) rows of every stratum s
    (at least 1), without replacement. Draw j depends only on (strata, fraction, seed, j): two
    extractions of the same questions get the same draws."""
    strata = np.asarray(strata)
    groups = [np.flatnonzero(strata == s) for s in np.unique(strata)]
    out = []
    for j in range(int(n_draws)):
        rng = np.random.default_rng([int(seed), j])
        take = [rng.choice(g, size=max(1, int(round(fraction * g.size))), replace=False) for g in groups]
        out.append(np.sort(np.concatenate(take)))
    return out


def boot_graph_k(k_sub: int, fraction: float, n: int) -> int:
    """Columns of the full graph from which the k_sub nearest members of a subsample that keeps
    ``fraction`` of the points can be read for nearly every row.

    The members among a row's first K neighbours are about Binomial(K, f); K is the smallest value
    whose mean stands 6 standard deviations above k_sub (a row lacks them with probability ~1e-9;
    such rows are recomputed, so K changes the cost, never the result)."""
    f = float(fraction)
    # K f - 6 sqrt(K f (1 - f)) >= k_sub, a quadratic in sqrt(K)
    b = 6 * math.sqrt(f * (1 - f))
    root = (b + math.sqrt(b * b + 4 * f * k_sub)) / (2 * f)
    return int(min(n - 1, math.ceil(root * root) + 1))


def return_subgraph(X: np.ndarray, dist: np.ndarray, ind: np.ndarray, members: np.ndarray,
                    k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k-nearest-neighbour graph of X[members] (DADApy layout, indices into ``members``), read from
    the graph (dist, ind) of all of X.

    members: sorted, distinct row indices of X; (dist, ind): column 0 each point itself, as
    :func:`graph.compute_neighbour_graph` gives them. Rows whose neighbour list over X holds fewer than k
    members are recomputed exactly (float64) against the members. Raises if k >= len(members).

    One pass over the members' lists, a few hundred rows at a time (:func:`_read_rows`): 1.9x less CPU
    than locating each row's first k members among all members' entries (14 -> 7.5 ms a subsample at
    1,600 points, 83 -> 43 ms at 9,181), same result."""
    members = np.asarray(members, dtype=np.int64)
    m, n = members.size, X.shape[0]
    if not 1 <= k <= m - 1:
        raise ValueError(f"k={k} neighbours need at least k + 1 members, have {m}")
    pos = np.full(n, -1, dtype=np.int32)
    pos[members] = np.arange(m, dtype=np.int32)
    sub_i = np.empty((m, k + 1), dtype=np.int64)
    sub_d = np.empty((m, k + 1), dtype=np.float64)
    ok = np.empty(m, dtype=bool)
    step = max(1, _GATHER_ENTRIES // ind.shape[1])  # rows at a time: their lists stay in cache
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        ok[r0:r1] = _read_rows(dist, ind, pos, members[r0:r1], k, sub_d[r0:r1], sub_i[r0:r1])
    sub_i[:, 0], sub_d[:, 0] = np.arange(m), 0.0
    short = np.flatnonzero(~ok)
    if short.size:
        Xm = np.asarray(X[members], dtype=np.float64)
        for row in short:
            d2 = np.square(Xm - Xm[row]).sum(axis=1)
            d2[row] = -1.0  # the point itself first
            order = np.argsort(d2, kind="stable")[:k + 1]
            sub_i[row], sub_d[row] = order, np.sqrt(np.maximum(d2[order], 0.0))
            sub_d[row, 0] = 0.0
    return sub_d, sub_i


_GATHER_ENTRIES = 1 << 18  # list entries return_subgraph reads at a time (a few MB of work arrays)


def _read_rows(dist: np.ndarray, ind: np.ndarray, pos: np.ndarray, rows: np.ndarray, k: int, out_d: np.ndarray,
               out_i: np.ndarray) -> np.ndarray:
    """For the members ``rows`` (row indices of the full graph), their k nearest members into out_d /
    out_i (positions in members, from ``pos``); returns which rows had them (the others are left to the
    caller). One pass: each entry's rank among its row's members (a running count; column 0 is the
    point itself, a member), and the entries of rank <= k + 1 gathered in row order."""
    nb = np.take(pos, ind[rows])  # -1 for non-members
    hit = nb >= 0
    rank = np.cumsum(hit, axis=1, dtype=np.int16 if ind.shape[1] < 2 ** 15 else np.int32)
    ok = rank[:, -1] > k  # the point and at least k other members
    keep = rank <= k + 1
    keep &= hit  # in each row, the point and its first k members: k + 1 entries
    whole = bool(ok.all())
    sel = slice(None) if whole else np.flatnonzero(ok)
    flat = np.flatnonzero(keep if whole else keep[sel])
    if flat.size:
        out_i[sel] = np.take(nb if whole else nb[sel], flat).reshape(-1, k + 1)
        out_d[sel] = np.take(dist[rows if whole else rows[sel]], flat).reshape(-1, k + 1)
    return ok


def return_member_knn(knn: np.ndarray, members: np.ndarray, k: int) -> np.ndarray:
    """Neighbour lists of the members within the subsample: (len(members), k), in the index space of
    ``knn`` (rows of the extraction), from lists over the whole sample ((n, K), -1 for none). A row
    with fewer than k members in its list (or none at all) is all -1 and drops out of an overlap."""
    members = np.asarray(members, dtype=np.int64)
    inside = np.zeros(knn.shape[0] + 1, dtype=bool)  # the extra slot is -1's
    inside[members] = True
    lst = knn[members]
    hit = inside[lst]
    count = hit.sum(axis=1)
    out = np.full((members.size, k), -1, dtype=knn.dtype)
    rows = np.flatnonzero(count >= k)
    if rows.size:
        keep = hit[rows] & (np.cumsum(hit[rows], axis=1) <= k)
        out[rows] = lst[rows][keep].reshape(rows.size, k)
    return out


def return_interval(theta: float, draws, fraction: float, confidence: float) -> tuple[float, float, int]:
    """(lo, hi, draws used): the scaled-quantile form of the delete-d jackknife for the full-sample value
    ``theta``: theta + c (q - median of the draws) at the (1 -+ confidence) / 2 quantiles, c = sqrt(f /
    (1 - f)), no deflation, no transform (non-finite draws skipped; NaN bounds when theta is not finite or
    fewer than two draws are). The layer tables use :func:`return_metric_interval` instead; the coverage
    study found this form 1.2-1.9x too wide for neighbour statistics and collapsing onto the estimate
    where many draws tie."""
    v = np.asarray(draws, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or not math.isfinite(theta):
        return math.nan, math.nan, int(v.size)
    c = math.sqrt(fraction / (1.0 - fraction))
    a = (1.0 - confidence) / 2.0
    q_lo, q_mid, q_hi = np.quantile(v, [a, 0.5, 1.0 - a])
    return float(theta + c * (q_lo - q_mid)), float(theta + c * (q_hi - q_mid)), int(v.size)


# --- the interval of each metric (its method: params.INTERVAL_METHODS, chosen by bench/coverage.py) ------

_EDGE = 1e-3  # a share or an ARI at its limit is moved this far inside before the logit / atanh


def _to_scale(x, transform: str):
    """The metric on the scale its interval is made on."""
    x = np.asarray(x, dtype=np.float64)
    if transform == "logit":
        x = np.clip(x, _EDGE, 1 - _EDGE)
        return np.log(x / (1 - x))
    if transform == "fisher":
        return np.arctanh(np.clip(x, -1 + _EDGE, 1 - _EDGE))
    return x


def _from_scale(z: float, transform: str) -> float:
    if transform == "logit":
        return float(1 / (1 + math.exp(-z)))
    if transform == "fisher":
        return float(math.tanh(z))
    return float(z)


def scale_factor(metric: str, fraction: float, method=None) -> float:
    """From the spread of subsamples of ``fraction`` to that of the full-sample estimate: the
    delete-d jackknife's sqrt(f / (1 - f)), divided by the metric's measured deflation where the
    fraction is the one the deflation was measured at (else the plain, wider factor). ``method``: an
    :class:`params.IntervalMethod` in place of the metric's own (the coverage study tries others)."""
    from .params import CALIBRATED_FRACTION, INTERVAL_METHODS, IntervalMethod

    c = math.sqrt(fraction / (1.0 - fraction))
    method = method or INTERVAL_METHODS.get(metric, IntervalMethod())
    return c / method.deflation if abs(fraction - CALIBRATED_FRACTION) < 1e-9 else c


#: the interquartile range of a normal distribution in standard deviations (2 x 0.6745)
_IQR_PER_SD = 1.3489795003921634


def _spread(z: np.ndarray, how: str) -> float:
    """The draws' spread on the interval's scale: their standard deviation ("sd"), or their
    interquartile range over that of a normal distribution ("iqr"; robust to a few far draws)."""
    if how == "iqr":
        q1, q3 = np.quantile(z, [0.25, 0.75])
        return float(q3 - q1) / _IQR_PER_SD
    return float(np.std(z, ddof=1))


def _integer_ends(lo: float, hi: float, theta: float, rounding: str) -> tuple[float, float]:
    """A count's ends as integers: "outward" (the smallest integer interval around [lo, hi]) or
    "nearest" (each end to its nearest integer, never past the estimate)."""
    if rounding == "nearest":
        return min(math.floor(lo + 0.5), math.floor(theta)), max(math.ceil(hi - 0.5), math.ceil(theta))
    return math.floor(lo + 1e-9), math.ceil(hi - 1e-9)


def return_metric_interval(metric: str, theta: float, draws, fraction: float,
                           confidence: float, method=None) -> tuple[float, float, int]:
    """(lo, hi, draws used): the interval of ``metric``'s full-sample value ``theta`` from the values of
    the subsamples, by the metric's method (module docstring; ``method``: another
    :class:`params.IntervalMethod`, for the coverage study): on the transformed scale,
    theta +- t_(n-1) x scale_factor x spread(draws), mapped back, counts rounded to integers, clipped to
    the metric's range. NaN ends when theta is not finite or fewer than two draws are."""
    from scipy import stats

    from .params import INTERVAL_METHODS, IntervalMethod

    method = method or INTERVAL_METHODS.get(metric, IntervalMethod())
    v = np.asarray(draws, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or not math.isfinite(theta):
        return math.nan, math.nan, int(v.size)
    z = _to_scale(v, method.transform)
    t = stats.t.ppf((1 + confidence) / 2, v.size - 1)
    half = t * scale_factor(metric, fraction, method) * _spread(z, method.spread)
    centre = float(_to_scale(theta, method.transform))
    lo, hi = _from_scale(centre - half, method.transform), _from_scale(centre + half, method.transform)
    if method.transform != "none":  # theta moved inside the open range: keep it inside its own interval
        lo, hi = min(lo, theta), max(hi, theta)
    if method.integer:
        lo, hi = _integer_ends(lo, hi, theta, method.rounding)
    bottom, top = method.bounds
    return float(min(max(lo, bottom), top)), float(min(max(hi, bottom), top)), int(v.size)


def describe_interval_method(metric: str, method=None) -> str:
    """The method of ``metric``'s interval (or of ``method``) in words (for the study's JSON and the docs)."""
    from .params import CALIBRATED_FRACTION, INTERVAL_METHODS, IntervalMethod

    m = method or INTERVAL_METHODS.get(metric, IntervalMethod())
    scale = {"none": "", "logit": "on the logit scale, ", "fisher": "on the atanh (Fisher) scale, "}[m.transform]
    spread = "sd(draws)" if m.spread == "sd" else "IQR(draws) / 1.349"
    text = (f"{scale}estimate +- t x sqrt(f/(1-f)) x {spread}"
            + (f" / {m.deflation:g} (at f = {CALIBRATED_FRACTION:g})" if m.deflation != 1 else ""))
    return text + (f", ends rounded {'outwards' if m.rounding == 'outward' else 'to the nearest'} integer"
                   + ("s" if m.rounding == "outward" else "") if m.integer else "")
