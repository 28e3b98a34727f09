"""Geometry of every layer of one extraction, and overlaps between paired extractions."""

from __future__ import annotations

import contextlib
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..devices import pick_device
from .files import read_labels, read_layer
from .graph import blas_single_thread
from .metrics import (
    LayerResult,
    compute_layer_graph,
    compute_layer_metrics,
    fill_intervals,
    resolution_advice,
    return_class_sizes,
    return_data_overlap,
)
from .paired import return_draws_digest
from .params import (
    BOOT_COLUMNS,
    GRIDE_COLUMNS,
    NEXT_LAYER,
    OVERLAP_COLUMNS,
    PAIR,
    RESOLVED,
    STATUS_OK,
    TABLE_COLUMNS,
    GeometryError,
    GeometryParams,
    metric_names,
)
from .resample import boot_graph_k, draw_members, return_member_knn

log = logging.getLogger("llmscape.geometry")


class ExtractionGeometry(NamedTuple):
    """Geometry of one extraction: ``table`` (one row per layer), ``gride`` (Gride profiles), ``knn``
    (dict of question_id, subject, layer, layer_name and the neighbour lists, for the saved .npz) and
    ``boot`` (one row per layer and subsample), as in the package docstring."""

    table: object
    gride: object
    knn: dict
    boot: object


def compute_geometry(h5_path: str | Path, params: GeometryParams, *, model: str = "", variant: str = "",
                     shots: int | None = None, layers: list[int] | None = None) -> ExtractionGeometry:
    """Geometry of every layer of one extraction, with intervals from ``params.n_boot`` subsamples of
    every subject (the same subsamples for every layer and for every extraction of these questions)."""
    run = _open_run(h5_path, params, model, variant, shots, layers)
    results = _layer_results(run)
    rows, knns, boots = [r.row for r in results], [r.knn for r in results], [r.boot for r in results]
    _next_layer_overlaps(rows, knns, boots, run)
    _warn_resolution(rows, run.draws, run.meta, run.params)
    return _tables(run, results)


class _Run(NamedTuple):
    """What every phase of :func:`compute_geometry` reads: the extraction, its labels (``meta``, from
    files.read_labels), the names of its rows, the layers asked for, the parameters with the device
    resolved, and the subsamples."""

    h5_path: str | Path
    meta: dict
    model: str
    variant: str
    shots: int
    layers: list
    params: GeometryParams
    draws: list


def _open_run(h5_path, params: GeometryParams, model: str, variant: str, shots: int | None, layers) -> _Run:
    """The extraction's labels and names (checked against its path), the device and the subsamples."""
    import torch

    meta = read_labels(h5_path, model=model, variant=variant, shots=shots)  # the path's names, checked
    n_layers = meta["shape"][0]
    if shots is None:
        shots = int(meta["attrs"].get("shots", -1))
    model = model or str(meta["attrs"].get("model", ""))
    variant = variant or str(meta["attrs"].get("variant", ""))
    layers = list(range(n_layers)) if layers is None else list(layers)
    device = pick_device(params.device, key="geometry.device", error=GeometryError)
    params = GeometryParams(**{**asdict(params), "device": device})
    log.info("%s: %d layers x %d questions x %d dims on %s (torch threads %d)", h5_path, n_layers,
             meta["shape"][1], meta["shape"][2], device, torch.get_num_threads())
    draws = draw_members(meta["subject"], params.n_boot, params.boot_fraction, params.seed)
    if draws:
        log.info("intervals: %d subsamples of %.0f%% of every subject (%d of %d questions), %.0f%% confidence",
                 len(draws), 100 * params.boot_fraction, draws[0].size, meta["shape"][1], 100 * params.confidence)
    return _Run(h5_path, meta, model, variant, int(shots), layers, params, draws)


def _layer_results(run: _Run) -> list[LayerResult]:
    """Every layer's :class:`LayerResult`, its row keyed by (model, variant, shots, layer) and named.

    Pipelined: the graphs of the next layers are built in worker threads (reading + neighbour graph:
    torch/BLAS/h5py work that releases the GIL) while DADApy's metrics of the current layer (Python,
    mostly holding the GIL) run here; the results are those of the sequential loop."""
    import h5py

    meta, params, device = run.meta, run.params, run.params.device
    # graphs in flight: on CPU, two while a layer fits one row strip (n <= block_rows, at most a few
    # hundred MB each), so one graph's serial steps overlap the other's parallel ones (1.15x on the
    # embedded model's 5-shot layers); one for larger layers, whose graph keeps the cores busy itself
    depth = 2 if device == "cpu" and meta["shape"][1] <= params.block_rows else 1
    results = []
    # on CPU numpy's BLAS runs one thread for the whole loop: the graph parallelises its products itself
    # (_knn_numpy), and a per-graph limit would change the BLAS setting under the metrics thread
    with h5py.File(run.h5_path, "r") as f, ThreadPoolExecutor(max_workers=depth) as pool, \
            (blas_single_thread() if device == "cpu" else contextlib.nullcontext()):
        hidden = f["hidden"]

        def graph_of(layer):
            X = read_layer(hidden, layer, run.h5_path)
            X = X.astype(np.float32) if X.dtype == np.float16 else X
            return compute_layer_graph(X, meta["subject"], meta["answer"], params,
                                       name=f"layer {layer} ({meta['layer_name'][layer]})", draws=run.draws)

        ahead = [pool.submit(graph_of, layer) for layer in run.layers[:depth]]
        for a, layer in enumerate(run.layers):
            graph = ahead.pop(0).result()
            if a + depth < len(run.layers):
                ahead.append(pool.submit(graph_of, run.layers[a + depth]))
            row, gride, knn, boot = compute_layer_metrics(graph, params)
            key = dict(model=run.model, variant=run.variant, shots=run.shots, layer=int(layer))
            row = dict(**key, layer_name=meta["layer_name"][layer], device=device, **row)
            results.append(LayerResult(row, [dict(**key, **g) for g in gride], knn, [dict(**key, **b) for b in boot]))
            _log_layer(graph.name, a, len(run.layers), row, len(boot))
    return results


def _log_layer(name: str, a: int, n_layers: int, row: dict, n_boot: int) -> None:
    log.info("%s (%d of %d): n=%d dup=%d id_gride=%.2f %s id_2nn=%.2f clusters=%s ari_subj=%.3f %s "
             "ari_let=%.3f (graph %.1fs, metrics %.1fs, %d subsamples %.1fs) [%s, %s]", name, a + 1,
             n_layers, row["n_points"], row["n_duplicates"], row["id_gride"], _ci(row, "id_gride"),
             row["id_2nn"], row["n_clusters"], row["ari_subjects"], _ci(row, "ari_subjects"),
             row["ari_letters"], row["seconds_graph"], row["seconds_metrics"], n_boot,
             row["seconds_boot"], row["status"], row["resolution"])


def _next_layer_overlaps(rows: list[dict], knns: list[np.ndarray], boots: list[list[dict]], run: _Run) -> None:
    """The NEXT_LAYER metrics (overlap_next_layer) of every layer, in its row and in its subsamples'
    boot rows (the same subsample in both layers), and their intervals; NaN where the next layer was
    not computed."""
    layers, draws, k = run.layers, run.draws, run.params.overlap_k
    nxt_lists = [return_member_knn(knns[0], d, k) for d in draws] if layers else []
    for a in range(len(layers)):
        nxt = math.nan
        follows = a + 1 < len(layers) and layers[a + 1] == layers[a] + 1
        if follows:
            nxt, _ = return_data_overlap(knns[a], knns[a + 1], k)
        rows[a]["overlap_next_layer"] = nxt
        # each subsample's neighbour lists in this layer and the next (each computed once)
        cur_lists, nxt_lists = nxt_lists, ([return_member_knn(knns[a + 1], d, k) for d in draws]
                                           if a + 1 < len(layers) else [])
        for b in boots[a]:
            b["overlap_next_layer"] = (return_data_overlap(cur_lists[b["draw"]], nxt_lists[b["draw"]], k)[0]
                                       if follows else math.nan)
        if boots[a]:
            fill_intervals(rows[a], boots[a], run.params, metric_names(NEXT_LAYER, interval=True))


def _tables(run: _Run, results: list[LayerResult]) -> ExtractionGeometry:
    """The layer, Gride and subsample tables and the neighbour lists to save; an error when no layer
    gave usable geometry."""
    import pandas as pd

    meta, layers = run.meta, run.layers
    table = pd.DataFrame([r.row for r in results], columns=TABLE_COLUMNS)
    if not (table["status"] == STATUS_OK).any():
        raise GeometryError(f"{run.h5_path}: no layer gave usable geometry (statuses: "
                            f"{sorted(set(table['status']))}); see the warnings above")
    gride_df = pd.DataFrame([g for r in results for g in r.gride], columns=GRIDE_COLUMNS)
    knn = dict(question_id=meta["question_id"], subject=meta["subject"], layer=np.asarray(layers, dtype=np.int64),
               layer_name=np.asarray([meta["layer_name"][layer] for layer in layers], dtype=str),
               knn=np.stack([r.knn for r in results]).astype(np.int32),
               # which questions each subsample kept: paired differences check it (paired.py)
               draws_digest=np.asarray(return_draws_digest(meta["question_id"], run.draws)))
    boot_df = pd.DataFrame([b for r in results for b in r.boot], columns=BOOT_COLUMNS)
    return ExtractionGeometry(table, gride_df, knn, boot_df)


def _ci(row: dict, metric: str) -> str:
    lo, hi = row.get(f"{metric}_lo", math.nan), row.get(f"{metric}_hi", math.nan)
    return "" if not (math.isfinite(lo) and math.isfinite(hi)) else f"[{lo:.2f}, {hi:.2f}]"


def _warn_resolution(rows: list[dict], draws: list[np.ndarray], meta: dict, params: GeometryParams) -> None:
    """One warning naming the layers below resolution and the fix; one if the subsamples are."""
    below = [r for r in rows if r["resolution"] != RESOLVED]
    if below:
        names = ", ".join(f"{r['layer']} ({r['layer_name']})" for r in below)
        log.warning("%s %s below resolution: %s", "layers" if len(below) > 1 else "layer", names,
                    resolution_advice(below[0], params))
    if draws and not below:
        smallest = return_class_sizes(meta["subject"][draws[0]])[0]
        if smallest < params.resolution_size():
            log.warning("the subsamples keep %d questions of the smallest subject, below the %d that resolve "
                        "it, while the whole sample is above: near the limit their ARI spread overstates the "
                        "uncertainty. Fix: raise geometry.boot_fraction (now %.2f) or data.per_subject",
                        smallest, params.resolution_size(), params.boot_fraction)



def compute_pair_overlaps(knn: dict, refs: list[tuple[str, str, int, dict]], *, model: str, variant: str,
                          shots: int, k: int | None = None, params: GeometryParams | None = None):
    """Data overlap, layer by layer, of one extraction's neighbour lists with each reference, with an
    interval from the subsamples of ``params`` (the geometry jobs' subsamples: same questions, same
    draws; none when params is None or n_boot is 0). k: params.overlap_k unless given.

    refs: (comparison, ref_variant, ref_shots, ref_knn). The two extractions must hold the same
    questions in the same order, with lists long enough for k (and for the subsamples); a mismatch is
    an error, never a silent misalignment."""
    import pandas as pd

    if k is None:
        if params is None:
            raise ValueError("compute_pair_overlaps needs k or params")
        k = params.overlap_k
    k = int(k)
    with_draws = params is not None and params.n_boot > 0
    _check_list_length(knn, refs, k, model, variant, shots, params if with_draws else None)
    draws = _pair_draws(knn, refs, model, variant, shots, params) if with_draws else []
    rows = []
    for comparison, ref_variant, ref_shots, ref in refs:
        _check_aligned(knn, ref, model, f"{variant}/{shots}shot", f"{ref_variant}/{ref_shots}shot")
        for a, layer in enumerate(knn["layer"]):
            ov, used = return_data_overlap(knn["knn"][a], ref["knn"][a], k)
            if used == 0:
                log.warning("layer %d: no points with neighbours in both %s/%sshot and %s/%sshot; overlap NaN",
                            layer, variant, shots, ref_variant, ref_shots)
            boot = [{"overlap": return_data_overlap(return_member_knn(knn["knn"][a], d, k),
                                                   return_member_knn(ref["knn"][a], d, k), k)[0]} for d in draws]
            row = dict(model=model, variant=variant, shots=int(shots), layer=int(layer),
                       layer_name=str(knn["layer_name"][a]), comparison=comparison, ref_variant=ref_variant,
                       ref_shots=int(ref_shots), k=int(k), n_points=used, overlap=ov,
                       overlap_lo=math.nan, overlap_hi=math.nan, n_boot=0)
            if draws:
                fill_intervals(row, boot, params, metric_names(PAIR, interval=True))
            rows.append(row)
    return pd.DataFrame(rows, columns=OVERLAP_COLUMNS)


def _check_list_length(knn: dict, refs: list, k: int, model: str, variant: str, shots: int,
                       params: GeometryParams | None) -> None:
    """Every saved neighbour list holds the k neighbours the overlap needs, and with subsamples
    (``params``) the columns from which each subsample's k nearest members are read."""
    names = [(f"{variant}/{shots}shot", knn)] + [(f"{rv}/{rs}shot", ref) for _, rv, rs, ref in refs]
    need = k if params is None else max(k, boot_graph_k(k, params.boot_fraction, len(knn["question_id"])))
    short = [f"{name} ({lists['knn'].shape[2]})" for name, lists in names if lists["knn"].shape[2] < need]
    if short:
        raise GeometryError(f"{model}: the saved neighbour lists of {', '.join(short)} are shorter than the {need} "
                            f"that overlap_k={k}" + (f" with subsamples of {params.boot_fraction:.0%}"
                                                      if need > k else "") + " needs (saved with other geometry "
                            "settings). Fix: rerun their geometry jobs (snakemake --forcerun geometry)")


def _pair_draws(knn: dict, refs: list, model: str, variant: str, shots: int,
                params: GeometryParams) -> list[np.ndarray]:
    """The geometry jobs' subsamples, drawn from the subjects saved with the neighbour lists."""
    old = [f"{variant}/{shots}shot"] * ("subject" not in knn) + [
        f"{ref_variant}/{ref_shots}shot" for _, ref_variant, ref_shots, ref in refs if "subject" not in ref]
    if old:
        raise GeometryError(f"{model}: the neighbour lists of {', '.join(old)} were saved without subjects (an "
                            "older llmscape), so the subsamples of the intervals cannot be drawn. Fix: rerun "
                            "their geometry jobs (snakemake --forcerun geometry)")
    return draw_members(knn["subject"], params.n_boot, params.boot_fraction, params.seed)


def _check_aligned(knn: dict, ref: dict, model: str, name: str, ref_name: str) -> None:
    """The two extractions hold the same questions in the same order and cover the same layers."""
    if not np.array_equal(knn["question_id"], ref["question_id"]):
        raise GeometryError(
            f"{model}/{name} and {model}/{ref_name} hold different "
            f"questions ({len(knn['question_id'])} vs {len(ref['question_id'])} ids, or another order); "
            "overlaps need the same questions row by row: re-extract both from the same data split")
    if not np.array_equal(knn["layer"], ref["layer"]):
        raise GeometryError(f"{model}: {name} covers layers {knn['layer'].tolist()} and "
                            f"{ref_name} layers {ref['layer'].tolist()}; overlaps pair them "
                            "layer by layer. Fix: rerun the geometry of both on every layer "
                            "(snakemake --forcerun geometry)")
