"""Figures of the join stage (matplotlib, Agg). Every function writes one PNG atomically and returns
its path; with nothing to plot (e.g. no fine-tuning variants) it writes a figure that says so, so the
report always has the file its caption describes."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..io import atomic_path
from .columns import BASE_METHOD, spec_col

matplotlib.use("Agg")  # files only, no display (pyplot picks its backend at the first figure)


def _save(fig, dest) -> Path:
    with atomic_path(dest, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(dest)


def _empty(dest, message: str) -> Path:
    fig, ax = plt.subplots(figsize=(5, 2))
    ax.axis("off")
    ax.text(0.5, 0.5, message, ha="center", va="center", wrap=True)
    return _save(fig, dest)


def _variant_order(variants) -> list[str]:
    v = sorted(set(variants))
    return (["base"] if "base" in v else []) + [x for x in v if x != "base"]


def correlation_heatmap(corr: pd.DataFrame, dest, *, method: str = "spearman", module: str = "all",
                        stat: str = "mean", scope: str | None = None) -> Path:
    """Spectral metric (rows) x geometry metric (columns), one panel per shots; ``*`` marks CIs that
    exclude 0. ``scope`` None: pooled if present, else base."""
    c = corr[(corr["method"] == method) & (corr["module"] == module) & (corr["stat"] == stat)]
    if scope is None:
        scope = "pooled" if (c["scope"] == "pooled").any() else "base"
    c = c[c["scope"] == scope]
    if c.empty:
        return _empty(dest, f"no {method} correlations for scope {scope}, module {module}")
    shots = sorted(c["shots"].unique())
    rows, cols = list(dict.fromkeys(c["metric"])), list(dict.fromkeys(c["geometry"]))
    fig, axes = plt.subplots(1, len(shots), figsize=(0.55 * len(cols) * len(shots) + 3, 0.38 * len(rows) + 2.2),
                             squeeze=False)
    im = None
    for ax, k in zip(axes[0], shots, strict=True):
        d = c[c["shots"] == k]
        R = d.pivot(index="metric", columns="geometry", values="r").reindex(index=rows, columns=cols)
        lo = d.pivot(index="metric", columns="geometry", values="ci_low").reindex(index=rows, columns=cols)
        hi = d.pivot(index="metric", columns="geometry", values="ci_high").reindex(index=rows, columns=cols)
        im = ax.imshow(R.to_numpy(float), cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        for i in range(len(rows)):
            for j in range(len(cols)):
                r = R.iat[i, j]
                if np.isfinite(r):
                    sig = (lo.iat[i, j] > 0 or hi.iat[i, j] < 0)
                    ax.text(j, i, f"{r:.2f}" + ("*" if sig else ""), ha="center", va="center", fontsize=6,
                            color="white" if abs(r) > 0.6 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
        ax.set_yticks(range(len(rows)), rows if ax is axes[0][0] else [""] * len(rows), fontsize=7)
        ax.set_title(f"{k}-shot", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label=f"{method} r")
    fig.suptitle(f"{method} across layers, {scope}; spectra: {stat} over {module} matrices", fontsize=9)
    return _save(fig, dest)


def id_alpha_overlay(joined: pd.DataFrame, dest, *, id_col: str = "id_gride",
                     alpha_col: str | None = None) -> Path:
    """Per variant: intrinsic dimension (left axis, one line per shots) and the block's alpha (right axis)."""
    alpha_col = alpha_col or spec_col("alpha_ks", "all", "mean")
    variants = _variant_order(joined["variant"])
    if not variants:
        return _empty(dest, "no variants")
    n = len(variants)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3 * nrow), squeeze=False)
    for ax, v in zip(axes.flat, variants, strict=False):  # a grid may have spare cells
        d = joined[joined["variant"] == v]
        for k, g in d.groupby("shots"):
            ax.plot(g["layer"], g[id_col], marker=".", label=f"ID {k}-shot")
        ax.set_xlabel("layer")
        ax.set_ylabel(id_col)
        ax2 = ax.twinx()
        a = d.drop_duplicates("layer").sort_values("layer")
        if alpha_col in a:
            ax2.plot(a["layer"], a[alpha_col], color="black", ls="--", marker="x", ms=3, label="alpha")
        ax2.set_ylabel(alpha_col, fontsize=7)
        ax.set_title(v, fontsize=8)
        if ax is axes.flat[0]:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, dest)


def ari_panels(joined: pd.DataFrame, dest) -> Path:
    """Per variant: ARI of the density-peak clusters with subjects (solid) and letters (dashed)."""
    variants = _variant_order(joined["variant"])
    if not variants:
        return _empty(dest, "no variants")
    n = len(variants)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4 * ncol, 2.8 * nrow), squeeze=False, sharey=True)
    for ax, v in zip(axes.flat, variants, strict=False):  # a grid may have spare cells
        d = joined[joined["variant"] == v]
        for i, (k, g) in enumerate(d.groupby("shots")):
            col = f"C{i}"
            ax.plot(g["layer"], g["ari_subjects"], color=col, label=f"subjects {k}-shot")
            ax.plot(g["layer"], g["ari_letters"], color=col, ls="--", label=f"letters {k}-shot")
        ax.set_title(v, fontsize=8)
        ax.set_xlabel("layer")
        ax.set_ylabel("ARI")
    axes.flat[0].legend(fontsize=6)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.tight_layout()
    return _save(fig, dest)


def accuracy_vs_trainable(summary: pd.DataFrame, dest) -> Path:
    """Accuracy against trainable parameters for the fine-tuning sweep (one marker per run and shots);
    the base model's accuracy as a horizontal line per shots."""
    ft = summary[~summary["method"].isin([BASE_METHOD, "srank-intervention"]) & summary["trainable_params"].notna()]
    if ft.empty:
        return _empty(dest, "no fine-tuning variants in this run (finetune.enabled or join.variants)")
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    markers = "osD^v<>p*h"
    for i, (k, g) in enumerate(summary.groupby("shots")):
        base = g[g["method"] == BASE_METHOD]
        if len(base):
            ax.axhline(float(base["accuracy"].iloc[0]), color=f"C{i}", ls=":", lw=1, label=f"base {k}-shot")
    for j, (meth, g) in enumerate(ft.groupby("method")):
        for i, (k, gk) in enumerate(g.groupby("shots")):
            ax.scatter(gk["trainable_params"].astype(float), gk["accuracy"], color=f"C{i}",
                       marker=markers[j % len(markers)], label=f"{meth} {k}-shot")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("MMLU accuracy (extraction)")
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, dest)


def intervention_plot(table: pd.DataFrame, dest, metrics=("accuracy", "id_gride", "ari_subjects")) -> Path:
    """Measured stable rank of the intervened group against accuracy and layer-mean geometry."""
    if table.empty:
        return _empty(dest, "no stable-rank intervention variants in this run")
    metrics = [m for m in metrics if m in table.columns]
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3), squeeze=False)
    for ax, m in zip(axes[0], metrics, strict=True):
        for i, ((group, k), g) in enumerate(table.groupby(["group", "shots"])):
            g = g.sort_values("stable_rank")
            ax.plot(g["stable_rank"], g[m], marker="o", color=f"C{i}", label=f"{group} {k}-shot")
        ax.set_xlabel("stable rank (group mean)")
        ax.set_ylabel(m)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return _save(fig, dest)


def trajectory_plot(traj: pd.DataFrame, dest, module: str = "all") -> Path:
    """eig_ratio during fine-tuning (left) and against the generalisation gap (right), per run."""
    t = traj[traj["module"] == module] if len(traj) else traj
    if t.empty:
        return _empty(dest, "no fine-tuning checkpoints with spectra in this run")
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.2))
    for i, (run, g) in enumerate(t.groupby("run")):
        a1.plot(g["step"], g["eig_ratio_mean"], marker="o", color=f"C{i}", label=run)
        a2.scatter(g["gap"], g["eig_ratio_mean"], color=f"C{i}")
    a1.set_xlabel("step")
    a1.set_ylabel(f"eig_ratio ({module}, mean)")
    a1.legend(fontsize=6)
    a2.set_xlabel("gap = val - train loss")
    a2.set_ylabel(f"eig_ratio ({module}, mean)")
    fig.tight_layout()
    return _save(fig, dest)


#: titles of the paired-difference figures, per comparison (llmscape.geometry.paired)
PAIRED_TITLES = {
    "shots": "k-shot minus 0-shot, same variant",
    "shots_step": "k-shot minus the next smaller shot count, same variant",
    "variant": "variant minus base, same shots",
    "layer": "layer l + 1 minus layer l, same extraction",
}


def _pair_label(comparison: str, r) -> str:
    if comparison == "shots_step":
        return f"{r['variant']} {r['shots']} - {r['ref_shots']} shots"
    return f"{r['variant']} {r['shots']}-shot"


def difference_bands(diffs: pd.DataFrame, dest, *, comparison: str, metrics=None, title: str = "") -> Path:
    """Paired differences per layer (value minus reference, same questions, same subsamples), one panel
    per metric, one line per pair with its interval as a band around 0; filled markers where a
    difference is claimed (the interval excludes 0 and most draws agree), open ones elsewhere."""
    d = diffs[diffs["comparison"] == comparison] if len(diffs) else diffs
    if d.empty:
        return _empty(dest, f"no {PAIRED_TITLES.get(comparison, comparison)} comparison in this run")
    metrics = list(metrics or dict.fromkeys(d["metric"]))
    ncol = min(len(metrics), 5)
    nrow = math.ceil(len(metrics) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol, 2.7 * nrow), squeeze=False)
    pairs = list(d.groupby(["variant", "shots", "ref_variant", "ref_shots"], sort=True))
    for ax, metric in zip(axes.flat, metrics, strict=False):  # a grid may have spare cells
        for i, (_, g) in enumerate(pairs):
            g = g[g["metric"] == metric].sort_values("layer")
            x, y = g["layer"].to_numpy(), g["diff"].to_numpy(dtype=float)
            lo, hi = g["diff_lo"].to_numpy(dtype=float), g["diff_hi"].to_numpy(dtype=float)
            sig = g["verdict"].isin(["higher", "lower"]).to_numpy()  # paired.py's verdict: a difference claimed
            col = f"C{i % 10}"
            ax.fill_between(x, lo, hi, color=col, alpha=0.18, linewidth=0)
            label = _pair_label(comparison, g.iloc[0]) if len(g) else None
            ax.plot(x, y, color=col, lw=1, label=label)
            ax.scatter(x[sig], y[sig], s=10, color=col)
            ax.scatter(x[~sig], y[~sig], s=10, facecolors="none", edgecolors=col, linewidths=0.7)
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_title(metric, fontsize=8)
        ax.set_xlabel("layer", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=6)
    conf = float(d["confidence"].dropna().iloc[0]) if d["confidence"].notna().any() else math.nan
    fig.suptitle(f"{title}{': ' if title else ''}{PAIRED_TITLES.get(comparison, comparison)}; bands: paired "
                 f"{100 * conf:.0f}% intervals from the same subsamples; filled: a difference (docs/geometry.md)",
                 fontsize=8)
    fig.tight_layout()
    return _save(fig, dest)
