"""Figures of the geometry tables (columns in llmscape.geometry): one line per shots setting."""

from __future__ import annotations

from pathlib import Path

import pandas as pd


def _axes(ncols: int, width: float = 5.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, 3.8), squeeze=False)
    return fig, axes[0]


def _lines(ax, table: pd.DataFrame, column: str, style: str = "-", label_suffix: str = ""):
    for shots, g in table.sort_values("layer").groupby("shots"):
        ax.plot(g["layer"], g[column], style, marker="o", ms=3, label=f"{shots}-shot{label_suffix}",
                color=f"C{sorted(table['shots'].unique()).index(shots)}")
    ax.set_xlabel("layer")
    ax.grid(alpha=0.3)


def _save(fig, dest, title: str):
    from ..io import atomic_path

    if title:
        fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(dest, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)


def plot_ari(table: pd.DataFrame, dest: str | Path, title: str = "") -> None:
    """The paper's two panels: ARI with subjects, ARI with answer letters, vs layer."""
    fig, (a, b) = _axes(2)
    _lines(a, table, "ari_subjects")
    _lines(b, table, "ari_letters")
    a.set_title("ARI subjects")
    b.set_title("ARI letters")
    for ax in (a, b):
        ax.set_ylim(-0.05, max(0.9, float(table[["ari_subjects", "ari_letters"]].max().max()) + 0.05))
        ax.set_ylabel("ARI")
    a.legend()
    _save(fig, dest, title)


def plot_id(table: pd.DataFrame, dest: str | Path, title: str = "") -> None:
    fig, (a,) = _axes(1, width=6.0)
    _lines(a, table, "id_gride", "-", " Gride (16,32)")
    _lines(a, table, "id_2nn", "--", " 2NN")
    a.set_ylabel("intrinsic dimension")
    a.legend(fontsize=7, ncol=2)
    _save(fig, dest, title)


def plot_clusters(table: pd.DataFrame, dest: str | Path, title: str = "") -> None:
    fig, (a, b) = _axes(2)
    _lines(a, table, "n_clusters")
    _lines(b, table, "core_fraction")
    a.set_ylabel("ADP clusters (halo off)")
    b.set_ylabel("core-point fraction (halo on)")
    b.set_ylim(0, 1.02)
    a.legend()
    _save(fig, dest, title)
