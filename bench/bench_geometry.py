"""Benchmark: the geometry of all layers of one extraction, ours against the published way.

ours       llmscape.geometry.compute_geometry: one neighbour graph per layer (float32, blocked,
           symmetric, numpy on CPU), handed to dadapy as precomputed distances and reused by every metric.
published  Doimo et al.'s recipe (NeurIPS 2024; docs/geometry.md) on plain dadapy: per layer, float64 coordinates,
           np.unique deduplication, Data(coordinates).compute_distances(maxk=1000), then the same
           metrics (Gride, 2NN, kNN density, ADP halo off and on, ARIs, label overlaps, overlap with
           the next layer) from dadapy's own distances.

With intervals (second column): the same geometry plus the per-metric intervals from ``n_boot``
subsamples (the default config's 100, 80% of every subject, the pipeline's own draws), on
``--boot-layers`` consecutive layers of each case.

ours       compute_geometry with n_boot: the layer's graph holds enough neighbours (boot_graph_k) and
           each subsample's graph is read from it (resample.return_subgraph), then every DADApy metric
           and the next-layer overlap per subsample, and the intervals.
published  the naive way on plain dadapy: the published recipe above on all points, then again from
           scratch on every subsample (X[rows], np.unique, Data(coordinates).compute_distances(maxk=1000),
           2NN, Gride up to the headline scale (return_id_scaling_gride(range_max=32)), kNN density,
           ADP halo off and on, ARIs, label overlaps, overlap with the same subsample in the next
           layer), then the same intervals from the subsamples' values (resample.return_metric_interval).
           On the paper-size case a subsample takes dadapy about 10 s, so ``--synthetic-boot-draws`` of
           them are run (on ``--synthetic-boot-layers`` layers) and the n_boot total is computed from
           their times (marked ``computed``, never reported as measured); ours always runs all n_boot.

Each method runs in a fresh process (peak RSS = that process's ru_maxrss, imports included), on the
same cores, ``--repeats`` times alternating with the other; the median run is reported. Cases: the
embedded model's 5-shot states and synthetic (9,181 x 4,096) data.

    python3 bench/bench_geometry.py [--real results/reps/smollm2-135m/base/5shot.h5] [--synthetic-layers 2]
                                    [--n-boot 100] [--boot-layers 1] [--synthetic-boot-layers 1]
                                    [--synthetic-boot-draws 2]

Prints a table and writes bench/results/geometry.json and bench/results/geometry.png.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import common as B  # bench/common.py: alternation, load, median and spread

ROOT = Path(__file__).resolve().parents[1]

PARAMS = dict(maxk=1000, id_range_max=100, id_scale=16, density_k=16, z=1.6, label_fraction=0.3, overlap_k=30)
COMPARE = ["n_points", "id_2nn", "id_gride", "n_clusters", "core_fraction", "ari_subjects", "ari_letters",
           "overlap_subjects", "overlap_letters", "overlap_next_layer"]
BOOT_METRICS = ["id_2nn", "id_gride", "log_density_mean", "n_clusters", "core_fraction", "ari_subjects",
                "ari_letters", "overlap_subjects", "overlap_letters", "overlap_next_layer"]


def synthetic_h5(path: Path, n: int = 9181, d: int = 4096, layers: int = 2, seed: int = 0, subjects: int = 57) -> Path:
    """``subjects`` 'subjects' as Gaussian clusters on a 40-d subspace plus isotropic noise, in d dimensions."""
    import h5py

    from llmscape.integrity import seal

    rng = np.random.default_rng(seed)
    subject = np.sort(rng.integers(0, subjects, n))
    answer = rng.integers(0, 4, n).astype(np.int8)
    basis = np.linalg.qr(rng.standard_normal((d, 40)))[0].astype(np.float32)
    with h5py.File(path, "w") as f:
        h = f.create_dataset("hidden", shape=(layers, n, d), dtype="float32", chunks=(1, min(n, 256), d),
                              fletcher32=True)
        for layer in range(layers):
            centres = rng.standard_normal((subjects, 40)).astype(np.float32) * (3.0 - layer % 3)
            Z = centres[subject] + rng.standard_normal((n, 40)).astype(np.float32)
            h[layer] = Z @ basis.T + 0.05 * rng.standard_normal((n, d)).astype(np.float32)
        f["question_id"] = np.arange(n, dtype=np.int64)
        f.create_dataset("subject", data=np.array([f"s{s:02d}" for s in subject], dtype=object),
                         dtype=h5py.string_dtype())
        f["answer"] = answer
        f["pred"] = answer
        f.create_dataset("layer_name", data=np.array([f"l{i}" for i in range(layers)], dtype=object),
                         dtype=h5py.string_dtype())
        f.attrs.update(model="synthetic", variant="base", shots=0, complete=True)
        seal(f)  # every dataset's checksum, as extract() writes them (readers check them)
    return path


def run_ours(h5: str, threads: int, opts: dict | None = None):
    """compute_geometry on every layer (point geometry), or with opts = {n_boot, layers}: with intervals
    on those layers. Returns (layer table, subsample table or None)."""
    import torch

    from llmscape import geometry as G

    torch.set_num_threads(threads)
    opts = opts or {}
    out = G.compute_geometry(h5, G.GeometryParams(**PARAMS, device="cpu", n_boot=opts.get("n_boot", 0)),
                             layers=opts.get("layers"))
    return out.table, (out.boot if opts.get("n_boot") else None), {}


def published_points(X: np.ndarray, subj: np.ndarray, let: np.ndarray, range_max: int) -> tuple[dict, np.ndarray]:
    """The published recipe on one set of points (float64 rows of one layer): (metrics, each row's
    overlap_k nearest rows as positions in X, -1 for a dropped duplicate or a degenerate set)."""
    from dadapy import Data
    from sklearn.metrics import adjusted_rand_score

    _, first = np.unique(X, axis=0, return_index=True)
    keep = np.sort(first)
    knn = np.full((len(X), PARAMS["overlap_k"]), -1)
    X, subj, let = X[keep], subj[keep], let[keep]
    row = dict(n_points=len(keep))
    if len(keep) < 34:  # constant or nearly: the published code would crash here
        return row, knn
    data = Data(coordinates=X, verbose=False)
    data.compute_distances(maxk=min(PARAMS["maxk"], len(keep) - 1))
    row["id_2nn"] = data.compute_id_2NN()[0]
    ids, _, _ = data.return_id_scaling_gride(range_max=range_max)
    row["id_gride"] = ids[4]
    data.set_id(ids[4])
    row["log_density_mean"] = float(np.mean(data.compute_density_kNN(k=PARAMS["density_k"])[0]))
    assignment = np.array(data.compute_clustering_ADP(Z=PARAMS["z"], halo=False))
    row["n_clusters"] = data.N_clusters
    row["ari_subjects"] = adjusted_rand_score(subj, assignment)
    row["ari_letters"] = adjusted_rand_score(let, assignment)
    row["core_fraction"] = np.mean(np.asarray(data.compute_clustering_ADP(Z=PARAMS["z"], halo=True)) >= 0)
    row["overlap_subjects"] = data.return_label_overlap(subj, class_fraction=PARAMS["label_fraction"])
    row["overlap_letters"] = data.return_label_overlap(let, class_fraction=PARAMS["label_fraction"])
    knn[keep] = keep[data.dist_indices[:, 1:PARAMS["overlap_k"] + 1]]
    return row, knn


def run_published(h5: str, threads: int, opts: dict | None = None):
    """The published recipe, written from its description (plain dadapy, float64, its own distances), on
    every layer; with opts = {n_boot, layers, max_draws}: on those layers, and again from scratch on each
    subsample (the first max_draws of the n_boot, all when None), then the intervals. Returns (layer
    table, subsample table or None)."""
    import h5py
    import pandas as pd

    from llmscape.geometry import read_labels

    opts = opts or {}
    meta = read_labels(h5)
    draws = _boot_draws(meta, opts)
    layers = opts.get("layers") or list(range(meta["shape"][0]))
    rows, boot, prev, prev_draw, t_draws = [], [], None, [], 0.0
    with h5py.File(h5, "r") as f:
        for a, layer in enumerate(layers):
            X = f["hidden"][layer].astype(np.float64)
            row, knn = published_points(X, meta["subject"], meta["answer"], PARAMS["id_range_max"])
            follows = a > 0 and layers[a - 1] == layer - 1
            if follows and prev is not None and row["n_points"] >= 34:
                rows[-1]["overlap_next_layer"] = _overlap(prev, knn)
            rows.append(dict(layer=layer, **row))
            prev = knn if row["n_points"] >= 34 else None
            cur_draw, t0 = [], time.perf_counter()
            for j, d in enumerate(draws):  # the naive way: every subsample from scratch
                b, kb = published_points(X[d], meta["subject"][d], meta["answer"][d], 2 * PARAMS["id_scale"])
                boot.append(dict(layer=layer, draw=j, **b))
                if follows and prev_draw:
                    boot[-1 - len(draws)]["overlap_next_layer"] = _overlap(prev_draw[j], kb)
                cur_draw.append(kb)
            prev_draw, t_draws = cur_draw, t_draws + time.perf_counter() - t0
    table, boot_df = pd.DataFrame(rows), (pd.DataFrame(boot) if opts.get("n_boot") else None)
    if boot:
        _published_intervals(table, boot_df)
    return table, boot_df, dict(draws_s=t_draws, draws_run=len(draws))


def _boot_draws(meta: dict, opts: dict) -> list:
    """The pipeline's subsamples (draw_members with the default seed and fraction), the first max_draws."""
    from llmscape.geometry import GeometryParams, draw_members

    if not opts.get("n_boot"):
        return []
    p = GeometryParams(**PARAMS, n_boot=opts["n_boot"])
    draws = draw_members(meta["subject"], p.n_boot, p.boot_fraction, p.seed)
    return draws[:opts["max_draws"]] if opts.get("max_draws") else draws


def _published_intervals(table, boot) -> None:
    """Each metric's interval from the subsamples' values, by the same method as ours (resample.py)."""
    from llmscape.geometry import GeometryParams
    from llmscape.geometry.resample import return_metric_interval

    p = GeometryParams(**PARAMS)
    for i, layer in enumerate(table["layer"]):
        mine = boot[boot["layer"] == layer]
        for m in BOOT_METRICS:
            if m in table and m in mine:
                lo, hi, _ = return_metric_interval(m, float(table.at[i, m]), mine[m].to_numpy(float),
                                                   p.boot_fraction, p.confidence)
                table.loc[i, [f"{m}_lo", f"{m}_hi"]] = lo, hi


def _overlap(a, b):
    valid = (a >= 0).all(1) & (b >= 0).all(1)
    if not valid.any():
        return float("nan")
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a[valid], b[valid], strict=True)]))


def ceiling_kernels(n: int, d: int, k1: int, threads: int) -> dict:
    """Seconds of the kernels any exact graph of one (n, d) layer needs, on this machine with ``threads``
    cores, each the median of a few runs on random data (a product's time does not depend on the values):

    syrk_f32_s   numpy's ``A @ A.T`` in float32 (OpenBLAS SYRK, the n^2 d / 2 multiply-adds of the
                 symmetric products, the least an exact Euclidean graph must do in float32);
    gemm_f32_onednn_s
                 the full n^2 d float32 product through oneDNN (graph.onednn_product, row chunks over
                 the graph's workers, one thread each), which has no SYRK: half of it is the same
                 least work at oneDNN's rate (None where torch has no oneDNN);
    gemm_f64_s   numpy's ``A @ B.T`` in float64, B a copy of A (the full n^2 d GEMM of the float64
                 distances the published path asks scikit-learn for);
    select_s     the k1 nearest of every row from the n x n squared distances, by our graph's own
                 selection (graph._select_packed or _select_topk, as compute_neighbour_graph picks),
                 over all n rows in strips of 2,048."""
    from threadpoolctl import threadpool_limits

    from llmscape.geometry import graph as Gr

    rng = np.random.default_rng(0)
    A = rng.standard_normal((n, d), dtype=np.float32)
    reps = 3 if n * n * d < 2e10 else 1  # the float64 GEMM of the paper-size case takes seconds

    def best_of(fn, k=reps):
        times = []
        for _ in range(k):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return float(np.median(times))

    with threadpool_limits(limits=threads, user_api="blas"):
        syrk = best_of(lambda: A @ A.T, max(reps, 3))
        gemm = _gemm_f64_s(A, best_of)
    onednn = _gemm_f32_onednn_s(A, threads, lambda fn: best_of(fn, max(reps, 3)))
    sq = np.square(A, dtype=np.float64).sum(axis=1).astype(np.float32)
    pool, packed = Gr.worker_pool(threads), Gr._PACKED_SHARE * k1 >= n
    out_v, out_i = np.empty((n, k1), np.float32), np.empty((n, k1), np.int64)

    def select_all() -> float:  # the selections' seconds alone (the strips are made untimed)
        spent = 0.0
        for s in range(0, n, 2048):
            e = min(n, s + 2048)
            strip = sq[s:e, None] + sq[None, :] - 2 * (A[s:e] @ A.T)
            np.maximum(strip, 0, out=strip)
            t0 = time.perf_counter()
            if packed:
                Gr._select_packed(strip, s, k1, out_v[s:e], out_i[s:e], pool, threads)
            else:
                Gr._select_topk(strip, s, k1, out_v[s:e], out_i[s:e])
            spent += time.perf_counter() - t0
        return spent

    with Gr.blas_single_thread():
        sel = [select_all() for _ in range(3)]
    return dict(n=n, d=d, k1=k1, threads=threads, syrk_f32_s=syrk, gemm_f32_onednn_s=onednn, gemm_f64_s=gemm,
                select_s=float(np.median(sel)), selection="packed sort" if packed else "torch top-k")


def _gemm_f32_onednn_s(A: np.ndarray, threads: int, best_of) -> float | None:
    """best_of's seconds of the full float32 A @ A.T through oneDNN, as the graph calls it: chunks of 512
    rows over the graph's workers, one OpenMP thread each; None without oneDNN."""
    from llmscape.geometry import graph as Gr

    matmul = Gr.onednn_product()
    if matmul is None:
        return None
    out = np.empty((A.shape[0], A.shape[0]), np.float32)
    pool = Gr.worker_pool(threads)
    return best_of(lambda: Gr._in_chunks(pool, threads, A.shape[0], lambda r0, r1: matmul(A[r0:r1], A, out[r0:r1]),
                                         chunk_rows=512, inline=False))


def _gemm_f64_s(A: np.ndarray, best_of) -> float:
    """best_of's seconds of the full float64 GEMM of A's rows with a copy of them (no SYRK)."""
    A64 = A.astype(np.float64)
    B64 = A64.copy()
    return best_of(lambda: A64 @ B64.T)


def ceiling(kernels: dict, layers: int, r: dict) -> dict:
    """What the measured kernels allow on a case of ``layers`` layers with a graph: the graph floor
    (layers x (float32 SYRK + selection)), the published path's float64 GEMMs alone, and the speed-up
    over the measured published time that an implementation spending only the graph floor would
    reach (metrics not counted: an upper bound, computed, never a measurement of ours)."""
    onednn = kernels.get("gemm_f32_onednn_s")
    products = [kernels["syrk_f32_s"]] + ([onednn / 2] if onednn else [])
    floor = layers * (min(products) + kernels["select_s"])
    pub = r["published"]["wall_s"]
    return dict(kernels, layers=layers, graph_floor_s=floor, published_gemm_f64_s=layers * kernels["gemm_f64_s"],
                floor_product="oneDNN GEMM / 2" if min(products) < kernels["syrk_f32_s"] else "OpenBLAS SYRK",
                published_wall_s=pub, ours_wall_s=r["ours"]["wall_s"], speedup_allowed=pub / floor,
                ours_over_floor=r["ours"]["wall_s"] / floor,
                note="computed from the kernels' measured times: the speed-up a graph costing only the "
                     "float32 symmetric product (the faster of OpenBLAS's SYRK and half of oneDNN's GEMM) "
                     "plus our selection per layer would allow (DADApy's metrics taken as free); not a "
                     "measurement of ours")


def measure_ceiling(shape: tuple, threads: int, tmp: Path) -> dict:
    """ceiling_kernels for one layer of ``shape`` (layers, n, d), in a fresh process like the methods."""
    n, d = int(shape[1]), int(shape[2])
    k1 = min(PARAMS["maxk"], n - 1) + 1
    out = str(tmp / f"ceiling_{n}x{d}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    with B.LoadSampler() as load:
        subprocess.run([sys.executable, __file__, "--child", "ceiling", f"{n},{d},{k1}", str(threads), out],
                       check=True, env=env)
    return dict(json.loads(Path(out + ".json").read_text()), **load.record())


def child(method: str, h5: str, threads: int, out: str, opts: str = "{}") -> None:
    if method == "ceiling":  # h5 holds "n,d,k1"
        n, d, k1 = (int(x) for x in h5.split(","))
        Path(out + ".json").write_text(json.dumps(ceiling_kernels(n, d, k1, threads)))
        return
    t0 = time.perf_counter()
    import dadapy  # noqa: F401  (imports count in both: jax, torch, sklearn)
    import torch  # noqa: F401  (as above: imported for its cost, not used)

    t_import = time.perf_counter() - t0
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    table, boot, extra = (run_ours if method == "ours" else run_published)(h5, threads, json.loads(opts))
    wall = time.perf_counter() - t1
    table.to_parquet(out + ".parquet", index=False)
    if boot is not None:
        boot.to_parquet(out + ".boot.parquet", index=False)
    Path(out + ".json").write_text(json.dumps(dict(
        wall_s=wall, import_s=t_import, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_after_import_mb=rss_import, **extra)))


def measure(method: str, h5: Path, threads: int, tmp: Path, opts: dict | None = None) -> dict:
    out = str(tmp / f"{method}_{h5.stem}{'_boot' if opts else ''}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, __file__, "--child", method, str(h5), str(threads), out, json.dumps(opts or {})],
                   check=True, env=env)
    import pandas as pd

    res = dict(json.loads(Path(out + ".json").read_text()), table=pd.read_parquet(out + ".parquet"))
    if Path(out + ".boot.parquet").exists() and opts:
        res["boot"] = pd.read_parquet(out + ".boot.parquet")
    return res


def compare(ours, pub, columns=tuple(COMPARE), on=("layer",)) -> dict:
    m = ours.merge(pub, on=list(on), suffixes=("", "_pub"))
    out = {}
    for c in columns:
        if c + "_pub" in m:
            a, b = m[c].astype(float).to_numpy(), m[c + "_pub"].astype(float).to_numpy()
            both = ~(np.isnan(a) | np.isnan(b))
            out[c] = dict(max_abs_diff=float(np.max(np.abs(a[both] - b[both]))) if both.any() else None,
                          nan_mismatch=int((np.isnan(a) != np.isnan(b)).sum()))
    return out


def figure(results: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(results)
    boot = {c: results[c]["with_intervals"] for c in cases if "with_intervals" in results[c]}
    fig, (a, w, b) = plt.subplots(1, 3, figsize=(14, 3.8))
    x = np.arange(len(cases))
    for j, (method, colour) in enumerate((("published", "C1"), ("ours", "C0"))):
        a.bar(x + (j - 0.5) * 0.38, [results[c][method]["wall_s"] for c in cases], 0.38, label=method, color=colour)
        w.bar(x + (j - 0.5) * 0.38, [boot[c][method]["wall_s"] if c in boot else 0 for c in cases], 0.38,
              label=method, color=colour)
        b.bar(x + (j - 0.5) * 0.38, [results[c][method]["peak_rss_mb"] for c in cases], 0.38, label=method,
              color=colour)
    for ax, ylab in ((a, "point geometry, all layers (s)"), (w, "with intervals (s; * computed)"),
                     (b, "peak RSS, point geometry (MB)")):
        ax.set_xticks(x, [f"{c}\n{results[c]['shape']}" for c in cases], fontsize=8)
        ax.set_ylabel(ylab)
        ax.grid(axis="y", alpha=0.3)
    for i, c in enumerate(cases):
        a.text(i, results[c]["published"]["wall_s"], f"{results[c]['speedup']:.1f}x", ha="center", va="bottom")
        if c in boot:
            w.text(i, boot[c]["published"]["wall_s"], f"{boot[c]['speedup']:.1f}x"
                   f"{'*' if 'published_computed' in boot[c] else ''}\nlayers {boot[c]['layers']}, "
                   f"n_boot {boot[c]['n_boot']}", ha="center", va="bottom", fontsize=7)
    a.legend()
    fig.suptitle("geometry of every layer: llmscape (one graph per layer, reused) vs published (dadapy distances)")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def print_table(results: dict) -> None:
    print(f"\n{'':>40}{'point geometry, all layers':^38} | with intervals (n_boot subsamples)")
    print(f"{'case':>22} {'layers x n x d':>16} {'published s':>12} {'ours s':>8} {'speedup':>8} {'ours MB':>8} | "
          f"{'layers':>7} {'published s':>12} {'ours s':>8} {'speedup':>8}")
    for name, r in results.items():
        w = r.get("with_intervals")
        star = "*" if w and "published_computed" in w else " "
        boot = (f"{','.join(map(str, w['layers'])):>7} {w['published']['wall_s']:11.1f}{star}"
                f" {w['ours']['wall_s']:8.1f} {w['speedup']:7.1f}x" if w else "")
        print(f"{name:>22} {r['shape']:>16} {r['published']['wall_s']:12.1f} {r['ours']['wall_s']:8.1f} "
              f"{r['speedup']:7.1f}x {r['ours']['peak_rss_mb']:8.0f} | {boot}")
        for label, x in (("point", r), ("with intervals", w)):
            if x:
                print(f"{'':>24}{label} speed-up per round: {B.fmt(x['speedup_summary'], 'x')}")
        if w and "published_computed" in w:
            print(f"{'':>24}* {w['published_computed']}")
        if "ceiling" in r:
            c = r["ceiling"]
            onednn = c.get("gemm_f32_onednn_s")
            print(f"{'':>24}ceiling (computed from measured kernels): {c['layers']} layers x (float32 OpenBLAS SYRK "
                  f"{c['syrk_f32_s']:.3f} s" + (f" / oneDNN GEMM / 2 {onednn / 2:.3f} s" if onednn else "") +
                  f", the faster, + selection {c['select_s']:.3f} s) = {c['graph_floor_s']:.2f} s, "
                  f"allowing {c['speedup_allowed']:.1f}x over published; ours is {c['ours_over_floor']:.2f}x "
                  f"that floor (float64 GEMM alone: {c['gemm_f64_s']:.3f} s a layer)")
        for x, key in ((r, "agreement"), (w, "agreement"), (w, "agreement_intervals"), (w, "agreement_draws")):
            for c, v in ((x or {}).get(key) or {}).items():
                if v["max_abs_diff"] or v["nan_mismatch"]:
                    print(f"{'':>24}{key:>20} {c:>20}: max |ours - published| = {v['max_abs_diff']:.3g}, "
                          f"NaN mismatches {v['nan_mismatch']}")


def alternated(name: str, h5: Path, threads: int, tmp: Path, repeats: int, opts: dict | None = None,
               pub_opts: dict | None = None) -> dict:
    """published and ours, ``repeats`` rounds alternating (a slow spell of the machine hits both): each
    method's median run, the per-round speed-up and the agreement of their tables."""
    r = {}
    runs = {"published": [], "ours": []}
    for rep in range(repeats):
        for method in ("published", "ours"):
            with B.LoadSampler() as load:
                m = measure(method, h5, threads, tmp, (pub_opts or opts) if method == "published" else opts)
            m.update(load.record())
            runs[method].append(m)
            print(f"{name:>22} {method:>10}{' +boot' if opts else ''} #{rep + 1}: {m['wall_s']:8.1f} s, peak RSS "
                  f"{m['peak_rss_mb']:7.0f} MB, load {m['load_before']:.2f} -> max {m['load_during_max']:.2f}"
                  f"{' BUSY' if m['busy'] else ''}", flush=True)
    for method, ms in runs.items():  # the median run by wall time
        r[method] = dict(sorted(ms, key=lambda m: m["wall_s"])[len(ms) // 2])
        r[method]["wall_s_runs"] = [m["wall_s"] for m in ms]
        r[method]["wall_s_summary"] = B.summary(ms, "wall_s")
        r[method]["runs"] = [{k: v for k, v in m.items() if k not in ("table", "boot")} for m in ms]
    r["speedup_summary"] = B.ratio(runs["published"], runs["ours"], "wall_s")  # per alternated round
    r["speedup"] = r["speedup_summary"]["median"]
    r["memory_ratio"] = r["published"]["peak_rss_mb"] / r["ours"]["peak_rss_mb"]
    ours, pub = r["ours"].pop("table"), r["published"].pop("table")
    r["graph_layers"] = int((ours["status"] == "ok").sum())  # layers that had a graph (not constant, ...)
    r["agreement"] = compare(ours, pub)
    if opts:  # the subsamples both ran, value by value
        r["agreement_draws"] = compare(r["ours"].pop("boot"), r["published"].pop("boot"), BOOT_METRICS,
                                       on=["layer", "draw"])
    if opts and not pub_opts:  # (intervals from a few of the subsamples are not comparable)
        r["agreement_intervals"] = compare(ours, pub, [f"{c}_{e}" for c in BOOT_METRICS for e in ("lo", "hi")])
    return r


def with_intervals(name: str, h5: Path, a, tmp: Path, layers: list[int], max_draws: int | None) -> dict:
    """Both methods with a.n_boot subsamples on ``layers``. With max_draws, published runs only that many
    subsamples and its n_boot total is computed from their time (points + draws x n_boot / max_draws)."""
    opts = dict(n_boot=a.n_boot, layers=layers)
    pub = dict(opts, max_draws=max_draws) if max_draws and max_draws < a.n_boot else None
    repeats = a.boot_repeats or a.repeats
    r = dict(layers=layers, n_boot=a.n_boot, repeats=repeats,
             **alternated(name, h5, a.threads, tmp, repeats, opts, pub))
    if pub:
        for run in r["published"]["runs"]:
            run["wall_s_measured"] = run["wall_s"]
            run["wall_s"] = run["wall_s"] - run["draws_s"] + run["draws_s"] * a.n_boot / run["draws_run"]
        ours = r["ours"]["runs"]
        r["published"]["wall_s"] = float(np.median([run["wall_s"] for run in r["published"]["runs"]]))
        r["published"]["wall_s_summary"] = B.summary(r["published"]["runs"], "wall_s")
        r["speedup_summary"] = B.ratio(r["published"]["runs"], ours, "wall_s")
        r["speedup"] = r["speedup_summary"]["median"]
        r["published_computed"] = (f"published ran {max_draws} of the {a.n_boot} subsamples per layer; its time "
                                   f"is computed as points + subsamples' time x {a.n_boot} / {max_draws}")
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default=str(ROOT / "results/reps/smollm2-135m/base/5shot.h5"))
    ap.add_argument("--synthetic-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per method and case; the median is reported")
    ap.add_argument("--tmp", default="/tmp/llmscape_bench_geometry")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--keep", action="store_true", help="merge into bench/results/geometry.json instead of replacing")
    ap.add_argument("--out", default=str(ROOT / "bench/results/geometry.json"), help="the JSON (the figure beside it)")
    ap.add_argument("--n-boot", type=int, default=100, help="subsamples of the with-intervals column (0: none)")
    ap.add_argument("--boot-layers", type=int, default=1, help="consecutive middle layers of that column")
    ap.add_argument("--synthetic-boot-layers", type=int, default=1, help="the same on the synthetic case")
    ap.add_argument("--boot-repeats", type=int, default=0, help="rounds of the with-intervals column (0: --repeats)")
    ap.add_argument("--synthetic-boot-draws", type=int, default=2,
                    help="subsamples the published way runs on the synthetic case (its total is computed)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the kernels' times (float32 SYRK and oneDNN GEMM, float64 GEMM, selection) and the "
                         "ceiling")
    ap.add_argument("--synthetic-small", type=int, default=0,
                    help="layers of a synthetic 1,600 x 576 case, 16 subjects (the embedded model's shape) for "
                         "a machine without its real states")
    a = ap.parse_args()
    import h5py

    tmp = Path(a.tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    where = B.machine()
    cases = {}
    if a.no_real:
        pass
    elif Path(a.real).exists():
        cases[f"{Path(a.real).parts[-3]} {Path(a.real).stem}"] = Path(a.real)
    else:
        print(f"no real states at {a.real}; synthetic case only")
    if a.synthetic_small > 0:
        cases["synthetic 1600x576"] = synthetic_h5(tmp / "synthetic_small.h5", n=1600, d=576, layers=a.synthetic_small,
                                                   subjects=16)
    if a.synthetic_layers > 0:
        cases["synthetic"] = synthetic_h5(tmp / "synthetic.h5", layers=a.synthetic_layers)
    results = {}
    for name, h5 in cases.items():
        with h5py.File(h5, "r") as f:
            shape = f["hidden"].shape
        r = dict(shape="x".join(map(str, shape)), **alternated(name, h5, a.threads, tmp, a.repeats))
        if not a.no_ceiling:
            r["ceiling"] = ceiling(measure_ceiling(shape, a.threads, tmp), r["graph_layers"], r)
        big = name == "synthetic"
        n_layers = a.synthetic_boot_layers if big else a.boot_layers
        if a.n_boot and n_layers:
            first = max(0, min(shape[0] - n_layers, shape[0] // 2))
            layers = list(range(first, min(shape[0], first + n_layers)))
            r["with_intervals"] = with_intervals(name, h5, a, tmp, layers, a.synthetic_boot_draws if big else None)
        r["load_avg_after"] = os.getloadavg()
        results[name] = r
    dest = Path(a.out)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if a.keep and dest.exists():
        results = {**json.loads(dest.read_text())["results"], **results}
    print_table(results)
    from llmscape.io import package_versions, write_json

    write_json(dest, dict(results=results, params=PARAMS, threads=a.threads, repeats=a.repeats, cpu=os.cpu_count(),
                          load_avg=os.getloadavg(), machine=where, versions=package_versions()))
    figure(results, dest.with_suffix(".png"))
    print(f"wrote {dest} and {dest.with_suffix('.png')}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:4], int(sys.argv[4]), *sys.argv[5:7])
    else:
        main()
