"""Pure numerics on one matrix's empirical spectral density (ESD): no torch, no files.

Input is the eigenvalue vector ``evals`` of ``W^T W`` for one weight matrix ``W`` of shape
(n_rows, n_cols), i.e. the squared singular values ``s_i^2`` (min(n_rows, n_cols) of them). Below
``N = max(n_rows, n_cols)``, ``M = min(n_rows, n_cols)``, ``c = M / N <= 1`` and ``Q = 1 / c``.
No 1/N normalisation is applied to ``evals`` (the WeightWatcher / AlphaPruning convention); where a
normalised unit is needed (Marchenko-Pastur, Tracy-Widom) it is stated.

Definitions (each metric is a column of the spectra table, see ``llmscape.spectra``):

* Norms. ``fro_norm_sq = sum(lambda)``; ``spectral_norm = s_1 = sqrt(lambda_max)`` (the operator norm,
  not squared); ``stable_rank = sum(lambda) / lambda_max``; ``eig_ratio = rho = s_1 / sqrt(sum_{j>=2} s_j^2)``
  so that ``stable_rank = 1 + 1 / rho^2`` (``rho = inf`` when only one singular value is non-zero).
  ``log_norm = log10(fro_norm_sq)`` and ``log_spectral_norm = log10(lambda_max)`` follow WeightWatcher
  (logs of *squared* norms).
* Numerical rank ``rank = #{s_i > s_1 * N * eps_float32}``; only those eigenvalues enter the fits.
* Hill power-law exponent of the ESD tail, density ``p(lambda) ~ lambda^-alpha`` for ``lambda >= x_min``:
  with ascending eigenvalues and the tail ``lambda_i, i >= i0`` (``n_t = n - i0`` values, ``x_min =
  lambda_i0`` included) ``alpha = 1 + n_t / sum_{i>=i0} ln(lambda_i / x_min)``. Kolmogorov-Smirnov distance
  of the tail to that power law, ``F(x) = 1 - (x / x_min)^(1 - alpha)``:
  ``ks="ww"`` (default, WeightWatcher / powerlaw): ``D = max_j |F(lambda_{i0+j}) - j / n_t|``;
  ``ks="two_sided"``: the exact sup distance, which also compares with ``(j + 1) / n_t``.
  Three choices of x_min:
    - ``median``: ``i0 = n // 2`` (AR-LoRA's "xmin_mid");
    - ``ks``: every candidate ``i0 = 0 .. n-2``, keep the one with the smallest D (candidates with
      ``alpha <= 1`` are excluded); this is WeightWatcher's default fit. ``xmin``, ``ks_distance`` and
      ``num_pl_spikes = n_t`` belong to it;
    - ``peak``: histogram ``log10(lambda)`` into ``peak_bins`` bins, take the modal bin's centre ``p``
      and scan only candidates with ``lo * p <= lambda <= hi * p`` (``peak_window = (lo, hi)``, default
      (0.95, 1.5)). Both bounds are in eigenvalue units: AlphaPruning / WeightWatcher compare a log10
      value with a linear one for the lower bound; we do not.
  ``alpha_weighted = alpha_ks * log10(lambda_max)``; ``log_alpha_norm = log10 sum(lambda^alpha_ks)``.
* Marchenko-Pastur bulk. For ``W`` with i.i.d. entries of variance ``sigma^2``, ``lambda / N`` follows
  MP with ratio c, support ``sigma^2 (1 -+ sqrt(c))^2``. The edge in eigenvalue units is
  ``mp_edge = N sigma^2 (1 + sqrt(c))^2``. ``sigma`` is the *entry* scale in the weights' units:
    - ``sigma_mp_mean = sqrt(mean(lambda) / N) = ||W||_F / sqrt(N M)`` (AR-LoRA's choice: spikes
      inflate it, so its spike count is conservative);
    - ``sigma_mp_fit``: least-squares match of the empirical quantiles of ``lambda / N`` to the MP
      quantiles on plotting positions ``(i + 1/2) / M`` inside ``mp_quantiles`` (default (0.05, 0.95)),
      ``sigma^2 = sum x g / sum g^2``; the top of the spectrum, where spikes live, is left out.
  ``sigma_mp_fit / sigma_mp_mean`` is the quantity WeightWatcher reports as ``sigma_mp`` (its
  eigenvalues are rescaled to mean 1).
* Tracy-Widom. In the normalised unit ``lambda / (N sigma^2)`` (edge at ``(1 + sqrt(c))^2``) the
  largest noise eigenvalue fluctuates on the scale (Johnstone 2001)
  ``tw = (1 + sqrt(c)) (1 + 1/sqrt(c))^(1/3) N^(-2/3)``. A spike is an eigenvalue above
  ``(1 + sqrt(c))^2 + tw_scale * tw`` in that unit (``tw_scale = 2`` ~ the 99% quantile of TW1), so the
  correction is scale-consistent (AR-LoRA adds a TW-like term in raw units).
  ``num_spikes`` uses ``sigma_mp_fit``, ``num_spikes_mean`` uses ``sigma_mp_mean``;
  ``mp_softrank = mp_edge_fit / lambda_max``.
* ``entropy = -sum p ln p / ln(rank)``, ``p = lambda / sum(lambda)`` over the numerical rank (1 =
  flat spectrum, 0 = rank one).

Degenerate matrices (all zeros, non-finite entries, fewer than ``min_evals`` non-zero eigenvalues such
as rank one or 1 x n) emit a :class:`DegenerateMatrixWarning` and return NaN for what is undefined
(every metric for a zero matrix; the fits for a low-rank one) instead of raising.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)

#: integer-valued metrics (nullable Int64 in the table)
INT_METRICS = ("rank", "n_evals", "num_pl_spikes", "num_spikes", "num_spikes_mean")
#: every metric :func:`compute_metrics` returns, in column order
METRICS = (
    "n_evals", "rank", "fro_norm_sq", "spectral_norm", "stable_rank", "eig_ratio",
    "log_norm", "log_spectral_norm",
    "alpha_median", "ks_distance_median", "xmin_median",
    "alpha_ks", "ks_distance", "xmin", "num_pl_spikes",
    "alpha_peak", "ks_distance_peak", "xmin_peak",
    "alpha_weighted", "log_alpha_norm",
    "sigma_mp_mean", "sigma_mp_fit", "mp_edge_mean", "mp_edge_fit", "tw",
    "num_spikes", "num_spikes_mean", "mp_softrank", "entropy",
)


class DegenerateMatrixWarning(UserWarning):
    """A matrix whose spectrum does not support some metric; those metrics are NaN."""


# ----------------------------------------------------------------------------------------------
# Power law (Hill + KS)
# ----------------------------------------------------------------------------------------------

def compute_hill_scan(evals_asc: np.ndarray, candidates: np.ndarray | None = None, ks: str = "ww",
                      chunk_elems: int = 1 << 22) -> tuple[np.ndarray, np.ndarray]:
    """Hill alpha and KS distance for each candidate start index ``i0`` of the tail.

    ``evals_asc`` must be positive and ascending. Returns ``(alphas, Ds)`` aligned with
    ``candidates`` (default: every index but the last); ``D = inf`` where ``alpha <= 1`` or undefined.
    Vectorised in blocks of candidates (O(n^2) work, ``chunk_elems`` float64 at a time).
    """
    lam = np.asarray(evals_asc, dtype=np.float64)
    n = lam.size
    if candidates is None:
        candidates = np.arange(max(n - 1, 0))
    candidates = np.asarray(candidates, dtype=np.int64)
    if candidates.size == 0:
        return np.empty(0), np.empty(0)
    if ks not in ("ww", "two_sided"):
        raise ValueError(f"ks must be 'ww' or 'two_sided', not {ks!r}")
    logs = np.log(lam)
    suffix = np.cumsum(logs[::-1])[::-1]  # suffix[i] = sum_{j>=i} log lambda_j
    n_t = (n - candidates).astype(np.float64)
    denom = suffix[candidates] - n_t * logs[candidates]
    with np.errstate(divide="ignore", invalid="ignore"):
        alphas = np.where(denom > 0, 1.0 + n_t / denom, np.nan)
    Ds = np.full(candidates.size, np.inf)
    ok = np.flatnonzero(np.isfinite(alphas) & (alphas > 1.0))
    j = np.arange(n)
    step = max(1, chunk_elems // max(n, 1))
    for s in range(0, ok.size, step):
        idx = ok[s:s + step]
        i0 = candidates[idx][:, None]  # (b, 1)
        a = alphas[idx][:, None]
        nt = n_t[idx][:, None]
        rel = j[None, :] - i0  # position inside the tail
        inside = rel >= 0
        with np.errstate(over="ignore", invalid="ignore"):
            model = 1.0 - np.exp((1.0 - a) * (logs[None, :] - logs[i0]))
            d = np.abs(model - rel / nt)
            if ks == "two_sided":
                d = np.maximum(d, np.abs(model - (rel + 1) / nt))
        d = np.where(inside, d, 0.0)
        Ds[idx] = d.max(axis=1)
    return alphas, Ds


def compute_powerlaw(evals_asc: np.ndarray, xmin_method: str = "ks", ks: str = "ww", peak_bins: int = 100,
                     peak_window: tuple[float, float] = (0.95, 1.5)) -> dict:
    """Hill fit with one x_min choice (``median``, ``ks`` or ``peak``) on positive ascending eigenvalues.

    Returns ``dict(alpha, D, xmin, n_tail)`` (NaN / 0 when no candidate exists).
    """
    lam = np.asarray(evals_asc, dtype=np.float64)
    n = lam.size
    nan = dict(alpha=math.nan, D=math.nan, xmin=math.nan, n_tail=0)
    if n < 2:
        return nan
    if xmin_method == "median":
        cand = np.array([n // 2]) if n // 2 <= n - 2 else np.array([n - 2])
    elif xmin_method == "ks":
        cand = np.arange(n - 1)
    elif xmin_method == "peak":
        loglam = np.log10(lam)
        counts, edges = np.histogram(loglam, bins=peak_bins)
        k = int(np.argmax(counts))
        peak = 10.0 ** (0.5 * (edges[k] + edges[k + 1]))
        lo, hi = peak_window
        cand = np.flatnonzero((lam >= lo * peak) & (lam <= hi * peak))
        cand = cand[cand <= n - 2]
    else:
        raise ValueError(f"xmin_method must be median, ks or peak, not {xmin_method!r}")
    if cand.size == 0:
        return nan
    alphas, Ds = compute_hill_scan(lam, cand, ks=ks)
    if not np.isfinite(Ds).any():
        if xmin_method == "median" and np.isfinite(alphas[0]):
            return dict(alpha=float(alphas[0]), D=math.nan, xmin=float(lam[cand[0]]), n_tail=int(n - cand[0]))
        return nan
    b = int(np.argmin(Ds))
    return dict(alpha=float(alphas[b]), D=float(Ds[b]), xmin=float(lam[cand[b]]), n_tail=int(n - cand[b]))


# ----------------------------------------------------------------------------------------------
# Marchenko-Pastur and Tracy-Widom
# ----------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def _mp_cdf_table(c: float, grid: int = 8193) -> tuple[np.ndarray, np.ndarray]:
    """(x, CDF) of the standard MP law (variance 1, ratio c <= 1) on a grid, via x = a + (b-a) sin^2(t)."""
    a, b = (1 - math.sqrt(c)) ** 2, (1 + math.sqrt(c)) ** 2
    t = np.linspace(0.0, math.pi / 2, grid)
    s2 = np.sin(t) ** 2
    x = a + (b - a) * s2
    # density * dx/dt = (b-a)^2 sin^2 cos^2 / (pi c x); sin^2 / x -> 1/b when a == 0 (c == 1)
    ratio = np.where(x > 0, s2 / np.where(x > 0, x, 1.0), 1.0 / (b - a))
    h = (b - a) ** 2 * ratio * np.cos(t) ** 2 / (math.pi * c)
    cdf = np.concatenate([[0.0], np.cumsum(0.5 * (h[1:] + h[:-1]) * np.diff(t))])
    cdf /= cdf[-1]
    return x, cdf


def return_mp_quantiles(c: float, p: np.ndarray) -> np.ndarray:
    """Quantiles of the standard Marchenko-Pastur law with ratio ``c = M/N`` in (0, 1] at levels ``p``."""
    if not 0 < c <= 1:
        raise ValueError(f"MP ratio c = M/N must be in (0, 1], got {c}")
    x, cdf = _mp_cdf_table(round(float(c), 12))
    return np.interp(np.asarray(p, dtype=np.float64), cdf, x)


def compute_tw_scale(n_big: int, n_small: int) -> float:
    """Tracy-Widom fluctuation scale of the top noise eigenvalue in the unit lambda / (N sigma^2)."""
    c = n_small / n_big
    return (1 + math.sqrt(c)) * (1 + 1 / math.sqrt(c)) ** (1 / 3) * n_big ** (-2 / 3)


def compute_mp_sigma_fit(evals_asc: np.ndarray, n_big: int, n_small: int,
                         quantiles: tuple[float, float] = (0.05, 0.95)) -> float:
    """Entry scale sigma of the MP bulk by least-squares quantile matching (see module docstring)."""
    lam = np.asarray(evals_asc, dtype=np.float64)
    m = lam.size
    if m < 2:
        return math.nan
    p = (np.arange(m) + 0.5) / m
    keep = (p >= quantiles[0]) & (p <= quantiles[1])
    if keep.sum() < 2:
        return math.nan
    g = return_mp_quantiles(n_small / n_big, p[keep])
    x = lam[keep] / n_big
    den = float(np.dot(g, g))
    if den <= 0:
        return math.nan
    s2 = float(np.dot(x, g)) / den
    return math.sqrt(s2) if s2 > 0 else math.nan


# ----------------------------------------------------------------------------------------------
# Everything for one matrix
# ----------------------------------------------------------------------------------------------

def stable_rank_of_eigenvalues(lam) -> float:
    """srank = ||W||_F^2 / ||W||_2^2 = sum(lambda) / lambda_max, lambda the eigenvalues of W^T W (NaN for a
    zero matrix). The one definition every stage uses: spectra, interventions, srank-calibrated."""
    lam = np.asarray(lam, dtype=np.float64)
    lmax = float(lam.max()) if lam.size else 0.0
    return float(lam.sum()) / lmax if lmax > 0 else math.nan


def stable_rank(W) -> float:
    """The stable rank of a weight tensor: eigenvalues of its smaller Gram matrix in float64."""
    import torch

    Wd = W.detach().to(torch.float64)
    G = Wd.T @ Wd if Wd.shape[0] >= Wd.shape[1] else Wd @ Wd.T
    return stable_rank_of_eigenvalues(torch.linalg.eigvalsh(G).clamp_min(0).cpu().numpy())


def compute_metrics(evals, n_rows: int, n_cols: int, *, min_evals: int = 10, tw_scale: float = 2.0,
                    ks: str = "ww", peak_bins: int = 100, peak_window: tuple[float, float] = (0.95, 1.5),
                    mp_quantiles: tuple[float, float] = (0.05, 0.95), name: str = "") -> dict:
    """All metrics of :data:`METRICS` for one matrix from its eigenvalues (squared singular values): the
    norms, rank and entropy, then (given enough non-zero eigenvalues) the power-law fits and the
    Marchenko-Pastur bulk and spikes; a metric the spectrum does not support stays NaN, with a warning.

    ``evals`` may be in any order; tiny negative values (Gram rounding) are clipped to 0.
    """
    out: dict = {k: math.nan for k in METRICS}
    lam = np.sort(np.asarray(evals, dtype=np.float64).ravel())
    out["n_evals"] = int(lam.size)
    label = f" {name}" if name else ""
    if lam.size == 0 or not np.all(np.isfinite(lam)) or lam[-1] <= 0:
        warnings.warn(f"matrix{label} ({n_rows}x{n_cols}) is zero or not finite: every spectral metric is NaN",
                      DegenerateMatrixWarning, stacklevel=2)
        out["rank"] = 0 if lam.size and np.all(np.isfinite(lam)) else math.nan
        return out
    lam = np.clip(lam, 0.0, None)
    n_big, n_small = max(n_rows, n_cols), min(n_rows, n_cols)
    nz = _norm_metrics(lam, n_big, out)
    if nz.size < max(min_evals, 2):
        warnings.warn(f"matrix{label} ({n_rows}x{n_cols}) has {nz.size} non-zero eigenvalues (< min_evals="
                      f"{min_evals}): power-law and Marchenko-Pastur metrics are NaN", DegenerateMatrixWarning,
                      stacklevel=2)
        return out
    _powerlaw_metrics(nz, float(lam[-1]), out, ks=ks, peak_bins=peak_bins, peak_window=peak_window)
    _mp_metrics(lam, n_big, n_small, out, tw_scale=tw_scale, mp_quantiles=mp_quantiles)
    return out


def _norm_metrics(lam: np.ndarray, n_big: int, out: dict) -> np.ndarray:
    """Fill the norms, stable rank, eigenvalue ratio, numerical rank and entropy of the ascending,
    non-negative eigenvalues ``lam`` (largest > 0) into ``out``; the non-zero eigenvalues."""
    lmax = float(lam[-1])
    total = float(lam.sum())
    tail = total - lmax
    out.update(fro_norm_sq=total, spectral_norm=math.sqrt(lmax), stable_rank=stable_rank_of_eigenvalues(lam),
               log_norm=math.log10(total), log_spectral_norm=math.log10(lmax))
    out["eig_ratio"] = math.sqrt(lmax / tail) if tail > 0 else math.inf
    tol = lmax * (n_big * EPS32) ** 2  # s_i > s_1 * N * eps  <=>  lambda_i > lambda_max (N eps)^2
    nz = lam[lam > tol]
    out["rank"] = int(nz.size)
    if nz.size >= 2:
        p = nz / nz.sum()
        out["entropy"] = float(-(p * np.log(p)).sum() / math.log(nz.size))
    return nz


def _powerlaw_metrics(nz: np.ndarray, lmax: float, out: dict, *, ks: str, peak_bins: int,
                      peak_window: tuple[float, float]) -> None:
    """Fill the Hill power-law fits of the non-zero eigenvalues ``nz`` (x_min at the median, by KS, in the
    peak window) and the alpha-weighted norms into ``out``."""
    med = compute_powerlaw(nz, "median", ks=ks)
    ksf = compute_powerlaw(nz, "ks", ks=ks)
    pk = compute_powerlaw(nz, "peak", ks=ks, peak_bins=peak_bins, peak_window=peak_window)
    out.update(alpha_median=med["alpha"], ks_distance_median=med["D"], xmin_median=med["xmin"],
               alpha_ks=ksf["alpha"], ks_distance=ksf["D"], xmin=ksf["xmin"], num_pl_spikes=ksf["n_tail"],
               alpha_peak=pk["alpha"], ks_distance_peak=pk["D"], xmin_peak=pk["xmin"])
    a = ksf["alpha"]
    if math.isfinite(a):
        out["alpha_weighted"] = a * math.log10(lmax)
        # log10 sum lambda^a computed stably around lambda_max
        out["log_alpha_norm"] = a * math.log10(lmax) + math.log10(float(np.sum((nz / lmax) ** a)))


def _mp_metrics(lam: np.ndarray, n_big: int, n_small: int, out: dict, *, tw_scale: float,
                mp_quantiles: tuple[float, float]) -> None:
    """Fill the Marchenko-Pastur entry scales (from the mean eigenvalue and fitted to the bulk), bulk
    edges, Tracy-Widom scale, spike counts above the edge and the MP soft rank of ``lam`` into ``out``."""
    lmax = float(lam[-1])
    total = float(lam.sum())
    c = n_small / n_big
    edge_unit = (1 + math.sqrt(c)) ** 2
    tw = compute_tw_scale(n_big, n_small)
    out["tw"] = tw
    s_mean = math.sqrt(total / lam.size / n_big)  # lam.size == M: all eigenvalues, zeros included
    s_fit = compute_mp_sigma_fit(lam, n_big, n_small, mp_quantiles) if lam.size == n_small else math.nan
    out.update(sigma_mp_mean=s_mean, sigma_mp_fit=s_fit, mp_edge_mean=n_big * s_mean ** 2 * edge_unit)
    thr = edge_unit + tw_scale * tw
    out["num_spikes_mean"] = int(np.sum(lam / (n_big * s_mean ** 2) > thr))
    if math.isfinite(s_fit) and s_fit > 0:
        out["mp_edge_fit"] = n_big * s_fit ** 2 * edge_unit
        out["num_spikes"] = int(np.sum(lam / (n_big * s_fit ** 2) > thr))
        out["mp_softrank"] = out["mp_edge_fit"] / lmax
