"""The interval of each geometry metric from its subsample values (llmscape.geometry.resample,
return_metric_interval, and the methods in params.INTERVAL_METHODS): the formula, ends inside the
metric's range, integer ends for counts, and the fewest subsamples a confidence needs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from llmscape.geometry.params import INTERVAL_METHODS, INTERVAL_METRICS, min_n_boot, n_boot_problem
from llmscape.geometry.resample import describe_interval_method, return_metric_interval, scale_factor


def test_every_interval_metric_has_a_method():
    assert set(INTERVAL_METRICS) <= set(INTERVAL_METHODS)
    assert all(describe_interval_method(m) for m in INTERVAL_METRICS)


def test_formula_of_a_plain_metric():
    # estimate +- t_(n-1) x sqrt(f / (1 - f)) / deflation x sd(draws), the deflation only at the fraction
    # it was measured at; NaN draws skipped, fewer than two draws give NaN
    rng = np.random.default_rng(0)
    draws = np.r_[5 + 0.1 * rng.standard_normal(60), np.nan]
    sd = np.nanstd(draws, ddof=1)
    t = stats.t.ppf(0.975, 59)
    lo, hi, used = return_metric_interval("id_gride", 6.0, draws, 0.8, 0.95)
    defl = INTERVAL_METHODS["id_gride"].deflation
    assert used == 60 and defl > 1
    assert (lo, hi) == pytest.approx((6 - t * 2 / defl * sd, 6 + t * 2 / defl * sd))
    lo7, hi7, _ = return_metric_interval("id_gride", 6.0, draws, 0.7, 0.95)
    assert hi7 - 6 == pytest.approx(t * math.sqrt(0.7 / 0.3) * sd)  # not calibrated there: the plain factor
    assert scale_factor("id_gride", 0.5) == pytest.approx(1.0)
    assert all(math.isnan(v) for v in return_metric_interval("id_gride", 6.0, [5.0, np.nan], 0.8, 0.95)[:2])
    assert all(math.isnan(v) for v in return_metric_interval("id_gride", math.nan, draws, 0.8, 0.95)[:2])


@pytest.mark.parametrize("theta, centre, spread", [(0.02, 0.0, 0.08), (0.5, 0.45, 0.2), (0.97, 0.95, 0.05),
                                                    (1.0, 0.99, 0.02)])
def test_ari_ends_stay_in_range_and_around_the_estimate(theta, centre, spread):
    # however wide the draws, both ends lie in the ARI's range, the estimate lies inside, and a value
    # near or at 1 still gets a lower end below it (the draws' sd, not their quantiles, which tie at 1)
    rng = np.random.default_rng(1)
    draws = np.clip(centre + spread * rng.standard_normal(100), -0.2, 1.0)
    lo, hi, _ = return_metric_interval("ari_subjects", theta, draws, 0.8, 0.95)
    assert -0.5 <= lo <= theta <= hi <= 1.0
    assert lo < theta  # not collapsed onto the estimate
    if theta < 1:
        assert hi > theta


def test_shares_stay_in_the_unit_interval():
    rng = np.random.default_rng(2)
    for m in ("overlap_subjects", "overlap_letters", "overlap_next_layer", "overlap", "core_fraction"):
        for theta in (0.001, 0.3, 0.999):
            draws = np.clip(theta + 0.3 * rng.standard_normal(50), 0, 1)
            lo, hi, _ = return_metric_interval(m, theta, draws, 0.8, 0.95)
            assert 0.0 <= lo <= theta <= hi <= 1.0, (m, theta, lo, hi)


def test_cluster_count_ends_are_integers_by_either_rounding():
    # "outward" (declared): the smallest integer interval around the continuous one; "nearest" (tried by
    # the coverage study): each end to its nearest integer, never past the estimate
    draws = np.array([15, 16, 16, 16, 14, 16, 15, 16, 16, 16] * 5, dtype=float)
    declared = INTERVAL_METHODS["n_clusters"]
    assert declared.integer and declared.rounding == "outward"
    cont = declared._replace(integer=False)
    for theta in (16.0, 15.0):
        clo, chi, _ = return_metric_interval("n_clusters", theta, draws, 0.8, 0.95, cont)
        lo, hi, _ = return_metric_interval("n_clusters", theta, draws, 0.8, 0.95)
        assert (lo, hi) == (math.floor(clo), math.ceil(chi)) and clo != lo
        near = return_metric_interval("n_clusters", theta, draws, 0.8, 0.95, declared._replace(rounding="nearest"))
        assert near[:2] == (min(round(clo), theta), max(round(chi), theta))
    # a narrow continuous interval still holds the estimate; never below one cluster
    near = declared._replace(rounding="nearest")
    assert return_metric_interval("n_clusters", 7.0, np.r_[np.full(40, 7.0), 7.2], 0.8, 0.95, near)[:2] == (7.0, 7.0)
    assert return_metric_interval("n_clusters", 1.0, np.ones(30), 0.8, 0.95)[:2] == (1.0, 1.0)


def test_iqr_spread_ignores_a_few_far_draws():
    # the label overlap of subjects: its spread is the draws' IQR / 1.349 on the logit scale, so two far
    # draws barely move the interval, where they would widen an sd-based one
    rng = np.random.default_rng(3)
    z = 4.0 + 0.2 * rng.standard_normal(98)
    draws = 1 / (1 + np.exp(-np.r_[z, 9.0, 9.5]))
    theta = 1 / (1 + math.exp(-4.0))
    method = INTERVAL_METHODS["overlap_subjects"]
    assert method.spread == "iqr" and method.transform == "logit"
    lo, hi, _ = return_metric_interval("overlap_subjects", theta, draws, 0.8, 0.95)
    q1, q3 = np.quantile(np.log(draws / (1 - draws)), [0.25, 0.75])
    half = stats.t.ppf(0.975, 99) * 2 / method.deflation * (q3 - q1) / 1.3489795003921634
    assert (lo, hi) == pytest.approx((1 / (1 + math.exp(-(4 - half))), 1 / (1 + math.exp(-(4 + half)))))
    slo, shi, _ = return_metric_interval("overlap_subjects", theta, draws, 0.8, 0.95, method._replace(spread="sd"))
    assert shi - slo > 1.5 * (hi - lo)


def test_fewest_subsamples_per_confidence():
    assert min_n_boot(0.95) == 15 and min_n_boot(0.9) < 15 < min_n_boot(0.99)
    n = min_n_boot(0.95)
    assert stats.t.ppf(0.975, n - 1) <= 1.1 * stats.norm.ppf(0.975) < stats.t.ppf(0.975, n - 2)
    msg = n_boot_problem(10, 0.95)
    assert "geometry.n_boot = 10" in msg and "at least 15" in msg and "Fix: geometry.n_boot: 15" in msg
    assert n_boot_problem(0, 0.95) == "" and n_boot_problem(15, 0.95) == "" and n_boot_problem(100, 0.99) == ""
