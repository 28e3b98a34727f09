"""Benchmark: the geometry of all layers of one extraction, ours against the published way.

ours       llmscape.geometry.compute_geometry: one neighbour graph per layer (float32, blocked,
           symmetric, numpy on CPU), handed to dadapy as precomputed distances and reused by every metric.
published  Doimo et al.'s recipe (NeurIPS 2024; docs/geometry.md) on plain dadapy: per layer, float64 coordinates,
           np.unique deduplication, Data(coordinates).compute_distances(maxk=1000), then the same
           metrics (Gride, 2NN, kNN density, ADP halo off and on, ARIs, label overlaps, overlap with
           the next layer) from dadapy's own distances.

Each method runs in a fresh process (peak RSS = that process's ru_maxrss, imports included), on the
same cores, ``--repeats`` times alternating with the other; the median run is reported. Cases: the
embedded model's 5-shot states and synthetic (9,181 x 4,096) data.

    python3 bench/bench_geometry.py [--real results/reps/smollm2-135m/base/5shot.h5] [--synthetic-layers 2]

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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

import common as B  # noqa: E402  (bench/common.py: alternation, load, median and spread)

PARAMS = dict(maxk=1000, id_range_max=100, id_scale=16, density_k=16, z=1.6, label_fraction=0.3, overlap_k=30)
COMPARE = ["n_points", "id_2nn", "id_gride", "n_clusters", "core_fraction", "ari_subjects", "ari_letters",
           "overlap_subjects", "overlap_letters", "overlap_next_layer"]


def synthetic_h5(path: Path, n: int = 9181, d: int = 4096, layers: int = 2, seed: int = 0) -> Path:
    """57 'subjects' as Gaussian clusters on a 40-d subspace plus isotropic noise, in d dimensions."""
    import h5py

    from llmscape.integrity import seal

    rng = np.random.default_rng(seed)
    subject = np.sort(rng.integers(0, 57, n))
    answer = rng.integers(0, 4, n).astype(np.int8)
    basis = np.linalg.qr(rng.standard_normal((d, 40)))[0].astype(np.float32)
    with h5py.File(path, "w") as f:
        h = f.create_dataset("hidden", shape=(layers, n, d), dtype="float32", chunks=(1, min(n, 256), d),
                              fletcher32=True)
        for layer in range(layers):
            centres = rng.standard_normal((57, 40)).astype(np.float32) * (3.0 - layer)
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


def run_ours(h5: str, threads: int):
    import torch

    from llmscape import geometry as G

    torch.set_num_threads(threads)
    table = G.compute_geometry(h5, G.GeometryParams(**PARAMS, device="cpu", n_boot=0)).table
    return table


def run_published(h5: str, threads: int):
    """The published recipe, written from its description (plain dadapy, float64, its own distances)."""
    import h5py
    import pandas as pd
    from dadapy import Data
    from sklearn.metrics import adjusted_rand_score

    from llmscape.geometry import read_labels

    meta = read_labels(h5)
    rows, prev = [], None
    with h5py.File(h5, "r") as f:
        for layer in range(meta["shape"][0]):
            X = f["hidden"][layer].astype(np.float64)
            _, first = np.unique(X, axis=0, return_index=True)
            keep = np.sort(first)
            X, subj, let = X[keep], meta["subject"][keep], meta["answer"][keep]
            row = dict(layer=layer, n_points=len(keep))
            if len(keep) < 34:  # constant or nearly: the published code would crash here
                rows.append(row)
                prev = None
                continue
            maxk = min(PARAMS["maxk"], len(keep) - 1)
            data = Data(coordinates=X, verbose=False)
            data.compute_distances(maxk=maxk)
            row["id_2nn"] = data.compute_id_2NN()[0]
            ids, _, _ = data.return_id_scaling_gride(range_max=PARAMS["id_range_max"])
            row["id_gride"] = ids[4]
            data.set_id(ids[4])
            data.compute_density_kNN(k=PARAMS["density_k"])
            assignment = np.array(data.compute_clustering_ADP(Z=PARAMS["z"], halo=False))
            row["n_clusters"] = data.N_clusters
            row["ari_subjects"] = adjusted_rand_score(subj, assignment)
            row["ari_letters"] = adjusted_rand_score(let, assignment)
            row["core_fraction"] = np.mean(np.asarray(data.compute_clustering_ADP(Z=PARAMS["z"], halo=True)) >= 0)
            row["overlap_subjects"] = data.return_label_overlap(subj, class_fraction=PARAMS["label_fraction"])
            row["overlap_letters"] = data.return_label_overlap(let, class_fraction=PARAMS["label_fraction"])
            # next-layer overlap on the questions kept in both layers (in original question indices)
            knn = np.full((meta["shape"][1], PARAMS["overlap_k"]), -1)
            knn[keep] = keep[data.dist_indices[:, 1:PARAMS["overlap_k"] + 1]]
            if prev is not None:
                rows[-1]["overlap_next_layer"] = _overlap(prev, knn)
            prev = knn
            rows.append(row)
    return pd.DataFrame(rows)


def _overlap(a, b):
    valid = (a >= 0).all(1) & (b >= 0).all(1)
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a[valid], b[valid])]))


def child(method: str, h5: str, threads: int, out: str) -> None:
    t0 = time.perf_counter()
    import dadapy  # noqa: F401  (imports count in both: jax, torch, sklearn)
    import torch  # noqa: F401

    t_import = time.perf_counter() - t0
    rss_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t1 = time.perf_counter()
    table = (run_ours if method == "ours" else run_published)(h5, threads)
    wall = time.perf_counter() - t1
    table.to_parquet(out + ".parquet", index=False)
    Path(out + ".json").write_text(json.dumps(dict(
        wall_s=wall, import_s=t_import, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        rss_after_import_mb=rss_import)))


def measure(method: str, h5: Path, threads: int, tmp: Path) -> dict:
    out = str(tmp / f"{method}_{h5.stem}")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    subprocess.run([sys.executable, __file__, "--child", method, str(h5), str(threads), out], check=True, env=env)
    import pandas as pd

    return dict(json.loads(Path(out + ".json").read_text()), table=pd.read_parquet(out + ".parquet"))


def compare(ours, pub) -> dict:
    m = ours.merge(pub, on="layer", suffixes=("", "_pub"))
    out = {}
    for c in COMPARE:
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
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(cases))
    for j, (method, colour) in enumerate((("published", "C1"), ("ours", "C0"))):
        a.bar(x + (j - 0.5) * 0.38, [results[c][method]["wall_s"] for c in cases], 0.38, label=method, color=colour)
        b.bar(x + (j - 0.5) * 0.38, [results[c][method]["peak_rss_mb"] for c in cases], 0.38, label=method,
              color=colour)
    for ax, ylab in ((a, "wall time, all layers (s)"), (b, "peak RSS (MB)")):
        ax.set_xticks(x, [f"{c}\n{results[c]['shape']}" for c in cases], fontsize=8)
        ax.set_ylabel(ylab)
        ax.grid(axis="y", alpha=0.3)
    for i, c in enumerate(cases):
        a.text(i, results[c]["published"]["wall_s"], f"{results[c]['speedup']:.1f}x", ha="center", va="bottom")
    a.legend()
    fig.suptitle("geometry of every layer: llmscape (one graph per layer, reused) vs published (dadapy distances)")
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


def print_table(results: dict) -> None:
    print(f"\n{'case':>22} {'layers x n x d':>16} {'published s':>12} {'ours s':>8} {'speedup':>8} "
          f"{'pub MB':>8} {'ours MB':>8}")
    for name, r in results.items():
        print(f"{name:>22} {r['shape']:>16} {r['published']['wall_s']:12.1f} {r['ours']['wall_s']:8.1f} "
              f"{r['speedup']:7.1f}x {r['published']['peak_rss_mb']:8.0f} {r['ours']['peak_rss_mb']:8.0f}")
        if "speedup_summary" in r:
            print(f"{'':>24}speedup per round: {B.fmt(r['speedup_summary'], 'x')}")
        for c, v in r["agreement"].items():
            print(f"{'':>24}{c:>20}: max |ours - published| = {v['max_abs_diff']}, NaN mismatches {v['nan_mismatch']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--real", default=str(ROOT / "results/reps/smollm2-135m/base/5shot.h5"))
    ap.add_argument("--synthetic-layers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="runs per method and case; the median is reported")
    ap.add_argument("--tmp", default="/tmp/llmscape_bench_geometry")
    ap.add_argument("--no-real", action="store_true")
    ap.add_argument("--keep", action="store_true", help="merge into bench/results/geometry.json instead of replacing")
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
    if a.synthetic_layers > 0:
        cases["synthetic"] = synthetic_h5(tmp / "synthetic.h5", layers=a.synthetic_layers)
    results = {}
    for name, h5 in cases.items():
        with h5py.File(h5, "r") as f:
            shape = "x".join(map(str, f["hidden"].shape))
        r = {"shape": shape}
        runs = {"published": [], "ours": []}
        for rep in range(a.repeats):  # alternating, so a slow spell of the machine hits both
            for method in ("published", "ours"):
                with B.LoadSampler() as load:
                    m = measure(method, h5, a.threads, tmp)
                m.update(load.record())
                runs[method].append(m)
                print(f"{name:>22} {method:>10} #{rep + 1}: {m['wall_s']:8.1f} s, peak RSS {m['peak_rss_mb']:7.0f} MB, "
                      f"load {m['load_before']:.2f} -> max {m['load_during_max']:.2f}{' BUSY' if m['busy'] else ''}",
                      flush=True)
        for method, ms in runs.items():  # the median run by wall time
            r[method] = dict(sorted(ms, key=lambda m: m["wall_s"])[len(ms) // 2])
            r[method]["wall_s_runs"] = [m["wall_s"] for m in ms]
            r[method]["wall_s_summary"] = B.summary(ms, "wall_s")
            r[method]["runs"] = [{k: v for k, v in m.items() if k != "table"} for m in ms]
        r["speedup_summary"] = B.ratio(runs["published"], runs["ours"], "wall_s")  # per alternated round
        r["speedup"] = r["speedup_summary"]["median"]
        r["memory_ratio"] = r["published"]["peak_rss_mb"] / r["ours"]["peak_rss_mb"]
        r["agreement"] = compare(r["ours"].pop("table"), r["published"].pop("table"))
        r["load_avg_after"] = os.getloadavg()
        results[name] = r
    out = ROOT / "bench/results"
    out.mkdir(parents=True, exist_ok=True)
    if a.keep and (out / "geometry.json").exists():
        results = {**json.loads((out / "geometry.json").read_text())["results"], **results}
    print_table(results)
    from llmscape.io import package_versions, write_json

    write_json(out / "geometry.json", dict(results=results, params=PARAMS, threads=a.threads, repeats=a.repeats,
                                           cpu=os.cpu_count(), load_avg=os.getloadavg(), machine=where,
                                           versions=package_versions()))
    figure(results, out / "geometry.png")
    print(f"wrote {out / 'geometry.json'} and {out / 'geometry.png'}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:4], int(sys.argv[4]), sys.argv[5])
    else:
        main()
