"""Benchmark: what the geometry's intervals cost per layer, against one plain pass, and what reading
each subsample's neighbour graph from the layer's graph saves against computing it afresh.

plain      compute_layer_graph + compute_layer_metrics without subsamples: the point estimates
reuse      the same with ``--draws`` subsamples of 80% of every subject; each subsample's graph is read
           from the layer's graph (llmscape.geometry.resample.return_subgraph), as the pipeline does
fresh      the same subsamples, each with a new neighbour graph of its own points (compute_layer_geometry
           on X[subsample]): what the intervals would cost without the reuse

Per-draw metrics of reuse and fresh are compared (they must agree: same clusters and ARIs, IDs to
float32 rounding). Cases: the embedded model's 5-shot states (the default run's extraction) and
synthetic paper-size layers (9,181 x 4,096, 57 clusters; see bench_geometry.py).

    python3 bench/bench_intervals.py [--real results/reps/smollm2-135m/base/5shot.h5] [--synthetic-layers 2]

Prints a table and writes bench/results/intervals.json and bench/results/intervals.png. Times are
per layer (median over layers) for the given number of draws; the full cost of n_boot draws is
that times n_boot / draws, stated as such.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import common as B  # bench/common.py: alternation, load, median and spread

ROOT = Path(__file__).resolve().parents[1]

COMPARE_EXACT = ["n_clusters", "ari_subjects", "ari_letters"]
COMPARE_CLOSE = ["id_gride", "id_2nn", "log_density_mean", "overlap_subjects", "overlap_letters", "core_fraction"]


def bench_case(h5: str, layers: list[int], draws: int, threads: int, fresh_draws: int) -> dict:
    import h5py
    import torch

    from llmscape import geometry as G
    from llmscape.geometry import metrics as M

    torch.set_num_threads(threads)
    meta = G.read_labels(h5)
    plain_p = G.GeometryParams(device="cpu", n_boot=0)
    boot_p = replace(plain_p, n_boot=draws)
    members = G.draw_members(meta["subject"], draws, boot_p.boot_fraction, boot_p.seed)
    out = dict(n=int(meta["shape"][1]), d=int(meta["shape"][2]), layers=[], draws=draws, fresh_draws=fresh_draws)
    worst = dict.fromkeys(COMPARE_CLOSE, 0.0)
    mismatches = 0
    with h5py.File(h5, "r") as f, G.blas_single_thread():
        for layer in layers:
            X = f["hidden"][layer].astype(np.float32)
            load = B.LoadSampler().__enter__()  # each layer is a round: plain, reuse and fresh in turn
            t0 = time.perf_counter()
            M.compute_layer_metrics(M.compute_layer_graph(X, meta["subject"], meta["answer"], plain_p), plain_p)
            t_plain = time.perf_counter() - t0
            t0 = time.perf_counter()
            res = M.compute_layer_metrics(M.compute_layer_graph(X, meta["subject"], meta["answer"], boot_p,
                                                                draws=members), boot_p)
            t_reuse = time.perf_counter() - t0
            if res.row["status"] != G.STATUS_OK:
                continue
            t0 = time.perf_counter()
            fresh = [G.compute_layer_geometry(X[d], meta["subject"][d], meta["answer"][d], plain_p).row
                     for d in members[:fresh_draws]]
            t_fresh = (time.perf_counter() - t0) / fresh_draws
            load.__exit__()
            for b, r in zip(res.boot[:len(fresh)], fresh, strict=True):
                mismatches += any(b[m] != r[m] and not (abs(b[m] - r[m]) < 1e-9) for m in COMPARE_EXACT)
                for m in COMPARE_CLOSE:
                    worst[m] = max(worst[m], abs(b[m] - r[m]) / max(1e-12, abs(r[m])))
            out["layers"].append(dict(layer=layer, plain_s=t_plain, reuse_extra_s=t_reuse - t_plain,
                                      reuse_per_draw_s=(t_reuse - t_plain) / draws, fresh_per_draw_s=t_fresh,
                                      **load.record()))
            print(f"  layer {layer}: plain {t_plain:.2f}s, +{t_reuse - t_plain:.2f}s for {draws} draws "
                  f"({(t_reuse - t_plain) / draws * 1e3:.0f} ms each), fresh {t_fresh * 1e3:.0f} ms per draw",
                  flush=True)
    L = out["layers"]
    med = {k: float(np.median([x[k] for x in L])) for k in ("plain_s", "reuse_extra_s", "reuse_per_draw_s",
                                                            "fresh_per_draw_s")}
    out.update(median=med, summary={k: B.summary(L, k) for k in med},
               speedup_per_draw_rounds=B.ratio([dict(x, s=x["fresh_per_draw_s"]) for x in L],
                                               [dict(x, s=x["reuse_per_draw_s"]) for x in L], "s"),
               speedup_per_draw=med["fresh_per_draw_s"] / med["reuse_per_draw_s"],
               intervals_over_plain=med["reuse_extra_s"] / med["plain_s"],
               compared_draws=len(L) * fresh_draws, exact_mismatches=int(mismatches),
               max_rel_diff={k: float(v) for k, v in worst.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--real", default=str(ROOT / "results/reps/smollm2-135m/base/5shot.h5"))
    ap.add_argument("--synthetic-layers", type=int, default=2)
    ap.add_argument("--draws", type=int, default=20)
    ap.add_argument("--fresh-draws", type=int, default=5, help="subsamples recomputed afresh per layer")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "bench/results/intervals.json"))
    args = ap.parse_args()
    where = B.machine()
    from bench_geometry import synthetic_h5

    cases = {}
    if Path(args.real).exists():
        print(f"real: {args.real}")
        import h5py

        with h5py.File(args.real) as f:
            n_layers = f["hidden"].shape[0]
        cases["smollm2_5shot"] = bench_case(args.real, list(range(1, n_layers)), args.draws, args.threads,
                                            args.fresh_draws)
    else:
        print(f"no extraction at {args.real}: skipping the real case (run the default DAG first)")
    if args.synthetic_layers:
        with tempfile.TemporaryDirectory() as tmp:
            h5 = synthetic_h5(Path(tmp) / "synthetic.h5", layers=args.synthetic_layers)
            print("synthetic: 9,181 x 4,096")
            cases["synthetic_9181x4096"] = bench_case(str(h5), list(range(args.synthetic_layers)),
                                                      max(2, args.draws // 4), args.threads,
                                                      min(args.fresh_draws, 3))
    result = dict(machine=f"{platform.processor() or platform.machine()}, {args.threads} threads, CPU only",
                  date=time.strftime("%Y-%m-%d"), machine_record=where, cases=cases)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'case':24s} {'n x d':>12s} {'plain s/layer':>14s} {'+ intervals':>12s} {'per draw: read':>15s} "
          f"{'fresh':>8s} {'speedup':>8s}")
    for name, c in cases.items():
        m = c["median"]
        print(f"{name:24s} {c['n']:>6d} x {c['d']:<5d} {m['plain_s']:>14.2f} {m['reuse_extra_s']:>9.2f} "
              f"({c['draws']}) {m['reuse_per_draw_s'] * 1e3:>11.0f} ms {m['fresh_per_draw_s'] * 1e3:>5.0f} ms "
              f"{c['speedup_per_draw']:>7.1f}x   mismatches {c['exact_mismatches']} of {c['compared_draws']}, "
              f"max rel diff {max(c['max_rel_diff'].values()):.1e}")
    plot(result, Path(args.out).with_suffix(".png"))


def plot(result: dict, dest: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = result["cases"]
    fig, axes = plt.subplots(1, len(cases), figsize=(5 * len(cases), 3.6), squeeze=False)
    for ax, (name, c) in zip(axes[0], cases.items(), strict=True):
        m = c["median"]
        bars = [m["plain_s"], m["reuse_per_draw_s"], m["fresh_per_draw_s"]]
        ax.bar(["plain pass\n(one layer)", "one subsample,\ngraph read", "one subsample,\ngraph afresh"], bars,
               color=["0.6", "C0", "C3"])
        for i, v in enumerate(bars):
            ax.text(i, v, f"{v:.2f} s" if v >= 0.1 else f"{v * 1e3:.0f} ms", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"{name}: {c['n']:,} x {c['d']:,}\nreading the graph: {c['speedup_per_draw']:.1f}x per subsample",
                     fontsize=9)
        ax.set_ylabel("seconds (median over layers)")
    fig.suptitle(f"Cost of the intervals per layer ({result['machine']}, {result['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(dest, dpi=110)
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
