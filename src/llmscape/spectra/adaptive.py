"""Spectrum-adaptive LoRA ranks (after Adaptive-Rank LoRA, Bhaskar et al. 2025; our own code).

Per decoder matrix (rows of a spectra table, embeddings and lm_head excluded):

1. min-max normalise over all analysed matrices (eps = 1e-8):
   ``a = (alpha - min) / (max - min + eps)`` and ``s = 1 - (spikes - min) / (max - min + eps)``;
2. composite score ``score = w_alpha * a + w_spikes * s`` (0.7 / 0.3 by default). A *low* score means a
   heavy tail (low Hill alpha) and many spikes, a *high* score a light tail and few spikes;
3. selection of ``int(L * percentile)`` of the L matrices: ``select="heaviest"`` keeps the lowest
   scores (what the published code does), ``"lightest"`` the highest, ``"all"`` keeps every matrix;
4. rank scaling between ``r_min`` and ``r_max`` over the selected set with
   ``u = (f(score) - f(min)) / (f(max) - f(min) + eps)``, ``f`` = identity (``linear``), ``log1p``
   (``log``) or ``sqrt`` (``sqrt``); ``rank = clip(round(r_min + (r_max - r_min) * u))``;
5. ``lora_alpha = round(rank * alpha_factor)`` per module.

**Direction** (``direction``) is an explicit choice because the published text and code disagree
(docs/spectra.md): ``"light_more"`` gives the higher ranks to the higher scores (lighter tails, fewer
spikes; the published code *within* its heavy-tailed selection, and the paper's section 3.2 / README),
``"heavy_more"`` gives them to the lower scores (heavier tails; the paper's abstract). The defaults,
``select="heaviest", direction="light_more"``, reproduce the published code.

Output JSON (``results/spectra/{model}/adaptive_ranks.json``), read by the fine-tuning stage and passed
to ``peft.LoraConfig(target_modules=..., r=..., lora_alpha=..., rank_pattern=..., alpha_pattern=...)``:

``target_modules``  one regex string: ``re.escape`` of every selected full module name (e.g.
                    ``model\\.layers\\.3\\.mlp\\.down_proj``) joined by ``|``; peft matches it with
                    ``re.fullmatch`` against module names, so exactly the selected modules get adapters
``rank_pattern``    {full module name: int rank}, e.g. ``{"model.layers.3.mlp.down_proj": 37}``
``alpha_pattern``   {full module name: int lora_alpha}
``r``, ``lora_alpha``   the LoraConfig defaults (overridden for every selected module by the patterns)
``settings``        every choice above (alpha_metric, spikes_metric, w_alpha, w_spikes, percentile,
                    select, direction, scaling, r_min, r_max, alpha_factor)
``modules``         one record per analysed matrix: module_name, layer, module, alpha, spikes, score,
                    selected, rank, lora_alpha (rank / lora_alpha null when not selected)
``model``, ``variant``, ``n_analysed``, ``n_selected``, ``peft_version``

peft 0.21.2 looks a module up in ``rank_pattern`` by ``re.match(r"(.*\\.)?(KEY)$", name)``; a full
module name as KEY matches only that module (its dots match themselves; the test checks every key
against every module name of a real peft model).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from ..errors import LlmscapeError
from ..projections import DECODER_MODULES

EPS = 1e-8
DEFAULTS = dict(alpha_metric="alpha_ks", spikes_metric="num_spikes_mean", w_alpha=0.7, w_spikes=0.3,
                percentile=0.5, select="heaviest", direction="light_more", scaling="linear", r_min=4,
                r_max=64, alpha_factor=2.0)
SCALINGS = {"linear": lambda x: x, "log": np.log1p, "sqrt": np.sqrt}


class AdaptiveRankError(LlmscapeError, ValueError):
    pass


def _minmax(x: np.ndarray) -> np.ndarray:
    return (x - x.min()) / (x.max() - x.min() + EPS)


def compute_adaptive_ranks(spectra: pd.DataFrame, *, alpha_metric="alpha_ks", spikes_metric="num_spikes_mean",
                           w_alpha=0.7, w_spikes=0.3, percentile=0.5, select="heaviest", direction="light_more",
                           scaling="linear", r_min=4, r_max=64, alpha_factor=2.0,
                           modules=DECODER_MODULES) -> pd.DataFrame:
    """Per-matrix scores, selection, ranks and alphas (see the module docstring)."""
    if select not in ("heaviest", "lightest", "all"):
        raise AdaptiveRankError(f"select must be heaviest, lightest or all, not {select!r}")
    if direction not in ("light_more", "heavy_more"):
        raise AdaptiveRankError(f"direction must be light_more or heavy_more, not {direction!r}")
    if scaling not in SCALINGS:
        raise AdaptiveRankError(f"scaling must be one of {', '.join(SCALINGS)}, not {scaling!r}")
    if not (0 < percentile <= 1):
        raise AdaptiveRankError(f"percentile must be in (0, 1], got {percentile}")
    if not (1 <= r_min <= r_max):
        raise AdaptiveRankError(f"need 1 <= r_min <= r_max, got {r_min}, {r_max}")
    for col in (alpha_metric, spikes_metric):
        if col not in spectra.columns:
            raise AdaptiveRankError(f"spectra table has no column {col!r}")
    df = spectra[spectra["module"].isin(modules) & (spectra["layer"] >= 0)].copy()
    df["module_name"] = df["name"].str.replace(r"\.weight$", "", regex=True)
    df["alpha"] = df[alpha_metric].astype(float)
    df["spikes"] = df[spikes_metric].astype(float)
    bad = ~(np.isfinite(df["alpha"]) & np.isfinite(df["spikes"]))
    if bad.any():
        import logging

        logging.getLogger("llmscape.spectra").warning(
            "%d matrices have NaN %s/%s and get no adapter: %s", int(bad.sum()), alpha_metric, spikes_metric,
            ", ".join(df.loc[bad, "module_name"].head(5)))
    df = df[~bad].sort_values(["layer", "module"], kind="stable").reset_index(drop=True)
    if df.empty:
        raise AdaptiveRankError("no matrix with finite metrics to rank")
    df["alpha_norm"] = _minmax(df["alpha"].to_numpy())
    df["spikes_norm"] = 1.0 - _minmax(df["spikes"].to_numpy())
    df["score"] = w_alpha * df["alpha_norm"] + w_spikes * df["spikes_norm"]
    n_keep = len(df) if select == "all" else int(len(df) * percentile)
    if n_keep < 1:
        raise AdaptiveRankError(f"percentile {percentile} of {len(df)} matrices selects none. Fix: raise "
                                "spectra.adaptive.percentile.")
    order = np.argsort(df["score"].to_numpy(), kind="stable")
    keep = order[:n_keep] if select == "heaviest" else order[::-1][:n_keep]
    df["selected"] = False
    df.loc[keep, "selected"] = True
    f = SCALINGS[scaling]
    sel = df["selected"].to_numpy()
    t = f(df["score"].to_numpy())
    tmin, tmax = t[sel].min(), t[sel].max()
    u = (tmax - t) / (tmax - tmin + EPS) if direction == "heavy_more" else (t - tmin) / (tmax - tmin + EPS)
    ranks = np.clip(np.floor(r_min + (r_max - r_min) * u + 0.5), r_min, r_max).astype(int)
    alphas = np.floor(ranks * alpha_factor + 0.5).astype(int)
    df["rank"] = pd.array(np.where(sel, ranks, 0), dtype="Int64")
    df["lora_alpha"] = pd.array(np.where(sel, alphas, 0), dtype="Int64")
    df.loc[~sel, ["rank", "lora_alpha"]] = pd.NA
    return df


def return_peft_config(ranks: pd.DataFrame, r: int = 16, lora_alpha: int = 32, settings: dict | None = None,
                       model: str = "", variant: str = "") -> dict:
    """The JSON-ready dict described in the module docstring."""
    try:
        from importlib.metadata import version

        peft_version = version("peft")
    except Exception:  # pragma: no cover - peft is a dependency
        peft_version = "absent"
    sel = ranks[ranks["selected"]]
    names = list(sel["module_name"])
    records = []
    for row in ranks.itertuples():
        records.append(dict(module_name=row.module_name, layer=int(row.layer), module=row.module,
                            alpha=float(row.alpha), spikes=float(row.spikes), score=float(row.score),
                            selected=bool(row.selected),
                            rank=None if pd.isna(row.rank) else int(row.rank),
                            lora_alpha=None if pd.isna(row.lora_alpha) else int(row.lora_alpha)))
    return dict(
        model=model, variant=variant, peft_version=peft_version,
        target_modules="|".join(re.escape(n) for n in names),
        rank_pattern={n: int(v) for n, v in zip(names, sel["rank"], strict=True)},
        alpha_pattern={n: int(v) for n, v in zip(names, sel["lora_alpha"], strict=True)},
        r=int(r), lora_alpha=int(lora_alpha), settings=dict(settings or {}),
        n_analysed=int(len(ranks)), n_selected=int(len(sel)), modules=records,
    )


def compute_rank_budget(config: dict, shapes: dict[str, tuple[int, int]]) -> int:
    """Number of LoRA parameters of a config: sum over selected modules of rank * (out + in)."""
    return int(sum(r * (shapes[n][0] + shapes[n][1]) for n, r in config["rank_pattern"].items()))

