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

Choosing and checking the methods. ``--cache DIR`` keeps every replicate's estimates, every subsample
value of every metric and the truth samples (parquet, a few MB: keep it out of git). From the cache any
interval method is evaluated again in seconds, by the library's own function
(resample.return_metric_interval with the method under test), without recomputing the geometry.
``--select`` chooses a method per metric on one set of replicates (:func:`select_methods`: the declared
method where it meets the targets with a margin, else the candidate with the highest coverage that
does); the table to report is the library's methods on *other* replicates (``--validation``: a run with
``--first-replicate`` past the selection set and ``--truth 0``, its truth being the cache's).

    python3 bench/coverage.py                      # the full study (sizes 64 and 100, 20 replicates)
    python3 bench/coverage.py --replicates 5 --truth 40 --sizes 64   # a quick look
    python3 bench/coverage.py --replicates 60 --cache A                       # selection set, with truth
    python3 bench/coverage.py --first-replicate 60 --replicates 40 --truth 0 --cache B   # evaluation set
    python3 bench/coverage.py --from-cache A --select --validation B          # choose on A
    python3 bench/coverage.py --from-cache A --validation B                   # report on B
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
    """compute_geometry of one sample (stream: its random stream); the layer table (one row per regime)
    and the subsample table (one row per regime and subsample: every interval metric's draws)."""
    from llmscape import geometry as G

    hidden, y, letters = draw_sample(pop, per_class, list(regimes.values()),
                                     np.random.default_rng([per_class, stream]))
    h5 = write_extraction(workdir / f"sample_{per_class}_{stream}.h5", hidden, y, letters, list(regimes))
    try:
        geo = G.compute_geometry(h5, params)
        return geo.table, geo.boot
    finally:
        h5.unlink()


def run_study(sizes, replicates: int, n_truth: int, params, log=print, pop: dict | None = None,
              regimes: dict = REGIMES, first: int = 0, cache: Path | None = None) -> dict:
    """Tables of the replicates (with intervals), of their subsamples (``boot``: every metric of every
    subsample, from which any interval method can be evaluated again) and of the truth samples (plain),
    per size (points per class); ``pop``: the population (make_population(), the 16 classes, by
    default); ``regimes``: layer name -> class separation; ``first``: the first replicate's random
    stream (another range of replicates is an independent validation set); ``cache``: a folder where
    each size's three tables are saved as parquet as soon as they are done (see :func:`load_cache`)."""
    import pandas as pd

    pop = pop or make_population()
    out = {}
    plain = replace(params, n_boot=0)
    with tempfile.TemporaryDirectory() as tmp:
        for per in sizes:
            t0 = time.perf_counter()
            truth = pd.concat([run_geometry(pop, per, 100_000 + s, plain, Path(tmp), regimes)[0]
                               for s in range(n_truth)] or [pd.DataFrame()])  # none: a validation set's
            t1 = time.perf_counter()
            runs = [(r, *run_geometry(pop, per, r, params, Path(tmp), regimes))
                    for r in range(first, first + replicates)]
            reps = pd.concat([t.assign(replicate=r) for r, t, _ in runs])
            boot = pd.concat([b.assign(replicate=r) for r, _, b in runs])
            log(f"size {per} per class: {n_truth} truth samples {t1 - t0:.0f} s, {replicates} replicates "
                f"{time.perf_counter() - t1:.0f} s")
            out[per] = dict(truth=truth, reps=reps, boot=boot, seconds_truth=t1 - t0,
                            seconds_reps=time.perf_counter() - t1)
            if cache is not None:
                save_cache(cache, per, out[per])
    return out


def save_cache(folder: Path, per_class: int, tables: dict) -> None:
    """The truth, replicate and subsample tables of one size as parquet files (each written under a
    temporary name, then renamed)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("truth", "reps", "boot"):
        path = folder / f"{name}_{per_class}.parquet"
        tmp = path.with_suffix(".part")
        tables[name].reset_index(drop=True).to_parquet(tmp)
        tmp.rename(path)


def load_cache(*folders: Path) -> dict:
    """The tables :func:`save_cache` wrote, per size: {size: dict(truth=, reps=, boot=)}; several
    folders (runs of other replicates of the same study) are joined, the truth samples from the first."""
    import pandas as pd

    sizes = sorted(int(p.stem.split("_")[1]) for p in Path(folders[0]).glob("reps_*.parquet"))
    if not sizes:
        raise SystemExit(f"no cached study in {folders[0]}: run bench/coverage.py --cache {folders[0]} first")
    out = {}
    for s in sizes:
        parts = {name: [pd.read_parquet(Path(f) / f"{name}_{s}.parquet") for f in folders] for name in ("reps", "boot")}
        out[s] = dict(truth=pd.read_parquet(Path(folders[0]) / f"truth_{s}.parquet"),
                      **{name: pd.concat(v, ignore_index=True) for name, v in parts.items()})
        if out[s]["reps"][["replicate", "layer"]].duplicated().any():
            raise SystemExit(f"the cached runs {[str(f) for f in folders]} share replicates: join runs of other ones")
    return out


def subsample_values(tables: dict, metrics) -> dict:
    """Per size and metric, the subsample values of every replicate row (a list of arrays in the order
    of the replicate table's rows): what an interval method needs, read once from the cached tables."""
    out = {}
    for size, t in tables.items():
        groups = dict(iter(t["boot"].groupby(["replicate", "layer"])))
        keys = list(zip(t["reps"]["replicate"], t["reps"]["layer"], strict=True))
        out[size] = {m: [groups[k][m].to_numpy(float) for k in keys] for m in metrics}
    return out


def with_methods(tables: dict, values: dict, methods: dict, params, replicates=None) -> dict:
    """Per size, the replicate table (its rows of ``replicates`` only, when given) with the ends of every
    metric in ``methods`` (name -> params.IntervalMethod) made again by the library
    (resample.return_metric_interval) from the cached subsample values."""
    from llmscape.geometry.resample import return_metric_interval

    out = {}
    for size, t in tables.items():
        reps = t["reps"].reset_index(drop=True)
        keep = np.ones(len(reps), bool) if replicates is None else reps["replicate"].isin(list(replicates)).to_numpy()
        reps = reps.copy()
        for m, method in methods.items():
            ends = [return_metric_interval(m, float(theta), draws, params.boot_fraction, params.confidence, method)[:2]
                    if k else (math.nan, math.nan)
                    for theta, draws, k in zip(reps[m], values[size][m], keep, strict=True)]
            reps[f"{m}_lo"], reps[f"{m}_hi"] = np.asarray(ends, float).reshape(-1, 2).T
        out[size] = reps[keep]
    return out


def evaluate(tables: dict, values: dict, methods: dict, params, replicates=None, truth: dict | None = None,
             regimes: dict = REGIMES) -> dict:
    """Cells (per size: :func:`summarise`'s rows) of the metrics in ``methods`` with those methods, on
    ``replicates`` (all when None), against the truth samples of ``truth`` (per size; default
    ``tables``' own)."""
    truth = truth or {s: t["truth"] for s, t in tables.items()}
    reps = with_methods(tables, values, methods, params, replicates)
    return {str(s): summarise(truth[s], reps[s], list(methods), regimes) for s in tables}


#: the selection rule's targets, inside the study's own (coverage 0.91-0.99, width at most 1.25x the ideal)
#: by a margin for the noise of the set the choice is made on
SELECT_COVERAGE, SELECT_CELL_COVERAGE, SELECT_WIDTH = (0.93, 0.985), 0.85, 1.2


def candidate_methods(metric: str) -> list:
    """The interval methods tried for ``metric``: its declared one first, then every combination of the
    scales that suit its range, deflations 0.8-2.5 (steps of 0.05; below 1 widens), the draws' sd or IQR, and for counts
    both roundings."""
    from llmscape.geometry.params import INTERVAL_METHODS

    base = INTERVAL_METHODS[metric]
    scales = (["none"] + (["logit"] if base.bounds == (0.0, 1.0) else [])
              + (["fisher"] if base.bounds == (-0.5, 1.0) else []))
    out = [base]
    for transform in scales:
        for deflation in np.round(np.arange(0.8, 2.501, 0.05), 2):
            for spread in ("sd", "iqr"):
                for rounding in (("outward", "nearest") if base.integer else (base.rounding,)):
                    m = base._replace(transform=transform, deflation=float(deflation), spread=spread, rounding=rounding)
                    if m != base:
                        out.append(m)
    return out


def meets(p: dict) -> bool:
    """Whether one method's pooled summary meets the selection targets."""
    return (SELECT_COVERAGE[0] <= p["coverage"] <= SELECT_COVERAGE[1] and p["coverage_min"] >= SELECT_CELL_COVERAGE
            and p["width_ratio_max"] <= SELECT_WIDTH)


def select_methods(tables: dict, values: dict, params, replicates, metrics) -> dict:
    """Per metric, on the selection replicates only: the declared method when it meets the targets (a
    method that works is not refitted), else among the candidates that meet them the one with the
    highest pooled coverage (ties: the narrower largest width ratio), i.e. the width target's whole
    budget spent on coverage, since a choice made near 0.95 on one set covered less on fresh
    replicates; the best few tried are kept."""
    out = {}
    for m in metrics:
        tried = []
        for method in candidate_methods(m):
            rows = [r for rs in evaluate(tables, values, {m: method}, params, replicates).values() for r in rs]
            tried.append((method, pooled(rows)[m]))
            if len(tried) == 1 and meets(tried[0][1]):
                break
        ok = [t for t in tried if meets(t[1])]
        rank = sorted(ok, key=lambda t: (-round(t[1]["coverage"], 6), t[1]["width_ratio_max"]))
        best = tried[0] if meets(tried[0][1]) else (rank[0] if rank else None)
        out[m] = dict(declared=tried[0][0]._asdict(), declared_summary=tried[0][1], met=best is not None,
                      chosen=best[0]._asdict() if best else None, chosen_summary=best[1] if best else None,
                      n_tried=len(tried), best=[dict(t[0]._asdict(), **t[1]) for t in rank[:5]])
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
    axes[1].legend(handles=handles, fontsize=8, loc="lower left")
    fig.suptitle(f"Interval coverage study: {result['replicates']} replicates per cell, truth from "
                 f"{result['n_truth']} samples, n_boot = {result['params']['n_boot']}"
                 + (f"\n{result['design']}" if "design" in result else ""), fontsize=10)
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
    ap.add_argument("--first-replicate", type=int, default=0, help="random stream of the first replicate")
    ap.add_argument("--cache", default=None, help="folder for the per-size tables (parquet, kept out of git)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/coverage.json"))
    ap.add_argument("--from-cache", metavar="DIR", nargs="+", help="instead of running: evaluate the library's "
                    "interval methods on a cached study (--cache; several: joined), on its odd replicates, or on "
                    "--validation's")
    ap.add_argument("--validation", metavar="DIR", help="a cached run of other replicates (--first-replicate, "
                    "--truth 0): the evaluation set, the whole --from-cache study the selection set")
    ap.add_argument("--select", action="store_true", help="with --from-cache: choose a method per metric on the "
                    "selection set (its even replicates, or all of it with --validation) and write the choice")
    ap.add_argument("--merge", nargs="+", metavar="JSON",
                    help="instead of running: join the results of runs of single sizes into --out")
    args = ap.parse_args(argv)
    if args.merge:
        return merge([json.loads(Path(f).read_text()) for f in args.merge], Path(args.out))
    if args.from_cache:
        return from_cache(args)
    params = G.GeometryParams(device="cpu")
    if args.n_boot is not None:
        params = replace(params, n_boot=args.n_boot)
    if args.truth == 0 and not args.cache:
        raise SystemExit("--truth 0 (a validation set, no truth samples) needs --cache DIR to keep it")
    t0 = time.perf_counter()
    study = run_study(args.sizes, args.replicates, args.truth, params, first=args.first_replicate,
                      cache=Path(args.cache) if args.cache else None)
    if args.truth == 0:
        return {}
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


def from_cache(args) -> dict:
    """--from-cache: the library's methods evaluated on the evaluation set (--validation's replicates, or
    the cache's odd ones), against the cache's truth samples; with --select, the choice per metric on
    the selection set (the cache's replicates, or its even ones) instead."""
    from dataclasses import asdict

    from llmscape import geometry as G
    from llmscape.geometry.params import INTERVAL_METHODS
    from llmscape.geometry.resample import describe_interval_method

    tables = load_cache(*map(Path, args.from_cache))
    params = G.GeometryParams(device="cpu")
    truth = {s: t["truth"] for s, t in tables.items()}
    reps = sorted(set(next(iter(tables.values()))["reps"]["replicate"]))
    if args.validation:
        selection, evaluation = (tables, None), (None, None)  # the evaluation set is read when evaluated
        design = f"selection: replicates {reps[0]}-{reps[-1]}; evaluation: those of {Path(args.validation).name}"
    else:
        selection, evaluation = (tables, reps[0::2]), (tables, reps[1::2])
        design = "selection: the even replicates; evaluation: the odd ones"
    sel_tables, sel_reps = selection
    if args.select:
        chosen = select_methods(sel_tables, subsample_values(sel_tables, G.INTERVAL_METRICS), params, sel_reps,
                                G.INTERVAL_METRICS)
        return write_selection(chosen, design, Path(args.out).with_name("coverage_selection.json"))
    ev_tables, ev_reps = evaluation if evaluation[0] is not None else (load_cache(Path(args.validation)), None)
    if args.validation:
        ev = sorted(set(next(iter(ev_tables.values()))["reps"]["replicate"]))
        design = f"methods chosen on replicates {reps[0]}-{reps[-1]}, evaluated on replicates {ev[0]}-{ev[-1]}"
    cells = evaluate(ev_tables, subsample_values(ev_tables, G.INTERVAL_METRICS),
                     {m: INTERVAL_METHODS[m] for m in G.INTERVAL_METRICS}, params, ev_reps, truth)
    n_reps = len(ev_reps) if ev_reps is not None else len(set(next(iter(ev_tables.values()))["reps"]["replicate"]))
    result = dict(what="coverage of nominal intervals, synthetic Gaussian classes (bench/coverage.py), "
                       "evaluated from the cached subsamples", design=design,
                  date=time.strftime("%Y-%m-%d"), sizes=sorted(tables), replicates=n_reps,
                  n_truth=int(len(next(iter(truth.values()))) // len(REGIMES)), params=asdict(params),
                  population=dict(classes=N_CLASSES, latent_dim=LATENT_DIM, ambient_dim=AMBIENT_DIM,
                                  letters=N_LETTERS, separations=REGIMES),
                  methods={m: describe_interval_method(m) for m in G.INTERVAL_METRICS},
                  cells=cells, pooled=pooled([r for rs in cells.values() for r in rs]))
    return write(result, Path(args.out))


def write_selection(chosen: dict, design: str, out: Path) -> dict:
    """The choice per metric (:func:`select_methods`) as JSON, with the targets it was made to, and a line
    per metric printed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    targets = dict(coverage=SELECT_COVERAGE, width=SELECT_WIDTH, cell_coverage=SELECT_CELL_COVERAGE)
    tmp = out.with_suffix(".part")
    tmp.write_text(json.dumps(dict(design=design, targets=targets, metrics=chosen), indent=1))
    tmp.rename(out)
    for m, c in chosen.items():
        print(f"{m:20s} declared kept: {c['declared'] == c['chosen']}; chosen {c['chosen']} {c['chosen_summary']}")
    return chosen


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
