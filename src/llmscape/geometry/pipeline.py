"""Geometry of every layer of one extraction, and overlaps between paired extractions."""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .files import read_labels
from .graph import blas_single_thread, resolve_device
from .metrics import compute_layer_graph, compute_layer_metrics, return_data_overlap
from .params import GRIDE_COLUMNS, OVERLAP_COLUMNS, STATUS_OK, TABLE_COLUMNS, GeometryError, GeometryParams

log = logging.getLogger("llmscape.geometry")


def compute_geometry(h5_path: str | Path, params: GeometryParams, *, model: str = "", variant: str = "",
                     shots: int | None = None, layers: list[int] | None = None):
    """Geometry of every layer of one extraction. Returns (table, gride, knn) with table and gride as
    pandas DataFrames (module docstring) and knn a dict(question_id, layer_name, knn)."""
    import h5py
    import pandas as pd
    import torch

    meta = read_labels(h5_path)
    n_layers = meta["shape"][0]
    if shots is None:
        shots = int(meta["attrs"].get("shots", -1))
    model = model or str(meta["attrs"].get("model", ""))
    variant = variant or str(meta["attrs"].get("variant", ""))
    layers = list(range(n_layers)) if layers is None else list(layers)
    device = resolve_device(params.device)
    params = GeometryParams(**{**asdict(params), "device": device})
    log.info("%s: %d layers x %d questions x %d dims on %s (torch threads %d)", h5_path, n_layers,
             meta["shape"][1], meta["shape"][2], device, torch.get_num_threads())

    rows, grides, knns = [], [], []
    # graphs in flight: on CPU, two while a layer fits one row strip (n <= block_rows, at most a few
    # hundred MB each), so one graph's serial steps overlap the other's parallel ones (1.15x on the
    # embedded model's 5-shot layers); one for larger layers, whose graph keeps the cores busy itself
    depth = 2 if device == "cpu" and meta["shape"][1] <= params.block_rows else 1
    # on CPU numpy's BLAS runs one thread for the whole loop: the graph parallelises its products itself
    # (_knn_numpy), and a per-graph limit would change the BLAS setting under the metrics thread
    with h5py.File(h5_path, "r") as f, ThreadPoolExecutor(max_workers=depth) as pool, \
            (blas_single_thread() if device == "cpu" else contextlib.nullcontext()):
        hidden = f["hidden"]

        def graph_of(layer):  # reading + neighbour graph: torch/BLAS/h5py work that releases the GIL
            X = hidden[layer]
            X = X.astype(np.float32) if X.dtype == np.float16 else X
            return compute_layer_graph(X, meta["subject"], meta["answer"], params,
                                       name=f"layer {layer} ({meta['layer_name'][layer]})")

        # pipelined: the graphs of the next layers are built in worker threads while DADApy's metrics of
        # layer l (Python, mostly holding the GIL) run here; the results are those of the sequential loop
        ahead = [pool.submit(graph_of, l) for l in layers[:depth]]
        for a, layer in enumerate(layers):
            state = ahead.pop(0).result()
            if a + depth < len(layers):
                ahead.append(pool.submit(graph_of, layers[a + depth]))
            name = state["name"]
            row, gride, knn = compute_layer_metrics(state, params)
            row = dict(model=model, variant=variant, shots=int(shots), layer=int(layer),
                       layer_name=meta["layer_name"][layer], device=device, **row)
            rows.append(row)
            grides += [dict(model=model, variant=variant, shots=int(shots), layer=int(layer), **g) for g in gride]
            knns.append(knn)
            log.info("%s: n=%d dup=%d id_gride=%.2f id_2nn=%.2f clusters=%s ari_subj=%.3f ari_let=%.3f "
                     "(graph %.1fs, metrics %.1fs) [%s]", name, row["n_points"], row["n_duplicates"],
                     row["id_gride"], row["id_2nn"], row["n_clusters"], row["ari_subjects"],
                     row["ari_letters"], row["seconds_graph"], row["seconds_metrics"], row["status"])

    for a in range(len(layers)):
        nxt = math.nan
        if a + 1 < len(layers) and layers[a + 1] == layers[a] + 1:
            nxt, _ = return_data_overlap(knns[a], knns[a + 1], params.overlap_k)
        rows[a]["overlap_next_layer"] = nxt

    table = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    if not (table["status"] == STATUS_OK).any():
        raise GeometryError(f"{h5_path}: no layer gave usable geometry (statuses: "
                            f"{sorted(set(table['status']))}); see the warnings above")
    gride_df = pd.DataFrame(grides, columns=GRIDE_COLUMNS)
    knn = dict(question_id=meta["question_id"], layer=np.asarray(layers, dtype=np.int64),
               layer_name=np.asarray([meta["layer_name"][l] for l in layers], dtype=str),
               knn=np.stack(knns).astype(np.int32))
    return table, gride_df, knn



def compute_pair_overlaps(knn: dict, refs: list[tuple[str, str, int, dict]], *, model: str, variant: str,
                          shots: int, k: int):
    """Data overlap, layer by layer, of one extraction's neighbour lists with each reference.

    refs: (comparison, ref_variant, ref_shots, ref_knn). The two extractions must hold the same
    questions in the same order; a mismatch is an error, never a silent misalignment."""
    import pandas as pd

    rows = []
    for comparison, ref_variant, ref_shots, ref in refs:
        if not np.array_equal(knn["question_id"], ref["question_id"]):
            raise GeometryError(
                f"{model}/{variant}/{shots}shot and {model}/{ref_variant}/{ref_shots}shot hold different "
                f"questions ({len(knn['question_id'])} vs {len(ref['question_id'])} ids, or another order); "
                "overlaps need the same questions row by row: re-extract both from the same data split")
        if not np.array_equal(knn["layer"], ref["layer"]):
            raise GeometryError(f"{variant}/{shots}shot and {ref_variant}/{ref_shots}shot cover different layers")
        for a, layer in enumerate(knn["layer"]):
            ov, used = return_data_overlap(knn["knn"][a], ref["knn"][a], k)
            if used == 0:
                log.warning("layer %d: no points with neighbours in both %s/%sshot and %s/%sshot; overlap NaN",
                            layer, variant, shots, ref_variant, ref_shots)
            rows.append(dict(model=model, variant=variant, shots=int(shots), layer=int(layer),
                             layer_name=str(knn["layer_name"][a]), comparison=comparison,
                             ref_variant=ref_variant, ref_shots=int(ref_shots), k=int(k), n_points=used,
                             overlap=ov))
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)
