"""Figures of the spectra stage."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..io import atomic_path
from ..projections import DECODER_MODULES

DEFAULT_METRICS = ("alpha_ks", "stable_rank", "num_spikes", "entropy")


def plot_depth(spectra: pd.DataFrame, out: str | Path, metrics=DEFAULT_METRICS, title: str = "") -> Path:
    """Metrics against depth: one row per metric, one panel (column) per module type, one line per variant.

    The base variant is drawn in black; other variants (interventions, fine-tunes) in colour.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = spectra[spectra["layer"] >= 0]
    modules = [m for m in DECODER_MODULES if m in set(df["module"])]
    metrics = [m for m in metrics if m in df.columns]
    variants = sorted(df["variant"].unique(), key=lambda v: (v != "base", v))
    fig, axes = plt.subplots(len(metrics), len(modules), figsize=(2.3 * len(modules), 1.9 * len(metrics)),
                             sharex=True, squeeze=False)
    cmap = plt.get_cmap("tab10")
    for i, metric in enumerate(metrics):
        for j, module in enumerate(modules):
            ax = axes[i, j]
            for k, variant in enumerate(variants):
                d = df[(df["module"] == module) & (df["variant"] == variant)].sort_values("layer")
                if d.empty:
                    continue
                style = dict(color="black", lw=1.4) if variant == "base" else dict(color=cmap(k % 10), lw=1.0,
                                                                                   ls="--")
                ax.plot(d["layer"], d[metric].astype(float), marker=".", ms=3, label=variant, **style)
            if i == 0:
                ax.set_title(module, fontsize=9)
            if j == 0:
                ax.set_ylabel(metric, fontsize=9)
            if i == len(metrics) - 1:
                ax.set_xlabel("layer", fontsize=8)
            ax.tick_params(labelsize=7)
    if len(variants) > 1:
        axes[0, -1].legend(fontsize=6, loc="best")
    fig.suptitle(title or f"weight spectra against depth: {', '.join(sorted(df['model'].unique()))}", fontsize=10)
    fig.tight_layout()
    out = Path(out)
    with atomic_path(out, suffix=".tmp.png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return out
