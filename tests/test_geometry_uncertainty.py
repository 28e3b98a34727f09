"""Known-answer tests of the geometry's uncertainty and resolution: subsample graphs read from the full
graph, intervals that cover a known intrinsic dimension and a known clustering and shrink with more
points, the resolution status and the resolution study (src/llmscape/geometry/resample.py,
resolution.py)."""

from __future__ import annotations

import logging
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from llmscape import geometry as G
from llmscape.geometry import metrics as M, resolution as R
from test_geometry import blobs, brute_knn, random_letters, write_h5

P = G.GeometryParams(maxk=100, id_range_max=64, id_scale=16, density_k=16, device="cpu", block_rows=512,
                     n_boot=0)


# --- subsamples and their graphs --------------------------------------------------------------


def test_draws_are_stratified_and_reproducible():
    strata = np.repeat([0, 1, 2], [50, 20, 7])
    draws = G.draw_members(strata, 5, 0.8, seed=3)
    assert len(draws) == 5
    for d in draws:
        assert np.array_equal(d, np.unique(d))  # sorted and distinct
        assert np.bincount(strata[d]).tolist() == [40, 16, 6]  # round(0.8 n_s) of every stratum
    assert all(np.array_equal(a, b) for a, b in zip(draws, G.draw_members(strata, 5, 0.8, seed=3), strict=True))
    assert not np.array_equal(draws[0], draws[1])
    assert not np.array_equal(draws[0], G.draw_members(strata, 1, 0.8, seed=4)[0])


@pytest.mark.parametrize("K, read", [(299, 200), (90, (30, 170)), (40, 0)])
def test_subgraph_is_the_subsample_graph(K, read):
    # the subsample's own k-NN graph, read from the graph of all points (rows whose list holds too few
    # members are recomputed), equals a brute-force graph of the subsample: complete lists (every row
    # read), lists that serve some rows and not others, lists too short for any row (all recomputed)
    rng = np.random.default_rng(0)
    X = (rng.standard_normal((300, 6)) * np.arange(1, 7)).astype(np.float32)
    dist, ind = G.compute_neighbour_graph(X, K, device="cpu")
    members = np.sort(rng.choice(300, 200, replace=False))
    k = 60
    pos = np.full(300, -1)
    pos[members] = np.arange(200)
    n_read = int(((pos[ind[members, 1:]] >= 0).sum(axis=1) >= k).sum())  # rows the gather serves
    assert n_read == read if isinstance(read, int) else read[0] < n_read < read[1]
    sd, si = G.return_subgraph(X, dist, ind, members, k)
    bd, bi = brute_knn(X[members], k)
    assert sd.shape == si.shape == (200, k + 1)
    assert np.array_equal(si[:, 0], np.arange(200)) and np.all(sd[:, 0] == 0)
    assert np.allclose(sd, bd, rtol=1e-5, atol=1e-6)
    assert (si == bi).mean() > 0.999


def test_member_knn_keeps_the_nearest_members():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((200, 5)).astype(np.float32)
    _, ind = G.compute_neighbour_graph(X, 60, device="cpu")
    knn = ind[:, 1:].astype(np.int32)
    knn[7] = -1  # a dropped row
    members = np.sort(rng.choice(200, 160, replace=False))
    sub = G.return_member_knn(knn, members, 10)
    _, bi = brute_knn(X[members], 10)
    expect = members[bi[:, 1:]]
    ok = members != 7
    assert np.array_equal(sub[ok], expect[ok])
    assert (sub[~ok] == -1).all()


def test_headline_gride_alone_equals_the_profile():
    # the subsamples fit the headline scale alone: the same number as the whole profile's entry
    X, y = blobs(n_per=120, n_blobs=4, dim=8, sep=3.0, seed=2)
    dist, ind = G.compute_neighbour_graph(X, 100, device="cpu")
    letters = random_letters(len(y))
    full, gride = M._graph_metrics(dist, ind, 100, 100, y, letters, P, profile=True)
    head, _ = M._graph_metrics(dist, ind, 100, 100, y, letters, P, profile=False)
    assert head["id_gride"] == full["id_gride"] and head["id_gride_err"] == full["id_gride_err"]
    assert [g["id"] for g in gride if g["n1"] == 16] == [full["id_gride"]]
    assert {k: v for k, v in head.items() if not k.startswith("id_gride")} == \
        {k: v for k, v in full.items() if not k.startswith("id_gride")}


def test_reading_the_graph_gives_the_same_draws_as_recomputing():
    # the optimisation (subsample graphs read from the layer's) changes nothing: each draw's metrics
    # equal those of a fresh computation on the subsample's points
    X, y = blobs(n_per=80, n_blobs=4, dim=8, sep=3.0, seed=5)
    letters = random_letters(len(y))
    p = replace(P, n_boot=4)
    draws = G.draw_members(y, 4, 0.8, seed=1)
    res = G.compute_layer_geometry(X, y, letters, p, draws=draws)
    for b, d in zip(res.boot, draws, strict=True):
        fresh = G.compute_layer_geometry(X[d], y[d], letters[d], P).row
        assert b["n_points"] == d.size
        assert b["n_clusters"] == fresh["n_clusters"] and b["ari_subjects"] == pytest.approx(fresh["ari_subjects"])
        for m in ("id_gride", "id_2nn", "log_density_mean", "overlap_subjects", "overlap_letters", "core_fraction"):
            assert b[m] == pytest.approx(fresh[m], rel=1e-5, abs=1e-9), m


def test_draws_with_duplicate_rows_keep_every_distinct_vector():
    # a subsample holds each of its questions' vectors once, whichever copy of a duplicate it drew: the
    # same points as a fresh computation on its rows (90 vectors, each twice)
    X, y = blobs(n_per=30, n_blobs=3, dim=8, sep=4.0, seed=6)
    Xd, yd = np.concatenate([X, X]), np.concatenate([y, y])
    letters = np.arange(len(yd)) % 2
    p = replace(P, maxk=60, id_scale=4, density_k=4, n_boot=3)
    draws = G.draw_members(yd, 3, 0.8, seed=2)
    res = G.compute_layer_geometry(Xd, yd, letters, p, draws=draws)
    for b, d in zip(res.boot, draws, strict=True):
        fresh = G.compute_layer_geometry(Xd[d], yd[d], letters[d], replace(p, n_boot=0)).row
        assert b["n_points"] == fresh["n_points"] == len(np.unique(d % 90))
        assert b["n_clusters"] == fresh["n_clusters"]
        assert b["id_gride"] == pytest.approx(fresh["id_gride"], rel=1e-5)


def test_draws_leave_out_dropped_non_finite_rows():
    X, y = blobs(n_per=60, n_blobs=3, dim=8, sep=4.0, seed=8)
    X[7] = np.nan  # one of 180 rows: dropped and counted, not a reason to lose the layer
    p = replace(P, maxk=60, id_scale=4, density_k=4, n_boot=5)
    res = G.compute_layer_geometry(X, y, np.arange(len(y)) % 2, p, draws=G.draw_members(y, 5, 0.8, seed=0))
    assert res.row["status"] == "ok" and res.row["n_dropped_nonfinite"] == 1 and res.row["n_points"] == 179
    assert res.row["n_boot"] == 5 and np.isfinite(res.row["id_gride_lo"])
    assert all(b["n_points"] <= 144 for b in res.boot)


# --- intervals ----------------------------------------------------------------------------------


def test_interval_formula():
    # delete-d jackknife: c = sqrt(f / (1 - f)) times the draws' quantile spread around their median,
    # centred on the full-sample value; NaN draws skipped; too few draws give NaN
    draws = np.r_[np.linspace(-1, 1, 101), np.nan]
    lo, hi, used = G.return_interval(10.0, draws, fraction=0.8, confidence=0.9)
    q = np.quantile(np.linspace(-1, 1, 101), [0.05, 0.95])
    assert used == 101 and (lo, hi) == pytest.approx((10 + 2 * q[0], 10 + 2 * q[1]))
    assert G.return_interval(10.0, draws, fraction=0.5, confidence=0.9)[:2] == pytest.approx((10 + q[0], 10 + q[1]))
    assert all(math.isnan(v) for v in G.return_interval(10.0, [1.0], 0.8, 0.9)[:2])
    assert all(math.isnan(v) for v in G.return_interval(math.nan, draws, 0.8, 0.9)[:2])


def sphere(n, d, seed, D=30):
    rng = np.random.default_rng(seed)
    Y = rng.standard_normal((n, d + 1))
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    return (Y @ np.linalg.qr(rng.standard_normal((D, d + 1)))[0].T).astype(np.float32)


@pytest.mark.slow
def test_id_intervals_cover_a_known_dimension_and_shrink():
    # the 2-sphere in R^30, 12 independent samples at each size: the Gride and 2NN intervals contain 2 in
    # most of them, get narrower with 4x the points, and their width matches the spread of the estimate
    # across independent samples (a wrong scale of the subsamples' spread, e.g. none, fails this)
    p = replace(P, n_boot=30)
    width, spread = {}, {}
    for n in (400, 1600):
        rows = []
        for seed in range(12):
            sub = np.arange(n) % 4
            rows.append(G.compute_layer_geometry(sphere(n, 2, seed), sub, np.zeros(n, int), p,
                                                 draws=G.draw_members(sub, p.n_boot, p.boot_fraction, seed)).row)
        for m in ("id_gride", "id_2nn"):
            assert np.mean([r[f"{m}_lo"] <= 2 <= r[f"{m}_hi"] for r in rows]) >= 0.8, (n, m)
        width[n] = np.mean([r["id_gride_hi"] - r["id_gride_lo"] for r in rows])
        spread[n] = 2 * 1.96 * np.std([r["id_gride"] for r in rows])
    assert width[1600] < 0.75 * width[400]
    for n in width:
        assert 0.9 < width[n] / spread[n] < 3.0, (n, width[n], spread[n])


def mixture(n_per, seed, sep=4.5, k=4, dim=6):
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n_per)
    return (np.eye(k, dim)[y] * sep + rng.standard_normal((y.size, dim))).astype(np.float32), y


@pytest.mark.slow
def test_cluster_intervals_cover_a_known_clustering_and_shrink():
    # four overlapping Gaussian classes (the known clustering): ADP with k = 8 finds 4 peaks; the interval
    # of the cluster count contains 4, those of the ARI and of the label overlap contain their expectation
    # at this sample size (the mean over independent samples), in most samples; both narrow with 4x points
    p = replace(P, id_scale=8, density_k=8, n_boot=25)
    width = {}
    for n_per in (150, 600):
        truth = [G.compute_layer_geometry(*mixture(n_per, 1000 + s), np.zeros(4 * n_per, int), P).row
                 for s in range(12)]
        expect = {m: np.mean([t[m] for t in truth]) for m in ("ari_subjects", "overlap_subjects")}
        rows = []
        for seed in range(12):
            X, y = mixture(n_per, seed)
            rows.append(G.compute_layer_geometry(X, y, np.zeros(len(y), int), p,
                                                 draws=G.draw_members(y, p.n_boot, p.boot_fraction, seed)).row)
        assert np.mean([r["n_clusters_lo"] <= 4 <= r["n_clusters_hi"] for r in rows]) >= 0.75
        for m, e in expect.items():
            assert np.mean([r[f"{m}_lo"] <= e <= r[f"{m}_hi"] for r in rows]) >= 0.75, (n_per, m)
        width[n_per] = {m: np.mean([r[f"{m}_hi"] - r[f"{m}_lo"] for r in rows]) for m in expect}
        assert all(r["ari_subjects_hi"] <= 1 for r in rows)  # clipped to the ARI's range
    for m in width[150]:
        assert width[600][m] < 0.75 * width[150][m], m


def test_intervals_are_reproducible_with_a_fixed_seed(tmp_path):
    X, y = blobs(n_per=60, n_blobs=3, dim=8, sep=4.0, seed=12)
    n = len(y)
    hidden = np.stack([X, X + 0.3 * np.random.default_rng(1).standard_normal(X.shape).astype(np.float32)])
    h5 = write_h5(tmp_path / "0shot.h5", hidden, np.array(["a", "b", "c"])[y], random_letters(n))
    p = replace(P, maxk=60, id_scale=8, density_k=8, n_boot=12)
    a = G.compute_geometry(h5, p)
    b = G.compute_geometry(h5, p)
    c = G.compute_geometry(h5, replace(p, seed=1))
    cols = [f"{m}_{e}" for m in G.INTERVAL_METRICS for e in ("lo", "hi")]
    pd.testing.assert_frame_equal(a.table[cols], b.table[cols])
    pd.testing.assert_frame_equal(a.boot, b.boot)
    assert not a.table[cols].equals(c.table[cols])
    t = a.table
    assert (t["n_boot"] == 12).all() and len(a.boot) == 2 * 12 and list(a.boot.columns) == G.BOOT_COLUMNS
    assert np.isfinite(t[[f"{m}_{e}" for m in ("id_gride", "ari_subjects", "overlap_subjects")
                          for e in ("lo", "hi")]].to_numpy()).all()
    assert np.isfinite(t.loc[0, "overlap_next_layer_lo"]) and math.isnan(t.loc[1, "overlap_next_layer_lo"])


def test_pair_overlaps_have_intervals(tmp_path):
    X, y = blobs(n_per=50, n_blobs=3, dim=8, sep=4.0, seed=13)
    rng = np.random.default_rng(2)
    subj = np.array(["a", "b", "c"])[y]
    p = replace(P, maxk=60, id_scale=8, density_k=8, n_boot=10)
    k0 = G.compute_geometry(write_h5(tmp_path / "0.h5", X[None], subj, random_letters(len(y))), p).knn
    noisy = (X + 0.5 * rng.standard_normal(X.shape)).astype(np.float32)
    k5 = G.compute_geometry(write_h5(tmp_path / "5.h5", noisy[None], subj, random_letters(len(y)), shots=5), p).knn
    ov = G.compute_pair_overlaps(k5, [("shots", "base", 0, k0)], model="toy", variant="base", shots=5, k=30,
                                 params=p)
    row = ov.iloc[0]
    assert row["n_boot"] == 10 and row["overlap_lo"] <= row["overlap"] <= row["overlap_hi"] < 1
    assert row["overlap_hi"] - row["overlap_lo"] > 0
    del k0["subject"]  # lists saved before the intervals existed: the draws cannot be made
    with pytest.raises(G.GeometryError, match="forcerun geometry"):
        G.compute_pair_overlaps(k5, [("shots", "base", 0, k0)], model="toy", variant="base", shots=5, k=30,
                                params=p)


# --- resolution ---------------------------------------------------------------------------------


def test_resolution_size_follows_the_neighbourhood_scales():
    assert P.resolution_size() == 64  # 2 x max(16, 2 x 16)
    assert replace(P, density_k=4, id_scale=4).resolution_size() == 16
    assert replace(P, density_k=40, id_scale=4).resolution_size() == 80


def test_resolution_status_on_classes_of_known_size(caplog):
    # three subjects of 70, 70 and 30 points with k = 16, scale (16, 32): 30 < 64, so the layer is below
    # resolution (subjects), keeps its numbers, and the warning names the layer and the fix
    rng = np.random.default_rng(4)
    y = np.repeat([0, 1, 2], [70, 70, 30])
    X = (np.eye(3, 10)[y] * 10 + rng.standard_normal((y.size, 10))).astype(np.float32)
    letters = np.arange(y.size) % 2  # two letter classes of 85
    with caplog.at_level(logging.WARNING, logger="llmscape.geometry"):
        row = G.compute_layer_geometry(X, y, letters, P, name="layer 7 (toy)").row
    assert row["status"] == "ok" and np.isfinite(row["ari_subjects"])
    assert (row["subject_size_min"], row["subject_size_median"]) == (30, 70.0)
    assert (row["letter_size_min"], row["letter_size_median"]) == (85, 85.0)
    assert row["resolution_size"] == 64 and row["resolution"] == "below_subjects"
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "layer 7 (toy)" in msg and "below resolution" in msg and "data.per_subject >= 64" in msg
    assert G.return_resolution(64, 64, P) == G.RESOLVED
    assert G.return_resolution(64, 63, P) == "below_letters" and G.return_resolution(10, 10, P) == "below_both"
    small = replace(P, density_k=4, id_scale=4)  # the fix: smaller neighbourhoods resolve 30 points
    assert G.compute_layer_geometry(X, y, letters, small).row["resolution"] == G.RESOLVED


def test_resolution_study_table_on_a_tiny_input(tmp_path, monkeypatch):
    # 3 separated subjects of 40 points, 2 layers (the second noise): at 4 per subject, far below the
    # resolution size 16 of k = 4, scale (4, 8), ADP merges subjects; at 20 per subject it finds them all
    X, y = blobs(n_per=40, n_blobs=3, dim=8, sep=25.0, seed=21)
    rng = np.random.default_rng(3)
    hidden = np.stack([X, rng.standard_normal(X.shape).astype(np.float32)])
    letters = np.arange(len(y)) % 2  # two answer letters, so that 20 per subject resolves them too
    h5 = write_h5(tmp_path / "5shot.h5", hidden, np.array(["a", "b", "c"])[y], letters, shots=5)
    p = replace(P, maxk=60, id_range_max=16, id_scale=4, density_k=4)
    study = R.compute_resolution_study(h5, p, [4, 20], 2, model="toy", variant="base")
    assert list(study.columns) == R.STUDY_COLUMNS
    assert len(study) == 2 * (1 + 2 * 2)  # layers x (whole + sizes x draws)
    assert sorted(study["per_subject"].unique()) == [4, 20, 40] and study["whole"].sum() == 2
    first = study[study["layer"] == 0].set_index(["per_subject", "draw"])
    assert (first.loc[20, "ari_subjects"] > 0.95).all() and (first.loc[4, "ari_subjects"] < 0.9).all()
    assert (first.loc[20, "resolution"] == G.RESOLVED).all() and (first.loc[4, "resolution"] == "below_both").all()
    assert (study.loc[study["per_subject"] == 20, "n_points"] == 60).all()
    summary = R.summarise_study(study)
    assert set(summary["group"]) == {"early", "late"}  # layer 0 of 0..1 is early, layer 1 late
    assert {"ari_subjects", "ari_subjects_min", "ari_subjects_max", "n_clusters", "id_gride", "layers"} <= set(summary)
    with pytest.raises(G.GeometryError, match="at most 40"):
        R.compute_resolution_study(h5, p, [4, 41], 1)
    # layers too large for a complete graph take the plain path: the same table
    monkeypatch.setattr(R, "COMPLETE_GRAPH_VALUES", 10)
    plain = R.compute_resolution_study(h5, p, [4, 20], 2, model="toy", variant="base")
    pd.testing.assert_frame_equal(plain[["per_subject", "draw", "n_points", "n_clusters", "resolution"]],
                                  study[["per_subject", "draw", "n_points", "n_clusters", "resolution"]])
    assert np.allclose(plain["id_gride"], study["id_gride"], rtol=1e-4, equal_nan=True)  # float32 rounding
