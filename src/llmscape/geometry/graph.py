"""The k-nearest-neighbour graph of a layer: blocked, symmetric, exact where float32 rounding could
reorder neighbours; numpy with our own threads on CPU, torch on CUDA."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..devices import pick_device
from .params import GeometryError

log = logging.getLogger("llmscape.geometry")


def return_unique_rows(X: np.ndarray, return_inverse: bool = False):
    """Sorted row indices of the first occurrence of every distinct row (exact, bitwise equality
    after mapping -0.0 to 0.0). Keeping them in order keeps the labels aligned. With
    ``return_inverse``, also each row's distinct-row number (a position into the first result).

    Same answer as ``np.unique(X, axis=0, return_index=True)``, without its lexicographic sort of
    whole rows (about 5 s at 9,181 x 4,096 in float64; this takes about 0.05 s): rows are grouped by
    Python's hash of their bytes, and rows sharing a hash are compared in full, so a hash collision can
    never merge distinct rows.
    """
    X = np.ascontiguousarray(X)
    if X.ndim != 2:
        raise ValueError(f"expected a 2-d array, got shape {X.shape}")
    n = X.shape[0]
    rep = np.arange(n, dtype=np.int64)  # each row's first equal row
    if n == 0:
        keep = np.zeros(0, dtype=np.int64)
        return (keep, rep) if return_inverse else keep
    X = X + X.dtype.type(0)  # -0.0 -> 0.0, so equal values compare equal bitwise
    h = np.fromiter((hash(r.tobytes()) for r in X), dtype=np.int64, count=n)
    order = np.argsort(h, kind="stable")  # equal hashes: in original order, first occurrence first
    hs = h[order]
    starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]])
    sizes = np.diff(np.r_[starts, n])
    keep = list(order[starts])
    for st, size in zip(starts[sizes > 1], sizes[sizes > 1], strict=True):  # duplicates (or a collision): compare rows
        group = order[st: st + size]
        reps = [group[0]]
        for i in group[1:]:
            same = next((r for r in reps if np.array_equal(X[i].view(np.uint8), X[r].view(np.uint8))), None)
            if same is None:
                reps.append(i)
                keep.append(i)
            else:
                rep[i] = same
    keep = np.sort(np.asarray(keep, dtype=np.int64))
    if not return_inverse:
        return keep
    pos = np.full(n, -1, dtype=np.int64)
    pos[keep] = np.arange(keep.size)
    return keep, pos[rep]


def compute_neighbour_graph(X: np.ndarray, k: int, *, device: str = "auto", precision: str = "float32",
                            block_rows: int = 2048, refine_tol: float = 1e-4,
                            sym_budget_mb: int = 2048, blas: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Euclidean k nearest neighbours of every row of X, DADApy layout.

    Returns (dist, ind), each (N, k + 1): column 0 is the point itself at distance 0, then the k
    nearest other points in increasing distance. dist is float64, ind int64.

    Squared distances come from |x|^2 + |y|^2 - 2 x.y on centred data, in blocks of ``block_rows``
    rows; each (I, J > I) block of the symmetric matrix is computed once and its transpose reused
    for row block J (while the upper triangle fits ``sym_budget_mb``), and each diagonal block
    (I, I) chunk by chunk from the chunk's own first row on (:func:`_product`), so that about half
    of the n^2 products are computed (at n = 1,600, one block: 0.75x the graph's CPU time); one
    selection per row strip. On CPU the products run in our own row-split workers (see
    :func:`_knn_numpy`), each through oneDNN's float32 inner product (``blas="onednn"``, what
    ``"auto"`` picks when torch has it, :func:`onednn_product`) or numpy's BLAS (``blas="numpy"``,
    and always in float64); on CUDA, or with ``blas="torch"``, all runs in torch (:func:`_knn_torch`).
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
    if blas not in ("auto", "onednn", "numpy", "torch"):
        raise ValueError(f"blas must be auto, onednn, numpy or torch, got {blas!r}")
    dev = pick_device(device, key="geometry.device", error=GeometryError)
    B = max(1, min(int(block_rows), n))
    itemsize = 4 if precision == "float32" else 8
    # each (I, J >= I) block is computed once; its transpose serves row block J later. Keeping the
    # upper triangle costs n^2/2 values: above the budget, fall back to full row strips.
    symmetric = (n * n // 2) * itemsize <= int(sym_budget_mb) << 20
    knn = _knn_torch if dev != "cpu" or blas == "torch" else _knn_numpy
    if knn is _knn_numpy:
        run_v, run_i, sq = _knn_numpy(X, k, precision, B, symmetric, _cpu_matmul(blas, precision))
    else:
        run_v, run_i, sq = _knn_torch(X, k, dev, precision, B, symmetric)
    run_v[:, 0] = 0.0
    if refine_tol > 0 and precision != "float64":
        _refine(X, run_v, run_i, sq, k, refine_tol)
    dist = np.empty(run_v.shape, dtype=np.float64)
    threads = cpu_threads() if knn is _knn_numpy else 1
    _in_chunks(worker_pool(threads), threads, n,
               lambda r0, r1: np.sqrt(run_v[r0:r1], out=dist[r0:r1], dtype=np.float64))
    return dist, run_i


def _cpu_matmul(blas: str, precision: str):
    """The CPU graph's product for ``blas`` (auto, onednn or numpy): :func:`onednn_product`'s, or None
    for numpy's BLAS (also in float64, which oneDNN's inner product lacks)."""
    if blas == "onednn" and onednn_product() is None:
        raise ValueError("blas='onednn' needs torch's oneDNN (torch.backends.mkldnn) at full float32 "
                         "precision; use blas='auto' or 'numpy'")
    return onednn_product() if blas in ("auto", "onednn") and precision == "float32" else None


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


def _knn_numpy(X: np.ndarray, k: int, precision: str, B: int, symmetric: bool, matmul=None):
    """CPU neighbour search in numpy and our own workers. Returns (squared distances, indices, |x|^2),
    unrefined.

    The products go through ``matmul(a, b, out)`` (out = a @ b.T: :func:`onednn_product`) or, when it
    is None, numpy's BLAS (OpenBLAS in the numpy wheel, the BLAS sklearn and so the published path
    use). The squared norms ride along in the product (:func:`_factors`), one call per block.

    Threads: :func:`cpu_threads` Python workers split every product and every selection by
    rows, each calling a one-thread BLAS (:func:`blas_single_thread`). OpenBLAS's own threads spin
    after each call and stole the cores from what came next (the top-k, the sort, the DADApy metrics
    of the previous layer running beside): on the embedded model's layers the whole geometry ran
    1.5x faster without them (bench/).

    Selection: where k + 1 is at least 1/_PACKED_SHARE of a row, one sort of packed (distance,
    index) keys (:func:`_select_packed`), else torch's top-k (:func:`_select_topk`); see
    _PACKED_SHARE for why and where they part.
    """
    from .resample import keep_freed_memory

    keep_freed_memory()  # the strips and factors of every layer from the heap, not fresh pages (4x faster)
    dt = np.dtype(precision)
    n, k1 = X.shape[0], k + 1
    threads = cpu_threads()
    pool = worker_pool(threads)
    run_v = np.empty((n, k1), dtype=dt)
    run_i = np.empty((n, k1), dtype=np.int64)
    packed = dt == np.float32 and _PACKED_SHARE * k1 >= n
    with blas_single_thread():
        L, R, sq = _factors(X, dt, pool, threads)

        def put_transpose(out, block):
            _in_chunks(pool, threads, out.shape[0], lambda r0, r1: copy_transposed(out[r0:r1], block[:, r0:r1]))

        for s, e, strip in _strips(n, B, symmetric, lambda rows: np.empty((rows, n), dtype=dt),
                                   _product(L, R, pool, threads, matmul), np.copy, put_transpose):
            if packed:
                _select_packed(strip, s, k1, run_v[s:e], run_i[s:e], pool, threads)
            else:
                _select_topk(strip, s, k1, run_v[s:e], run_i[s:e])
    return run_v, run_i, sq


#: a row's k + 1 nearest are taken by one sort of all its packed keys when k + 1 >= n / _PACKED_SHARE,
#: else by torch's top-k. Measured on one core (AMD EPYC, numpy 1.26's AVX-512 sort, torch 2.13) at
#: n = 9,181: the sort costs about 5 ns per column whatever k (49 us a row), the top-k 15 us at
#: k + 1 = 31, 58 us at 301, 84 us at 1,001; they meet near k + 1 = n / 40.
_PACKED_SHARE = 32


def _factors(X: np.ndarray, dt: np.dtype, pool, threads: int):
    """(L, R, |x|^2) of the centred rows of X in ``dt``: L = [-2x, |x|^2, 1] and R = [x, 1, |x|^2],
    so that L_i . R_j = |x_i - x_j|^2 in one BLAS product. Centring on the mean keeps the norms, and
    so the cancellation in the formula, small."""
    n, d = X.shape
    mean = X.mean(axis=0, dtype=np.float64).astype(dt)
    sq = np.empty(n, dtype=dt)
    L = np.empty((n, d + 2), dtype=dt)
    R = np.empty((n, d + 2), dtype=dt)

    def prepare(r0, r1):  # centred rows, their squared norms (pairwise sums), and the two factors
        Xc, tmp = R[r0:r1, :d], L[r0:r1, :d]  # written in place: no temporary of the rows
        np.subtract(X[r0:r1], mean, out=Xc, dtype=dt)
        sq[r0:r1] = np.square(Xc, out=tmp).sum(axis=1)
        np.multiply(Xc, -2.0, out=tmp)
        L[r0:r1, d], L[r0:r1, d + 1] = sq[r0:r1], 1.0
        R[r0:r1, d], R[r0:r1, d + 1] = 1.0, sq[r0:r1]

    # rows of a few MB per call, so the passes over a chunk run in cache
    _in_chunks(pool, threads, n, prepare, chunk_rows=max(1, min(-(-n // threads), (4 << 20) // (4 * d + 8))))
    return L, R, sq


def _product(L: np.ndarray, R: np.ndarray, pool, threads: int, matmul=None):
    """product(s, e, s2, e2, out): the squared distances of rows s:e to rows s2:e2 into ``out``, from
    the factors of :func:`_factors`, clamped at +0.0, split over the pool in fixed chunks of rows, each
    chunk one ``matmul(a, b, out)`` (out = a @ b.T; numpy's when None)."""
    as_int = np.int32 if L.dtype == np.float32 else np.int64
    if matmul is None:
        def matmul(a, b, out):
            np.matmul(a, b.T, out=out)

    def product(s, e, s2, e2, out):
        diagonal = s2 == s and e2 == e

        def part(r0, r1):
            # a diagonal block is symmetric: each chunk computes its columns from its own first row
            # on (about half the products), then writes their transpose below itself
            c0 = r0 if diagonal else 0
            block = out[r0:r1, c0:]
            matmul(L[s + r0:s + r1], R[s2 + c0:e2], block)
            # clamp at 0 in the integer view: rounding's negatives and -0.0 (sign bit set, which would
            # order first as an integer) all become +0.0
            bits = block.view(as_int)
            np.maximum(bits, 0, out=bits)
            if diagonal:  # the rows below this chunk compute only their own columns on
                copy_transposed(out[r1:, r0:r1], block[:, r1 - r0:])

        # fixed chunks: BLAS may round a row differently by its position in the product (its kernels
        # handle the rows beyond a multiple of their unroll apart), so chunks that depended on the
        # thread count would make the graph depend on it too
        # in the pool even when one chunk: a oneDNN call must run in a worker of one OpenMP thread
        _in_chunks(pool, threads, e - s, part, chunk_rows=_product_rows(L.shape[1], diagonal), inline=False)

    return product


#: rows and columns of one tile of :func:`copy_transposed` (64 KB in float32: in the core's L1/L2)
_TILE = 128


def copy_transposed(dst: np.ndarray, src: np.ndarray) -> None:
    """dst[...] = src.T, exactly, tile by tile: each tile of src is copied contiguous and transposed by
    torch's blocked transpose (its fast path wants a whole contiguous matrix, transposed). numpy's own
    copy of a transposed view walks one of the two arrays down its columns, a cache line per value: a
    2,048 x 2,048 float32 block took 44 ms that way and 4 ms by tiles (one core, docs/geometry.md). A tile has
    fewer values than torch's grain for threading, so this runs in the caller's thread alone."""
    import torch

    rows, cols = dst.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            tile = torch.from_numpy(np.ascontiguousarray(src[j:j + _TILE, i:i + _TILE]))
            dst[i:i + _TILE, j:j + _TILE] = tile.T.contiguous().numpy()


_ONEDNN: list = []  # [matmul or None], once per process


def onednn_product():
    """``matmul(a, b, out)``: out = a @ b.T for float32 numpy arrays through torch's oneDNN inner
    product (``torch.ops.mkldnn._linear_pointwise``), one OpenMP thread, to be called from the graph's
    workers (:func:`worker_pool`); None where torch has no oneDNN or allows it reduced precision
    (``torch.backends.mkldnn.matmul.fp32_precision`` other than none/ieee).

    Why: oneDNN picks its kernels for the CPU it runs on, while OpenBLAS may be held to older ones. On
    the AMD EPYC this project is benchmarked on, the environment sets ``OPENBLAS_CORETYPE=Haswell``
    (AVX2 kernels, 133 GFLOP/s a core in float32) where oneDNN runs AVX-512 at 247; with OpenBLAS left
    to detect the CPU both run about 240 (docs/geometry.md, "Third round"). So oneDNN is never the slower of the
    two here; ``ONEDNN_MAX_CPU_ISA`` holds it to a kernel set as ``OPENBLAS_CORETYPE`` holds OpenBLAS,
    for results equal bit for bit across CPU types. Float32 throughout (no bf16 or tf32 inside: tested
    against float64)."""
    if not _ONEDNN:
        _ONEDNN.append(_load_onednn())
    return _ONEDNN[0]


def _load_onednn():
    import torch

    try:
        if not torch.backends.mkldnn.is_available():
            return None
        if str(torch.backends.mkldnn.matmul.fp32_precision).lower() not in ("none", "ieee"):
            return None
        op = torch.ops.mkldnn._linear_pointwise
        probe = torch.ones((2, 3))
        if not torch.equal(op(probe, probe, None, "none", [], ""), torch.full((2, 2), 3.0)):
            return None
    except (AttributeError, RuntimeError, TypeError):  # gone, or its signature changed: numpy's BLAS
        return None

    def matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
        _one_omp_thread()
        np.copyto(out, op(torch.from_numpy(a), torch.from_numpy(b), None, "none", [], "").numpy())

    return matmul


_WORKER = threading.local()


def _one_omp_thread() -> None:
    """Hold this worker thread's OpenMP team to one thread, for good (an OpenMP setting is per thread,
    so the caller's and torch's other threads keep theirs). torch's own per-thread start-up runs first,
    since it would set the team back to torch's thread count."""
    if getattr(_WORKER, "omp_one", None) is None:
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("oneDNN products run in the graph's worker threads, not the main thread")
        import torch

        torch.get_num_threads()
        _WORKER.omp_one = _threadpools().limit(limits=1, user_api="openmp")


def cpu_threads() -> int:
    """Workers of the CPU graph: torch's thread count, which the rule sets from its ``threads``."""
    import torch

    return max(1, torch.get_num_threads())


_PRODUCT_ROWS = 128  # rows of one BLAS call in the CPU graph (at most a few hundred columns per row)


def _product_rows(width: int, diagonal: bool) -> int:
    """Rows of one BLAS call for factors of ``width`` columns: set by the shape alone (never by the
    thread count, see :func:`_product`). Each call packs its whole right-hand block, so long rows
    want more rows per call: at 4,098 columns 512 rows run 1.1x faster than 128 (OpenBLAS, one
    core, AMD EPYC; bench/). A diagonal block takes half as many, since its chunks compute a
    triangle and each chunk's own square is computed in full."""
    rows = _PRODUCT_ROWS * max(1, min(4, width // 1024))
    return max(_PRODUCT_ROWS, rows // 2) if diagonal else rows


_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def worker_pool(threads: int, job: str = "knn") -> ThreadPoolExecutor:
    """A process-wide pool of ``threads`` workers for one kind of job (started once: a new pool per
    layer cost 5 ms). Several graphs (two in flight in compute_geometry) share the "knn" pool; the
    subsamples of a layer run in the "boot" pool, so a graph's row chunks never queue behind them."""
    with _POOLS_LOCK:
        if (job, threads) not in _POOLS:
            _POOLS[job, threads] = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"llmscape-{job}")
        return _POOLS[job, threads]


def _in_chunks(pool, threads: int, rows: int, work, chunk_rows: int | None = None, inline: bool = True) -> None:
    """work(r0, r1) over contiguous row chunks of range(rows), in the pool: ``threads`` chunks, or chunks
    of ``chunk_rows`` rows whatever the thread count; a single chunk in the caller's thread when
    ``inline``."""
    step = chunk_rows or -(-rows // threads)
    chunks = [(r0, min(rows, r0 + step)) for r0 in range(0, rows, step)]
    if len(chunks) == 1 and inline:
        work(*chunks[0])
    else:
        for f in [pool.submit(work, *c) for c in chunks]:
            f.result()


_THREADPOOLS: list = []


def _threadpools():
    """threadpoolctl's view of the process's BLAS and OpenMP libraries, found once (about 20 ms a scan),
    after torch is loaded, so that the scan sees the OpenMP runtime oneDNN runs on."""
    if not _THREADPOOLS:
        import torch  # noqa: F401  (loads torch's OpenMP runtime before the scan)
        from threadpoolctl import ThreadpoolController

        _THREADPOOLS.append(ThreadpoolController())
    return _THREADPOOLS[0]


def blas_single_thread():
    """Context: numpy's BLAS runs one thread (threadpoolctl); the caller parallelises instead."""
    return _threadpools().limit(limits=1, user_api="blas")


def _select_packed(strip: np.ndarray, s: int, k1: int, out_v: np.ndarray, out_i: np.ndarray, pool,
                   threads: int) -> None:
    """The k1 smallest entries of every row of a float32 strip (rows s, s + 1, ... of the n x n squared
    distances, all n columns) in increasing order, the point itself first, ties by column index.

    Each entry becomes one int64 key, (bits of d2 as int32) << b | column, with b bits for a column
    index: for d2 >= 0 the bit patterns order like the values, so sorting the keys sorts the distances
    and carries the indices along, exactly, equal distances in column order. Unless k1 is a small share
    of the row, one numpy sort of these keys is cheaper than torch's top-k (1.7x at 1,001 of 9,181,
    2x at 1,001 of 1,140; _PACKED_SHARE). Rows are split over ``threads`` workers of ``pool``.
    """
    rows, n = strip.shape
    b = max(1, (n - 1).bit_length())
    col = np.arange(n, dtype=np.int64)
    sub = max(1, _KEYS_BYTES // (n * 8))  # rows whose keys a worker sorts at a time

    def work(r0: int, r1: int) -> None:
        buf = np.empty((min(sub, r1 - r0), n), dtype=np.int64)
        for q0 in range(r0, r1, sub):
            q1 = min(r1, q0 + sub)
            key = buf[:q1 - q0]
            np.left_shift(strip[q0:q1].view(np.int32), b, out=key, dtype=np.int64)
            key |= col
            key[np.arange(q1 - q0), np.arange(s + q0, s + q1)] = -1  # the point itself sorts first
            key.sort(axis=1)
            first = key[:, :k1]
            np.bitwise_and(first, (1 << b) - 1, out=out_i[q0:q1])
            # the bits of d2, back in float32 (one pass: the shift writes int32 directly)
            np.right_shift(first, b, out=out_v[q0:q1].view(np.int32), casting="unsafe")
            out_i[q0:q1, 0] = np.arange(s + q0, s + q1)

    _in_chunks(pool, threads, rows, work)  # numpy's sort and the passes release the GIL


#: packed keys a selection worker builds, sorts and reads at a time: a few rows, so that their passes
#: run in the core's L2 cache (1 MB on this AMD EPYC) instead of memory: the selection ran
#: faster than with 32 MB of keys at once (1.3x at n = 1,600, 1.1x at 9,181, one core; bench/)
_KEYS_BYTES = 512 << 10


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
