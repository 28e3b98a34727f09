"""Coverage study of the geometry's intervals: do nominal 95% intervals cover what they claim, and how
wide are they against the ideal?

Synthetic data with a known sampling distribution: a fixed population of 16 classes, each an isotropic
unit Gaussian in 8 dimensions around a class mean (unit vectors times a separation), embedded in R^50 by
a fixed orthonormal map. A sample draws ``per_class`` points of every class (the pipeline subsamples
within subjects, so the design is stratified like it). Three separations give three regimes of the
subject ARI (about 0.08, 0.45 and 0.92 at 100 points per class); they are the three "layers" of one
extraction file, so ``overlap_next_layer`` gets intervals too. Answer letters are drawn uniformly from 4.

For every size and replicate, the project's own code path runs on the sample, with the default
geometry parameters: ``compute_geometry`` on an HDF5 file in the extraction layout, ``n_boot``
subsamples, the interval of each metric as the pipeline computes it. The truth is the mean of each
metric over ``--truth`` independent samples of the same size (plain passes, no subsamples), and the
ideal width is that of a 95% normal interval with the spread of those samples, 2 x 1.96 x sd.

Reported per size, regime and interval metric: coverage of the truth by the interval (over replicates,
with its binomial standard error), mean width / ideal width, the share of intervals with an end on the
estimate (a collapsed side), and the range of the ends. Writes ``bench/results/coverage.json`` and
``bench/results/coverage.png``.

    python3 bench/coverage.py                      # the full study (sizes 64 and 100, 20 replicates)
    python3 bench/coverage.py --replicates 5 --truth 40 --sizes 64   # a quick look
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

#: the three regimes: class separation -> (name by the subject ARI it gives at 100 points per class)
REGIMES = {"ARI about 0.08": 4.0, "ARI about 0.45": 5.7, "ARI about 0.92": 8.5}
N_CLASSES, LATENT_DIM, AMBIENT_DIM, N_LETTERS = 16, 8, 50, 4
Z95 = 1.959963984540054


def make_population(n_classes: int = N_CLASSES, latent: int = LATENT_DIM, ambient: int = AMBIENT_DIM,
                    seed: int = 0) -> dict:
    """The fixed population: class mean directions (unit vectors in R^latent) and the embedding."""
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((n_classes, latent))
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    embed = np.linalg.qr(rng.standard_normal((ambient, latent)))[0]
    return dict(means=means, embed=embed)


def draw_sample(pop: dict, per_class: int, separations, rng: np.random.Generator):
    """One sample: hidden (len(separations), n, ambient) float32, the same points at every separation
    (layer), class labels and answer letters (n,)."""
    means, embed = pop["means"], pop["embed"]
    y = np.repeat(np.arange(means.shape[0]), per_class)
    noise = rng.standard_normal((y.size, means.shape[1]))
    letters = rng.integers(0, N_LETTERS, y.size)
    hidden = np.stack([((means[y] * s + noise) @ embed.T).astype(np.float32) for s in separations])
    return hidden, y, letters


def write_extraction(path: Path, hidden: np.ndarray, classes: np.ndarray, letters: np.ndarray,
                     layer_names) -> Path:
    """The sample as an extraction file (the layout llmscape.extract writes), for compute_geometry."""
    import h5py

    from llmscape.integrity import seal

    n = hidden.shape[1]
    tmp = path.with_suffix(".part")
    with h5py.File(tmp, "w") as f:
        f.create_dataset("hidden", data=hidden, chunks=(1, n, hidden.shape[2]), fletcher32=True)
        f.create_dataset("question_id", data=np.arange(n, dtype=np.int64))
        f.create_dataset("subject", data=np.asarray([f"class{c:02d}" for c in classes], dtype=object),
                         dtype=h5py.string_dtype())
        f.create_dataset("answer", data=np.asarray(letters, dtype=np.int8))
        f.create_dataset("pred", data=np.asarray(letters, dtype=np.int8))
        f.create_dataset("layer_name", data=np.asarray(layer_names, dtype=object), dtype=h5py.string_dtype())
        f.attrs.update(model="synthetic", variant="base", shots=0, site="norm", complete=True)
        seal(f)  # every dataset's checksum, as extract() writes them (compute_geometry checks them)
    tmp.rename(path)
    return path


def run_geometry(pop: dict, per_class: int, stream: int, params, workdir: Path, regimes: dict = REGIMES):
    """compute_geometry of one sample (stream: its random stream); the layer table (one row per regime)."""
    from llmscape import geometry as G

    hidden, y, letters = draw_sample(pop, per_class, list(regimes.values()),
                                     np.random.default_rng([per_class, stream]))
    h5 = write_extraction(workdir / f"sample_{per_class}_{stream}.h5", hidden, y, letters, list(regimes))
    try:
        return G.compute_geometry(h5, params).table
    finally:
        h5.unlink()


def run_study(sizes, replicates: int, n_truth: int, params, log=print, pop: dict | None = None,
              regimes: dict = REGIMES) -> dict:
    """Tables of the replicates (with intervals) and of the truth samples (plain), per size (points per
    class); ``pop``: the population (make_population(), the 16 classes, by default); ``regimes``: layer
    name -> class separation."""
    import pandas as pd

    pop = pop or make_population()
    out = {}
    plain = replace(params, n_boot=0)
    with tempfile.TemporaryDirectory() as tmp:
        for per in sizes:
            t0 = time.perf_counter()
            truth = pd.concat([run_geometry(pop, per, 100_000 + s, plain, Path(tmp), regimes) for s in range(n_truth)])
            t1 = time.perf_counter()
            reps = pd.concat([run_geometry(pop, per, r, params, Path(tmp), regimes).assign(replicate=r)
                              for r in range(replicates)])
            log(f"size {per} per class: {n_truth} truth samples {t1 - t0:.0f} s, {replicates} replicates "
                f"{time.perf_counter() - t1:.0f} s")
            out[per] = dict(truth=truth, reps=reps, seconds_truth=t1 - t0, seconds_reps=time.perf_counter() - t1)
    return out


def summarise(truth, reps, metrics, regimes=REGIMES) -> list[dict]:
    """Coverage and width per regime (layer) and metric, against the truth samples."""
    rows = []
    for name in regimes:
        t, r = truth[truth["layer_name"] == name], reps[reps["layer_name"] == name]
        for m in metrics:
            tv = t[m].to_numpy(float)
            tv = tv[np.isfinite(tv)]
            if tv.size < 2 or not len(r):
                continue
            mu, sd = float(tv.mean()), float(tv.std(ddof=1))
            lo, hi, th = (r[c].to_numpy(float) for c in (f"{m}_lo", f"{m}_hi", m))
            ok = np.isfinite(lo) & np.isfinite(hi)
            cov = (lo[ok] <= mu) & (mu <= hi[ok])
            ideal = 2 * Z95 * sd
            rows.append(dict(regime=name, metric=m, truth_mean=mu, truth_sd=sd, n_truth=int(tv.size),
                             replicates=int(ok.sum()), coverage=float(cov.mean()),
                             coverage_se=float(math.sqrt(max(cov.mean() * (1 - cov.mean()), 1e-12) / ok.sum())),
                             width=float(np.mean(hi[ok] - lo[ok])), ideal_width=ideal,
                             width_ratio=float(np.mean(hi[ok] - lo[ok]) / ideal) if ideal > 0 else math.nan,
                             collapsed=float(np.mean((lo[ok] == th[ok]) | (hi[ok] == th[ok]))),
                             lo_min=float(lo[ok].min()), hi_max=float(hi[ok].max()),
                             estimate_mean=float(np.mean(th[ok]))))
    return rows


def pooled(rows: list[dict]) -> dict:
    """Per metric over every size and regime: coverage (all replicates together) and the range of the
    width ratios."""
    out = {}
    for m in dict.fromkeys(r["metric"] for r in rows):
        sel = [r for r in rows if r["metric"] == m]
        n = sum(r["replicates"] for r in sel)
        cov = sum(r["coverage"] * r["replicates"] for r in sel) / n
        ratios = [r["width_ratio"] for r in sel if math.isfinite(r["width_ratio"])]
        out[m] = dict(coverage=cov, coverage_se=math.sqrt(cov * (1 - cov) / n), replicates=n,
                      coverage_min=min(r["coverage"] for r in sel), coverage_max=max(r["coverage"] for r in sel),
                      width_ratio_min=min(ratios, default=math.nan), width_ratio_max=max(ratios, default=math.nan))
    return out


def plot(result: dict, path: Path) -> None:
    """Coverage (left) and width / ideal (right) per metric, one marker per size and regime, with the
    targets shaded (91-99% coverage, width at most 1.25x ideal)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [dict(r, size=s) for s, rs in result["cells"].items() for r in rs]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(metrics) + 1.6), sharey=True)
    marks = dict(zip(REGIMES, "o^s", strict=True))
    sizes = sorted({r["size"] for r in rows}, key=int)
    colours = dict(zip(sizes, ("tab:blue", "tab:orange", "tab:green", "tab:red"), strict=False))  # up to 4 sizes
    for r in rows:
        y = metrics.index(r["metric"]) + (sizes.index(r["size"]) - (len(sizes) - 1) / 2) * 0.25
        kw = dict(marker=marks[r["regime"]], color=colours[r["size"]], ls="none", ms=6)
        axes[0].errorbar(r["coverage"], y, xerr=r["coverage_se"], **kw)
        axes[1].plot(r["width_ratio"], y, **kw)
    axes[0].axvspan(0.91, 0.99, color="0.9")
    axes[0].axvline(0.95, color="0.5", lw=0.8)
    axes[1].axvspan(0, 1.25, color="0.9")
    axes[1].axvline(1.0, color="0.5", lw=0.8)
    axes[0].set_yticks(range(len(metrics)), metrics)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("coverage of the expected value by nominal 95% intervals")
    axes[1].set_xlabel("mean width / ideal width (2 x 1.96 x sd over independent samples)")
    handles = [plt.Line2D([], [], marker=mk, color="k", ls="none", label=name) for name, mk in marks.items()]
    handles += [plt.Line2D([], [], marker="o", color=c, ls="none", label=f"{N_CLASSES} x {s} points")
                for s, c in colours.items()]
    axes[1].legend(handles=handles, fontsize=8, loc="lower right")
    fig.suptitle(f"Interval coverage study: {result['replicates']} replicates per cell, truth from "
                 f"{result['n_truth']} samples, n_boot = {result['params']['n_boot']}", fontsize=10)
    fig.tight_layout()
    tmp = path.with_suffix(".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.rename(path)


def main(argv=None) -> dict:
    from dataclasses import asdict

    from llmscape import geometry as G
    from llmscape.geometry.resample import describe_interval_method

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 100], help="points per class (16 classes)")
    ap.add_argument("--replicates", type=int, default=20)
    ap.add_argument("--truth", type=int, default=200, help="independent samples for the truth and its spread")
    ap.add_argument("--n-boot", type=int, default=None, help="subsamples (default: the pipeline's)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/coverage.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="instead of running: join the results of runs of single sizes into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge([json.loads(Path(f).read_text()) for f in args.merge], Path(args.out))
    params = G.GeometryParams(device="cpu")
    if args.n_boot is not None:
        params = replace(params, n_boot=args.n_boot)
    t0 = time.perf_counter()
    study = run_study(args.sizes, args.replicates, args.truth, params)
    cells = {str(s): summarise(d["truth"], d["reps"], G.INTERVAL_METRICS) for s, d in study.items()}
    result = dict(what="coverage of nominal intervals, synthetic Gaussian classes (bench/coverage.py)",
                  date=time.strftime("%Y-%m-%d"), machine=f"{platform.node()} {platform.processor()}".strip(),
                  cpus=__import__("os").cpu_count(), seconds=time.perf_counter() - t0,
                  population=dict(classes=N_CLASSES, latent_dim=LATENT_DIM, ambient_dim=AMBIENT_DIM,
                                  letters=N_LETTERS, separations=REGIMES),
                  sizes=args.sizes, replicates=args.replicates, n_truth=args.truth, params=asdict(params),
                  methods={m: describe_interval_method(m) for m in G.INTERVAL_METRICS},
                  cells=cells, pooled=pooled([r for rs in cells.values() for r in rs]))
    return write(result, Path(args.out))


def write(result: dict, out: Path) -> dict:
    """The JSON (written under a temporary name, then renamed), the figure and the printed table."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.rename(out)
    plot(result, out.with_suffix(".png"))
    print_table(result)
    return result


def merge(results: list[dict], out: Path) -> dict:
    """One result from runs of different sizes with the same settings (e.g. one process per size)."""
    first = results[0]
    for r in results[1:]:
        for key in ("replicates", "n_truth", "params", "methods", "population"):
            if r[key] != first[key]:
                raise SystemExit(f"cannot merge: the runs differ in {key}")
    cells = {s: rows for r in results for s, rows in r["cells"].items()}
    merged = dict(first, sizes=[int(s) for s in cells], cells=cells, seconds=sum(r["seconds"] for r in results),
                  pooled=pooled([row for rows in cells.values() for row in rows]))
    return write(merged, out)


def print_table(result: dict) -> None:
    """Coverage (width / ideal) per metric and regime, one block per size."""
    for size, rows in result["cells"].items():
        print(f"\n{N_CLASSES} x {size} points, {result['replicates']} replicates, truth from {result['n_truth']}")
        print(f"{'metric':20s}" + "".join(f"{name:>24s}" for name in REGIMES))
        for m in dict.fromkeys(r["metric"] for r in rows):
            cells = {r["regime"]: r for r in rows if r["metric"] == m}
            print(f"{m:20s}" + "".join(f"{cells[n]['coverage']:>14.2f} ({cells[n]['width_ratio']:.2f}x)"
                                       if n in cells else f"{'-':>24s}" for n in REGIMES))


if __name__ == "__main__":
    main()
