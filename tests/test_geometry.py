"""Known-answer tests of the geometry stage (src/llmscape/geometry/)."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from dadapy import Data
from sklearn.metrics import adjusted_rand_score

from llmscape import geometry as G
from llmscape.configcheck import GEOMETRY_SECTIONS
from llmscape.integrity import seal

ROOT = Path(__file__).resolve().parents[1]

# Small maxk keeps the tests fast; the scales and k follow the paper.
P = G.GeometryParams(maxk=100, id_range_max=64, id_scale=16, density_k=16, z=1.6, label_fraction=0.3,
                     overlap_k=30, device="cpu", block_rows=512, n_boot=0)


def blobs(n_per=200, n_blobs=5, dim=20, sep=30.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_blobs, dim)) * sep
    y = np.repeat(np.arange(n_blobs), n_per)
    X = centres[y] + rng.standard_normal((y.size, dim))
    perm = rng.permutation(y.size)
    return X[perm].astype(np.float32), y[perm]


def random_letters(n, seed=1):
    return np.random.default_rng(seed).integers(0, 4, n)


def write_h5(path, hidden, subject, answer, question_id=None, shots=0, variant="base"):
    n = hidden.shape[1]
    with h5py.File(path, "w") as f:
        f.create_dataset("hidden", data=hidden, chunks=(1, n, hidden.shape[2]), fletcher32=True)
        f.create_dataset("question_id", data=np.arange(n, dtype=np.int64) if question_id is None else question_id)
        f.create_dataset("subject", data=np.asarray(subject, dtype=object), dtype=h5py.string_dtype())
        f.create_dataset("answer", data=np.asarray(answer, dtype=np.int8))
        f.create_dataset("pred", data=np.asarray(answer, dtype=np.int8))
        f.create_dataset("layer_name", data=np.asarray([f"l{i}" for i in range(hidden.shape[0])], dtype=object),
                         dtype=h5py.string_dtype())
        f.attrs.update(model="toy", variant=variant, shots=shots, site="norm", complete=True)
        seal(f)  # every dataset's checksum, as extract() writes them
    return path


# --- neighbour graph -------------------------------------------------------------------------


def brute_knn(X, k):
    X = X.astype(np.float64)
    d = np.sqrt(((X[:, None, :] - X[None, :, :]) ** 2).sum(-1))
    np.fill_diagonal(d, -1)
    ind = np.argsort(d, axis=1, kind="stable")[:, : k + 1]
    dist = np.take_along_axis(d, ind, 1)
    dist[:, 0] = 0
    return dist, ind


@pytest.mark.parametrize("k", [40, 200])  # a top-k of a few per row; most of every row (packed-key sort)
@pytest.mark.parametrize("sym_budget_mb,blas", [(2048, "onednn"), (0, "onednn"), (2048, "numpy"), (0, "numpy"),
                                                (2048, "torch")])
def test_neighbour_graph_matches_brute_force_across_blocks(sym_budget_mb, blas, k):
    # symmetric blocks and plain row strips; block products by oneDNN, numpy's BLAS and torch
    rng = np.random.default_rng(3)
    X = (rng.standard_normal((301, 7)) * np.arange(1, 8)).astype(np.float32)
    dist, ind = G.compute_neighbour_graph(X, k, device="cpu", block_rows=37,  # 9 uneven blocks
                                          sym_budget_mb=sym_budget_mb, blas=blas)
    bd, bi = brute_knn(X, k)
    assert dist.shape == ind.shape == (301, k + 1)
    assert np.array_equal(ind[:, 0], np.arange(301)) and np.all(dist[:, 0] == 0)
    assert np.allclose(dist, bd, rtol=1e-5, atol=1e-6)
    assert (ind == bi).mean() > 0.999
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_packed_selection_orders_ties_by_index():
    # the 125 points of the grid {-2..2}^3 (mean 0, so the float32 products are exact): many equal
    # distances, which the packed-key sort must keep in index order, the point itself first
    rng = np.random.default_rng(5)
    X = np.stack(np.meshgrid(*[np.arange(-2, 3)] * 3), -1).reshape(-1, 3)
    X = X[rng.permutation(len(X))].astype(np.float32)
    n = len(X)
    dist, ind = G.compute_neighbour_graph(X, n - 1, device="cpu", block_rows=17)
    d2 = ((X[:, None, :].astype(np.float64) - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, -1)
    order = np.argsort(d2, axis=1, kind="stable")  # by distance, then by index
    assert np.array_equal(ind, order)
    assert np.array_equal(dist[:, 1:], np.sqrt(np.take_along_axis(d2, order, 1)[:, 1:]))


def test_neighbour_graph_identical_with_one_or_two_threads():
    # the CPU path splits products and sorts over torch.get_num_threads() workers: same bits either way
    import torch

    rng = np.random.default_rng(6)
    X = rng.standard_normal((700, 50)).astype(np.float32)
    before = torch.get_num_threads()
    out = {}
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out[threads] = [G.compute_neighbour_graph(X, k, device="cpu", block_rows=256) for k in (30, 600)]
    finally:
        torch.set_num_threads(before)
    for (d1, i1), (d2, i2) in zip(out[1], out[2], strict=True):
        assert np.array_equal(d1, d2) and np.array_equal(i1, i2)


@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (300, 5), (129, 257), (256, 128)])
def test_copy_transposed_is_an_exact_transpose(shape):
    # the graph's tiled transpose, into a strided view as the strips use it, edge tiles included
    rng = np.random.default_rng(9)
    src = rng.standard_normal((shape[1] + 3, shape[0] + 7))[:shape[1], 2:shape[0] + 2]
    big = np.full((shape[0] + 2, shape[1] + 9), np.nan)
    G.graph.copy_transposed(big[1:shape[0] + 1, 4:shape[1] + 4], src)
    assert np.array_equal(big[1:shape[0] + 1, 4:shape[1] + 4], src.T)
    assert np.isnan(big[0]).all() and np.isnan(big[:, :4]).all() and np.isnan(big[:, shape[1] + 4:]).all()


def test_onednn_products_are_float32_and_leave_the_callers_threads_alone():
    # the oneDNN product must be a true float32 one (no bf16 or tf32 inside: an error near float32's
    # rounding, not bf16's 1e-3), equal to numpy's to float32 rounding, and its one-thread OpenMP
    # setting must stay in the graph's workers: the caller keeps torch's thread count
    import torch

    matmul = G.graph.onednn_product()
    assert matmul is not None, "torch on x86 ships oneDNN; without it blas='auto' falls back to numpy"
    rng = np.random.default_rng(8)
    a, b = rng.standard_normal((300, 1000)).astype(np.float32), rng.standard_normal((200, 1000)).astype(np.float32)
    out = np.empty((300, 200), np.float32)

    def in_worker():
        from threadpoolctl import threadpool_info

        matmul(a, b, out)
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "openmp"]

    assert set(G.graph.worker_pool(2).submit(in_worker).result()) == {1}  # one OpenMP thread in the worker
    exact = a.astype(np.float64) @ b.astype(np.float64).T
    err = np.abs(out - exact).max() / np.abs(exact).max()
    assert 0 < err < 1e-5, err
    assert np.abs(out - a @ b.T).max() / np.abs(exact).max() < 1e-5
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        G.compute_neighbour_graph(rng.standard_normal((500, 20)).astype(np.float32), 30, device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="worker threads"):
        matmul(a, b, out)  # never in the main thread: it would hold torch there to one thread


def test_ari_equals_scikit_learn():
    rng = np.random.default_rng(7)
    for t in range(300):
        n = int(rng.integers(1, 200))
        a = rng.integers(0, int(rng.integers(1, 40)), n)
        b = a.copy() if t % 5 == 0 else np.arange(n) if t % 7 == 0 else rng.integers(-1, 6, n)
        assert G.return_ari(a, b) == adjusted_rand_score(a, b)


@pytest.mark.parametrize("k", [10, 100])
def test_neighbour_graph_refines_cancellation_prone_pairs(k):
    # two tight clusters far from their common mean: |x|^2 + |y|^2 - 2xy in float32 is pure noise
    rng = np.random.default_rng(4)
    off = np.zeros(16)
    off[0] = 1e3
    X = np.concatenate([off + 1e-2 * rng.standard_normal((60, 16)), -off + 1e-2 * rng.standard_normal((60, 16))])
    X = X.astype(np.float32)
    bd, _ = brute_knn(X, k)
    d_ref, _ = G.compute_neighbour_graph(X, k, device="cpu", block_rows=50)
    d_raw, _ = G.compute_neighbour_graph(X, k, device="cpu", block_rows=50, refine_tol=0)
    assert np.allclose(d_ref[:, 1:], bd[:, 1:], rtol=1e-4)
    assert not np.allclose(d_raw[:, 1:], bd[:, 1:], rtol=1e-2)  # why the refinement exists


def test_unique_rows_keep_first_occurrence_in_order():
    X = np.array([[1, 2], [3, 4], [1, 2], [0.0, 5], [-0.0, 5], [3, 4], [7, 7]], dtype=np.float32)
    assert G.return_unique_rows(X).tolist() == [0, 1, 3, 6]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unique_rows_equal_numpy_unique(dtype):
    # the hash-and-verify grouping gives np.unique's first occurrences on many small cases full of
    # duplicates and signed zeros (few distinct values, so collisions of whole rows are common)
    rng = np.random.default_rng(11)
    for _ in range(200):
        n, d = int(rng.integers(1, 60)), int(rng.integers(1, 7))
        X = rng.integers(-2, 3, (n, d)).astype(dtype)
        X[rng.random(n) < 0.2] *= -1  # 0.0 -> -0.0 in some rows
        ref = np.sort(np.unique(X + dtype(0), axis=0, return_index=True)[1])
        assert G.return_unique_rows(X).tolist() == ref.tolist()


# --- intrinsic dimension ---------------------------------------------------------------------


def geometry_of(X, subjects=None, letters=None, params=P):
    n = X.shape[0]
    subjects = np.zeros(n, int) if subjects is None else subjects
    letters = random_letters(n) if letters is None else letters
    return G.compute_layer_geometry(X, subjects, letters, params, name="test")


def test_id_of_a_linear_subspace():
    rng = np.random.default_rng(5)
    d, D, n = 6, 100, 2000
    basis = np.linalg.qr(rng.standard_normal((D, d)))[0]
    X = (rng.standard_normal((n, d)) @ basis.T + 3.0).astype(np.float32)
    row, gride, _, _ = geometry_of(X)
    assert row["status"] == "ok"
    assert abs(row["id_gride"] - d) / d < 0.10, row["id_gride"]
    assert abs(row["id_2nn"] - d) / d < 0.10, row["id_2nn"]
    assert [(g["n1"], g["n2"]) for g in gride] == [(1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]


def test_id_of_a_curved_manifold():
    # the 3-sphere S^3 in R^4, rotated into R^40
    rng = np.random.default_rng(6)
    Y = rng.standard_normal((2500, 4))
    Y /= np.linalg.norm(Y, axis=1, keepdims=True)
    R = np.linalg.qr(rng.standard_normal((40, 4)))[0]
    X = (Y @ R.T).astype(np.float32)
    row, _, _, _ = geometry_of(X)
    assert abs(row["id_gride"] - 3) / 3 < 0.10, row["id_gride"]
    assert abs(row["id_2nn"] - 3) / 3 < 0.10, row["id_2nn"]


# --- clustering ------------------------------------------------------------------------------


def test_separated_blobs_give_their_labels_back():
    X, y = blobs()
    letters = random_letters(len(y))
    row, _, _, _ = geometry_of(X, y, letters)
    assert row["n_clusters"] == 5
    assert row["ari_subjects"] >= 0.95
    assert abs(row["ari_letters"]) < 0.05
    assert row["overlap_subjects"] > 0.99
    assert row["overlap_letters"] < 0.4
    assert 0 < row["core_fraction"] <= 1


def plain_dadapy(X, maxk, params=P):
    """The published recipe: dadapy on float64 coordinates, its own distances."""
    d = Data(coordinates=X.astype(np.float64), verbose=False)
    d.compute_distances(maxk=maxk)
    ids, errs, _ = d.return_id_scaling_gride(range_max=params.id_range_max)
    d.set_id(ids[4])
    d.compute_density_kNN(k=params.density_k)
    assignment = np.array(d.compute_clustering_ADP(Z=params.z, halo=False))
    return ids, errs, assignment, d


@pytest.mark.parametrize("case", ["gaussian", "plane", "ties", "outliers"])
def test_gride_equals_dadapy_on_the_same_graph(case):
    # our vectorised Gride (Newton steps, all scales at once) against DADApy's bisections, same distances:
    # ratios of exactly 1 (rounded coordinates), far outliers (its ratio filter), a low-dimensional plane
    rng = np.random.default_rng(21)
    X = {"gaussian": lambda: rng.standard_normal((1200, 8)),
         "plane": lambda: rng.standard_normal((900, 3)) @ rng.standard_normal((3, 40)),
         "ties": lambda: np.round(rng.standard_normal((800, 4)), 1),
         "outliers": lambda: np.vstack([rng.standard_normal((500, 20)), 50 * rng.standard_normal((20, 20))])}[case]()
    X = X[G.return_unique_rows(X)]
    dist, ind = G.compute_neighbour_graph(X.astype(np.float32), 200, device="cpu")
    ids, errs, n2s = Data(distances=(dist, ind), maxk=200, verbose=False).return_id_scaling_gride(
        range_max=100, return_ranks=True)
    ours, our_errs, our_n2s = G.metrics.return_gride_profile(dist, 100)
    assert np.array_equal(our_n2s, n2s) and len(n2s) == 6
    assert np.max(np.abs(ours - ids)) < 2e-7 and np.allclose(our_errs, errs, rtol=1e-6, atol=0)
    if case == "ties":
        assert (dist[:, 2] == dist[:, 1]).any()  # the nudged ratios of exactly 1 occur


def test_identical_to_plain_dadapy():
    rng = np.random.default_rng(7)
    # unequal, overlapping blobs: two peaks merge (5 clusters, ARI ~0.8) and a third of the points are halo
    X, y = blobs(n_per=150, n_blobs=6, dim=12, sep=1.5, seed=8)
    X = (X * rng.uniform(0.5, 2.0, size=12)).astype(np.float32)
    letters = random_letters(len(y))
    row, gride, _, _ = geometry_of(X, y, letters)
    ids, errs, assignment, ref = plain_dadapy(X, P.maxk)
    assert np.allclose([g["id"] for g in gride], ids, rtol=1e-5)
    assert np.allclose([g["err"] for g in gride], errs, rtol=1e-4)
    assert row["id_gride"] == pytest.approx(ids[4], rel=1e-5)
    assert row["n_clusters"] == ref.N_clusters and ref.N_clusters > 1 and row["core_fraction"] < 0.9
    assert row["ari_subjects"] == pytest.approx(adjusted_rand_score(y, assignment), abs=1e-12)
    # the same assignment, point by point (cluster labels too)
    ours = Data(distances=G.compute_neighbour_graph(X, P.maxk, device="cpu"), maxk=P.maxk, verbose=False)
    ours.set_id(row["id_gride"])
    ours.compute_density_kNN(k=P.density_k)
    assert np.array_equal(ours.compute_clustering_ADP(Z=P.z, halo=False), assignment)
    # the core fraction (halo on) derived from that one call equals DADApy's own halo=True clustering
    halo = np.asarray(ref.compute_clustering_ADP(Z=P.z, halo=True))
    assert row["core_fraction"] == pytest.approx(np.mean(halo >= 0), abs=1e-12) and (halo < 0).any()
    # label overlap as dadapy computes it on coordinates
    ref_ov = Data(coordinates=X.astype(np.float64), verbose=False)
    ref_ov.compute_distances(maxk=P.maxk)
    assert row["overlap_subjects"] == pytest.approx(ref_ov.return_label_overlap(y, class_fraction=0.3), abs=1e-9)


def test_data_overlap_matches_dadapy_and_handles_missing_rows():
    rng = np.random.default_rng(9)
    A = rng.standard_normal((400, 10)).astype(np.float32)
    B = (A + 0.3 * rng.standard_normal(A.shape)).astype(np.float32)
    _, ia = G.compute_neighbour_graph(A, 30, device="cpu")
    _, ib = G.compute_neighbour_graph(B, 30, device="cpu")
    ours, used = G.return_data_overlap(ia[:, 1:], ib[:, 1:], 30)
    ref = Data(coordinates=A.astype(np.float64), verbose=False)
    ref.compute_distances(maxk=30)
    expected = ref.return_data_overlap(coordinates=B.astype(np.float64), k=30)
    assert used == 400 and ours == pytest.approx(expected, abs=1e-12)
    assert 0.2 < ours < 0.95
    assert G.return_data_overlap(ia[:, 1:], ia[:, 1:], 30) == (1.0, 400)
    holes = ia[:, 1:].copy()
    holes[:50] = -1
    assert G.return_data_overlap(holes, ia[:, 1:], 30) == (1.0, 350)


# --- degenerate inputs -----------------------------------------------------------------------


def test_duplicates_are_dropped_with_labels_aligned():
    X, y = blobs(n_per=120, n_blobs=4, dim=10, sep=20.0, seed=10)
    letters = random_letters(len(y))
    rng = np.random.default_rng(11)
    dup = rng.choice(len(y), 60, replace=False)
    Xd = np.concatenate([X, X[dup]])
    yd, ld = np.concatenate([y, y[dup]]), np.concatenate([letters, letters[dup]])
    perm = rng.permutation(len(yd))
    row, _, knn, _ = geometry_of(Xd[perm], yd[perm], ld[perm])
    clean, _, _, _ = geometry_of(X, y, letters)
    assert row["n_duplicates"] == 60 and row["n_points"] == len(y) and row["n_questions"] == len(yd)
    assert row["ari_subjects"] == pytest.approx(clean["ari_subjects"]) and row["ari_subjects"] > 0.95
    # the float32 products round a row by its place in the BLAS call, and the duplicates move every row:
    # equal to float32 precision, not bit for bit
    assert row["id_gride"] == pytest.approx(clean["id_gride"], rel=1e-5)
    assert (knn < 0).all(axis=1).sum() == 60  # dropped rows have no neighbour list
    assert knn.max() < len(yd)


def test_degenerate_layers_give_nan_and_a_warning(tmp_path, caplog):
    X, y = blobs(n_per=40, n_blobs=3, dim=8, sep=20.0, seed=12)
    n = len(y)
    good = X
    many = np.arange(n)[:, None] % 6 == 0  # 20 of 120 rows: more than max_nonfinite_fraction (1%)
    hidden = np.stack([
        np.ones((n, 8), np.float32),  # layer 0: every vector identical
        np.where(np.arange(n)[:, None] == 5, np.nan, good).astype(np.float32),  # layer 1: one NaN row, dropped
        np.repeat(good[:10], n // 10 + 1, axis=0)[:n],  # layer 2: 10 distinct points
        np.where(many, np.inf, good).astype(np.float32),  # layer 3: 20 inf rows
        good,
        good,  # layers 4 and 5 identical: overlap 1
    ]).astype(np.float16)
    h5 = write_h5(tmp_path / "0shot.h5", hidden, np.array(["a", "b", "c"])[y], random_letters(n))
    with caplog.at_level(logging.WARNING, logger="llmscape.geometry"):
        table, gride, knn, _ = G.compute_geometry(h5, P)
    assert table["status"].tolist() == ["constant", "ok", "too_few_points", "non_finite", "ok", "ok"]
    bad = [0, 2, 3]
    assert table.loc[bad, ["id_gride", "id_2nn", "n_clusters", "ari_subjects", "overlap_letters"]].isna().all().all()
    assert table.loc[0, "n_duplicates"] == n - 1 and table.loc[2, "n_points"] == 10
    # a few non-finite rows are dropped and counted, the rest of the layer is analysed
    assert table.loc[1, "n_dropped_nonfinite"] == 1 and table.loc[1, "n_points"] == n - 1
    assert table.loc[1, "ari_subjects"] > 0.95 and (knn["knn"][1][5] == -1).all() and (knn["knn"][1] != 5).all()
    assert table.loc[3, "n_dropped_nonfinite"] == 20
    for layer in (0, 1, 2, 3):
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(f"layer {layer} (l{layer})" in w for w in warnings)
    assert table.loc[4, "ari_subjects"] > 0.95 and table.loc[4, "overlap_next_layer"] == 1.0
    assert math.isnan(table.loc[5, "overlap_next_layer"]) and math.isnan(table.loc[0, "overlap_next_layer"])
    assert set(gride["layer"]) == {1, 4, 5}
    assert knn["knn"].shape == (6, n, 30) and (knn["knn"][0] == -1).all()
    assert list(table.columns) == G.TABLE_COLUMNS


def test_unusable_inputs_are_clear_errors(tmp_path):
    n = 50
    const = write_h5(tmp_path / "c.h5", np.ones((3, n, 4), np.float32), ["a"] * n, np.zeros(n))
    with pytest.raises(G.GeometryError, match="no layer"):
        G.compute_geometry(const, P)
    with h5py.File(tmp_path / "bad.h5", "w") as f:
        f.create_dataset("hidden", data=np.zeros((2, 3, 4)))
        f.attrs["complete"] = True
    with pytest.raises(G.GeometryError, match="lacks datasets"):
        G.compute_geometry(tmp_path / "bad.h5", P)
    with pytest.raises(G.GeometryError, match="no extraction"):
        G.compute_geometry(tmp_path / "missing.h5", P)


def test_damaged_extractions_stop_with_the_file_and_the_fix(tmp_path):
    # a flipped byte inside a layer's data, a truncated file, a file cut short before its completion
    # mark: each stops the geometry naming the file and the command that rebuilds it, never a bare
    # h5py traceback, and nothing is computed from the damaged values
    X, y = blobs(n_per=40, n_blobs=3, dim=8, sep=20.0, seed=16)
    hidden = np.stack([X, X + 1]).astype(np.float32)
    good = write_h5(tmp_path / "good.h5", hidden, np.array(["a", "b", "c"])[y], random_letters(len(y)))
    fix = "Fix: rebuild exactly this file with `snakemake --cores 1 --force "

    flipped = tmp_path / "flipped.h5"
    flipped.write_bytes(good.read_bytes())
    with h5py.File(flipped, "r") as f:
        offset = f["hidden"].id.get_chunk_info(1).byte_offset  # layer 1's chunk
    raw = bytearray(flipped.read_bytes())
    raw[offset + 100] ^= 0xFF
    flipped.write_bytes(bytes(raw))
    with pytest.raises(G.GeometryError, match=r"flipped\.h5: layer 1 cannot be read intact") as e:
        G.compute_geometry(flipped, P)
    assert fix in str(e.value)

    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(G.GeometryError, match=r"cut\.h5 is not a readable HDF5 file") as e:
        G.compute_geometry(cut, P)
    assert fix in str(e.value)

    unmarked = tmp_path / "unmarked.h5"
    unmarked.write_bytes(good.read_bytes())
    with h5py.File(unmarked, "r+") as f:
        del f.attrs["complete"]
    with pytest.raises(G.GeometryError, match=r"unmarked\.h5 has no completion mark") as e:
        G.compute_geometry(unmarked, P)
    assert fix in str(e.value)
    assert G.compute_geometry(good, P).table["status"].eq("ok").all()  # the intact copy reads fine


def test_pair_overlaps_check_alignment(tmp_path):
    X, y = blobs(n_per=40, n_blobs=3, dim=8, sep=20.0, seed=13)
    n = len(y)
    rng = np.random.default_rng(14)
    hid0 = np.stack([X, X + 0.01 * rng.standard_normal(X.shape).astype(np.float32)])
    hid5 = np.stack([rng.standard_normal(X.shape).astype(np.float32), X])
    subj = np.array(["a", "b", "c"])[y]
    _, _, k0, _ = G.compute_geometry(write_h5(tmp_path / "0.h5", hid0, subj, random_letters(n)), P)
    _, _, k5, _ = G.compute_geometry(write_h5(tmp_path / "5.h5", hid5, subj, random_letters(n), shots=5), P)
    ov = G.compute_pair_overlaps(k5, [("shots", "base", 0, k0)], model="toy", variant="base", shots=5, k=30)
    assert list(ov.columns) == G.OVERLAP_COLUMNS and len(ov) == 2
    assert ov.loc[0, "overlap"] < 0.5 < ov.loc[1, "overlap"]  # noise vs blobs; the same blobs
    shuffled = dict(k0, question_id=k0["question_id"][::-1].copy())
    with pytest.raises(G.GeometryError, match="different questions"):
        G.compute_pair_overlaps(k5, [("shots", "base", 0, shuffled)], model="toy", variant="base", shots=5, k=30)
    G.write_knn(tmp_path / "k.npz", k0)
    back = G.read_knn(tmp_path / "k.npz")
    assert np.array_equal(back["knn"], k0["knn"]) and back["layer_name"].tolist() == ["l0", "l1"]


def test_schema_defaults_match_the_library():
    schema = yaml.safe_load((ROOT / "workflow/schemas/config.schema.yaml").read_text())
    props = schema["properties"]["geometry"]["properties"]
    # the study and the replication have rules of their own (llmscape.configcheck.GEOMETRY_SECTIONS)
    defaults = {k: v["default"] for k, v in props.items() if k not in GEOMETRY_SECTIONS}
    assert G.GeometryParams.from_config(defaults) == G.GeometryParams()
    for cfg in ("config.yaml", "ci.yaml", "llama3-8b.yaml"):
        geometry = yaml.safe_load((ROOT / "config" / cfg).read_text())["geometry"]
        G.GeometryParams.from_config({k: v for k, v in geometry.items() if k not in GEOMETRY_SECTIONS})


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_matches_cpu():
    X, _ = blobs(n_per=300, n_blobs=5, dim=64, sep=3.0, seed=15)
    dc, ic = G.compute_neighbour_graph(X, 100, device="cpu")
    dg, ig = G.compute_neighbour_graph(X, 100, device="cuda")
    assert np.allclose(dg, dc, rtol=1e-4, atol=1e-5) and (ig == ic).mean() > 0.999
