"""Device check: the neighbour graph on CUDA, against a float64 reference and sklearn (dadapy's search).

Synthetic clustered data at the paper's sizes (9,181 and 14,042 x 4,096), maxk = 1000. Reports wall
times (CUDA, torch CPU, sklearn float64 NearestNeighbors as in dadapy.compute_distances) and the
agreement of the CUDA graph with an exact float64 graph. Writes $OUT/graph_cuda.json (or ./).

    python3 bench/bench_graph_cuda.py [--sizes 9181 14042] [--no-sklearn]

(with PYTHONPATH=src in front where llmscape is not installed, as on a lent GPU machine)
"""
import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from llmscape.geometry import compute_neighbour_graph


def data(n, d=4096, seed=0):
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((d, 40)))[0].astype(np.float32)
    y = rng.integers(0, 57, n)
    Z = rng.standard_normal((57, 40)).astype(np.float32)[y] * 3 + rng.standard_normal((n, 40)).astype(np.float32)
    return (Z @ basis.T + 0.05 * rng.standard_normal((n, d)).astype(np.float32) + 5.0).astype(np.float32)


def exact_graph(X, k):
    """float64 brute force on the GPU (direct differences per block: no cancellation)."""
    Xt = torch.as_tensor(X, device="cuda", dtype=torch.float64)
    out_d, out_i = [], []
    for s in range(0, len(X), 512):
        d2 = torch.cdist(Xt[s:s + 512], Xt, compute_mode="donot_use_mm_for_euclid_dist") ** 2
        d2[torch.arange(d2.shape[0]), torch.arange(s, s + d2.shape[0])] = -1
        v, i = torch.topk(d2, k + 1, largest=False, sorted=True)
        out_d.append(v.clamp(min=0).sqrt().cpu())
        out_i.append(i.cpu())
    return torch.cat(out_d).numpy(), torch.cat(out_i).numpy()


def timed(f, *a, **kw):
    t = time.perf_counter()
    r = f(*a, **kw)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return r, time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[9181, 14042])
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--no-sklearn", action="store_true")
    a = ap.parse_args()
    res = dict(device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
               cpus=os.cpu_count(), torch=torch.__version__, cases=[])
    compute_neighbour_graph(data(2000, 256), 100, device="cuda")  # warm-up (context, kernels)
    for n in a.sizes:
        X = data(n)
        c = dict(n=n, d=X.shape[1], k=a.k)
        (dg, ig), c["cuda_s"] = timed(compute_neighbour_graph, X, a.k, device="cuda")
        (dg2, ig2), c["cuda_float64_s"] = timed(compute_neighbour_graph, X, a.k, device="cuda", precision="float64")
        c["cuda_peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
        torch.cuda.reset_peak_memory_stats()
        de, ie = exact_graph(X, a.k)
        c["index_agreement"] = float((ig == ie).mean())
        c["set_agreement_k30"] = float(np.mean([len(np.intersect1d(p[1:31], q[1:31])) / 30
                                                for p, q in zip(ig, ie, strict=True)]))
        c["max_rel_dist_err"] = float(np.max(np.abs(dg[:, 1:] - de[:, 1:]) / de[:, 1:]))
        c["float64_index_agreement"] = float((ig2 == ie).mean())
        torch.set_num_threads(os.cpu_count())
        _, c["torch_cpu_s"] = timed(compute_neighbour_graph, X, a.k, device="cpu")
        if not a.no_sklearn:
            from sklearn.neighbors import NearestNeighbors

            def sk(x):  # the float64 copy timed too, as dadapy makes it
                x = x.astype(np.float64)
                return NearestNeighbors(n_neighbors=a.k + 1, n_jobs=os.cpu_count()).fit(x).kneighbors(x)

            (ds, is_), c["sklearn_float64_cpu_s"] = timed(sk, X)
            c["sklearn_index_agreement"] = float((is_ == ie).mean())
        res["cases"].append(c)
        print(json.dumps(c), flush=True)
    out = Path(os.environ.get("OUT", "."))
    (out / "graph_cuda.json").write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
