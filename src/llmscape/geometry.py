"""Representation geometry per layer: intrinsic dimension, density peaks, ARIs and overlaps.

Definitions follow Doimo et al. (NeurIPS 2024, reference notes A.5-A.8): per layer, on the
deduplicated last-token vectors,

* intrinsic dimension by 2NN and by Gride at the scales (n1, 2 n1) = (1, 2), (2, 4), ...; the headline
  ID is the (16, 32) scale (``id_scale`` = 16), matching the density k = 16;
* kNN log density with k = 16 at the headline ID, Advanced Density Peaks (ADP) clustering with Z = 1.6
  and the halo off; the core-point fraction comes from a second ADP run with the halo on;
* adjusted Rand index of the ADP assignment against subjects and against answer letters;
* class-balanced label neighbourhood overlap (class fraction 0.3) for subjects and letters;
* data (neighbourhood) overlap with k = 30 between the same questions in two representations.

The k-nearest-neighbour graph of a layer is computed once (:func:`compute_neighbour_graph`: blocked,
symmetric; numpy with our own threads on CPU, torch on CUDA when present) and reused by everything
above; DADApy gets it as precomputed distances. DADApy's convention for
``Data(distances=(dist, ind), maxk=maxk)``: both arrays have maxk + 1 columns, column 0 is the point
itself at distance 0, the rest sorted by distance; ADP walks all ``maxk`` columns, so ``maxk``
changes the clustering and is passed explicitly.

Output tables (column names are a contract with the join stage; keep them stable)
--------------------------------------------------------------------------------
``{shots}shot.parquet``: one row per (model, variant, shots, layer)

    model, variant, shots, layer (int, index into ``hidden``), layer_name,
    status          "ok", or why the metrics are NaN: "non_finite", "constant", "too_few_points", "failed"
    n_questions     rows in the extraction; n_points: distinct vectors analysed; n_duplicates = the difference
    maxk            neighbours given to DADApy (min(config maxk, n_points - 1))
    id_2nn          2NN intrinsic dimension (DADApy, linear fit on 90% of the ratios)
    id_gride, id_gride_err   Gride ID at the headline scale (id_scale_n1, 2 id_scale_n1)
    id_scale_n1     n1 of the headline scale (16)
    density_k, log_density_mean   kNN density parameters and the mean log density
    z, n_clusters   ADP merging parameter and number of clusters (halo off)
    core_fraction   fraction of points outside the halo (ADP with halo on)
    ari_subjects, ari_letters     ARI of the ADP assignment (halo off) with subject / answer letter
    label_fraction, overlap_subjects, overlap_letters   class-balanced label overlap
    overlap_k, overlap_next_layer data overlap of layer l with layer l + 1 (NaN for the last layer)
    seconds_graph, seconds_metrics, device

``{shots}shot_gride.parquet``: long table, one row per (layer, scale):
    model, variant, shots, layer, n1, n2, id, err

``{shots}shot_overlap.parquet`` (:func:`compute_pair_overlaps`): one row per (layer, comparison):
    model, variant, shots, layer, layer_name, comparison ("shots": against 0-shot of the same variant;
    "variant": against base at the same shots), ref_variant, ref_shots, k, n_points, overlap

``{shots}shot_knn.npz``: question_id (n,), layer_name, knn (n_layers, n, overlap_k) int32: each
question's overlap_k nearest neighbours as row indices into question_id; -1 for rows dropped as
duplicates and for layers without a neighbour graph (non-finite, constant, too few points). The pair overlaps are computed from these files.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

log = logging.getLogger("llmscape.geometry")

STATUS_OK = "ok"


class GeometryError(RuntimeError):
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

    @classmethod
    def from_config(cls, cfg: dict | None) -> "GeometryParams":
        cfg = dict(cfg or {})
        names = {f.name for f in fields(cls)}
        unknown = set(cfg) - names
        if unknown:
            raise ValueError(f"unknown geometry parameters: {sorted(unknown)}")
        return cls(**cfg)

    def min_points(self) -> int:
        """Fewest distinct points a layer needs: the headline Gride scale and the density k must fit."""
        return max(2 * self.id_scale, self.density_k, 2) + 1


# ---------------------------------------------------------------------------------------------
# Neighbour graph


def resolve_device(spec: str = "auto") -> str:
    from .models import pick_device

    return pick_device(spec, key="geometry.device", error=GeometryError)


def return_unique_rows(X: np.ndarray) -> np.ndarray:
    """Sorted row indices of the first occurrence of every distinct row (exact, bitwise equality
    after mapping -0.0 to 0.0). Keeping them in order keeps the labels aligned.

    Same answer as ``np.unique(X, axis=0, return_index=True)``, without its lexicographic sort of
    whole rows (about 5 s at 9,181 x 4,096 in float64; this takes about 0.05 s): rows are grouped by
    Python's hash of their bytes, and rows sharing a hash are compared in full, so a hash collision can
    never merge distinct rows.
    """
    X = np.ascontiguousarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {X.shape}")
    n = X.shape[0]
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    X = X + X.dtype.type(0)  # -0.0 -> 0.0, so equal values compare equal bitwise
    h = np.fromiter((hash(r.tobytes()) for r in X), dtype=np.int64, count=n)
    order = np.argsort(h, kind="stable")  # equal hashes: in original order, first occurrence first
    hs = h[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    sizes = np.diff(np.r_[starts, n])
    keep = list(order[starts])
    for st, size in zip(starts[sizes > 1], sizes[sizes > 1]):  # duplicates (or a collision): compare rows
        group = order[st: st + size]
        reps = [group[0]]
        for i in group[1:]:
            if not any(np.array_equal(X[i].view(np.uint8), X[r].view(np.uint8)) for r in reps):
                reps.append(i)
                keep.append(i)
    return np.sort(np.asarray(keep, dtype=np.int64))


def compute_neighbour_graph(X: np.ndarray, k: int, *, device: str = "auto", precision: str = "float32",
                            block_rows: int = 2048, refine_tol: float = 1e-4,
                            sym_budget_mb: int = 2048, blas: str = "numpy") -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest neighbours of every row of X, DADApy layout.

    Returns (dist, ind), each (N, k + 1): column 0 is the point itself at distance 0, then the k
    nearest other points in increasing distance. dist is float64, ind int64.

    Squared distances come from |x|^2 + |y|^2 - 2 x.y on centred data, in blocks of ``block_rows``
    rows; each (I, J >= I) block of the symmetric matrix is computed once and its transpose reused
    for row block J, halving the matrix products (while the upper triangle fits ``sym_budget_mb``);
    one selection per row strip. On CPU (``blas="numpy"``) everything runs in numpy (see
    :func:`_knn_numpy`); on CUDA, or with ``blas="torch"``, in torch (:func:`_knn_torch`).
    Where a squared distance is below ``refine_tol`` (|x|^2 + |y|^2), the formula has lost its
    relative precision: those pairs (or, when a whole neighbourhood is that tight, the whole row) are
    recomputed in float64 (:func:`_refine`).
    """
    X = np.asarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {X.shape}")
    n = X.shape[0]
    if not 1 <= k <= n - 1:
        raise ValueError(f"k={k} neighbours need at least k + 1 points, have {n}")
    if precision not in ("float32", "float64"):
        raise ValueError(f"precision must be float32 or float64, got {precision!r}")
    if blas not in ("numpy", "torch"):
        raise ValueError(f"blas must be numpy or torch, got {blas!r}")
    dev = resolve_device(device)
    B = max(1, min(int(block_rows), n))
    itemsize = 4 if precision == "float32" else 8
    # each (I, J >= I) block is computed once; its transpose serves row block J later. Keeping the
    # upper triangle costs n^2/2 values: above the budget, fall back to full row strips.
    symmetric = (n * n // 2) * itemsize <= int(sym_budget_mb) << 20
    knn = _knn_numpy if dev == "cpu" and blas == "numpy" else _knn_torch
    run_v, run_i, sq = knn(X, k, dev, precision, B, symmetric)
    run_v[:, 0] = 0.0
    if refine_tol > 0 and precision != "float64":
        _refine(X, run_v, run_i, sq, k, refine_tol)
    dist = np.empty(run_v.shape, dtype=np.float64)
    threads = _cpu_threads() if knn is _knn_numpy else 1
    _in_chunks(_workers(threads), threads, n,
               lambda r0, r1: np.sqrt(run_v[r0:r1], out=dist[r0:r1], dtype=np.float64))
    return dist, run_i


def _strips(n: int, B: int, symmetric: bool, empty, product, keep, put_transpose):
    """Row strips (s, e, d2[s:e, :]) of the n x n squared distances, one at a time.

    empty(rows) allocates a (rows, n) strip; product(s, e, s2, e2, out) fills its block of columns
    s2:e2 in place. When ``symmetric``, each upper block (I, J > I) is computed once, kept as
    keep(block), and written transposed into strip J by put_transpose(out, kept).
    """
    starts = list(range(0, n, B))
    kept: dict[tuple[int, int], object] = {}
    for a, s in enumerate(starts):
        e = min(n, s + B)
        strip = empty(e - s)
        for b, s2 in enumerate(starts):
            e2 = min(n, s2 + B)
            out = strip[:, s2:e2]
            if symmetric and b < a:
                put_transpose(out, kept.pop((b, a)))
                continue
            product(s, e, s2, e2, out)
            if symmetric and b > a:
                kept[(a, b)] = keep(out)
        yield s, e, strip
        del strip


def _knn_numpy(X: np.ndarray, k: int, dev: str, precision: str, B: int, symmetric: bool):
    """CPU neighbour search in numpy alone. Returns (squared distances, indices, |x|^2), unrefined.

    The products go through numpy's BLAS (OpenBLAS in the numpy wheel, the BLAS sklearn and so the
    published path use): torch's MKL runs 1.6x slower on AMD EPYC (measured, bench/). The squared
    norms ride along in the product, [-2x, |x|^2, 1] . [y, 1, |y|^2] = |x - y|^2, one BLAS call per
    block.

    Threads: :func:`_cpu_threads` Python workers split every product and every selection by
    rows, each calling a one-thread BLAS (:func:`blas_single_thread`). OpenBLAS's own threads spin
    after each call and stole the cores from what came next (the top-k, the sort, the DADApy metrics
    of the previous layer running beside): on the embedded model's layers the whole geometry ran
    1.5x faster without them (bench/).
    """
    dt = np.dtype(precision)
    as_int = np.int32 if dt == np.float32 else np.int64
    n, d = X.shape
    k1 = k + 1
    threads = _cpu_threads()
    pool = _workers(threads)
    mean = X.mean(axis=0, dtype=np.float64).astype(dt)
    sq = np.empty(n, dtype=dt)
    L = np.empty((n, d + 2), dtype=dt)
    R = np.empty((n, d + 2), dtype=dt)

    def prepare(r0, r1):  # centred rows, their squared norms (pairwise sums), and the two factors
        Xc = X[r0:r1].astype(dt)
        Xc -= mean
        sq[r0:r1] = np.square(Xc).sum(axis=1)
        np.multiply(Xc, -2.0, out=L[r0:r1, :d])
        L[r0:r1, d], L[r0:r1, d + 1] = sq[r0:r1], 1.0
        R[r0:r1, :d], R[r0:r1, d], R[r0:r1, d + 1] = Xc, 1.0, sq[r0:r1]

    def product(s, e, s2, e2, out):
        Rt = R[s2:e2].T

        def part(r0, r1):
            np.matmul(L[s + r0:s + r1], Rt, out=out[r0:r1])
            # clamp at 0 in the integer view: rounding's negatives and -0.0 (sign bit set, which would
            # order first as an integer) all become +0.0
            bits = out[r0:r1].view(as_int)
            np.maximum(bits, 0, out=bits)

        _in_chunks(pool, threads, e - s, part)

    def put_transpose(out, block):
        _in_chunks(pool, threads, out.shape[0], lambda r0, r1: np.copyto(out[r0:r1], block[:, r0:r1].T))

    run_v = np.empty((n, k1), dtype=dt)
    run_i = np.empty((n, k1), dtype=np.int64)
    # where k1 is most of a row, a full sort of packed (distance, index) keys beats a top-k
    packed = dt == np.float32 and 2 * k1 > n
    with blas_single_thread():
        _in_chunks(pool, threads, n, prepare)
        for s, e, strip in _strips(n, B, symmetric, lambda rows: np.empty((rows, n), dtype=dt), product,
                                   np.copy, put_transpose):
            if packed:
                _select_packed(strip, s, k1, run_v[s:e], run_i[s:e], pool, threads)
            else:
                _select_topk(strip, s, k1, run_v[s:e], run_i[s:e])
    return run_v, run_i, sq


def _cpu_threads() -> int:
    """Workers of the CPU graph: torch's thread count, which the rule sets from its ``threads``."""
    import torch

    return max(1, torch.get_num_threads())


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _workers(threads: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers (started once: a new pool per layer cost 5 ms).
    Several graphs (two in flight in compute_geometry) share it."""
    with _POOLS_LOCK:
        if threads not in _POOLS:
            _POOLS[threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="llmscape-knn")
        return _POOLS[threads]


def _in_chunks(pool, threads: int, rows: int, work) -> None:
    """work(r0, r1) over ``threads`` contiguous row chunks of range(rows), in the pool."""
    step = -(-rows // threads)
    chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    if len(chunks) == 1:
        work(*chunks[0])
    else:
        for f in [pool.submit(work, *c) for c in chunks]:
            f.result()


_BLAS = None


def blas_single_thread():
    """Context: numpy's BLAS runs one thread (threadpoolctl); the caller parallelises instead."""
    global _BLAS
    from threadpoolctl import ThreadpoolController

    if _BLAS is None:
        _BLAS = ThreadpoolController()
    return _BLAS.limit(limits=1, user_api="blas")


def _select_packed(strip: np.ndarray, s: int, k1: int, out_v: np.ndarray, out_i: np.ndarray, pool,
                   threads: int) -> None:
    """The k1 smallest entries of every row of a float32 strip (rows s, s + 1, ... of the n x n squared
    distances, all n columns) in increasing order, the point itself first, ties by column index.

    Each entry becomes one int64 key, (bits of d2 as int32) << b | column, with b bits for a column
    index: for d2 >= 0 the bit patterns order like the values, so sorting the keys sorts the distances
    and carries the indices along, exactly. When k1 is most of the row (the embedded model's layers:
    1,001 of 1,140), one numpy sort of these keys is about 2x cheaper than torch's top-k. Rows are
    split over ``threads`` workers of ``pool``.
    """
    rows, n = strip.shape
    b = max(1, (n - 1).bit_length())
    col = np.arange(n, dtype=np.int64)

    def work(r0: int, r1: int) -> None:
        key = strip[r0:r1].view(np.int32).astype(np.int64)
        key <<= b
        key |= col
        key[np.arange(r1 - r0), np.arange(s + r0, s + r1)] = -1  # the point itself sorts first
        key.sort(axis=1)
        key = key[:, :k1]
        np.bitwise_and(key, (1 << b) - 1, out=out_i[r0:r1])
        out_v[r0:r1] = (key >> b).astype(np.int32).view(np.float32)
        out_i[r0:r1, 0] = np.arange(s + r0, s + r1)

    _in_chunks(pool, threads, rows, work)  # numpy's sort releases the GIL


def _select_topk(strip: np.ndarray, s: int, k1: int, out_v: np.ndarray, out_i: np.ndarray) -> None:
    """The k1 smallest entries of every row of a strip, by torch's top-k (a few of many per row)."""
    import torch

    rows = strip.shape[0]
    strip[np.arange(rows), np.arange(s, s + rows)] = -1.0  # the point itself first
    t = torch.from_numpy(strip)
    # top-k on the integer view: for floats >= 0 (and the one -1 per row) the bit patterns order like
    # the values, and integer comparisons make torch's top-k about 1.6x faster on CPU
    as_int = torch.int32 if t.dtype == torch.float32 else torch.int64
    v, i = torch.topk(t.view(as_int), k1, dim=1, largest=False, sorted=True)
    out_v[:] = v.view(t.dtype).numpy()
    out_i[:] = i.numpy()


def _knn_torch(X: np.ndarray, k: int, dev: str, precision: str, B: int, symmetric: bool):
    """Neighbour search in torch (CUDA, or CPU with torch's BLAS). Returns numpy (squared distances,
    indices, |x|^2), unrefined."""
    import torch

    dev = torch.device(dev)
    dt = {"float32": torch.float32, "float64": torch.float64}[precision]
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[dt]
    n, k1 = X.shape[0], k + 1
    mean = X.mean(axis=0, dtype=np.float64)
    Xc = torch.as_tensor(X, device=dev).to(dt)
    Xc -= torch.as_tensor(mean, device=dev).to(dt)
    sq = (Xc * Xc).sum(dim=1)

    def product(s, e, s2, e2, out):
        out.copy_(torch.addmm(sq[None, s2:e2], Xc[s:e], Xc[s2:e2].T, beta=1.0, alpha=-2.0))
        out += sq[s:e, None]
        out.view(as_int).clamp_(min=0)  # in the integer view: negatives and -0.0 become +0.0

    run_v = torch.empty((n, k1), dtype=dt, device=dev)
    run_i = torch.empty((n, k1), dtype=torch.int64, device=dev)
    for s, e, strip in _strips(n, B, symmetric, lambda rows: torch.empty((rows, n), dtype=dt, device=dev),
                               product, torch.clone, lambda out, block: out.copy_(block.T)):
        strip[torch.arange(e - s, device=dev), torch.arange(s, e, device=dev)] = -1.0  # the point itself first
        v, run_i[s:e] = torch.topk(strip.view(as_int), k1, dim=1, largest=False, sorted=True)
        run_v[s:e] = v.view(dt)
        del strip
    return run_v.cpu().numpy(), run_i.cpu().numpy(), sq.cpu().numpy()


def _smallest(d2: np.ndarray, k1: int) -> tuple[np.ndarray, np.ndarray]:
    """(values, indices) of the k1 smallest entries of every row, in increasing order."""
    if k1 < d2.shape[1]:
        idx = np.argpartition(d2, k1 - 1, axis=1)[:, :k1]
    else:
        idx = np.broadcast_to(np.arange(d2.shape[1]), d2.shape).copy()
    v = np.take_along_axis(d2, idx, 1)
    pos = np.argsort(v, axis=1, kind="stable")
    return np.take_along_axis(v, pos, 1), np.take_along_axis(idx, pos, 1)


def _refine(X: np.ndarray, run_v: np.ndarray, run_i: np.ndarray, sq: np.ndarray, k: int, tol: float) -> None:
    """The numerically careful step of :func:`compute_neighbour_graph`, in place, in numpy.

    A squared distance below tol (|x|^2 + |y|^2) is inside the rounding noise of the float32
    formula. Rows whose k-th neighbour is already there (a tight group far from the data mean) are
    redone in float64, centred on those rows; in the other rows only the near pairs are recomputed
    directly as |x - y|^2 and the row re-sorted (the selected set is right, the order may not be).
    Only rows whose nearest neighbour is below tol (|x|^2 + max |y|^2) can hold such a pair, so the
    full test runs on those alone (on real data: none or a few).
    """
    n, k1 = X.shape[0], k + 1
    cand = np.flatnonzero(run_v[:, 1] < tol * (sq + sq.max()))
    if cand.size == 0:
        return
    X64 = np.asarray(X, dtype=np.float64)
    whole = cand[run_v[cand, k] < tol * (sq[cand] + sq[run_i[cand, k]])]
    if whole.size:
        Y = X64 - X64[whole].mean(axis=0)
        sqY = np.square(Y).sum(axis=1)
        chunk = max(1, (1 << 25) // n)
        for p in range(0, whole.size, chunk):
            r = whole[p:p + chunk]
            d2 = Y[r] @ Y.T
            d2 *= -2.0
            d2 += sqY[None, :]
            d2 += sqY[r, None]
            np.maximum(d2, 0.0, out=d2)
            d2[np.arange(r.size), r] = -1.0
            v, i = _smallest(d2, k1)
            v[:, 0] = 0.0
            run_v[r], run_i[r] = v, i
        log.info("recomputed %d neighbourhoods in float64 (tight groups far from the mean)", whole.size)
    rest = np.setdiff1d(cand, whole, assume_unique=True)
    if rest.size == 0:
        return
    sus = run_v[rest] < tol * (sq[rest, None] + sq[run_i[rest]])
    sus[:, 0] = False
    rr, c = np.nonzero(sus)
    if rr.size == 0:
        return
    r = rest[rr]
    j = run_i[r, c]
    chunk = max(1, (1 << 26) // max(1, X.shape[1]))
    exact = np.empty(r.size, dtype=np.float64)
    for p in range(0, r.size, chunk):
        q = slice(p, p + chunk)
        exact[q] = np.square(X64[r[q]] - X64[j[q]]).sum(axis=1)
    run_v[r, c] = exact
    rows = np.unique(r)
    sub_v, sub_i = run_v[rows, 1:], run_i[rows, 1:]
    pos = np.argsort(sub_v, axis=1, kind="stable")
    run_v[rows, 1:] = np.take_along_axis(sub_v, pos, 1)
    run_i[rows, 1:] = np.take_along_axis(sub_i, pos, 1)
    log.debug("recomputed %d near pairs directly", int(r.size))


# ---------------------------------------------------------------------------------------------
# Metrics on a neighbour graph


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
    return dict(id_2nn=math.nan, id_gride=math.nan, id_gride_err=math.nan, log_density_mean=math.nan,
                n_clusters=math.nan, core_fraction=math.nan, ari_subjects=math.nan, ari_letters=math.nan,
                overlap_subjects=math.nan, overlap_letters=math.nan)


def compute_layer_geometry(X: np.ndarray, subjects: np.ndarray, letters: np.ndarray, params: GeometryParams,
                           *, name: str = "layer") -> tuple[dict, list[dict], np.ndarray]:
    """All metrics of one layer. X (n, d); subjects, letters: integer codes (n,).

    Returns (row, gride_rows, knn): the metric row (see the module docstring), the Gride profile as
    rows (n1, n2, id, err), and the overlap_k neighbour lists (n, overlap_k) in row indices of X
    (-1 for dropped duplicates and for degenerate layers). Degenerate layers give NaN metrics, a
    status and a logged warning naming the layer.
    """
    return compute_layer_metrics(compute_layer_graph(X, subjects, letters, params, name=name), params)


def compute_layer_graph(X: np.ndarray, subjects: np.ndarray, letters: np.ndarray, params: GeometryParams,
                        *, name: str = "layer") -> dict:
    """First half of :func:`compute_layer_geometry`: checks, deduplication and the neighbour graph (the
    heavy, GIL-free part). Returns the state :func:`compute_layer_metrics` finishes."""
    n = X.shape[0]
    p = params
    row = dict(n_questions=n, n_points=0, n_duplicates=0, status=STATUS_OK, maxk=0,
               id_scale_n1=p.id_scale, density_k=p.density_k, z=p.z, label_fraction=p.label_fraction,
               overlap_k=p.overlap_k, seconds_graph=0.0, seconds_metrics=0.0, **_nan_row())
    knn = np.full((n, p.overlap_k), -1, dtype=np.int32)
    state = dict(row=row, knn=knn, name=name, graph=None)

    if not np.isfinite(X).all():
        bad = int((~np.isfinite(X)).any(axis=1).sum())
        log.warning("%s: %d of %d vectors hold NaN or inf; metrics set to NaN", name, bad, n)
        row["status"] = "non_finite"
        return state

    X = np.asarray(X, dtype=np.float32 if X.dtype != np.float64 else np.float64)
    keep = return_unique_rows(X)
    m = keep.shape[0]
    row.update(n_points=int(m), n_duplicates=int(n - m))
    if m < n:
        log.info("%s: dropped %d identical vectors, %d distinct left", name, n - m, m)
    if m == 1:
        log.warning("%s: all %d vectors are identical; metrics set to NaN", name, n)
        row["status"] = "constant"
        return state
    if m < p.min_points():
        log.warning("%s: only %d distinct vectors, fewer than the %d the neighbour scales need "
                    "(id_scale=%d, density_k=%d); metrics set to NaN", name, m, p.min_points(),
                    p.id_scale, p.density_k)
        row["status"] = "too_few_points"
        return state

    Xu, sub_u, let_u = X[keep], subjects[keep], letters[keep]
    maxk = min(p.maxk, m - 1)
    graph_k = min(m - 1, max(maxk, p.overlap_k, return_label_overlap_k(sub_u, p.label_fraction),
                             return_label_overlap_k(let_u, p.label_fraction)))
    row["maxk"] = int(maxk)
    t0 = time.perf_counter()
    dist, ind = compute_neighbour_graph(Xu, graph_k, device=p.device, precision=p.precision,
                                        block_rows=p.block_rows, refine_tol=p.refine_tol)
    row["seconds_graph"] = time.perf_counter() - t0
    ok_knn = min(p.overlap_k, graph_k)
    knn[keep, :ok_knn] = keep[ind[:, 1:ok_knn + 1]].astype(np.int32)
    state.update(graph=(dist, ind), maxk=maxk, graph_k=graph_k, subjects=sub_u, letters=let_u)
    return state


def compute_layer_metrics(state: dict, params: GeometryParams) -> tuple[dict, list[dict], np.ndarray]:
    """Second half of :func:`compute_layer_geometry`: every DADApy metric on the layer's graph."""
    from dadapy import Data

    row, knn, name, p = state["row"], state["knn"], state["name"], params
    gride: list[dict] = []
    if state["graph"] is None:
        return row, gride, knn
    (dist, ind), maxk, graph_k = state["graph"], state["maxk"], state["graph_k"]
    sub_u, let_u = state["subjects"], state["letters"]
    t1 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=UserWarning)
            data = Data(distances=(np.ascontiguousarray(dist[:, :maxk + 1]),
                                   np.ascontiguousarray(ind[:, :maxk + 1])), maxk=maxk, verbose=False)
            row["id_2nn"] = float(data.compute_id_2NN()[0])
            ids, errs, n2s = data.return_id_scaling_gride(range_max=min(p.id_range_max, maxk), return_ranks=True)
            gride = [dict(n1=int(b // 2), n2=int(b), id=float(i), err=float(e)) for i, e, b in zip(ids, errs, n2s)]
            head = [g for g in gride if g["n1"] == p.id_scale]
            if not head:
                raise ValueError(f"the headline scale ({p.id_scale}, {2 * p.id_scale}) is outside the Gride "
                                 f"range (id_range_max={p.id_range_max}, maxk={maxk})")
            row["id_gride"], row["id_gride_err"] = head[0]["id"], head[0]["err"]
            data.set_id(row["id_gride"])
            log_den, _ = data.compute_density_kNN(k=p.density_k)
            row["log_density_mean"] = float(np.mean(log_den))
            assignment = np.array(data.compute_clustering_ADP(Z=p.z, halo=False), copy=True)
            row["n_clusters"] = int(data.N_clusters)
            row["ari_subjects"] = return_ari(sub_u, assignment)
            row["ari_letters"] = return_ari(let_u, assignment)
            row["core_fraction"] = return_core_fraction(data, p.z)
            full = data if graph_k == maxk else Data(distances=(dist, ind), maxk=graph_k, verbose=False)
            row["overlap_subjects"] = float(full.return_label_overlap(sub_u, class_fraction=p.label_fraction))
            row["overlap_letters"] = float(full.return_label_overlap(let_u, class_fraction=p.label_fraction))
    except Exception as e:  # a failure in one layer must not lose the other layers
        log.warning("%s: geometry failed (%s: %s); metrics set to NaN", name, type(e).__name__, e,
                    exc_info=True)
        row.update(_nan_row())
        row["status"] = "failed"
    row["seconds_metrics"] = time.perf_counter() - t1
    return row, gride, knn


# ---------------------------------------------------------------------------------------------
# Extraction files


def read_labels(h5_path: str | Path) -> dict:
    """question_id, subject codes and names, answer letters and layer names of an extraction."""
    import h5py

    h5_path = Path(h5_path)
    if not h5_path.exists():
        raise GeometryError(f"no extraction at {h5_path}")
    with h5py.File(h5_path, "r") as f:
        missing = [k for k in ("hidden", "question_id", "subject", "answer") if k not in f]
        if missing:
            raise GeometryError(f"{h5_path} lacks datasets {missing}: not an llmscape extraction")
        shape = f["hidden"].shape
        if len(shape) != 3:
            raise GeometryError(f"{h5_path}: hidden has shape {shape}, expected (n_layers, n_questions, d)")
        qid = np.asarray(f["question_id"][:], dtype=np.int64)
        subject = np.asarray(f["subject"].asstr()[:], dtype=object)
        answer = np.asarray(f["answer"][:], dtype=np.int64)
        if "layer_name" in f:
            layer_name = [str(s) for s in f["layer_name"].asstr()[:]]
        else:
            layer_name = [f"l{i}" for i in range(shape[0])]
        attrs = {k: (v.item() if hasattr(v, "item") else v) for k, v in f.attrs.items()}
    n = shape[1]
    for key, arr in (("question_id", qid), ("subject", subject), ("answer", answer)):
        if arr.shape != (n,):
            raise GeometryError(f"{h5_path}: {key} has shape {arr.shape}, hidden has {n} questions")
    if len(layer_name) != shape[0]:
        raise GeometryError(f"{h5_path}: {len(layer_name)} layer names for {shape[0]} layers")
    if n < 2:
        raise GeometryError(f"{h5_path}: {n} question(s); geometry needs many")
    subject_names, subject_codes = np.unique(subject.astype(str), return_inverse=True)
    return dict(question_id=qid, subject=subject_codes.astype(np.int64), subject_names=subject_names,
                answer=answer, layer_name=layer_name, shape=shape, attrs=attrs)


def compute_geometry(h5_path: str | Path, params: GeometryParams, *, model: str = "", variant: str = "",
                     shots: int | None = None, layers: list[int] | None = None):
    """Geometry of every layer of one extraction. Returns (table, gride, knn) with table and gride as
    pandas DataFrames (module docstring) and knn a dict(question_id, layer_name, knn)."""
    import h5py
    import pandas as pd
    import torch

    meta = read_labels(h5_path)
    n_layers = meta["shape"][0]
    if shots is None:
        shots = int(meta["attrs"].get("shots", -1))
    model = model or str(meta["attrs"].get("model", ""))
    variant = variant or str(meta["attrs"].get("variant", ""))
    layers = list(range(n_layers)) if layers is None else list(layers)
    device = resolve_device(params.device)
    params = GeometryParams(**{**asdict(params), "device": device})
    log.info("%s: %d layers x %d questions x %d dims on %s (torch threads %d)", h5_path, n_layers,
             meta["shape"][1], meta["shape"][2], device, torch.get_num_threads())

    rows, grides, knns = [], [], []
    # graphs in flight: on CPU, two while a layer fits one row strip (n <= block_rows, at most a few
    # hundred MB each), so one graph's serial steps overlap the other's parallel ones (1.15x on the
    # embedded model's 5-shot layers); one for larger layers, whose graph keeps the cores busy itself
    depth = 2 if device == "cpu" and meta["shape"][1] <= params.block_rows else 1
    # on CPU numpy's BLAS runs one thread for the whole loop: the graph parallelises its products itself
    # (_knn_numpy), and a per-graph limit would change the BLAS setting under the metrics thread
    with h5py.File(h5_path, "r") as f, ThreadPoolExecutor(max_workers=depth) as pool, \
            (blas_single_thread() if device == "cpu" else contextlib.nullcontext()):
        hidden = f["hidden"]

        def graph_of(layer):  # reading + neighbour graph: torch/BLAS/h5py work that releases the GIL
            X = hidden[layer]
            X = X.astype(np.float32) if X.dtype == np.float16 else X
            return compute_layer_graph(X, meta["subject"], meta["answer"], params,
                                       name=f"layer {layer} ({meta['layer_name'][layer]})")

        # pipelined: the graphs of the next layers are built in worker threads while DADApy's metrics of
        # layer l (Python, mostly holding the GIL) run here; the results are those of the sequential loop
        ahead = [pool.submit(graph_of, l) for l in layers[:depth]]
        for a, layer in enumerate(layers):
            state = ahead.pop(0).result()
            if a + depth < len(layers):
                ahead.append(pool.submit(graph_of, layers[a + depth]))
            name = state["name"]
            row, gride, knn = compute_layer_metrics(state, params)
            row = dict(model=model, variant=variant, shots=int(shots), layer=int(layer),
                       layer_name=meta["layer_name"][layer], device=device, **row)
            rows.append(row)
            grides += [dict(model=model, variant=variant, shots=int(shots), layer=int(layer), **g) for g in gride]
            knns.append(knn)
            log.info("%s: n=%d dup=%d id_gride=%.2f id_2nn=%.2f clusters=%s ari_subj=%.3f ari_let=%.3f "
                     "(graph %.1fs, metrics %.1fs) [%s]", name, row["n_points"], row["n_duplicates"],
                     row["id_gride"], row["id_2nn"], row["n_clusters"], row["ari_subjects"],
                     row["ari_letters"], row["seconds_graph"], row["seconds_metrics"], row["status"])

    for a in range(len(layers)):
        nxt = math.nan
        if a + 1 < len(layers) and layers[a + 1] == layers[a] + 1:
            nxt, _ = return_data_overlap(knns[a], knns[a + 1], params.overlap_k)
        rows[a]["overlap_next_layer"] = nxt

    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if not (table["status"] == STATUS_OK).any():
        raise GeometryError(f"{h5_path}: no layer gave usable geometry (statuses: "
                            f"{sorted(set(table['status']))}); see the warnings above")
    gride_df = pd.DataFrame(grides, columns=GRIDE_COLUMNS)
    knn = dict(question_id=meta["question_id"], layer=np.asarray(layers, dtype=np.int64),
               layer_name=np.asarray([meta["layer_name"][l] for l in layers], dtype=str),
               knn=np.stack(knns).astype(np.int32))
    return table, gride_df, knn


TABLE_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "status", "n_questions", "n_points",
                 "n_duplicates", "maxk", "id_2nn", "id_gride", "id_gride_err", "id_scale_n1", "density_k",
                 "log_density_mean", "z", "n_clusters", "core_fraction", "ari_subjects", "ari_letters",
                 "label_fraction", "overlap_subjects", "overlap_letters", "overlap_k", "overlap_next_layer",
                 "seconds_graph", "seconds_metrics", "device"]
GRIDE_COLUMNS = ["model", "variant", "shots", "layer", "n1", "n2", "id", "err"]
OVERLAP_COLUMNS = ["model", "variant", "shots", "layer", "layer_name", "comparison", "ref_variant", "ref_shots",
                   "k", "n_points", "overlap"]


def write_knn(dest: str | Path, knn: dict) -> None:
    from llmscape.io import atomic_path

    with atomic_path(dest) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **knn)


def read_knn(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def compute_pair_overlaps(knn: dict, refs: list[tuple[str, str, int, dict]], *, model: str, variant: str,
                          shots: int, k: int):
    """Data overlap, layer by layer, of one extraction's neighbour lists with each reference.

    refs: (comparison, ref_variant, ref_shots, ref_knn). The two extractions must hold the same
    questions in the same order; a mismatch is an error, never a silent misalignment."""
    import pandas as pd

    rows = []
    for comparison, ref_variant, ref_shots, ref in refs:
        if not np.array_equal(knn["question_id"], ref["question_id"]):
            raise GeometryError(
                f"{model}/{variant}/{shots}shot and {model}/{ref_variant}/{ref_shots}shot hold different "
                f"questions ({len(knn['question_id'])} vs {len(ref['question_id'])} ids, or another order); "
                "overlaps need the same questions row by row: re-extract both from the same data split")
        if not np.array_equal(knn["layer"], ref["layer"]):
            raise GeometryError(f"{variant}/{shots}shot and {ref_variant}/{ref_shots}shot cover different layers")
        for a, layer in enumerate(knn["layer"]):
            ov, used = return_data_overlap(knn["knn"][a], ref["knn"][a], k)
            if used == 0:
                log.warning("layer %d: no points with neighbours in both %s/%sshot and %s/%sshot; overlap NaN",
                            layer, variant, shots, ref_variant, ref_shots)
            rows.append(dict(model=model, variant=variant, shots=int(shots), layer=int(layer),
                             layer_name=str(knn["layer_name"][a]), comparison=comparison,
                             ref_variant=ref_variant, ref_shots=int(ref_shots), k=int(k), n_points=used,
                             overlap=ov))
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)
