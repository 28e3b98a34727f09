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
def study():
    out = C.run_study([40], replicates=20, n_truth=40, params=PARAMS, log=lambda *_: None,
                      pop=C.make_population(n_classes=4), regimes=REGIMES)[40]
    rows = C.summarise(out["truth"], out["reps"], G.INTERVAL_METRICS, REGIMES)
    return out["reps"], {(r["regime"], r["metric"]): r for r in rows}


def test_intervals_cover_the_expected_value_at_about_their_width(study):
    # the continuous neighbour statistics, both regimes, 20 replicates each: pooled coverage of the mean
    # over independent samples near the nominal 95%, and intervals about as wide as the ideal one (the
    # plain delete-d factor, without the measured deflation, is 1.2-1.5x too wide here)
    _, cells = study
    sel = [cells[(reg, m)] for reg in REGIMES for m in CONTINUOUS]
    pooled = np.mean([c["coverage"] for c in sel])
    assert pooled >= 0.9, {(c["regime"], c["metric"]): c["coverage"] for c in sel}
    assert min(c["coverage"] for c in sel) >= 0.8
    ratios = [c["width_ratio"] for c in sel]
    assert 0.8 <= np.mean(ratios) <= 1.3 and max(ratios) <= 1.6, ratios


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
