"""The CPU neighbour graph's two selections and the subsample graphs read from it.

The graph picks, per row strip, either one sort of packed (distance, index) keys or torch's top-k,
by the share of the row it keeps (graph._PACKED_SHARE); both must give the exact neighbours, and the
subsample graphs read from the layer's graph must be exactly the first members of each list.
"""

from __future__ import annotations

import numpy as np
import pytest

from llmscape import geometry as G
from llmscape.geometry import graph as Gr


def brute(X: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 k-NN by a stable sort of all distances: ties in index order, the point itself first."""
    X = X.astype(np.float64)
    d2 = ((X[:, None, :] - X[None]) ** 2).sum(-1)
    np.fill_diagonal(d2, -1)
    ind = np.argsort(d2, axis=1, kind="stable")[:, :k + 1]
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, ind, 1), 0))
    dist[:, 0] = 0
    return dist, ind


@pytest.mark.parametrize("k", [5, 60])  # 6 of 1,000 columns: torch's top-k; 61: the packed sort
def test_both_selections_give_the_exact_graph(k):
    packed = Gr._PACKED_SHARE * (k + 1) >= 1000
    assert packed == (k == 60)  # the two cases really take the two paths
    rng = np.random.default_rng(11)
    X = (rng.standard_normal((1000, 9)) * np.arange(1, 10)).astype(np.float32)
    dist, ind = G.compute_neighbour_graph(X, k, device="cpu", block_rows=300)
    bd, bi = brute(X, k)
    assert np.array_equal(ind[:, 0], np.arange(1000)) and np.all(dist[:, 0] == 0)
    assert np.allclose(dist, bd, rtol=1e-5, atol=1e-6)
    assert (ind == bi).mean() > 0.999  # float32 rounding may swap near-equal neighbours, nothing more
    assert np.all(np.diff(dist, axis=1) >= 0)


def test_packed_sort_bounds_its_keys_and_keeps_them_identical():
    # each worker sorts its rows a few at a time (at most _KEYS_BYTES of keys, uneven last block):
    # same bits as sorting all of them at once, and as the default blocks
    rng = np.random.default_rng(12)
    X = rng.standard_normal((1200, 16)).astype(np.float32)
    default = G.compute_neighbour_graph(X, 400, device="cpu")
    before = Gr._KEYS_BYTES
    graphs = []
    try:
        for rows in (7, 1200):  # 7-row blocks; the whole strip at once
            Gr._KEYS_BYTES = rows * 1200 * 8
            graphs.append(G.compute_neighbour_graph(X, 400, device="cpu"))
    finally:
        Gr._KEYS_BYTES = before
    for dist, ind in graphs:
        assert np.array_equal(dist, default[0]) and np.array_equal(ind, default[1])


def test_subgraph_is_the_first_members_of_each_list():
    # by definition: each member's list over all points with the non-members struck out, cut at k;
    # rows whose list holds fewer than k members are recomputed (and equal the brute-force graph)
    rng = np.random.default_rng(13)
    X = rng.standard_normal((400, 5)).astype(np.float32)
    dist, ind = G.compute_neighbour_graph(X, 80, device="cpu")
    members = np.sort(rng.choice(400, 300, replace=False))
    k = 58
    pos = np.full(400, -1)
    pos[members] = np.arange(300)
    sd, si = G.return_subgraph(X, dist, ind, members, k)
    n_read = 0
    for r, i in enumerate(members):
        inside = pos[ind[i]] >= 0
        if inside.sum() > k:  # the point itself and k members: read from the list
            n_read += 1
            assert np.array_equal(si[r], pos[ind[i][inside][:k + 1]])
            assert np.array_equal(sd[r, 1:], dist[i][inside][1:k + 1])
    assert 0 < n_read < 300  # both kinds of rows occur
    bd, bi = brute(X[members], k)
    assert np.array_equal(si[:, 0], np.arange(300)) and np.all(sd[:, 0] == 0)
    assert np.allclose(sd, bd, rtol=1e-5, atol=1e-6) and (si == bi).mean() > 0.999
