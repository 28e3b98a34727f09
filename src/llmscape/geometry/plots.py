"""Figures of the geometry tables (columns in llmscape.geometry): one line per shots setting, a band
for the interval of each value, open markers on a dotted line where a layer is below resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .params import RESOLVED
from .resolution import GROUPS

BELOW_NOTE = "open markers, dotted: below resolution (too few points per class)"


def _axes(ncols: int, width: float = 5.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.8), squeeze=False)
    return fig, axes[0]


def _lines(ax, table: pd.DataFrame, column: str, style: str = "-", label_suffix: str = "", band: bool = True):
    """One line per shots; the band of {column}_lo..{column}_hi; open markers and a dotted line on layers
    whose ``resolution`` is not ``resolved``. Returns whether any layer was below resolution."""
    shots_all = sorted(table["shots"].unique())
    any_below = False
    for shots, g in table.sort_values("layer").groupby("shots"):
        color = f"C{shots_all.index(shots)}"
        below = (g["resolution"] != RESOLVED).to_numpy() if "resolution" in g else np.zeros(len(g), bool)
        any_below |= bool(below.any())
        y = g[column].to_numpy(dtype=float)
        ax.plot(g["layer"], np.where(below, np.nan, y), style, color=color, label=f"{shots}-shot{label_suffix}")
        if below.any():  # the below-resolution stretch, joined to its neighbours, dotted
            edge = below | np.r_[below[1:], False] | np.r_[False, below[:-1]]
            ax.plot(g["layer"], np.where(edge, y, np.nan), ":", color=color)
        ax.scatter(g["layer"][~below], y[~below], s=9, color=color)
        ax.scatter(g["layer"][below], y[below], s=14, facecolors="none", edgecolors=color, linewidths=0.9)
        lo, hi = f"{column}_lo", f"{column}_hi"
        if band and lo in g and np.isfinite(g[lo].to_numpy(dtype=float)).any():
            ax.fill_between(g["layer"], g[lo].to_numpy(dtype=float), g[hi].to_numpy(dtype=float), color=color,
                            alpha=0.15, linewidth=0)
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)
    return any_below


def _note(fig, below: bool, table: pd.DataFrame) -> None:
    parts = []
    if "confidence" in table and (table.get("n_boot", pd.Series([0])) > 0).any():
        c = float(table["confidence"].dropna().iloc[0])
        parts.append(f"bands: {100 * c:.0f}% intervals from {int(table['n_boot'].max())} subsamples")
    if below:
        parts.append(BELOW_NOTE)
    if parts:
        fig.text(0.5, 0.005, "; ".join(parts), ha="center", va="bottom", fontsize=7, color="0.3")


def _save(fig, dest, title: str):
    from ..io import atomic_path

    if title:
        fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    with atomic_path(dest, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_ari(table: pd.DataFrame, dest: str | Path, title: str = "") -> None:
    """The paper's two panels: ARI with subjects, ARI with answer letters, vs layer."""
    fig, (a, b) = _axes(2)
    below = _lines(a, table, "ari_subjects")
    below |= _lines(b, table, "ari_letters")
    a.set_title("ARI subjects")
    b.set_title("ARI letters")
    top = float(np.nanmax(table[["ari_subjects", "ari_letters"]].to_numpy(dtype=float), initial=0))
    for ax in (a, b):
        ax.set_ylim(-0.05, max(0.9, top) + 0.08)
        ax.set_ylabel("ARI")
    a.legend()
    _note(fig, below, table)
    _save(fig, dest, title)


def plot_id(table: pd.DataFrame, dest: str | Path, title: str = "") -> None:
    fig, (a,) = _axes(1, width=6.0)
    scale = int(table["id_scale_n1"].dropna().iloc[0]) if "id_scale_n1" in table else 16
    below = _lines(a, table, "id_gride", "-", f" Gride ({scale},{2 * scale})")
    _lines(a, table, "id_2nn", "--", " 2NN", band=False)
    a.set_ylabel("intrinsic dimension")
    a.legend(fontsize=7, ncol=2)
    _note(fig, below, table)
    _save(fig, dest, title)


def plot_clusters(table: pd.DataFrame, dest: str | Path, title: str = "") -> None:
    fig, (a, b) = _axes(2)
    below = _lines(a, table, "n_clusters")
    _lines(b, table, "core_fraction")
    a.set_ylabel("ADP clusters (halo off)")
    b.set_ylabel("core-point fraction (halo on)")
    b.set_ylim(0, 1.02)
    a.legend()
    _note(fig, below, table)
    _save(fig, dest, title)


def plot_resolution(summary: pd.DataFrame, dest: str | Path, *, resolution_size: int, n_subjects: int,
                    title: str = "") -> None:
    """Subject ARI, ADP clusters and Gride ID against points per subject, one line per layer group
    (mean over its layers and the subsamples), the band from the smallest to the largest of the
    subsamples' group means (a range, not an interval); the whole extraction as a star; the resolution
    size as a dashed line."""
    fig, axes = _axes(3, width=4.6)
    for ax, metric, label in zip(axes, ("ari_subjects", "n_clusters", "id_gride"),
                                 ("subject ARI", "ADP clusters", "Gride ID (headline scale)"), strict=True):
        for i, group in enumerate(GROUPS):
            g = summary[summary["group"] == group]
            if g.empty:
                continue
            sub, whole = g[~g["whole"]].sort_values("per_subject"), g[g["whole"]]
            layers = int(g["layers"].iloc[0])
            ax.plot(sub["per_subject"], sub[metric], "-o", ms=3, color=f"C{i}", label=f"{group} ({layers} layers)")
            ax.fill_between(sub["per_subject"], sub[f"{metric}_min"], sub[f"{metric}_max"], color=f"C{i}", alpha=0.15,
                            linewidth=0)
            ax.plot(whole["per_subject"], whole[metric], "*", ms=9, color=f"C{i}")
        ax.axvline(resolution_size, ls="--", color="0.4", lw=1)
        if metric == "n_clusters":
            ax.axhline(n_subjects, ls=":", color="0.4", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("questions per subject")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.text(0.5, 0.005, f"dashed: resolution size {resolution_size}; star: whole extraction; dotted: "
             f"{n_subjects} subjects; bands: smallest to largest subsample (group mean)", ha="center", va="bottom",
             fontsize=7, color="0.3")
    _save(fig, dest, title)


def plot_headline(table: pd.DataFrame, dest: str | Path, *, model: str) -> None:
    """The report's front-page figure: subject ARI per layer, one line per shot count, with the bands
    of its intervals, titled with the model that ran."""
    fig, (a,) = _axes(1, width=7.0)
    below = _lines(a, table, "ari_subjects")
    top = float(np.nanmax(table["ari_subjects"].to_numpy(dtype=float), initial=0))
    a.set_ylim(-0.05, max(0.5, top) + 0.08)
    a.set_ylabel("ARI of density peaks with subjects")
    a.legend(fontsize=8)
    _note(fig, below, table)
    _save(fig, dest, f"{model}: subject ARI per layer and shot count")


def write_figure_html(png: str | Path, dest: str | Path, caption: str) -> None:
    """A self-contained HTML figure (the PNG inlined as a data URI) with its caption, for a page that
    cannot link files, such as the report's front page."""
    import base64
    import html

    from ..io import atomic_path

    data = base64.b64encode(Path(png).read_bytes()).decode("ascii")
    text = (f'<figure style="margin:0">\n<img alt="{html.escape(caption)}" style="max-width:100%" '
            f'src="data:image/png;base64,{data}">\n<figcaption>{html.escape(caption)}</figcaption>\n</figure>\n')
    with atomic_path(dest, suffix=".tmp.html") as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
