"""Resolution study: how many points per class the density-peak recipe needs before the subject ARI and
the headline Gride ID reach their large-sample values; the evidence for the resolution rule
(``GeometryParams.resolution_size``, ``llmscape.geometry.resolution``).

The criterion (``resolution.TOLERANCE``, ``resolution.PROBABILITY``): at n points per class a value is
at its large-sample value when the subject ARI is within 0.1 of it (a difference on the ARI's bounded
scale) and the Gride ID within 10% of it (a ratio); a size resolves a metric when a sample of that size
meets this with probability at least 0.9. Sizes are counted in units of the neighbourhood scale
s = max(density_k, n2 = 2 id_scale): the rule is "factor x s points per class".

(a) Synthetic classes of known size: bench/coverage.py's population (16 classes, isotropic unit
    Gaussians in 8 dimensions around unit class means times a separation, embedded in R^50), four
    separations from no structure to fully separated classes (the four "layers" of one extraction file).
    Each draw is a fresh sample of ``--ref-units`` x s points per class; the project's own study
    (``resolution.compute_resolution_study``, the code path of rule geometry_resolution) computes the
    whole sample and one subsample per size. A subsample of an independent sample is an independent
    sample of its size, so the draws are independent; the large-sample value of a metric is the mean
    of the draws' whole samples. Two neighbourhood scales: k = 16 with the scale (16, 32), the default,
    and k = 8 with (8, 16), to see whether the factor holds in units of s.
(b) The embedded model: the base 5-shot extraction of the embedded default (SmolLM2-135M-Instruct,
    16 MMLU subjects x 100 questions), every layer, ``--model-draws`` subsamples of each size within
    subjects; the reference is the whole extraction (100 per subject = 3.1 s: not a large-sample limit,
    and a subsample of 80 shares 80% of its questions, so the large sizes look closer than they are).
    Per layer group (first, middle, last third by depth) and draw: the group mean at n over the group
    mean of the whole extraction.

Reported per part, scale, regime (or layer group), metric and size: the median over draws of the value
and of its ratio to the reference, the 5th and 95th percentiles of that ratio over the draws (where 90%
of single draws fall), the share of draws meeting the criterion with its 95% Wilson interval, and the
smallest size from which the share stays at least 0.9 ("resolved from"). Writes
``bench/results/resolution_study.json`` and ``bench/results/resolution_study.png``.

    python3 bench/resolution_study.py                       # both parts
    python3 bench/resolution_study.py --model-draws 0       # the synthetic part alone
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL_H5 = "/tmp/freshrun/results/reps/smollm2-135m/base/5shot.h5"
#: class separation of each synthetic regime (bench/coverage.py's population; subject ARI at 100 points per
#: class about 0.08, 0.45, 0.92, and 1 for the largest)
SEPARATIONS = {"sep 5.7": 5.7, "sep 8.5": 8.5, "sep 10": 10.0, "sep 12": 12.0}
#: sizes in units of s = max(density_k, 2 id_scale)
UNITS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
SCALES = ((16, 16), (8, 8))  # (density_k, id_scale)
METRICS = ("ari_subjects", "id_gride", "n_clusters")
Z95 = 1.959963984540054


def load_population_module():
    """bench/coverage.py under its own name (the name "coverage" is also the coverage.py package's)."""
    spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "bench" / "coverage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def synthetic_draws(scale: tuple[int, int], draws: int, ref_units: float, log=print):
    """The long table of part (a) at one scale: one row per (regime, size, draw), whole samples marked."""
    import pandas as pd

    from llmscape import geometry as G
    from llmscape.geometry import resolution as R

    C = load_population_module()
    pop = C.make_population()
    k, n1 = scale
    params = G.GeometryParams(device="cpu", density_k=k, id_scale=n1, n_boot=0)
    s = max(k, 2 * n1)
    n_ref = round(ref_units * s)
    sizes = sorted({max(2, round(u * s)) for u in UNITS if round(u * s) < n_ref})
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in range(draws):
            t0 = time.perf_counter()
            hidden, y, letters = C.draw_sample(pop, n_ref, list(SEPARATIONS.values()),
                                               np.random.default_rng([7, k, n1, d]))
            h5 = C.write_extraction(Path(tmp) / f"draw{d}.h5", hidden, y, letters, list(SEPARATIONS))
            study = R.compute_resolution_study(h5, params, sizes, 1, seed=d, model="synthetic", variant="base",
                                               shots=0)
            h5.unlink()
            out.append(study.assign(draw=d, density_k=k, id_scale=n1, scale=s))
            log(f"  scale k={k}, ({n1}, {2 * n1}): draw {d + 1}/{draws} ({time.perf_counter() - t0:.1f} s)")
    table = pd.concat(out, ignore_index=True).rename(columns={"layer_name": "regime"})
    return table


def model_draws(h5: str, sizes, draws: int, log=print):
    """The long table of part (b): rule geometry_resolution's table of the embedded model's extraction."""
    from llmscape import geometry as G
    from llmscape.geometry import resolution as R

    params = G.GeometryParams(device="cpu", n_boot=0)
    t0 = time.perf_counter()
    study = R.compute_resolution_study(h5, params, sizes, draws, seed=0, model="smollm2-135m", variant="base",
                                       shots=5)
    log(f"  model: {study['layer'].nunique()} layers x ({len(sizes)} sizes x {draws} draws + whole) in "
        f"{time.perf_counter() - t0:.0f} s")
    return study.assign(scale=max(params.density_k, 2 * params.id_scale))


def wilson(hits: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a binomial share (Wilson 1927)."""
    if n == 0:
        return math.nan, math.nan
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def cells(values: dict, reference: dict, metric: str, scale: int, label: dict) -> list[dict]:
    """One row per size: ``values`` maps size -> per-draw values, ``reference`` the large-sample value."""
    from llmscape.geometry import resolution as R

    rows = []
    for size in sorted(values):
        v = np.asarray(values[size], dtype=float)
        v = v[np.isfinite(v)]
        if not v.size:
            continue
        ratio = v / reference if reference else np.full(v.shape, np.nan)
        hits = int(R.within_tolerance(metric, v, reference).sum()) if metric in R.TOLERANCE else None
        lo, hi = wilson(hits, v.size) if hits is not None else (math.nan, math.nan)
        rows.append(dict(label, metric=metric, per_class=int(size), units=size / scale, draws=int(v.size),
                         reference=float(reference), value_median=float(np.median(v)),
                         ratio_median=float(np.median(ratio)), ratio_p05=float(np.percentile(ratio, 5)),
                         ratio_p95=float(np.percentile(ratio, 95)),
                         within=None if hits is None else hits / v.size, within_wilson_lo=lo,
                         within_wilson_hi=hi))
    return rows


def resolved_from(rows: list[dict]) -> float | None:
    """The smallest size (in units of s) from which the share within tolerance stays >= PROBABILITY."""
    from llmscape.geometry import resolution as R

    ok = [(r["units"], r["within"] >= R.PROBABILITY) for r in sorted(rows, key=lambda r: r["units"])]
    start = None
    for units, good in ok:
        start = (start if start is not None else units) if good else None
    return start


def summarise_synthetic(table) -> list[dict]:
    """Rows of cells() per scale, regime and metric; the reference is the mean of the whole samples."""
    rows = []
    for (k, n1, regime), g in table.groupby(["density_k", "id_scale", "regime"], sort=False):
        scale = int(g["scale"].iloc[0])
        for metric in METRICS:
            ref = float(g.loc[g["whole"], metric].mean())
            sub = g[~g["whole"]]
            values = {int(n): grp[metric].to_numpy() for n, grp in sub.groupby("per_subject")}
            label = dict(part="synthetic", density_k=int(k), id_scale=int(n1), regime=regime,
                         reference_per_class=int(g.loc[g["whole"], "per_subject"].iloc[0]),
                         reference_sd=float(g.loc[g["whole"], metric].std()))
            rows += cells(values, ref, metric, scale, label)
    return rows


def summarise_model(table) -> list[dict]:
    """Rows of cells() per layer group and metric: per draw the group mean, the whole extraction's group
    mean as the reference."""
    rows = []
    scale = int(table["scale"].iloc[0])
    d = table[np.isfinite(table["ari_subjects"])]
    for group, g in d.groupby("group", sort=False):
        means = g.groupby(["whole", "per_subject", "draw"])[list(METRICS)].mean().reset_index()
        for metric in METRICS:
            ref = float(means.loc[means["whole"], metric].iloc[0])
            sub = means[~means["whole"]]
            values = {int(n): grp[metric].to_numpy() for n, grp in sub.groupby("per_subject")}
            label = dict(part="model", density_k=16, id_scale=16, regime=group,
                         layers=f"{g['layer'].min()}-{g['layer'].max()}",
                         reference_per_class=int(g.loc[g["whole"], "per_subject"].iloc[0]))
            rows += cells(values, ref, metric, scale, label)
    return rows


def verdicts(rows: list[dict]) -> list[dict]:
    """Per part, scale, regime and criterion metric: the reference and the size it is resolved from."""
    from llmscape.geometry import resolution as R

    keys = dict.fromkeys((r["part"], r["density_k"], r["id_scale"], r["regime"], r["metric"]) for r in rows
                         if r["metric"] in R.TOLERANCE)
    out = []
    for part, k, n1, regime, metric in keys:
        sel = [r for r in rows if (r["part"], r["density_k"], r["id_scale"], r["regime"], r["metric"]) ==
               (part, k, n1, regime, metric)]
        out.append(dict(part=part, density_k=k, id_scale=n1, regime=regime, metric=metric,
                        reference=sel[0]["reference"], resolved_from_units=resolved_from(sel),
                        largest_units=max(r["units"] for r in sel)))
    return out


def plot(result: dict, path: Path) -> None:
    """Ratio to the reference against size in units of s: ARI (top) and Gride ID (bottom); one column per
    synthetic scale and one for the model; median with the 5-95% band over draws; the rule dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["cells"]
    panels = list(dict.fromkeys((r["part"], r["density_k"]) for r in rows))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.3 * len(panels), 6.4), squeeze=False, sharex=True)
    for j, (part, k) in enumerate(panels):
        for i, metric in enumerate(("ari_subjects", "id_gride")):
            ax = axes[i, j]
            sel = [r for r in rows if (r["part"], r["density_k"], r["metric"]) == (part, k, metric)
                   and (metric != "ari_subjects" or r["reference"] >= 0.2)]  # a ratio to ~0 says nothing
            for c, regime in enumerate(dict.fromkeys(r["regime"] for r in sel)):
                g = sorted((r for r in sel if r["regime"] == regime), key=lambda r: r["units"])
                x = [r["units"] for r in g]
                ax.plot(x, [r["ratio_median"] for r in g], "-o", ms=3, color=f"C{c}",
                        label=f"{regime} (ref {g[0]['reference']:.2f})")
                ax.fill_between(x, [r["ratio_p05"] for r in g], [r["ratio_p95"] for r in g], color=f"C{c}",
                                alpha=0.15, linewidth=0)
            ax.axhspan(0.9, 1.1, color="0.9", zorder=0)
            ax.axvline(result["rule_factor"], ls="--", color="0.3", lw=1)
            ax.set_ylim(-0.1, 1.5)
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6.5)
            what = "subject ARI" if metric == "ari_subjects" else "Gride ID"
            ax.set_ylabel(f"{what} / reference")
            where = (f"synthetic, k = {k}, scale ({k}, {2 * k})" if part == "synthetic"
                     else "SmolLM2-135M 5-shot, k = 16, scale (16, 32)")
            ax.set_title(where, fontsize=9)
            if i == 1:
                ax.set_xlabel("points per class / max(density_k, 2 id_scale)")
    fig.text(0.5, 0.005, "line: median over draws; band: 5th-95th percentile of single draws; grey: within 10%; "
             "ARI panels leave out regimes whose reference ARI is below 0.2; "
             f"dashed: the rule ({result['rule_factor']:g} x the scale)", ha="center", va="bottom", fontsize=7,
             color="0.3")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    tmp = path.with_suffix(".part.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.rename(path)


def print_table(result: dict) -> None:
    for r in result["cells"]:
        if r["metric"] == "n_clusters":
            continue
        print(f"{r['part']:9s} k={r['density_k']:2d} {r['regime']:8s} {r['metric']:12s} n={r['per_class']:4d} "
              f"({r['units']:4.2f} s): value {r['value_median']:6.3f} ratio {r['ratio_median']:5.2f} "
              f"[{r['ratio_p05']:5.2f}, {r['ratio_p95']:5.2f}] within {r['within']:.2f} "
              f"[{r['within_wilson_lo']:.2f}, {r['within_wilson_hi']:.2f}] ({r['draws']} draws)")
    for v in result["verdicts"]:
        print(f"{v['part']:9s} k={v['density_k']:2d} {v['regime']:8s} {v['metric']:12s} reference "
              f"{v['reference']:.3f}: resolved from {v['resolved_from_units']} x s (largest tried "
              f"{v['largest_units']:.2f})")


def main(argv=None) -> dict:
    from llmscape import geometry as G
    from llmscape.geometry import resolution as R
    from llmscape.io import write_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draws", type=int, default=40, help="independent synthetic samples per scale")
    ap.add_argument("--scales", nargs="+", default=[f"{k},{n1}" for k, n1 in SCALES],
                    help="synthetic neighbourhood scales as density_k,id_scale")
    ap.add_argument("--ref-units", type=float, default=6.0, help="the whole synthetic sample, in units of s")
    ap.add_argument("--model-h5", default=MODEL_H5)
    ap.add_argument("--model-sizes", type=int, nargs="+", default=[10, 16, 24, 32, 40, 48, 56, 64, 80])
    ap.add_argument("--model-draws", type=int, default=30, help="subsamples per size (0: skip the model)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/resolution_study.json"))
    args = ap.parse_args(argv)
    logging.getLogger("llmscape").setLevel(logging.ERROR)  # every small size is below resolution: expected
    t0, load_before = time.perf_counter(), os.getloadavg()[0]
    rows, seconds = [], {}
    scales = [tuple(int(v) for v in text.split(",")) for text in args.scales]
    for scale in scales:
        t = time.perf_counter()
        rows += summarise_synthetic(synthetic_draws(scale, args.draws, args.ref_units))
        seconds[f"synthetic k={scale[0]}"] = time.perf_counter() - t
    if args.model_draws:
        t = time.perf_counter()
        rows += summarise_model(model_draws(args.model_h5, args.model_sizes, args.model_draws))
        seconds["model"] = time.perf_counter() - t
    result = dict(what="resolution study (bench/resolution_study.py)",
                  date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                  machine=f"{platform.node()} {platform.processor()}".strip(), cpus=os.cpu_count(),
                  load_before=load_before, load_after=os.getloadavg()[0], seconds=time.perf_counter() - t0,
                  seconds_by_part=seconds,
                  criterion=dict(tolerance={m: list(v) for m, v in R.TOLERANCE.items()}, probability=R.PROBABILITY),
                  rule_factor=G.RESOLUTION_FACTOR, synthetic=dict(separations=SEPARATIONS, units=UNITS,
                                                                   scales=scales, draws=args.draws,
                                                                   ref_units=args.ref_units),
                  model=dict(h5=args.model_h5, sizes=args.model_sizes, draws=args.model_draws),
                  params=asdict(replace(G.GeometryParams(), n_boot=0)), cells=rows, verdicts=verdicts(rows))
    out = Path(args.out)
    write_json(out, result)  # (under a temporary name, renamed when complete)
    plot(result, out.with_suffix(".png"))
    print_table(result)
    print(f"{result['seconds']:.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())})")
    return result


if __name__ == "__main__":
    main()
