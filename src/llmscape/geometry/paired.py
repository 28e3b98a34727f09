"""Paired differences: two extractions of the same questions compared subsample by subsample.

Why paired
----------
Every extraction of the same questions (every shot count, every variant) is subsampled identically:
draw j keeps the same questions in all of them (:func:`resample.draw_members`), and every layer of
one extraction uses the same draws. Two marginal intervals that overlap can still hide a clear
difference, because most of the sampling noise (which questions happen to be in the sample) is
shared by the two sides. The difference computed within each draw cancels that shared part:

    D = theta_A - theta_B            (full sample, the point estimate)
    D_j = theta_A(j) - theta_B(j)    (subsample j, the same questions on both sides)

and the interval of D comes from the D_j by the delete-d jackknife (Shao and Wu 1989, Ann. Statist.
17: 1176-1197), applied to the difference as one statistic of the paired data, in the form the
marginal intervals use (:mod:`resample`): the draws' sd scaled by c = sqrt(f / (1 - f)), with
Student's t for the draws' own noise,

    D +- t_(n_boot - 1) x c x sd(D_j)        ends clipped to what a difference of the metric can be,
                                             rounded outwards to integers for the cluster count.

No transformed scale (a difference is not bounded like its metric) and no deflation: the coverage
study measured the deflation of each metric's marginal spread, not of a paired difference's, so these
intervals keep the plain, wider factor.

Only the stored per-subsample values and the full-sample values are used, never the marginal
intervals' ends. A difference is claimed ("higher" / "lower") only where its interval excludes 0
and most draws differ in the same direction as the full sample (``draws_agree`` > 1/2: a guard for
discrete metrics, where a cluster count can differ in the full sample while the draws agree, which
would give a zero-width interval away from 0); otherwise the verdict is "no difference detected".
The intervals are pointwise, one per layer and metric: over 30 layers, one or two intervals may
exclude 0 by chance at 95%.

Comparisons (``comparison``): ``shots`` (k-shot against 0-shot of the same variant), ``shots_step``
(k-shot against the next smaller shot count above 0: 2 against 1, 5 against 2), ``variant`` (a variant
against base at the same shots), ``layer`` (layer l + 1 against layer l of one extraction). ``diff`` is
always ``value - ref_value``.

Accuracy on the same questions: the exact McNemar test on the discordant questions (McNemar 1947,
Psychometrika 12: 153-157; exact binomial form) and a paired bootstrap interval of the accuracy
difference, questions resampled within subjects (the sample is stratified by subject).

Pairing is checked, not assumed: the two sides must hold the same question ids in the same order and
the same record of their subsamples (``draws_digest`` in the saved neighbour lists); otherwise a
:class:`PairingError` names both files and the fix.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .params import INTERVAL_METHODS, INTERVAL_METRICS, GeometryError

#: the metrics whose paired differences are computed: every metric with a subsample interval
PAIRED_METRICS = INTERVAL_METRICS
DIFF_COLUMNS = ["model", "variant", "shots", "comparison", "ref_variant", "ref_shots", "layer", "layer_name",
                "ref_layer", "metric", "value", "ref_value", "diff", "diff_lo", "diff_hi", "n_boot", "draws_agree",
                "boot_fraction", "confidence", "verdict"]
SUMMARY_COLUMNS = ["model", "variant", "shots", "comparison", "ref_variant", "ref_shots", "metric", "n_layers",
                   "n_higher", "n_lower", "n_no_difference", "layers_higher", "layers_lower", "diff_min", "diff_max"]
ACCURACY_COLUMNS = ["model", "variant", "shots", "comparison", "ref_variant", "ref_shots", "scoring", "n_questions",
                    "accuracy", "ref_accuracy", "diff", "diff_lo", "diff_hi", "n_resamples", "both_right",
                    "only_this_right", "only_ref_right", "both_wrong", "p_mcnemar", "confidence", "verdict"]
HIGHER, LOWER, NO_DIFFERENCE, UNDETERMINED = "higher", "lower", "no difference detected", "undetermined"
ACCURACY_RESAMPLES = 2000  # paired bootstrap of the accuracy difference: enough for a 95% percentile interval
#: scoring -> the extraction's prediction dataset (extract.py): " A".." D" and "A".."D" letter logits
SCORINGS = {"space": "pred", "nospace": "pred_nospace"}


class PairingError(GeometryError):
    """A paired comparison of extractions that do not hold the same questions or the same subsamples."""


@dataclass
class Extraction:
    """One extraction's geometry as the paired comparisons read it: its layer table, its per-subsample
    values, its question ids and the record of its subsamples; ``files`` names it in messages."""

    variant: str
    shots: int
    table: pd.DataFrame
    boot: pd.DataFrame
    question_id: np.ndarray
    draws_digest: str | None
    files: str

    @property
    def name(self) -> str:
        return f"{self.variant}/{self.shots}shot"


def return_draws_digest(question_id: np.ndarray, draws: list[np.ndarray]) -> str:
    """A fingerprint of the subsamples: sha256 over the question ids each draw keeps, in draw order.
    Two extractions with the same digest used the same questions in draw j for every j."""
    h = hashlib.sha256(f"{len(draws)} draws;".encode())
    qid = np.asarray(question_id, dtype=np.int64)
    for d in draws:
        h.update(np.ascontiguousarray(qid[np.asarray(d, dtype=np.int64)]).tobytes())
        h.update(b";")
    return h.hexdigest()


def read_extraction(table_path, boot_path, knn_path, *, variant: str, shots: int) -> Extraction:
    """The files of one geometry job (the layer table, ``_boot.parquet`` and ``_knn.npz``), reading only
    the question ids and the subsample record of the neighbour lists."""
    from ..io import read_npz, read_parquet, rebuild_hint  # a damaged file is named with its rebuild

    knn = read_npz(knn_path, keys=("question_id", "draws_digest"))
    if "question_id" not in knn:
        raise GeometryError(f"{knn_path} holds no question_id: not the neighbour lists of a geometry job. "
                            f"{rebuild_hint(knn_path)}")
    qid = np.asarray(knn["question_id"], dtype=np.int64)
    digest = str(knn["draws_digest"]) if "draws_digest" in knn else None
    files = ", ".join(str(p) for p in (table_path, boot_path, knn_path))
    return Extraction(variant, int(shots), read_parquet(table_path), read_parquet(boot_path), qid, digest, files)


def check_pairing(this: Extraction, ref: Extraction) -> None:
    """Raise :class:`PairingError` unless ``this`` and ``ref`` hold the same questions in the same order
    and were subsampled identically (same draws digest, same subsample share and count)."""
    fix = ("Fix: extract both from the same questions (the same data settings), then rerun the geometry of both "
           "(snakemake --forcerun geometry <their .parquet>)")
    if not np.array_equal(this.question_id, ref.question_id):
        same = np.intersect1d(this.question_id, ref.question_id).size
        raise PairingError(f"{this.name} ({this.files}) and {ref.name} ({ref.files}) hold different questions "
                           f"({this.question_id.size} and {ref.question_id.size} ids, {same} in common, or another "
                           f"order): a paired difference compares the same questions draw by draw. {fix}")
    old = [e for e in (this, ref) if e.draws_digest is None]
    if old:
        raise PairingError(f"{', '.join(f'{e.name} ({e.files})' for e in old)}: saved without the record of its "
                           "subsamples (draws_digest in the _knn.npz, written by an older llmscape), so the pairing "
                           f"of the draws cannot be checked. {fix}")
    if this.draws_digest != ref.draws_digest or _boot_setting(this) != _boot_setting(ref):
        raise PairingError(f"{this.name} ({this.files}) and {ref.name} ({ref.files}) hold the same questions but "
                           f"different subsamples (n_boot, boot_fraction: {_boot_setting(this)} against "
                           f"{_boot_setting(ref)}; or another geometry.seed). Fix: rerun the geometry of both with "
                           "the same geometry settings (snakemake --forcerun geometry <their .parquet>)")


def _boot_setting(e: Extraction) -> tuple:
    return (int(e.table["n_boot"].max()), round(float(e.table["boot_fraction"].iloc[0]), 12))


def difference_interval(diff: float, draw_diffs, fraction: float, confidence: float,
                        metric: str | None = None) -> tuple[float, float, int]:
    """(lo, hi, draws used): the interval of the paired difference ``diff`` from the differences of the
    subsamples, diff +- t x sqrt(f / (1 - f)) x sd (module docstring), clipped to the range a difference
    of ``metric`` can take, integer ends for a count. NaN ends when diff is not finite or fewer than two
    draws are paired."""
    from scipy import stats

    v = np.asarray(draw_diffs, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2 or not math.isfinite(diff):
        return math.nan, math.nan, int(v.size)
    c = math.sqrt(fraction / (1.0 - fraction))
    half = float(stats.t.ppf((1 + confidence) / 2, v.size - 1)) * c * float(np.std(v, ddof=1))
    lo, hi = diff - half, diff + half
    method = INTERVAL_METHODS.get(metric)  # the metric's range, and whether it is a count
    if method is not None and method.integer:  # a difference of two counts is an integer
        lo, hi = math.floor(lo + 1e-9), math.ceil(hi - 1e-9)
    bottom, top = method.bounds if method is not None else (-math.inf, math.inf)
    span = top - bottom  # a difference of two values in [bottom, top] lies in [-span, span]
    return float(max(lo, -span)), float(min(hi, span)), int(v.size)


def return_draws_agree(diff: float, draw_diffs) -> float:
    """Share of the paired draws whose difference has the sign of the full-sample one (NaN when the
    full-sample difference is 0 or not finite, or no draw is)."""
    v = np.asarray(draw_diffs, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0 or not math.isfinite(diff) or diff == 0:
        return math.nan
    return float(np.mean(np.sign(v) == np.sign(diff)))


def return_verdict(diff: float, lo: float, hi: float, agree: float = 1.0) -> str:
    """"higher" / "lower" where the interval excludes 0 and most draws agree in sign, "no difference
    detected" otherwise, "undetermined" without an interval."""
    if not (math.isfinite(diff) and math.isfinite(lo) and math.isfinite(hi)):
        return UNDETERMINED
    if not agree > 0.5:
        return NO_DIFFERENCE
    return HIGHER if lo > 0 else LOWER if hi < 0 else NO_DIFFERENCE


def _draws_by_layer(boot: pd.DataFrame) -> dict:
    return {int(layer): g.set_index("draw")[list(PAIRED_METRICS)] for layer, g in boot.groupby("layer")}


def _metric_rows(key: dict, this: pd.Series, ref: pd.Series, draws_this, draws_ref, fraction: float,
                 confidence: float) -> list[dict]:
    """One row per metric: the full-sample difference of two layer rows and its interval from the draws
    both sides hold (joined on the draw index)."""
    empty = pd.DataFrame(columns=list(PAIRED_METRICS), dtype=float)
    a = empty if draws_this is None else draws_this
    b = empty if draws_ref is None else draws_ref
    both = a.join(b, how="inner", rsuffix="_ref")
    rows = []
    for m in PAIRED_METRICS:
        diff = float(this[m]) - float(ref[m])
        draw_diffs = both[m] - both[f"{m}_ref"]
        lo, hi, used = difference_interval(diff, draw_diffs, fraction, confidence, m)
        agree = return_draws_agree(diff, draw_diffs)
        rows.append(dict(key, metric=m, value=float(this[m]), ref_value=float(ref[m]), diff=diff, diff_lo=lo,
                         diff_hi=hi, n_boot=used, draws_agree=agree, boot_fraction=fraction, confidence=confidence,
                         verdict=return_verdict(diff, lo, hi, agree)))
    return rows


def _setting(e: Extraction) -> tuple[float, float]:
    t = e.table
    return float(t["boot_fraction"].iloc[0]), float(t["confidence"].iloc[0])


def compute_pair_differences(this: Extraction, ref: Extraction, comparison: str, *, model: str = "") -> pd.DataFrame:
    """Paired differences ``this - ref`` of every metric at every layer both extractions hold (the
    ``shots`` and ``variant`` comparisons). Raises :class:`PairingError` if they are not paired."""
    check_pairing(this, ref)
    fraction, confidence = _setting(this)
    ref_rows = ref.table.set_index("layer")
    d_this, d_ref = _draws_by_layer(this.boot), _draws_by_layer(ref.boot)
    missing = sorted(set(this.table["layer"]) ^ set(ref.table["layer"]))
    if missing:
        raise PairingError(f"{this.name} ({this.files}) and {ref.name} ({ref.files}) cover different layers "
                           f"(only one holds {missing[:10]}). Fix: rerun the geometry of both on every layer")
    rows = []
    for _, row in this.table.sort_values("layer").iterrows():
        layer = int(row["layer"])
        key = dict(model=model, variant=this.variant, shots=this.shots, comparison=comparison,
                   ref_variant=ref.variant, ref_shots=ref.shots, layer=layer, layer_name=str(row["layer_name"]),
                   ref_layer=layer)
        rows += _metric_rows(key, row, ref_rows.loc[layer], d_this.get(layer), d_ref.get(layer), fraction,
                             confidence)
    return pd.DataFrame(rows, columns=DIFF_COLUMNS)


def compute_layer_differences(e: Extraction, *, model: str = "") -> pd.DataFrame:
    """Paired differences of every metric between each layer and the one before it in one extraction
    (``layer`` l + 1, ``ref_layer`` l): the same draws in every layer, so they pair as well."""
    fraction, confidence = _setting(e)
    draws = _draws_by_layer(e.boot)
    table = e.table.sort_values("layer").reset_index(drop=True)
    rows = []
    for i in range(1, len(table)):
        this, ref = table.iloc[i], table.iloc[i - 1]
        if int(this["layer"]) != int(ref["layer"]) + 1:
            continue  # a gap in the layers analysed: no neighbour to compare with
        key = dict(model=model, variant=e.variant, shots=e.shots, comparison="layer", ref_variant=e.variant,
                   ref_shots=e.shots, layer=int(this["layer"]), layer_name=str(this["layer_name"]),
                   ref_layer=int(ref["layer"]))
        rows += _metric_rows(key, this, ref, draws.get(int(this["layer"])), draws.get(int(ref["layer"])), fraction,
                             confidence)
    return pd.DataFrame(rows, columns=DIFF_COLUMNS)


def compute_all_differences(extractions: dict, comparisons, *, model: str = "") -> pd.DataFrame:
    """Every paired difference of a model: each extraction's layer differences, then each comparison
    (variant, shots, comparison, ref_variant, ref_shots) of ``comparisons``. extractions: {(variant,
    shots): Extraction}."""
    parts = [compute_layer_differences(e, model=model) for e in extractions.values()]
    for variant, shots, comparison, ref_variant, ref_shots in comparisons:
        this, ref = extractions[(variant, int(shots))], extractions[(ref_variant, int(ref_shots))]
        parts.append(compute_pair_differences(this, ref, comparison, model=model))
    parts = [p for p in parts if len(p)]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=DIFF_COLUMNS)


def _ranges(layers) -> str:
    """Layers as compact ranges: [1, 2, 3, 7] -> "1-3, 7"."""
    out, run = [], []
    for x in sorted(int(v) for v in layers):
        if run and x != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(x)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def summarise_differences(diffs: pd.DataFrame) -> pd.DataFrame:
    """One row per (comparison, pair, metric): in how many layers the paired interval lies above 0,
    below 0, or holds 0, which layers, and the range of the differences."""
    key = ["model", "variant", "shots", "comparison", "ref_variant", "ref_shots", "metric"]
    rows = []
    for k, g in diffs.groupby(key, sort=False):
        finite = g[np.isfinite(g["diff"].to_numpy(dtype=float))]
        rows.append(dict(zip(key, k, strict=True), n_layers=len(finite), n_higher=int((g["verdict"] == HIGHER).sum()),
                         n_lower=int((g["verdict"] == LOWER).sum()),
                         n_no_difference=int((g["verdict"] == NO_DIFFERENCE).sum()),
                         layers_higher=_ranges(g.loc[g["verdict"] == HIGHER, "layer"]),
                         layers_lower=_ranges(g.loc[g["verdict"] == LOWER, "layer"]),
                         diff_min=float(finite["diff"].min()) if len(finite) else math.nan,
                         diff_max=float(finite["diff"].max()) if len(finite) else math.nan))
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


# --- accuracy on the same questions ------------------------------------------------------------------


def mcnemar_exact(only_this: int, only_ref: int) -> float:
    """Two-sided exact McNemar p-value: under no difference, each of the m discordant questions is as
    likely to favour either side, so min(b, c) ~ Binomial(m, 1/2); p = min(1, 2 P(X <= min(b, c)))."""
    b, c = int(only_this), int(only_ref)
    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be >= 0, got {b} and {c}")
    m = b + c
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** m)  # exact integers; one rounding at the division


def paired_bootstrap_interval(right_this: np.ndarray, right_ref: np.ndarray, strata: np.ndarray, *,
                              confidence: float, n_resamples: int = ACCURACY_RESAMPLES,
                              seed: int = 0) -> tuple[float, float]:
    """Percentile interval of the accuracy difference, resampling questions with replacement within each
    stratum (subject) and keeping both sides of a question together."""
    delta = right_this.astype(np.int64) - right_ref.astype(np.int64)
    rng = np.random.default_rng([int(seed), 20])
    totals = np.zeros(int(n_resamples), dtype=np.int64)
    for s in np.unique(strata):
        d = delta[strata == s]
        totals += d[rng.integers(0, d.size, size=(int(n_resamples), d.size))].sum(axis=1)
    a = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(totals / delta.size, [a, 1.0 - a])
    return float(lo), float(hi)


def read_answers(h5_path, *, model: str | None = None, variant: str | None = None, shots: int | None = None) -> dict:
    """question_id, subject, answer and the predictions of an extraction (not its states), after the
    checks every reader of an extraction makes: each dataset against its checksum, and the file's model,
    variant and shots against those its path names (:mod:`llmscape.integrity`)."""
    import h5py

    from ..integrity import check_identity, rebuild_hint, verify

    need = ("question_id", "subject", "answer", *SCORINGS.values())
    with h5py.File(h5_path, "r") as f:
        missing = [k for k in need if k not in f]
        if missing:
            raise GeometryError(f"{h5_path} lacks {missing}: not a complete llmscape extraction. "
                                f"{rebuild_hint(h5_path)}")
        verify(f, h5_path, GeometryError)
        check_identity(h5_path, dict(f.attrs), model=model, variant=variant, shots=shots, error=GeometryError)
        out = {k: np.asarray(f[k][:]) for k in need if k != "subject"}
        out["subject"] = np.asarray(f["subject"].asstr()[:], dtype=object)
    out["path"] = str(h5_path)
    return out


def compute_accuracy_difference(this: dict, ref: dict, *, key: dict, confidence: float, seed: int = 0,
                                n_resamples: int = ACCURACY_RESAMPLES) -> list[dict]:
    """Accuracy of ``this`` against ``ref`` on the same questions, one row per scoring: the 2 x 2 table,
    the exact McNemar p-value, a paired bootstrap interval of the difference, and the verdict of the
    test at level 1 - confidence."""
    if not np.array_equal(this["question_id"], ref["question_id"]):
        raise PairingError(f"{this['path']} and {ref['path']} hold different questions "
                           f"({len(this['question_id'])} and {len(ref['question_id'])} ids, or another order): their "
                           "accuracies cannot be compared question by question. Fix: extract both from the same "
                           "questions (the same data settings)")
    rows = []
    for scoring, pred in SCORINGS.items():
        r_this, r_ref = this[pred] == this["answer"], ref[pred] == ref["answer"]
        n = int(r_this.size)
        b, c = int((r_this & ~r_ref).sum()), int((~r_this & r_ref).sum())
        diff = (b - c) / n
        p = mcnemar_exact(b, c)
        lo, hi = paired_bootstrap_interval(r_this, r_ref, this["subject"], confidence=confidence,
                                           n_resamples=n_resamples, seed=seed)
        verdict = (HIGHER if diff > 0 else LOWER) if p < 1.0 - confidence else NO_DIFFERENCE
        rows.append(dict(key, scoring=scoring, n_questions=n, accuracy=float(r_this.mean()),
                         ref_accuracy=float(r_ref.mean()), diff=diff, diff_lo=lo, diff_hi=hi, n_resamples=n_resamples,
                         both_right=int((r_this & r_ref).sum()), only_this_right=b, only_ref_right=c,
                         both_wrong=int((~r_this & ~r_ref).sum()), p_mcnemar=p, confidence=confidence,
                         verdict=verdict))
    return rows


def compute_accuracy_pairs(h5_paths: dict, comparisons, *, model: str = "", confidence: float = 0.95,
                           seed: int = 0) -> pd.DataFrame:
    """The accuracy comparison of every (variant, shots, comparison, ref_variant, ref_shots) in
    ``comparisons``; h5_paths: {(variant, shots): extraction path}."""
    answers = {(v, k): read_answers(Path(p), model=model, variant=v, shots=k) for (v, k), p in h5_paths.items()}
    rows = []
    for variant, shots, comparison, ref_variant, ref_shots in comparisons:
        key = dict(model=model, variant=variant, shots=int(shots), comparison=comparison, ref_variant=ref_variant,
                   ref_shots=int(ref_shots))
        rows += compute_accuracy_difference(answers[(variant, int(shots))], answers[(ref_variant, int(ref_shots))],
                                            key=key, confidence=confidence, seed=seed)
    return pd.DataFrame(rows, columns=ACCURACY_COLUMNS)
