"""Correlations between weight spectra and representation geometry.

Definitions
-----------
* ``r``, ``p``: Pearson or Spearman coefficient and two-sided p-value from ``scipy.stats.pearsonr`` /
  ``scipy.stats.spearmanr`` on the complete pairs (rows where both values are finite). NaN when fewer
  than 3 pairs or either side is constant.
* ``partial_r``, ``partial_p``: the correlation controlling for depth. Pearson: residualise x and y on the
  layer index by least squares (with intercept), correlate the residuals. Spearman: the same on ranks
  (x, y and the layer index are ranked first), i.e. the partial Spearman coefficient. p-value from
  t = r sqrt((n - 3) / (1 - r^2)) with n - 3 degrees of freedom.
* ``ci_low``, ``ci_high`` (and ``partial_ci_low``, ``partial_ci_high``): percentile bootstrap intervals:
  ``n_boot`` resamples of the rows (layers; pooled scopes resample (variant, layer) rows) with
  replacement, drawn from ``numpy.random.default_rng(seed)``, so the same inputs give the same CIs.
  Resamples where a side is constant are dropped (``n_boot_ok`` counts the rest).

Tables written by the ``correlate`` rule (all long / tidy)
----------------------------------------------------------
``correlations.parquet``        scope (a variant or ``pooled``), shots, spectral, metric, module, stat,
                                geometry, method, n, r, p, ci_low, ci_high, partial_r, partial_p,
                                partial_ci_low, partial_ci_high, n_boot_ok
``deltas.parquet``              per (variant, shots, layer): ``d:<column>`` = variant - base for every
                                geometry and selected spectral column, and d:accuracy
``delta_correlations.parquet``  across variants (layer-averaged deltas, one point per variant) and across
                                (variant, layer) points: x, y, scope, shots, method, n, r, p, ci_low, ci_high
``interventions.parquet``       per stable-rank intervention variant and shots: group, target, the
                                measured stable rank of the group (mean over its matrices and layers), base
                                value, accuracy and its change, layer-mean geometry and its change
``intervention_effects.parquet`` per (group, shots, y): Spearman / Pearson of the measured stable rank
                                against y across base and the group's targets, and the OLS slope
``trajectories.parquet``        per (run, step, module): eig_ratio mean / median over the module's matrices
                                and layers at the merged checkpoint, train loss (mean over the
                                ``gap_window`` steps ending at step), val loss (linear interpolation between
                                evaluations, NaN outside them), gap = val - train
``trajectory_correlations.parquet``  per run and pooled: eig_ratio against gap across checkpoints
"""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pandas as pd
from scipy import stats

from .columns import BASE_METHOD, GEOMETRY_METRICS, SRANK_GROUPS, SRANK_METHOD, parse_spec_col, spec_col

log = logging.getLogger("llmscape.join")

METHODS = ("spearman", "pearson")
CORR_COLUMNS = ["scope", "shots", "spectral", "metric", "module", "stat", "geometry", "method", "n", "r", "p",
                "ci_low", "ci_high", "partial_r", "partial_p", "partial_ci_low", "partial_ci_high", "n_boot_ok"]


# ---------------------------------------------------------------------------------------------------
# single pairs


def _complete(x, y, z=None):
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    if z is not None:
        z = np.asarray(z, float)
        ok &= np.isfinite(z)
        return x[ok], y[ok], z[ok]
    return x[ok], y[ok]


def _constant(a) -> bool:
    return a.size == 0 or np.all(a == a[0])


def correlation(x, y, method: str = "spearman") -> tuple[float, float, int]:
    """(r, p, n) of the complete pairs via scipy; NaN when n < 3 or a side is constant."""
    x, y = _complete(x, y)
    n = len(x)
    if n < 3 or _constant(x) or _constant(y):
        return math.nan, math.nan, n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = stats.spearmanr(x, y) if method == "spearman" else stats.pearsonr(x, y)
    return float(res[0]), float(res[1]), n


def _residualise(a: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Least-squares residuals of a on z (with intercept), along the last axis (batched)."""
    zc = z - z.mean(-1, keepdims=True)
    ac = a - a.mean(-1, keepdims=True)
    num = (ac * zc).sum(-1, keepdims=True)
    denom = np.broadcast_to((zc * zc).sum(-1, keepdims=True), num.shape)
    beta = np.divide(num, denom, out=np.zeros(num.shape), where=denom > 0)
    return ac - beta * zc


def partial_correlation(x, y, z, method: str = "spearman") -> tuple[float, float, int]:
    """Correlation of x and y controlling for z (module docstring); (r, p, n)."""
    x, y, z = _complete(x, y, z)
    n = len(x)
    if n < 4 or _constant(x) or _constant(y):
        return math.nan, math.nan, n
    if method == "spearman":
        x, y, z = stats.rankdata(x), stats.rankdata(y), stats.rankdata(z)
    rx, ry = _residualise(x, z), _residualise(y, z)
    sx, sy = np.sqrt((rx * rx).sum()), np.sqrt((ry * ry).sum())
    if sx < 1e-12 * max(1.0, np.abs(x).max()) or sy < 1e-12 * max(1.0, np.abs(y).max()):
        return math.nan, math.nan, n
    r = float(np.clip((rx * ry).sum() / (sx * sy), -1, 1))
    dof = n - 3
    if abs(r) >= 1:
        return r, 0.0, n
    t = r * math.sqrt(dof / (1 - r * r))
    return r, float(2 * stats.t.sf(abs(t), dof)), n


# ---------------------------------------------------------------------------------------------------
# batched bootstrap


def _batched_corr(X: np.ndarray, Y: np.ndarray, Z: np.ndarray | None, rank: bool) -> np.ndarray:
    """Correlations of every column of X with every column of Y in each batch: X (B, n, p), Y (B, n, q),
    optional depth Z (B, n) to partial out; returns (B, p, q) with NaN where a side is constant."""
    if rank:
        X, Y = stats.rankdata(X, axis=1), stats.rankdata(Y, axis=1)
        if Z is not None:
            Z = stats.rankdata(Z, axis=1)
    X, Y = np.moveaxis(X, 1, 2), np.moveaxis(Y, 1, 2)  # (B, p, n), (B, q, n)
    if Z is not None:
        X, Y = _residualise(X, Z[:, None, :]), _residualise(Y, Z[:, None, :])
    else:
        X, Y = X - X.mean(-1, keepdims=True), Y - Y.mean(-1, keepdims=True)
    sx, sy = np.sqrt((X * X).sum(-1)), np.sqrt((Y * Y).sum(-1))
    num = X @ np.moveaxis(Y, 1, 2)
    den = sx[:, :, None] * sy[:, None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        r = num / den
    r[den <= 1e-12] = np.nan
    return np.clip(r, -1, 1)


def _nan_groups(A: np.ndarray) -> dict[bytes, list[int]]:
    groups: dict[bytes, list[int]] = {}
    for j in range(A.shape[1]):
        groups.setdefault(np.isfinite(A[:, j]).tobytes(), []).append(j)
    return groups


def bootstrap_ci(X: np.ndarray, Y: np.ndarray, depth: np.ndarray, method: str, n_boot: int, seed: int,
                 level: float = 0.95) -> dict[str, np.ndarray]:
    """Percentile bootstrap CIs of r and partial r for all (X column, Y column) pairs: arrays (p, q)."""
    n, p = X.shape
    q = Y.shape[1]
    out = {k: np.full((p, q), np.nan) for k in ("ci_low", "ci_high", "partial_ci_low", "partial_ci_high")}
    out["n_boot_ok"] = np.zeros((p, q), int)
    if n_boot <= 0 or n < 4:
        return out
    lo, hi = 100 * (1 - level) / 2, 100 * (1 + level) / 2
    for kx, cols_x in _nan_groups(X).items():
        okx = np.frombuffer(kx, dtype=bool)
        for ky, cols_y in _nan_groups(Y).items():
            ok = okx & np.frombuffer(ky, dtype=bool) & np.isfinite(depth)
            m = int(ok.sum())
            if m < 4:
                continue
            rng = np.random.default_rng(seed)
            idx = rng.integers(0, m, size=(n_boot, m))
            Xs, Ys, Zs = X[ok][:, cols_x], Y[ok][:, cols_y], depth[ok]
            for key, Z in (("", None), ("partial_", Zs[idx])):
                r = _batched_corr(Xs[idx], Ys[idx], Z, method == "spearman")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    l_, h_ = np.nanpercentile(r, lo, axis=0), np.nanpercentile(r, hi, axis=0)
                out[f"{key}ci_low"][np.ix_(cols_x, cols_y)] = l_
                out[f"{key}ci_high"][np.ix_(cols_x, cols_y)] = h_
                if not key:
                    out["n_boot_ok"][np.ix_(cols_x, cols_y)] = np.isfinite(r).sum(0)
    return out


# ---------------------------------------------------------------------------------------------------
# spectra x geometry across layers


def correlate_block(df: pd.DataFrame, xcols, ycols, *, depth_col: str = "layer", methods=METHODS, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Long table of every (x, y, method) of one scope: r, p, partial r, CIs."""
    X = df[list(xcols)].to_numpy(float)
    Y = df[list(ycols)].to_numpy(float)
    z = df[depth_col].to_numpy(float)
    rows = []
    for method in methods:
        ci = bootstrap_ci(X, Y, z, method, n_boot, seed, level)
        for i, xc in enumerate(xcols):
            for j, yc in enumerate(ycols):
                r, p, n = correlation(X[:, i], Y[:, j], method)
                pr, pp, _ = partial_correlation(X[:, i], Y[:, j], z, method)
                rows.append(dict(x=xc, y=yc, method=method, n=n, r=r, p=p, partial_r=pr, partial_p=pp,
                                 **{k: ci[k][i, j] for k in ci}))
    return pd.DataFrame(rows)


def layer_correlations(joined: pd.DataFrame, spectral, geometry=GEOMETRY_METRICS, *, methods=METHODS,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95, pooled: bool = True) -> pd.DataFrame:
    """Spectral x geometry correlations across layers, per (variant, shots) and pooled over variants."""
    spectral = [c for c in spectral if c in joined.columns]
    geometry = [c for c in geometry if c in joined.columns]
    frames = []
    for shots, g in joined.groupby("shots", sort=True):
        scopes = [(v, gv) for v, gv in g.groupby("variant", sort=True)]
        if pooled and g["variant"].nunique() > 1:
            scopes.append(("pooled", g))
        for scope, d in scopes:
            t = correlate_block(d, spectral, geometry, methods=methods, n_boot=n_boot, seed=seed, level=level)
            t.insert(0, "scope", scope)
            t.insert(1, "shots", int(shots))
            frames.append(t)
    out = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["x", "y"])
    out = out.rename(columns={"x": "spectral", "y": "geometry"})
    parts = out["spectral"].map(lambda c: parse_spec_col(c) or (c, "", ""))
    out["metric"] = parts.map(lambda t: t[0])
    out["module"] = parts.map(lambda t: t[1])
    out["stat"] = parts.map(lambda t: t[2])
    return out.reindex(columns=CORR_COLUMNS)


# ---------------------------------------------------------------------------------------------------
# across variants


def variant_deltas(joined: pd.DataFrame, columns, base: str = "base") -> pd.DataFrame:
    """Per (variant, shots, layer) of every non-base variant: ``d:<col>`` = value - base value."""
    cols = [c for c in columns if c in joined.columns] + ["accuracy"]
    b = joined[joined["variant"] == base]
    if b.empty:
        return pd.DataFrame(columns=["variant", "shots", "layer", "method"])
    key = ["shots", "layer"]
    other = joined[joined["variant"] != base]
    m = other[["variant", "method", "depth"] + key + cols].merge(b[key + cols], on=key, how="left",
                                                                 suffixes=("", "@base"), validate="many_to_one")
    out = m[["variant", "method", "shots", "layer", "depth"]].copy()
    for c in cols:
        out[f"d:{c}"] = m[c] - m[f"{c}@base"]
    return out.reset_index(drop=True)


def delta_correlations(deltas: pd.DataFrame, spectral, geometry=GEOMETRY_METRICS, *, methods=METHODS,
                       n_boot: int = 1000, seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Change in spectra vs change in geometry vs change in accuracy.

    ``across_variants``: one point per variant (deltas averaged over layers): spectral x geometry,
    spectral x accuracy, geometry x accuracy. ``across_layers``: one point per (variant, layer):
    spectral x geometry."""
    if deltas.empty:
        return pd.DataFrame(columns=["scope", "shots", "x", "y", "method", "n", "r", "p", "ci_low", "ci_high"])
    dx = [f"d:{c}" for c in spectral if f"d:{c}" in deltas.columns]
    dy = [f"d:{c}" for c in geometry if f"d:{c}" in deltas.columns]
    frames = []
    for shots, g in deltas.groupby("shots", sort=True):
        per_var = g.groupby("variant")[dx + dy + ["d:accuracy", "layer"]].mean().reset_index()
        for scope, d, xs, ys in (("across_variants", per_var, dx + dy, dy + ["d:accuracy"]),
                                 ("across_layers", g, dx, dy)):
            t = correlate_block(d, xs, ys, methods=methods, n_boot=n_boot, seed=seed, level=level)
            t = t[t["x"] != t["y"]]
            if scope == "across_variants":  # spectral x geometry, spectral x accuracy, geometry x accuracy
                t = t[~(t["x"].isin(dy) & t["y"].isin(dy))]
            t.insert(0, "scope", scope)
            t.insert(1, "shots", int(shots))
            frames.append(t.drop(columns=["partial_r", "partial_p", "partial_ci_low", "partial_ci_high"]))
    return pd.concat(frames, ignore_index=True)


# ---------------------------------------------------------------------------------------------------
# stable-rank interventions


def intervention_table(joined: pd.DataFrame, geometry=GEOMETRY_METRICS, base: str = "base") -> pd.DataFrame:
    """Per intervention variant and shots: measured stable rank of its group, accuracy and layer-mean
    geometry, each with its change against base. Base rows are included once per group (target NaN)."""
    iv = joined[joined["method"] == SRANK_METHOD]
    b = joined[joined["variant"] == base]
    if iv.empty or b.empty:
        return pd.DataFrame(columns=["group", "variant", "shots", "target", "stable_rank", "accuracy"])
    geometry = [c for c in geometry if c in joined.columns]
    rows = []
    for group in sorted(iv["srank_group"].dropna().unique()):
        col = spec_col("stable_rank", group if group in ("attn", "mlp", "all") else SRANK_GROUPS[group][0], "mean")
        variants = [base] + sorted(iv.loc[iv["srank_group"] == group, "variant"].unique())
        for shots, g in joined[joined["variant"].isin(variants)].groupby("shots"):
            bg = g[g["variant"] == base]
            for v, gv in g.groupby("variant"):
                row = dict(group=group, variant=v, shots=int(shots),
                           target=float(gv["srank_target"].iloc[0]) if v != base else math.nan,
                           stable_rank=float(gv[col].mean()) if col in gv else math.nan,
                           accuracy=float(gv["accuracy"].iloc[0]))
                row["d:stable_rank"] = row["stable_rank"] - float(bg[col].mean())
                row["d:accuracy"] = row["accuracy"] - float(bg["accuracy"].iloc[0])
                for c in geometry:
                    row[c] = float(gv[c].mean())
                    row[f"d:{c}"] = row[c] - float(bg[c].mean())
                rows.append(row)
    return pd.DataFrame(rows)


def intervention_effects(table: pd.DataFrame, geometry=GEOMETRY_METRICS) -> pd.DataFrame:
    """Per (group, shots, y): correlation of the measured stable rank with y across base + targets, and
    the OLS slope dy / d stable_rank."""
    rows = []
    if table.empty:
        return pd.DataFrame(columns=["group", "shots", "y", "method", "n", "r", "p", "slope"])
    ys = ["accuracy"] + [c for c in geometry if c in table.columns]
    for (group, shots), g in table.groupby(["group", "shots"]):
        x = g["stable_rank"].to_numpy(float)
        for y in ys:
            yy = g[y].to_numpy(float)
            xs, ys_ = _complete(x, yy)
            slope = float(np.polyfit(xs, ys_, 1)[0]) if len(xs) >= 2 and not _constant(xs) else math.nan
            for method in METHODS:
                r, p, n = correlation(x, yy, method)
                rows.append(dict(group=group, shots=int(shots), y=y, method=method, n=n, r=r, p=p, slope=slope))
    return pd.DataFrame(rows)


# ---------------------------------------------------------------------------------------------------
# checkpoints: eigenvalue ratio during fine-tuning against the generalisation gap


def loss_at(curve: list[dict], step: float, window: int = 1) -> float:
    """Train loss: mean of the entries with step in (step - window, step]; NaN if none."""
    v = [c["loss"] for c in curve or [] if step - window < c["step"] <= step]
    return float(np.mean(v)) if v else math.nan


def interp_loss(curve: list[dict], step: float) -> float:
    """Val loss linearly interpolated between evaluations; NaN outside [first, last] evaluated step."""
    if not curve:
        return math.nan
    s = np.array([c["step"] for c in curve], float)
    l_ = np.array([c["loss"] for c in curve], float)
    if step < s.min() or step > s.max():
        return math.nan
    return float(np.interp(step, s, l_))


def trajectories(checkpoint_spectra: dict, runs: dict, modules=("all", "attn", "mlp"), window: int = 10,
                 base_spectra: pd.DataFrame | None = None) -> pd.DataFrame:
    """``checkpoint_spectra``: {(run, step): spectra table of the merged checkpoint}; ``runs``: {run:
    metrics.json dict}. Step 0 is the base model (no losses) when ``base_spectra`` is given."""
    from .columns import DECODER_MODULES, MODULE_GROUPS

    groups = {m: (m,) for m in DECODER_MODULES}
    groups.update(MODULE_GROUPS)
    rows = []
    items = list(checkpoint_spectra.items())
    if base_spectra is not None:
        items = [((r, 0), base_spectra) for r in runs] + items
    for (run, step), spec in items:
        m = runs.get(run, {})
        dec = spec[spec["layer"] >= 0]
        tr = loss_at(m.get("train_loss"), step, window) if step > 0 else math.nan
        va = interp_loss(m.get("val_loss"), step) if step > 0 else math.nan
        for mod in modules:
            sub = dec[dec["module"].isin(groups[mod])]["eig_ratio"].to_numpy(float)
            sub = sub[np.isfinite(sub)]
            rows.append(dict(run=run, method=m.get("method"), step=int(step), module=mod,
                             eig_ratio_mean=float(sub.mean()) if sub.size else math.nan,
                             eig_ratio_median=float(np.median(sub)) if sub.size else math.nan,
                             train_loss=tr, val_loss=va, gap=va - tr))
    cols = ["run", "method", "step", "module", "eig_ratio_mean", "eig_ratio_median", "train_loss", "val_loss", "gap"]
    return pd.DataFrame(rows, columns=cols).sort_values(["run", "module", "step"]).reset_index(drop=True)


def trajectory_correlations(traj: pd.DataFrame) -> pd.DataFrame:
    """eig_ratio (mean) against gap across checkpoints: per run, and pooled over runs."""
    rows = []
    for mod, g in traj.groupby("module"):
        scopes = list(g.groupby("run")) + ([("pooled", g)] if g["run"].nunique() > 1 else [])
        for scope, d in scopes:
            for method in METHODS:
                r, p, n = correlation(d["eig_ratio_mean"], d["gap"], method)
                rows.append(dict(scope=scope, module=mod, x="eig_ratio_mean", y="gap", method=method, n=n, r=r, p=p))
    return pd.DataFrame(rows, columns=["scope", "module", "x", "y", "method", "n", "r", "p"])


def top_correlations(corr: pd.DataFrame, k: int = 20, method: str = "spearman") -> pd.DataFrame:
    """The k strongest pooled (else per-variant) correlations by |r|, for the report."""
    c = corr[(corr["method"] == method) & corr["r"].notna()]
    if (c["scope"] == "pooled").any():
        c = c[c["scope"] == "pooled"]
    c = c.assign(abs_r=c["r"].abs()).sort_values("abs_r", ascending=False).head(k)
    return c.drop(columns="abs_r").reset_index(drop=True)


def is_base(method: str) -> bool:
    return method == BASE_METHOD
