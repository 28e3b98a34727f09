"""A reduced run of the interval coverage study (bench/coverage.py): small Gaussian classes, the
project's own geometry path (compute_geometry on an extraction file, subsamples, the per-metric
intervals), truth from independent samples. Checks that the intervals cover, are not much wider than
the ideal, keep their ends in range and integer where they should."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from llmscape import geometry as G
from llmscape.geometry.params import INTERVAL_METHODS

ROOT = Path(__file__).resolve().parents[1]
# bench/coverage.py under its own name (the name "coverage" is also the coverage.py package's)
_spec = importlib.util.spec_from_file_location("bench_coverage", ROOT / "bench" / "coverage.py")
C = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(C)

#: 4 classes of 40 points: near chance (ARI about 0) and a middle regime (ARI about 0.25)
REGIMES = {"chance": 2.5, "middle": 3.5}
PARAMS = G.GeometryParams(maxk=100, id_range_max=16, id_scale=4, density_k=8, overlap_k=10, n_boot=15,
                          device="cpu")
CONTINUOUS = ["id_2nn", "id_gride", "log_density_mean", "overlap_subjects", "overlap_letters"]


@pytest.fixture(scope="module")
def run():
    return {40: C.run_study([40], replicates=20, n_truth=40, params=PARAMS, log=lambda *_: None,
                            pop=C.make_population(n_classes=4), regimes=REGIMES)[40]}


@pytest.fixture(scope="module")
def study(run):
    out = run[40]
    rows = C.summarise(out["truth"], out["reps"], G.INTERVAL_METRICS, REGIMES)
    return out["reps"], {(r["regime"], r["metric"]): r for r in rows}


def calibration_problems(cells: dict) -> list[str]:
    """What is wrong with the continuous metrics' intervals, both regimes, 20 replicates each (empty when
    nothing is): pooled coverage of the mean over independent samples below 0.9 or a cell below 0.8,
    intervals not about as wide as the ideal one on average (0.8-1.3x) or one over 1.6x."""
    sel = [cells[(reg, m)] for reg in REGIMES for m in CONTINUOUS]
    cov, ratios = [c["coverage"] for c in sel], [c["width_ratio"] for c in sel]
    checks = {f"pooled coverage {np.mean(cov):.2f}": np.mean(cov) < 0.9,
              f"a cell's coverage {min(cov):.2f}": min(cov) < 0.8,
              f"mean width ratio {np.mean(ratios):.2f}": not 0.8 <= np.mean(ratios) <= 1.3,
              f"largest width ratio {max(ratios):.2f}": max(ratios) > 1.6}
    return [problem for problem, bad in checks.items() if bad]


def test_intervals_cover_the_expected_value_at_about_their_width(study):
    # the declared methods (the plain delete-d factor, without the measured deflation, is 1.2-1.5x too wide
    # here)
    _, cells = study
    assert calibration_problems(cells) == [], {k: (c["coverage"], c["width_ratio"]) for k, c in cells.items()}


def test_the_cached_draws_give_the_pipelines_ends_and_can_fail_a_method(run):
    # the study's offline evaluation (any method, from the cached subsample values, by the library's own
    # function) reproduces the ends compute_geometry wrote for the declared methods; and the calibration
    # check rejects a method that is not calibrated (intervals a third as wide: too narrow)
    values = C.subsample_values(run, G.INTERVAL_METRICS)
    declared = {m: INTERVAL_METHODS[m] for m in G.INTERVAL_METRICS}
    again = C.with_methods(run, values, declared, PARAMS)[40]
    for m in G.INTERVAL_METRICS:
        for end in ("lo", "hi"):
            np.testing.assert_allclose(again[f"{m}_{end}"], run[40]["reps"][f"{m}_{end}"], rtol=1e-12, err_msg=m)
    narrow = {m: declared[m]._replace(deflation=3 * declared[m].deflation) for m in CONTINUOUS}
    cells = {(r["regime"], r["metric"]): r
             for r in C.evaluate(run, values, narrow, PARAMS, regimes=REGIMES)["40"]}
    assert any("coverage" in p for p in calibration_problems(cells))


def test_cluster_count_ends_are_integers_around_the_estimate(study):
    reps, cells = study
    lo, hi, est = (reps[c].to_numpy(float) for c in ("n_clusters_lo", "n_clusters_hi", "n_clusters"))
    assert np.array_equal(lo, np.round(lo)) and np.array_equal(hi, np.round(hi))
    assert (lo <= est).all() and (est <= hi).all() and (lo >= 1).all()
    assert cells[("middle", "n_clusters")]["coverage"] >= 0.85


def test_ari_ends_are_in_range_and_not_degenerate(study):
    # ends within the ARI's range; in the middle regime (the clustering varies between samples) the
    # interval has width and neither end sits on the estimate; near chance no lower end below -0.5
    reps, cells = study
    lo, hi, est = (reps[c].to_numpy(float) for c in ("ari_subjects_lo", "ari_subjects_hi", "ari_subjects"))
    assert (lo >= -0.5).all() and (hi <= 1).all() and (lo <= est).all() and (est <= hi).all()
    mid = (reps["layer_name"] == "middle").to_numpy()
    assert np.mean((lo[mid] < est[mid]) & (est[mid] < hi[mid])) >= 0.9
    assert cells[("middle", "ari_subjects")]["coverage"] >= 0.85
    assert cells[("middle", "ari_subjects")]["width_ratio"] <= 1.5
