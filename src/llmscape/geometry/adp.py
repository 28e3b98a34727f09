"""DADApy's ADP clustering, with its output checked before any metric reads it.

DADApy 0.3.4's compiled ADP builds the labels with ``np.empty`` and writes each surviving cluster's
members into it; a point that ends up in no cluster keeps whatever the memory held (reported upstream
and fixed after that release). Such a label may even fall in range, so the check does not stop at the
labels: the clusters' member lists (``cluster_indices``) must hold every point exactly once, each
member labelled with its own cluster, every cluster non-empty, and the cluster count must agree with
the labels, the centres and the saddle-density matrix the core fraction reads. A faulty assignment is
recomputed with DADApy's pure-Python ADP (``Data.compute_clustering_ADP_pure_python``, the same
algorithm without the compiled loops) and counted (``n_adp_repaired`` in the layer table); one that is
still faulty is an error, which marks the layer ``failed``.
"""

from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger("llmscape.geometry")


def adp_fault(data) -> str:
    """What is wrong with the ADP assignment (halo off) last stored on DADApy ``data``; "" when it is
    whole: every point in exactly one cluster, labels in 0..N_clusters-1 and equal to the member lists."""
    n = int(data.N)
    labels = np.asarray(data.cluster_assignment)
    k = int(data.N_clusters) if data.N_clusters is not None else 0
    if labels.shape != (n,) or labels.dtype.kind not in "iu":
        return f"labels of shape {labels.shape} and type {labels.dtype}, expected ({n},) integers"
    if k < 1:
        return f"{k} clusters"
    outside = (labels < 0) | (labels >= k)
    if outside.any():
        return f"{int(outside.sum())} of {n} labels outside 0..{k - 1} (e.g. {labels[outside][:3].tolist()})"
    members = list(data.cluster_indices) if data.cluster_indices is not None else []
    if len(members) != k:
        return f"{len(members)} member lists for {k} clusters"
    count = np.zeros(n, dtype=np.int64)
    for c, idx in enumerate(members):
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size == 0:
            return f"cluster {c} has no member"
        np.add.at(count, idx, 1)
        if (labels[idx] != c).any():
            return f"{int((labels[idx] != c).sum())} members of cluster {c} labelled otherwise"
    if (count != 1).any():
        return (f"{int((count == 0).sum())} of {n} points in no cluster, {int((count > 1).sum())} in several "
                f"(their labels are left-over memory)")
    if len(data.cluster_centers) != k or np.shape(data.log_den_bord) != (k, k):
        return f"{len(data.cluster_centers)} centres and saddle matrix {np.shape(data.log_den_bord)} for {k} clusters"
    return ""


def checked_adp(data, z: float, name: str = "layer") -> tuple[np.ndarray, int]:
    """(assignment, 1 if it was repaired else 0) of ADP with merging parameter ``z`` and the halo off on
    DADApy ``data`` (densities computed): the compiled ADP, checked by :func:`adp_fault`; a faulty
    result is recomputed with DADApy's pure-Python ADP, which is checked in turn."""
    data.compute_clustering_ADP(Z=z, halo=False)
    fault = adp_fault(data)
    if not fault:
        return np.array(data.cluster_assignment, copy=True), 0
    log.warning("%s: DADApy's compiled ADP gave a faulty assignment (%s); recomputed with its pure-Python ADP "
                "(counted in n_adp_repaired)", name, fault)
    data.compute_clustering_ADP_pure_python(Z=z, halo=False)
    fault = adp_fault(data)
    if fault:
        raise ValueError(f"DADApy's ADP gave a faulty assignment twice, compiled and pure Python ({fault})")
    return np.array(data.cluster_assignment, copy=True), 1
